"""Task merging on MiniLM: merge four fine-tuned encoders with every method, score each task.

For each training seed, the four encoders fine-tuned with that seed are merged into one
encoder through `mergekit_lite.api.merge` (in memory: the result comes back as a state dict).
Each method's small hyperparameter grid is scored on the validation splits (mean normalised
accuracy over the tasks); the chosen point is then scored once on the fixed test splits.
Normalised accuracy = merged accuracy / that task's fine-tuned accuracy, as in the TIES and
PCB papers. Every evaluation is cached in `.cache/results/merging_evals_s<seed>.json` (one file
per seed, so seeds can run in separate processes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import cache as qcache
from .encoder import accuracy, features, load_encoder, load_head
from .tasks import SEEDS, TASK_NAMES, batcher, finetune, load_task

Grid = list[dict[str, Any]]

# (label, mlite method, grid). Documented in README.md and docs/results.md.
METHODS: list[tuple[str, str, Grid]] = [
    ("linear", "linear", [{}]),
    ("task_arithmetic", "task_arithmetic", [{"lambda": x} for x in (0.4, 0.8)]),
    ("ties", "ties", [{"density": d, "lambda": 1.0} for d in (0.2, 0.5)]),
    ("dare_ties", "dare_ties", [{"density": 0.5, "lambda": x} for x in (0.4, 0.8)]),
    ("pcb (tensor)", "pcb", [{"scope": "tensor", "ratio": r, "lambda": 1.0} for r in (0.1, 0.3)]),
    ("pcb (global)", "pcb", [{"scope": "global", "ratio": r, "lambda": 1.0} for r in (0.1, 0.3)]),
    ("model_stock", "model_stock", [{}]),
]
RESULTS = qcache.CACHE / "results"


class EvalCache:
    """A JSON dict of finished evaluations, rewritten after each new entry so a crash loses little."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.data:
            self.put(key, compute())
        return self.data[key]

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)
        return value


def evaluate(weights: Path | Mapping[str, torch.Tensor], heads: Mapping[str, Path], split: str) -> dict[str, float]:
    """Accuracy of one encoder on every task's `split`, each task with its own head."""
    model = load_encoder(qcache.minilm_dir(), weights)
    out = {}
    for name, head_path in heads.items():
        task = load_task(name)
        rows = getattr(task, split)
        feats = features(model, batcher(), [t for t, _ in rows])
        out[name] = accuracy(load_head(head_path), feats, [y for _, y in rows])
    return out


def merged_state(method: str, models: list[Path], params: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    from mergekit_lite import api
    from mergekit_lite.methods.registry import get_method

    spec = get_method(method)
    base = qcache.minilm_dir() if spec is None or spec.needs_base else None  # linear averages the fine-tunes
    result = api.merge(method, base=base, models=models, parameters=params, seed=seed)
    assert isinstance(result, dict)
    return result


def run(log: Callable[[str], None] = print, seeds: tuple[int, ...] = SEEDS) -> dict[str, Any]:
    """All seeds, all methods; returns the structure `report.py` renders.

    Each grid point is merged once; the best point's merged encoder stays in memory for the
    test evaluation. A one-point grid skips the validation pass (nothing to choose).
    """
    per_seed: dict[str, Any] = {}
    for seed in seeds:
        evals = EvalCache(RESULTS / f"merging_evals_s{seed}.json")
        fts = {t: finetune(t, seed, log) for t in TASK_NAMES}
        heads = {t: ft.head_path for t, ft in fts.items()}
        models = [fts[t].encoder_dir for t in TASK_NAMES]
        ft_val = {t: fts[t].metrics["val_acc"] for t in TASK_NAMES}
        ft_test = {t: fts[t].metrics["test_acc"] for t in TASK_NAMES}
        base_test = evals.get(f"s{seed}|pretrained|test", lambda h=heads: evaluate(qcache.minilm_dir(), h, "test"))
        rows: dict[str, Any] = {}
        for label, method, grid in METHODS:
            test_key = f"s{seed}|{label}|test"
            if test_key in evals.data:
                rows[label] = evals.data[test_key]
                continue
            best: tuple[float, dict[str, Any], dict[str, torch.Tensor] | None, float] | None = None
            scored = []
            for params in grid:
                t0 = time.time()
                state = merged_state(method, models, params, seed)
                merge_s = time.time() - t0
                if len(grid) == 1:
                    best = (float("nan"), params, state, merge_s)
                    break
                val = evals.get(
                    f"s{seed}|{label}|{json.dumps(params, sort_keys=True)}|val",
                    lambda state=state, h=heads: evaluate(state, h, "val"),
                )
                norm = sum(val[t] / ft_val[t] for t in TASK_NAMES) / len(TASK_NAMES)
                scored.append({"params": params, "val": val, "val_normalised": norm})
                log(f"seed {seed} {label} {params}: val normalised {norm:.3f} (merge {merge_s:.1f}s)")
                if best is None or norm > best[0]:
                    best = (norm, params, state, merge_s)
                else:
                    del state
            assert best is not None
            norm, params, state, merge_s = best
            assert state is not None
            test = evaluate(state, heads, "test")
            rows[label] = evals.put(test_key, {
                "method": method, "params": params, "val_normalised": None if norm != norm else norm,
                "grid": scored, "test": test, "merge_seconds": round(merge_s, 2),
            })
            log(f"seed {seed} {label}: chose {params}, test {test}")
        per_seed[str(seed)] = {"finetuned_test": ft_test, "finetuned_val": ft_val, "pretrained_test": base_test,
                               "methods": rows}
    return {"tasks": list(TASK_NAMES), "seeds": list(seeds), "methods": [m[0] for m in METHODS],
            "grids": {m[0]: m[2] for m in METHODS}, "per_seed": per_seed}
