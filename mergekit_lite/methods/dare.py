"""DARE (Yu et al., ICML 2024, arXiv 2311.03099): drop random entries of each task vector, rescale.

mᵢ ~ Bernoulli(density) per entry, τ̂ᵢ = mᵢ ⊙ τᵢ / density (`rescale: paper`), or rescaled so
that ‖τ̂ᵢ‖₁ = ‖τᵢ‖₁ (`rescale: l1`, mergekit's choice), or not at all (`rescale: none`). Then
`dare_linear` combines like task arithmetic and `dare_ties` like TIES (sign election).

Reproducibility: model i keeps entry k when u < density, where u is a position-keyed draw
(seed, tensor name, i and the entry's place) (`draws.keep_mask`): the same seed gives the same mask
whatever the traversal order, worker count, device, or whether the engine streams the tensor
in row blocks. With `rescale: paper` or `none` the method is row-local, so big tensors stream
in blocks; `rescale: l1` needs the whole tensor's norms.
"""

from __future__ import annotations

import torch

from .detmath import exact_divisor
from .draws import keep_mask
from .registry import MethodSpec, TensorJob, register
from .sparsify import apply_mask, rescale_l1
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


def drop_and_rescale(job: TensorJob, taus: list[torch.Tensor], densities: tuple[float, ...]) -> list[torch.Tensor]:
    mode = str(job.params.get("rescale", "paper"))
    out = []
    for i, (tau, density) in enumerate(zip(taus, densities, strict=True)):
        if density >= 1:
            out.append(tau)
            continue
        kept = apply_mask(tau, keep_mask(job, i, tau.shape, density, tau.device))
        if mode == "paper":
            kept.div_(exact_divisor(density, kept))
        elif mode == "l1":
            kept = rescale_l1(tau, kept)
        out.append(kept)
    return out


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
    )
)
