"""The benchmark set with tokenizers whose vocabularies differ, for the `vocab_union` entry.

The generated models have no tokenizer. This writes, beside them, one folder per model that
links to its shards and adds a `tokenizer.json` (BPE, one token per embedding row): the base's
tokens t0…; ft1, a chat fine-tune, calls its last two ids <|im_start|> and <|im_end|> (added
special tokens) where the base keeps t{V-2} and t{V-1}; ft2 has 100 pairs of ids swapped;
ft3 has the base's tokens. A union then has V + 2 tokens, in an order both tools agree on (the
two chat tokens are ft1's added tokens, taken in id order), so their outputs compare by id.
The shards are links, not copies: the set's page cache and I/O floor are the generated set's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from generate import BenchSet

CHAT = ("<|im_start|>", "<|im_end|>")


def vocab_set(bench_set: BenchSet) -> BenchSet:
    """`bench_set` as folders with tokenizers (made once, beside the set)."""
    vocab = bench_set.shape.vocab_size
    words = [f"t{i}" for i in range(vocab)]
    swapped = list(words)
    for i in range(100):
        a, b = 10 + 2 * i, 11 + 2 * i
        swapped[a], swapped[b] = swapped[b], swapped[a]
    plans = {"base": (words, ()), "ft1": (words[:-2], CHAT), "ft2": (swapped, ()), "ft3": (words, ())}
    models = []
    for model in bench_set.models:
        target = bench_set.root / "vocab" / model.name
        target.mkdir(parents=True, exist_ok=True)
        for f in model.iterdir():
            link = target / f.name
            if f.suffix in (".safetensors", ".json") and not link.exists():
                os.symlink(f.resolve(), link)
        tokens, chat = plans[model.name]
        write_tokenizer(target, tokens, chat)
        models.append(target)
    return dataclasses.replace(bench_set, models=tuple(models))


def write_tokenizer(folder: Path, tokens: list[str], added: tuple[str, ...]) -> None:
    """A BPE tokenizer.json transformers loads as it is (no merges: one token per word)."""
    entries = [{"id": len(tokens) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, t in enumerate(added)]
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": entries, "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []}}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
