"""Patch portability (PortLLM) on MiniLM: does a LoRA trained on the old base still work on an evolved base?

- old base: all-MiniLM-L6-v2.
- evolved base: the old base after continued (full) training on other data — the Reuters R8
  topic fine-tune of the merging experiment (seed 0), so it costs no extra compute.
- patch: a PEFT LoRA (r 8, alpha 16, query/value projections) plus a linear head, trained on
  tweet authorship (Clinton vs Trump) on the old base, 2 epochs of the 384-example subsample.
Rows, all scored on the fixed tweet-author test split: old base + LoRA (the original
personalised model), evolved base alone with the LoRA's head, evolved base + the LoRA ported
by `mergekit_lite.workflows.patch.patch` (training-free), and evolved base + a LoRA retrained
on it (the costly alternative PortLLM avoids).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import cache as qcache
from .encoder import accuracy, features, load_encoder, load_head, mean_pool, save_head, train_classifier
from .tasks import N_TRAIN, batcher, finetune, load_task

TASK = "tweet_author"
EVOLVE_TASK = "reuters_r8"
SEEDS = (0, 1)
LORA_EPOCHS = 2
LORA_LR = 1e-3
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "lora_dropout": 0.0}
OUT = qcache.CACHE / "portability"


def train_lora(base_dir: Path, out_dir: Path, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """LoRA + head on `base_dir` for TASK; saves the PEFT adapter dir and head, returns metrics."""
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        return json.loads(metrics_path.read_text())
    from peft import LoraConfig, get_peft_model

    task = load_task(TASK)
    torch.manual_seed(seed)
    model = load_encoder(qcache.minilm_dir(), base_dir)
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    head = torch.nn.Linear(model.config.hidden_size, len(task.labels))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    t0 = time.time()
    from .data import sample_train

    losses = train_classifier(
        peft_model, head, batcher(), sample_train(task, N_TRAIN, seed), seed=seed, epochs=LORA_EPOCHS, lr=LORA_LR, head_lr=2e-3,
        trainable=trainable, encode=lambda ids, mask: mean_pool(peft_model, ids, mask), log=log,
    )
    seconds = time.time() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir / "adapter"))
    save_head(head, out_dir / "head.safetensors", task.labels)
    merged = peft_model.merge_and_unload()
    feats = features(merged, batcher(), [t for t, _ in task.test])
    metrics = {
        "train_seconds": round(seconds, 1),
        "last_loss": sum(losses[-8:]) / len(losses[-8:]),
        "trainable_params": sum(p.numel() for p in trainable),
        "test_acc": accuracy(head, feats, [y for _, y in task.test]),
    }
    metrics_path.write_text(json.dumps(metrics, indent=1))
    log(f"LoRA on {base_dir.name} seed {seed}: {metrics}")
    return metrics


def test_accuracy(weights: Any, head_path: Path) -> float:
    task = load_task(TASK)
    model = load_encoder(qcache.minilm_dir(), weights)
    feats = features(model, batcher(), [t for t, _ in task.test])
    return accuracy(load_head(head_path), feats, [y for _, y in task.test])


def run(log: Callable[[str], None] = print) -> dict[str, Any]:
    from mergekit_lite.workflows.patch import patch

    old_base = qcache.minilm_dir()
    evolved = finetune(EVOLVE_TASK, 0, log).encoder_dir

    def compute() -> dict[str, Any]:
        rows: dict[str, dict[str, float]] = {}
        for seed in SEEDS:
            old_dir = OUT / f"lora_old_s{seed}"
            new_dir = OUT / f"lora_new_s{seed}"
            old = train_lora(old_base, old_dir, seed, log)
            new = train_lora(evolved, new_dir, seed, log)
            t0 = time.time()
            result = patch(evolved, old_dir / "adapter")
            patch_s = time.time() - t0
            assert result.state_dict is not None
            rows[str(seed)] = {
                "old_base+lora": old["test_acc"],
                "old_base_alone": test_accuracy(old_base, old_dir / "head.safetensors"),
                "new_base_alone": test_accuracy(evolved, old_dir / "head.safetensors"),
                "new_base+ported_patch": test_accuracy(result.state_dict, old_dir / "head.safetensors"),
                "new_base+retrained_lora": new["test_acc"],
                "patched_tensors": len(result.patched),
                "patch_seconds": round(patch_s, 2),
                "retrain_seconds": new["train_seconds"],
            }
            log(f"portability seed {seed}: {rows[str(seed)]}")
        shift = _base_shift(old_base, evolved)
        return {"task": TASK, "evolve_task": EVOLVE_TASK, "lora": LORA, "seeds": list(SEEDS), "per_seed": rows,
                "base_shift": shift}

    return qcache.cached_json(qcache.CACHE / "results" / "portability.json", compute)


def _base_shift(old: Path, new: Path) -> dict[str, float]:
    """‖θ_new − θ_old‖ / ‖θ_old‖ over the LoRA-targeted matrices and over the whole encoder."""
    from safetensors.torch import load_file

    a, b = load_file(str(old / "model.safetensors")), load_file(str(new / "model.safetensors"))
    floats = [k for k in a if a[k].is_floating_point()]
    targeted = [k for k in floats if k.endswith(("query.weight", "value.weight"))]

    def rel(keys: list[str]) -> float:
        num = sum(float((b[k] - a[k]).double().pow(2).sum()) for k in keys)
        den = sum(float(a[k].double().pow(2).sum()) for k in keys)
        return (num / den) ** 0.5

    return {"targeted": rel(targeted), "all": rel(floats)}
