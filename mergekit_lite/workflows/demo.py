"""`mlite demo`: synthetic models plus every example recipe, run end to end.

A new user (and CI) can see the whole product work without downloading anything: a small
Llama-style base, two fine-tunes, a LoRA adapter and a probe are generated, the example
recipes shipped with the package are copied beside them and each is run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UsageError
from ..synthetic import LlamaShape, build_model_set

DEMO_SHAPE = LlamaShape(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class DemoRun:
    recipe: str
    output: Path | None
    seconds: float
    tensors: int


def example_recipes() -> list[tuple[str, str]]:
    """(file name, YAML text) of every example recipe shipped with the package."""
    root = resources.files("mergekit_lite.examples")
    return sorted((p.name, p.read_text()) for p in root.iterdir() if p.name.endswith(".yaml"))


def build_demo_models(folder: Path) -> Path:
    """Write models/{base,ft1,ft2,lora} and models/probe.safetensors under `folder`, each model
    with a tokenizer.json. ft2's tokenizer, like a chat fine-tune that took over two reserved
    tokens, names its last two ids <|im_start|> and <|im_end|>: merged by id that changes
    nothing, and recipes/mergekit_vocab_union.yaml lines the rows up by token."""
    models = folder / "models"
    if models.exists():
        shutil.rmtree(models)
    ms = build_model_set(models, shape=DEMO_SHAPE, n_finetunes=2, num_shards=2, dtype=torch.bfloat16)
    words = [f"<reserved_{i}>" if i >= DEMO_SHAPE.vocab_size - 2 else f"w{i}" for i in range(DEMO_SHAPE.vocab_size)]
    for path in (ms.base, ms.finetunes[0]):
        demo_tokenizer(path, words)
    demo_tokenizer(ms.finetunes[1], [*words[:-2], "<|im_start|>", "<|im_end|>"])
    g = torch.Generator().manual_seed(7)
    save_file({"weight": torch.randn(2, DEMO_SHAPE.hidden_size, generator=g)}, str(models / "probe.safetensors"))
    return models


def demo_tokenizer(path: Path, words: list[str]) -> None:
    """A word-level tokenizer.json over `words` (ids in order), with the last two as special
    added tokens, and the tokenizer_config.json transformers reads it with."""
    added = [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, w in enumerate(words) if i >= len(words) - 2]
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": words[0]}}
    (path / "tokenizer.json").write_text(json.dumps(data))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128,
        "added_tokens_decoder": {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in added}}))


def run_demo(folder: str | Path, *, report: Callable[[str], None] = print) -> list[DemoRun]:
    """Build the demo models in `folder`, copy the example recipes there and run each."""
    from ..api import run_recipe
    from ..recipe.model import load_recipe

    root = Path(folder).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root}: exists and is not a directory; give --dir a new or existing directory")
    root.mkdir(parents=True, exist_ok=True)
    report(f"building synthetic models ({DEMO_SHAPE.num_parameters():,} parameters each) in {root / 'models'}")
    build_demo_models(root)
    runs = []
    for name, text in example_recipes():
        path = root / name
        path.write_text(text)
        recipe = load_recipe(path)
        out = None if recipe.output.path else root / "out" / path.stem  # mergekit-shape recipes name no output
        t0 = time.perf_counter()
        result = run_recipe(recipe, out=out, force=True)
        dt = time.perf_counter() - t0
        runs.append(DemoRun(name, result.output, dt, result.tensors))
        report(f"ran {name}: {result.tensors} tensors -> {result.output} ({dt:.2f} s)")
    return runs
