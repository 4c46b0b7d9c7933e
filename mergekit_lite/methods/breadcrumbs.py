"""Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795): drop outliers and the small tail.

Per task vector and tensor: drop the `gamma` fraction of largest magnitudes (outliers) and as
many of the smallest as needed for `density` to remain, then θ = θ₀ + λ Σ wᵢτ̂ᵢ (no rescaling,
no sign election, no normalisation by default — mergekit's `breadcrumbs`). Drop counts follow
mergekit exactly (see `sparsify.outlier_counts`); ties at either cut are kept.
`breadcrumbs_ties` (mergekit's name) combines the same thinned vectors with TIES' sign election
and disjoint sum instead, still without normalisation by default, as mergekit's does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .registry import MethodSpec, Param, TensorJob, register
from .sparsify import apply_mask, outlier_counts, outlier_mask
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

GAMMA = Param(
    "gamma",
    "float",
    0.01,
    "Fraction of largest-magnitude entries dropped as outliers (reduced when density + gamma > 1).",
    per_model=True,
    minimum=0.0,
    maximum=1.0,
    max_exclusive=True,
)


@dataclass(frozen=True)
class OutlierBounds:
    """Per model, the kept magnitude interval [lo, hi] of a whole tensor, or keep-all/none."""

    lo: tuple[float | None, ...]  # None: no lower cut
    hi: tuple[float | None, ...]  # None: no upper cut
    keep_none: tuple[bool, ...]


class OutlierBoundsReducer:
    """The two order statistics of |τᵢ| that `outlier_mask` uses, over a tensor's row blocks.

    Lets the engine stream a big tensor in blocks: the bounds are found first by exact
    streaming selection (`stats.BracketSelect`), then every block is masked with them, keeping
    exactly what `outlier_mask` keeps on the whole tensor.
    """

    expected_passes = 2

    def __init__(self, params: Mapping[str, Any], n_models: int) -> None:
        self.densities = per_model(params, "density", n_models)
        self.gammas = per_model(params, "gamma", n_models)

        def ranks(row: int, count: int) -> list[int]:
            n_bottom, n_top = outlier_counts(self.densities[row], self.gammas[row], count)
            return [min(n_bottom, max(count - 1, 0)), max(count - n_top - 1, 0)]

        self._select = BracketSelect(n_models, ranks)
        self.n_models = n_models

    def observe(self, job: TensorJob) -> None:
        for i, tau in enumerate(task_vectors(job, "breadcrumbs")):
            self._select.observe(i, tau.abs())

    def end_pass(self) -> bool:
        return self._select.end_pass()

    def result(self) -> OutlierBounds:
        counts = self._select.counts()
        values = self._select.values()
        lo, hi, none = [], [], []
        for i in range(self.n_models):
            count = int(counts[i])
            n_bottom, n_top = outlier_counts(self.densities[i], self.gammas[i], count)
            none.append(n_bottom + n_top >= count)
            lo.append(float(values[i, 0]) if n_bottom > 0 else None)
            hi.append(float(values[i, 1]) if n_top > 0 else None)
        return OutlierBounds(tuple(lo), tuple(hi), tuple(none))


def _bounded_mask(tau: torch.Tensor, bounds: OutlierBounds, i: int) -> torch.Tensor:
    if bounds.keep_none[i]:
        return torch.zeros_like(tau, dtype=torch.bool)
    magnitude = tau.abs()
    keep = torch.ones_like(tau, dtype=torch.bool)
    lo, hi = bounds.lo[i], bounds.hi[i]
    if lo is not None:
        keep &= magnitude >= lo
    if hi is not None:
        keep &= magnitude <= hi
    return keep


def _thinned(job: TensorJob, method: str) -> list[torch.Tensor]:
    """Every τᵢ with its outliers and small tail dropped (per tensor, or by bounds gathered first)."""
    taus = task_vectors(job, method)
    n = len(taus)
    densities = per_model(job.params, "density", n)
    gammas = per_model(job.params, "gamma", n)
    if isinstance(job.stats, OutlierBounds):  # a row block of a big tensor: bounds gathered first
        return [apply_mask(t, _bounded_mask(t, job.stats, i)) for i, t in enumerate(taus)]
    return [apply_mask(t, outlier_mask(t, d, g)) for t, d, g in zip(taus, densities, gammas, strict=True)]


def merge_breadcrumbs(job: TensorJob) -> torch.Tensor:
    return add_to_base(job, _thinned(job, "breadcrumbs"), elect=False)


def merge_breadcrumbs_ties(job: TensorJob) -> torch.Tensor:
    return add_to_base(job, _thinned(job, "breadcrumbs_ties"), elect=True)


def _spec(name: str, summary: str, merge: Callable[[TensorJob], torch.Tensor]) -> MethodSpec:
    """The two variants differ only in how the thinned vectors are combined."""
    return register(MethodSpec(
        name=name, summary=summary, merge=merge,
        params=(WEIGHT, DENSITY, GAMMA, LAMBDA, normalize_param(False), INT8_MASK),
        needs_base=True, min_models=1, paper="https://arxiv.org/abs/2312.06795", doc="methods/breadcrumbs.md",
        tensor_reducer=OutlierBoundsReducer,
    ))


SPEC = _spec("breadcrumbs", "Model Breadcrumbs: drop the largest (gamma) and smallest magnitudes, keep density, add.",
             merge_breadcrumbs)
TIES_SPEC = _spec("breadcrumbs_ties", "Model Breadcrumbs' thinning, then TIES' sign election and disjoint sum "
                  "(mergekit's breadcrumbs_ties).", merge_breadcrumbs_ties)
