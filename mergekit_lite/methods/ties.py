"""TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708): trim, elect sign, disjoint merge.

Trim each τᵢ to its top `density` fraction by magnitude, elect a sign per entry from Σ wᵢτ̂ᵢ,
average only the entries that agree with it, then θ = θ₀ + λτₘ.

`scope: tensor` (mergekit's behaviour) trims each tensor on its own. `scope: global` is the
paper's code: the top-k is taken over the whole flattened model, one threshold per model. The
threshold is the exact k-th largest |τᵢ| over every float tensor, found in two streaming passes
(`stats.BracketSelect`: a sample, then a count and a gather around the cut) so no model is ever
held in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RecipeError
from .registry import MethodSpec, Param, Scope, TensorJob, register
from .sparsify import apply_mask, keep_count, magnitude_mask, threshold_mask
from .stats import BracketSelect
from .task_arithmetic import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    add_to_base,
    normalize_param,
    per_model,
    task_vectors,
)

SCOPE = Param(
    "scope",
    "str",
    "tensor",
    "Where the top-k trim is taken: tensor = each tensor on its own (mergekit), "
    "global = over the whole flattened model (the TIES paper's code; needs a statistics pass).",
    choices=("tensor", "global"),
    per_tensor=False,
)


@dataclass(frozen=True)
class GlobalThresholds:
    """What the statistics pass hands to every output job in `scope: global`.

    Per model i: `keep[i]` = int(density_i · total) entries kept over the model, and
    `thresholds[i]` the keep[i]-th largest |τᵢ| (meaningless when keep is 0 or total).
    """

    densities: tuple[float, ...]
    total: int
    keep: tuple[int, ...]
    thresholds: tuple[float, ...]


class GlobalTopK:
    """Reducer: exact per-model k-th largest |τᵢ| over every float tensor of the model."""

    expected_passes = 2  # read by the planner for progress and estimates

    def __init__(self, params: Mapping[str, Any], n_models: int, *, at_least_one: bool = False) -> None:
        if "density" not in params:
            raise RecipeError("ties: with scope: global, density must be the same for every tensor")
        self.densities = per_model(params, "density", n_models)
        self.n_models = n_models
        self.at_least_one = at_least_one  # tensor scope (one tensor's blocks): mergekit's rule

        def ranks(row: int, count: int) -> list[int]:
            k = keep_count(self.densities[row], count, at_least_one=at_least_one)
            # ascending 0-based position of the k-th largest; clamp for the keep-all/none cases
            return [min(max(count - k, 0), max(count - 1, 0))]

        self._select = BracketSelect(n_models, ranks)

    def observe(self, job: TensorJob) -> None:
        for i, tau in enumerate(task_vectors(job, "ties")):
            self._select.observe(i, tau.abs())

    def end_pass(self) -> bool:
        return self._select.end_pass()

    def result(self) -> GlobalThresholds:
        counts = self._select.counts()
        total = int(counts[0]) if counts.numel() else 0
        values = self._select.values()
        return GlobalThresholds(
            densities=self.densities,
            total=total,
            keep=tuple(keep_count(d, total, at_least_one=self.at_least_one) for d in self.densities),
            thresholds=tuple(float(values[i, 0]) for i in range(self.n_models)),
        )


def ties_scope(params: Mapping[str, Any]) -> Scope:
    return "global" if params.get("scope", "tensor") == "global" else "tensor"


def trim(job: TensorJob, taus: list[torch.Tensor], densities: tuple[float, ...]) -> list[torch.Tensor]:
    """τ̂ᵢ = τᵢ · mask, per tensor or with thresholds from a statistics pass.

    Thresholds come from the model-wide pass (scope: global) or, for a tensor the engine
    streams in row blocks, from the same reducer run over that tensor alone (`tensor_reducer`):
    both keep exactly the entries `magnitude_mask` keeps on the whole tensor.
    """
    stats = job.stats
    if stats is None and job.params.get("scope", "tensor") != "global":
        return [apply_mask(t, magnitude_mask(t, d)) for t, d in zip(taus, densities, strict=True)]
    if not isinstance(stats, GlobalThresholds):
        raise RuntimeError(f"ties: no statistics for tensor {job.name}")
    if tuple(densities) != tuple(stats.densities):
        raise RecipeError(
            f"ties: with scope: global, density must be the same for every tensor (tensor {job.name})"
        )
    return [
        apply_mask(t, threshold_mask(t, thr, k, stats.total))
        for t, thr, k in zip(taus, stats.thresholds, stats.keep, strict=True)
    ]


def merge_ties(job: TensorJob) -> torch.Tensor:
    taus = task_vectors(job, "ties")
    n = len(taus)
    trimmed = trim(job, taus, per_model(job.params, "density", n))
    return add_to_base(job, trimmed, elect=True)


SPEC = register(
    MethodSpec(
        name="ties",
        summary="TIES: trim each task vector to its top-density magnitudes, elect signs, disjoint mean.",
        params=(WEIGHT, DENSITY, LAMBDA, normalize_param(True), SCOPE, INT8_MASK),
        merge=merge_ties,
        needs_base=True,
        min_models=1,
        scope=ties_scope,
        reducer=GlobalTopK,
        row_local=lambda params: params.get("scope", "tensor") == "global",
        tensor_reducer=lambda params, n: (
            GlobalTopK(params, n, at_least_one=True) if params.get("scope", "tensor") != "global" else None
        ),
        paper="https://arxiv.org/abs/2306.01708",
        doc="methods/ties.md",
    )
)
