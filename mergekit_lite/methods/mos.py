"""MOS adapter merging (Sun et al., AAAI 2025): each task's adapter leans towards the earlier ones.

MOS trains one small adapter per task on a frozen backbone and, to stop the adapters drifting
apart, pulls each new task's adapter towards the mean of the earlier tasks' adapters:

    A'₀ = A₀,   A'ₜ = (1 − m)·Aₜ + m·mean(A₀ … Aₜ₋₁)          (mode "stored", the reference)
    A'₀ = A₀,   A'ₜ = (1 − m)·Aₜ + m·mean(A'₀ … A'ₜ₋₁)        (mode "sequential")

The rule is elementwise on every parameter (weights and biases), so everything here works on
plain tensors. "stored" is what the reference code's `reweight_adapter` computes from its list of
stored adapters; "sequential" replays the training flow for adapters that were trained
independently. The rule is applied once (the reference re-applies it in place on every
evaluation forward pass, which collapses the stored adapters; see docs/methods/mos.md).

The registered `mos` method is the per-tensor face of the rule for recipe steps: its models are
the tasks in order and its output is the merged adapter of the *last* task. Merging a whole
adapter bank (every task's merged adapter at once) is `mergekit_lite.workflows.mos.mos_merge`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from .detmath import exact_divisor
from .lowrank import truncated_svd
from .registry import MethodSpec, Param, TensorJob, register

MosMode = Literal["stored", "sequential"]
MODES: tuple[str, ...] = ("stored", "sequential")


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")


def mos_stored_tensors(tensors: Sequence[torch.Tensor], momentum: float) -> list[torch.Tensor]:
    """Merged adapters of every task, the mean taken over the *given* earlier adapters.

    A running sum plays the role of the reference code's prefix sums, so T tasks cost O(T)
    tensor operations rather than O(T²).
    """
    _check_momentum(momentum)
    if not tensors:
        return []
    out, running = [tensors[0].clone()], tensors[0].clone()
    for t, a in enumerate(tensors[1:], start=1):
        out.append((1.0 - momentum) * a + momentum * (running / exact_divisor(t, running)))
        running = running + a
    return out


def mos_sequential_tensors(tensors: Sequence[torch.Tensor], momentum: float) -> list[torch.Tensor]:
    """Merged adapters of every task, the mean taken over the earlier *merged* adapters."""
    _check_momentum(momentum)
    if not tensors:
        return []
    out, running = [tensors[0].clone()], tensors[0].clone()
    for t, a in enumerate(tensors[1:], start=1):
        merged = (1.0 - momentum) * a + momentum * (running / exact_divisor(t, running))
        out.append(merged)
        running = running + merged
    return out


def mos_tensors(tensors: Sequence[torch.Tensor], momentum: float, mode: MosMode = "stored") -> list[torch.Tensor]:
    """Dispatch on `mode`; the single entry point the workflows and the method use."""
    if mode == "stored":
        return mos_stored_tensors(tensors, momentum)
    if mode == "sequential":
        return mos_sequential_tensors(tensors, momentum)
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def _merge_dicts(
    adapters: Sequence[Mapping[str, torch.Tensor]], momentum: float, mode: MosMode
) -> list[dict[str, torch.Tensor]]:
    if not adapters:
        return []
    names = list(adapters[0])
    for i, a in enumerate(adapters[1:], start=1):
        if set(a) != set(names):
            missing = sorted(set(names) ^ set(a))
            raise ValueError(f"adapter {i} does not have the same parameters as adapter 0: {missing[0]!r}")
    out: list[dict[str, torch.Tensor]] = [{} for _ in adapters]
    for name in names:
        for t, merged in enumerate(mos_tensors([a[name] for a in adapters], momentum, mode)):
            out[t][name] = merged
    return out


def mos_merge_stored(
    adapters: Sequence[Mapping[str, torch.Tensor]], momentum: float = 0.1
) -> list[dict[str, torch.Tensor]]:
    """MOS "stored" merge of whole adapters (one parameter dict per task, in task order)."""
    return _merge_dicts(adapters, momentum, "stored")


def mos_merge_sequential(
    adapters: Sequence[Mapping[str, torch.Tensor]], momentum: float = 0.1
) -> list[dict[str, torch.Tensor]]:
    """MOS "sequential" merge of whole adapters (one parameter dict per task, in task order)."""
    return _merge_dicts(adapters, momentum, "sequential")


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scale s in ΔW = s·B·A: α/r, or α/√r with rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def refactor_lowrank(
    delta: torch.Tensor, rank: int, scaling: float, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B, A) with scaling·B·A the best rank-`rank` approximation of `delta`.

    The SVD is `methods.lowrank.truncated_svd` (exact for small matrices, seeded randomized SVD
    for large ones), which splits the singular values evenly: B = U·√S / scaling, A = √S·Vᵀ.
    Dividing B by the new adapter's own scale means PEFT reproduces the truncated ΔW. When `rank`
    exceeds what the delta holds (min(out, in), or a zero delta) the extra rank is zero-padded:
    exact, and the factor shapes stay the ones the adapter config promises.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if scaling == 0:
        raise ValueError("scaling must be non-zero")
    low = truncated_svd(delta, rank=rank, seed=seed)
    b = delta.new_zeros(delta.shape[0], rank, dtype=low.b.dtype)
    a = delta.new_zeros(rank, delta.shape[1], dtype=low.a.dtype)
    b[:, : low.rank] = low.b / scaling
    a[: low.rank] = low.a
    return b, a


def _merge_job(job: TensorJob) -> torch.Tensor:
    momentum = float(job.params["momentum"])
    mode = job.params["mode"]
    return mos_tensors(list(job.models), momentum, mode)[-1]


SPEC = register(
    MethodSpec(
        name="mos",
        summary="MOS adapter merge: the last task's adapter pulled towards the earlier tasks' mean.",
        params=(
            Param(
                "momentum",
                "float",
                0.1,
                "weight m of the earlier tasks' mean: A'ₜ = (1 − m)·Aₜ + m·mean(earlier)",
                minimum=0.0,
                maximum=1.0,
            ),
            Param(
                "mode",
                "str",
                "stored",
                "mean over the given earlier adapters (stored, as the reference) or the merged ones",
                choices=MODES,
                per_tensor=False,
            ),
        ),
        merge=_merge_job,
        needs_base=False,
        min_models=1,
        ordered=True,
        paper="https://arxiv.org/abs/2412.09441",
        doc="methods/mos.md",
    )
)
