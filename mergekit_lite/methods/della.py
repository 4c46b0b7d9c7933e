"""DELLA-Merging (Deep et al., arXiv 2406.11617): magnitude-ranked random drop, then TIES.

MagPrune: within each row, entry keep probabilities rise linearly with the magnitude rank from
density − ε (smallest) to density + ε (largest) (`sparsify.della_probabilities`; the rank sorts
of all models run as one batch); kept entries are rescaled by 1/pᵢ, their own keep probability
(`rescale: paper`, default), or to the task
vector's L1 norm (`rescale: l1`, what mergekit does), or not at all. Then `della` elects signs
and takes the disjoint mean like TIES; `della_linear` adds like task arithmetic.
Draws are position-keyed (seed, tensor name, model, entry), like DARE; probabilities
depend only on the entry's row, so with `rescale: paper`/`none` big tensors stream in row blocks.
With `rescale: l1` a big tensor is read twice in blocks: once to sum its L1 norms
(`sparsify.L1NormSums`), once for the output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ..errors import RecipeError
from .draws import keep_mask
from .registry import MethodSpec, Param, TensorJob, register
from .sparsify import L1NormSums, apply_mask, della_probabilities_many, l1_norms, rescale_l1
from .task_arithmetic import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    RESCALE,
    WEIGHT,
    add_to_base,
    normalize_param,
    per_model,
    row_local_unless_l1,
    task_vectors,
)

EPSILON = Param(
    "epsilon",
    "float",
    0.15,
    "Half-width of the keep-probability range density ± epsilon (needs 0 < density − ε, density + ε ≤ 1).",
    per_model=True,
    minimum=0.0,
    maximum=0.5,
)


def _out_of_range(params: Mapping[str, Any], n: int) -> tuple[int, float, float] | None:
    """(model, density, epsilon) of the first pruned model whose density ± epsilon leaves (0, 1]."""
    densities = per_model(params, "density", n)
    epsilons = per_model(params, "epsilon", n)
    for i, (d, e) in enumerate(zip(densities, epsilons, strict=True)):
        if d < 1 and (d - e <= 0 or d + e > 1):
            return i + 1, d, e
    return None


def probability_range_problem(params: Mapping[str, Any], n: int) -> str | None:
    """The plan's check of every tensor before a run (`MethodSpec.check`); `magprune` checks
    again, for jobs built by hand."""
    bad = _out_of_range(params, n)
    return None if bad is None else f"model {bad[0]}: {_RANGE_RULE} (density {bad[1]:g}, epsilon {bad[2]:g})"


_RANGE_RULE = "density ± epsilon must lie in (0, 1]"


def magprune(job: TensorJob, taus: list[torch.Tensor], method: str) -> list[torch.Tensor]:
    n = len(taus)
    densities = per_model(job.params, "density", n)
    epsilons = per_model(job.params, "epsilon", n)
    mode = str(job.params.get("rescale", "paper"))
    pruned = [i for i, density in enumerate(densities) if density < 1]
    bad = _out_of_range(job.params, n)
    if bad is not None:
        raise RecipeError(f"{method}: model {bad[0]}, tensor {job.name}: {_RANGE_RULE} "
                          f"(density {bad[1]:g}, epsilon {bad[2]:g})")
    probabilities = dict(zip(pruned, della_probabilities_many(
        [taus[i] for i in pruned], [densities[i] for i in pruned], [epsilons[i] for i in pruned]
    ), strict=True))
    out = []
    for i, tau in enumerate(taus):
        if i not in probabilities:
            out.append(tau)
            continue
        probs = probabilities.pop(i)  # dropped as soon as used: one model's probabilities at a time
        kept = apply_mask(tau, keep_mask(job, i, tau.shape, probs, tau.device))
        if mode == "paper":
            kept.div_(probs.to(tau.dtype))
        elif mode == "l1":
            kept = rescale_l1(tau, kept, norms=l1_norms(job, i))
        out.append(kept)
    return out


def _thinned(job: TensorJob) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(τᵢ, its surviving entries unscaled) per model, for the `rescale: l1` norms of a row block."""
    unscaled = {**dict(job.params), "rescale": "none"}
    taus = task_vectors(job, "della")
    kept = magprune(replace(job, params=unscaled), taus, "della")
    densities = per_model(job.params, "density", len(taus))
    return [(tau, k if d < 1 else None) for tau, k, d in zip(taus, kept, densities, strict=True)]


def l1_reducer(params: Mapping[str, Any], n_models: int) -> L1NormSums | None:
    """With `rescale: l1`, the norms of a big tensor's blocks (`MethodSpec.tensor_reducer`)."""
    return L1NormSums(n_models, _thinned) if params.get("rescale", "paper") == "l1" else None


def _merge(job: TensorJob, *, elect: bool, method: str) -> torch.Tensor:
    taus = task_vectors(job, method)
    thinned = magprune(job, taus, method)
    return add_to_base(job, thinned, elect=elect)


def merge_della(job: TensorJob) -> torch.Tensor:
    return _merge(job, elect=True, method="della")


def merge_della_linear(job: TensorJob) -> torch.Tensor:
    return _merge(job, elect=False, method="della_linear")


SPEC = register(
    MethodSpec(
        name="della",
        summary="DELLA: magnitude-rank keep probabilities density ± epsilon, rescale, TIES election.",
        params=(WEIGHT, DENSITY, EPSILON, LAMBDA, normalize_param(True), RESCALE, INT8_MASK),
        merge=merge_della,
        needs_base=True,
        min_models=1,
        paper="https://arxiv.org/abs/2406.11617",
        doc="methods/della.md",
        row_local=row_local_unless_l1,
        tensor_reducer=l1_reducer,
        check=probability_range_problem,
    )
)

LINEAR_SPEC = register(
    MethodSpec(
        name="della_linear",
        summary="DELLA without sign election: magnitude-rank random drop, rescale, task arithmetic.",
        params=(WEIGHT, DENSITY, EPSILON, LAMBDA, normalize_param(False), RESCALE, INT8_MASK),
        merge=merge_della_linear,
        needs_base=True,
        min_models=1,
        paper="https://arxiv.org/abs/2406.11617",
        doc="methods/della.md",
        row_local=row_local_unless_l1,
        tensor_reducer=l1_reducer,
        check=probability_range_problem,
    )
)
