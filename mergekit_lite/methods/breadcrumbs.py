"""Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795): drop outliers and the small tail.

Per task vector and tensor: drop the `gamma` fraction of largest magnitudes (outliers) and as
many of the smallest as needed for `density` to remain, then θ = θ₀ + λ Σ wᵢτ̂ᵢ (no rescaling,
no sign election, no normalisation by default — mergekit's `breadcrumbs`). Drop counts follow
mergekit exactly (see `sparsify.outlier_counts`); ties at either cut are kept.
"""

from __future__ import annotations

import torch

from .registry import MethodSpec, Param, TensorJob, register
from .sparsify import outlier_mask
from .task_arithmetic import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    combine,
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


def merge_breadcrumbs(job: TensorJob) -> torch.Tensor:
    taus = task_vectors(job, "breadcrumbs")
    n = len(taus)
    densities = per_model(job.params, "density", n)
    gammas = per_model(job.params, "gamma", n)
    thinned = [t * outlier_mask(t, d, g) for t, d, g in zip(taus, densities, gammas, strict=True)]
    mixed = combine(
        thinned,
        per_model(job.params, "weight", n),
        elect=False,
        normalize=bool(job.params["normalize"]),
        lam=float(job.params["lambda"]),
    )
    return job.base + mixed  # type: ignore[operator]


SPEC = register(
    MethodSpec(
        name="breadcrumbs",
        summary="Model Breadcrumbs: drop the largest (gamma) and smallest magnitudes, keep density, add.",
        params=(WEIGHT, DENSITY, GAMMA, LAMBDA, normalize_param(False), INT8_MASK),
        merge=merge_breadcrumbs,
        needs_base=True,
        min_models=1,
        paper="https://arxiv.org/abs/2312.06795",
        doc="methods/breadcrumbs.md",
    )
)
