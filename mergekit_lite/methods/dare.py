"""DARE (Yu et al., ICML 2024, arXiv 2311.03099): drop random entries of each task vector, rescale.

mᵢ ~ Bernoulli(density) per entry, τ̂ᵢ = mᵢ ⊙ τᵢ / density (`rescale: paper`), or rescaled so
that ‖τ̂ᵢ‖₁ = ‖τᵢ‖₁ (`rescale: l1`, mergekit's choice), or not at all (`rescale: none`). Then
`dare_linear` combines like task arithmetic and `dare_ties` like TIES (sign election).

Reproducibility: model i keeps entry k when u < density, where u is a position-keyed draw
(seed, tensor name, i and the entry's place) (`draws.keep_mask`): the same seed gives the same mask
whatever the traversal order, worker count, device, or whether the engine streams the tensor
in row blocks. With `rescale: paper` or `none` the method is row-local, so big tensors stream
in blocks; `rescale: l1` needs the whole tensor's norms, so a big tensor is read twice in
blocks: once to sum them (`sparsify.L1NormSums`), once for the output.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .detmath import exact_divisor
from .draws import keep_mask
from .registry import MethodSpec, TensorJob, register
from .sparsify import L1NormSums, apply_mask, l1_norms, rescale_l1
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


def drop(job: TensorJob, taus: list[torch.Tensor], densities: tuple[float, ...]) -> Iterator[torch.Tensor | None]:
    """Each task vector with its dropped entries zeroed, unscaled; None for density ≥ 1 (no drop)."""
    for i, (tau, density) in enumerate(zip(taus, densities, strict=True)):
        yield None if density >= 1 else apply_mask(tau, keep_mask(job, i, tau.shape, density, tau.device))


def drop_and_rescale(job: TensorJob, taus: list[torch.Tensor], densities: tuple[float, ...]) -> list[torch.Tensor]:
    mode = str(job.params.get("rescale", "paper"))
    out = []
    for i, (tau, kept, density) in enumerate(zip(taus, drop(job, taus, densities), densities, strict=True)):
        if kept is None:
            out.append(tau)
            continue
        if mode == "paper":
            kept.div_(exact_divisor(density, kept))
        elif mode == "l1":
            kept = rescale_l1(tau, kept, norms=l1_norms(job, i))
        out.append(kept)
    return out


def _thinned(job: TensorJob) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    taus = task_vectors(job, "dare")
    return zip(taus, drop(job, taus, per_model(job.params, "density", len(taus))), strict=True)


def l1_reducer(params: Mapping[str, Any], n_models: int) -> L1NormSums | None:
    """With `rescale: l1`, the norms of a big tensor's blocks (`MethodSpec.tensor_reducer`)."""
    return L1NormSums(n_models, _thinned) if params.get("rescale", "paper") == "l1" else None


def _merge(job: TensorJob, *, elect: bool, method: str) -> torch.Tensor:
    taus = task_vectors(job, method)
    n = len(taus)
    thinned = drop_and_rescale(job, taus, per_model(job.params, "density", n))
    return add_to_base(job, thinned, elect=elect)


def merge_dare_linear(job: TensorJob) -> torch.Tensor:
    return _merge(job, elect=False, method="dare_linear")


def merge_dare_ties(job: TensorJob) -> torch.Tensor:
    return _merge(job, elect=True, method="dare_ties")


PARAMS = (WEIGHT, DENSITY, LAMBDA, normalize_param(False), RESCALE, INT8_MASK)

LINEAR_SPEC = register(
    MethodSpec(
        name="dare_linear",
        summary="DARE: random drop (keep prob. density) and rescale, then task arithmetic.",
        params=PARAMS,
        merge=merge_dare_linear,
        needs_base=True,
        min_models=1,
        paper="https://arxiv.org/abs/2311.03099",
        doc="methods/dare.md",
        row_local=row_local_unless_l1,
        tensor_reducer=l1_reducer,
    )
)

TIES_SPEC = register(
    MethodSpec(
        name="dare_ties",
        summary="DARE: random drop (keep prob. density) and rescale, then TIES sign election.",
        params=PARAMS,
        merge=merge_dare_ties,
        needs_base=True,
        min_models=1,
        paper="https://arxiv.org/abs/2311.03099",
        doc="methods/dare.md",
        row_local=row_local_unless_l1,
        tensor_reducer=l1_reducer,
    )
)
