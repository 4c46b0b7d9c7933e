"""The benchmark's merges, written once as method + parameters and rendered for both tools.

The same parameters go to mlite (its native `inputs`/`steps` shape) and to mergekit (its
single-step `merge_method` shape), so both compute the same merge: the parameters are given
once for all models (top-level `parameters` in mergekit), and both produce bfloat16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class BenchMethod:
    """One benchmarked merge: the method names in each tool and the shared parameters."""

    key: str  # the name on the command line and in the table
    mlite_method: str
    mergekit_method: str | None  # None: mergekit has no equivalent
    parameters: dict[str, Any] = field(default_factory=dict)
    uses_base: bool = True
    random: bool = False  # seeded: the two tools' outputs differ by design
    n_models: int = 3  # fine-tunes merged (the first n); fewer than 3 read less than the I/O floor's inputs
    # a layer stack (mergekit's `slices:`, one source per slice): (fine-tune number, first, end)
    # with first and end as fractions of the models' layers; both tools read the mergekit shape
    stack: tuple[tuple[int, float, float], ...] = ()
    # mergekit's tokenizer_source: the models with differing tokenizers (bench_vocab.py), both
    # tools reading the mergekit shape
    tokenizer_source: str | None = None

    @property
    def inputs(self) -> int:
        return self.n_models + (1 if self.uses_base else 0)


METHODS: dict[str, BenchMethod] = {
    m.key: m
    for m in (
        BenchMethod("linear", "linear", "linear", {"weight": 1.0}, uses_base=False),
        BenchMethod("task_arithmetic", "task_arithmetic", "task_arithmetic", {"weight": 0.3}),
        BenchMethod("ties", "ties", "ties", {"density": 0.5, "weight": 0.3}),
        BenchMethod("dare_ties", "dare_ties", "dare_ties", {"density": 0.5, "weight": 0.3}, random=True),
        BenchMethod("breadcrumbs", "breadcrumbs", "breadcrumbs", {"density": 0.9, "gamma": 0.01, "weight": 0.3}),
        BenchMethod("della", "della", "della", {"density": 0.5, "epsilon": 0.1, "weight": 0.3}, random=True),
        BenchMethod("pcb_tensor", "pcb", None, {"ratio": 0.1, "clamp_ratio": 0.01, "scope": "tensor"}),
        BenchMethod("pcb_global", "pcb", None, {"ratio": 0.1, "clamp_ratio": 0.01, "scope": "global"}),
        # mergekit's other methods (no targets in the performance issue: measured against mergekit)
        BenchMethod("sce", "sce", "sce", {"select_topk": 0.5}),
        BenchMethod("multislerp", "multislerp", "multislerp", {"weight": 1.0}),
        BenchMethod("karcher", "karcher", "karcher", {}, uses_base=False),
        BenchMethod("nuslerp", "nuslerp", "nuslerp", {"weight": 1.0}, uses_base=False, n_models=2),
        BenchMethod("ram", "ram", "ram", {}),
        BenchMethod("ramplus_tl", "ramplus_tl", "ramplus_tl", {}),
        BenchMethod("nearswap", "nearswap", "nearswap", {"t": 0.001}, n_models=1),
        BenchMethod("arcee_fusion", "arcee_fusion", "arcee_fusion", {}, n_models=1),
        BenchMethod("passthrough", "passthrough", "passthrough", {}, uses_base=False, n_models=1),
        # a frankenmerge: the first 3/4 of ft1's layers, then the last 3/4 of ft2's (1.5× the layers)
        BenchMethod("frankenmerge", "passthrough", "passthrough", {}, uses_base=False, n_models=2,
                    stack=((1, 0.0, 0.75), (2, 0.25, 1.0))),
        # task arithmetic over models whose tokenizers differ: rows lined up by token into a union
        BenchMethod("vocab_union", "task_arithmetic", "task_arithmetic", {"weight": 0.3}, tokenizer_source="union"),
    )
}

SEED = 0


def mlite_recipe(method: BenchMethod, base: Path, finetunes: list[Path], out: Path) -> dict[str, Any]:
    """mlite's native shape: named inputs, one step, bf16 output (a layer stack: mergekit's shape)."""
    if method.stack or method.tokenizer_source:
        return {**mergekit_recipe(method, base, finetunes), "seed": SEED, "output": {"path": str(out)}}
    inputs = {"base": str(base)} if method.uses_base else {}
    names = []
    for i, ft in enumerate(finetunes[: method.n_models], 1):
        inputs[f"ft{i}"] = str(ft)
        names.append(f"ft{i}")
    step: dict[str, Any] = {"id": method.key, "method": method.mlite_method}
    if method.uses_base:
        step["base"] = "base"
    step["models"] = names
    step["parameters"] = dict(method.parameters)
    return {
        "inputs": inputs,
        "steps": [step],
        "seed": SEED,
        "output": {"path": str(out), "dtype": "bfloat16"},
    }


def mergekit_recipe(method: BenchMethod, base: Path, finetunes: list[Path]) -> dict[str, Any]:
    """mergekit's configuration for the same merge (output path is mergekit-yaml's argument)."""
    if method.mergekit_method is None:
        raise ValueError(f"mergekit has no {method.key}")
    cfg: dict[str, Any] = {"merge_method": method.mergekit_method}
    if method.uses_base:
        cfg["base_model"] = str(base)
    if method.stack:
        layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
        cfg["slices"] = [{"sources": [{"model": str(finetunes[i - 1]),
                                       "layer_range": [round(first * layers), round(end * layers)]}]}
                         for i, first, end in method.stack]
    else:
        cfg["models"] = [{"model": str(ft)} for ft in finetunes[: method.n_models]]
    cfg["parameters"] = dict(method.parameters)
    cfg["dtype"] = "bfloat16"
    if method.tokenizer_source:
        cfg["tokenizer_source"] = method.tokenizer_source
    return cfg


def write_yaml(data: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
