"""NuSLERP: mergekit's weighted slerp of two models, or of their task vectors, per tensor or per row.

Two endpoints v₀, v₁: the two models, or with a base their task vectors τᵢ = θᵢ − θ₀ (the
result is then θ₀ + slerp(τ₁, τ₂), so the interpolation runs on the sphere of changes rather
than of weights). The position comes from the per-model weights, t = w₂/(w₁ + w₂) (0.5 when
|w₁ + w₂| < 1e-6), so a recipe reads like a weighted average: `weight: 3` against `weight: 1`
gives t = 1/4, a quarter of the way from the first model to the second.

The vectors interpolated are the whole tensor (`nuslerp_flatten`, the default), or with it off
each vector along the last dimension (a 2-D weight's rows), or with `nuslerp_row_wise` each
vector along dimension 0 (its columns); a 1-D tensor is always one vector. Per vector, with
norms clamped at 1e-7 and cos = v₀·v₁ / (‖v₀‖‖v₁‖) clamped to [−1, 1]:

    result = sin((1−t)θ)/sin θ · v₀ + sin(tθ)/sin θ · v₁,   θ = acos(cos)
    result = (1−t)·v₀ + t·v₁                                 when the two are colinear

mergekit calls them colinear when 1 − cos² ≤ 1e-16 with cos computed in its compute dtype: in
float32 that holds for cos = ±1 exactly and for no other value. Our cosine is a float64 sum,
which for two identical directions lands within 1e-16 of 1 but not always on it, so we say
colinear when the cosine rounds to ±1 in float32 (|cos| ≥ 1 − 2⁻²⁵): the same test mergekit's
float32 arithmetic makes, decided on a more exact cosine. (Both branches agree to ~θ² there, so
the choice only matters exactly at ±1: antipodal vectors, where sin θ = 0.) This is not our
slerp's test (|cos| > 0.9995, which lerps a whole band of near-colinear tensors).

Norms and dots are float64 sums of the exact float64 products, in the fixed order of
`detmath` (per row: `row_sums64`; per tensor: `FlatSum`, as slerp), so the same tensor gives the
same bits whatever the thread count or the row blocks: flattened, a big tensor streams in row
blocks after a pass that takes the three sums over all of them (`SlerpAngle`, with our
endpoints); per row along the last dimension each row is its own vector and the method is
row-local. Along dimension 0 a vector spans every row, and the tensor is held whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import RecipeError
from .detmath import row_sums64
from .registry import MethodSpec, Param, TensorJob, register
from .slerp import SlerpAngle, SlerpSums, float64_sums
from .task_arithmetic import check_shapes

NORM_MIN = 1e-7  # a vector's norm is clamped at this before dividing by it, as in mergekit
WEIGHT_SUM_MIN = 1e-6  # below this |w₁ + w₂| the position is the midpoint, as in mergekit
# The midpoint between 1 and the largest float32 below it: |cos| at or above it rounds to 1 in
# float32, where mergekit's 1 − cos² ≤ 1e-16 holds (and only there).
COLINEAR_COS = 1.0 - 2.0**-25
_VECTORS_PER_SUM = 1 << 20  # entries turned into float64 products at a time

WEIGHT = Param("weight", "float", None, "This model's weight; the position is t = w₂/(w₁ + w₂) (0.5 if they cancel).",
               per_model=True, required=True)
FLATTEN = Param("nuslerp_flatten", "bool", True,
                "Interpolate each tensor as one vector; false: each vector along the last dimension (rows).")
ROW_WISE = Param("nuslerp_row_wise", "bool", False,
                 "With nuslerp_flatten false: vectors along dimension 0 (a weight's columns) instead of rows.")


def interpolation_t(weights: Sequence[float]) -> float:
    """t = w₂/(w₁ + w₂), the midpoint when the weights (nearly) cancel; in float64, as mergekit."""
    w0, w1 = (float(w) for w in weights)
    total = w0 + w1
    return 0.5 if abs(total) < WEIGHT_SUM_MIN else w1 / total


def endpoints(job: TensorJob) -> tuple[torch.Tensor, torch.Tensor]:
    """(v₀, v₁): the two models, or their task vectors when the job has a base (in the models'
    own buffers when they are disposable)."""
    if len(job.models) != 2:
        raise RecipeError(f"nuslerp: needs exactly two models besides the base, got {len(job.models)} "
                          f"(tensor {job.name})")
    v0, v1 = job.models
    if job.base is None:
        check_shapes(job, [v1], v0)
        return v0, v1
    base = job.base
    check_shapes(job, job.models, base)
    if job.models_disposable:
        return v0.sub_(base), v1.sub_(base)
    return v0 - base, v1 - base


def coefficients(t: float, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s₀, s₁) per vector, result = s₀v₀ + s₁v₁, from float64 ‖v₀‖², ‖v₁‖², v₀·v₁ (CPU tensors,
    so the angle's maths is the same float64 code on any device)."""
    na, nb = aa.sqrt().clamp(min=NORM_MIN), bb.sqrt().clamp(min=NORM_MIN)
    cos = (ab / (na * nb)).clamp(-1.0, 1.0)
    colinear = cos.abs() >= COLINEAR_COS
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.where(colinear, 1.0, torch.sin(theta))  # the spherical branch is dropped there
    s0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin)
    s1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    return s0, s1


def vector_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """‖a‖², ‖b‖², a·b of each row of two [vectors, length] tensors, on the CPU: float64 sums of
    the exact float64 products, a bounded group of rows at a time (no float64 copy of a whole
    tensor). A row's bits depend on that row alone (`row_sums64`), so row blocks give the whole
    tensor's sums."""
    step = max(1, _VECTORS_PER_SUM // max(1, a.shape[1]))
    parts: tuple[list[torch.Tensor], ...] = ([], [], [])
    for start in range(0, a.shape[0], step):
        x, y = a[start : start + step].to(torch.float64), b[start : start + step].to(torch.float64)
        for acc, prod in zip(parts, (x * x, y * y, x * y), strict=True):
            acc.append(row_sums64(prod).cpu())
    empty = torch.zeros(0, dtype=torch.float64)
    aa, bb, ab = (torch.cat(p) if p else empty for p in parts)
    return aa, bb, ab


def _as_vectors(v: torch.Tensor, row_wise: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    """v as [vectors, length] (a view where the layout allows) and the shape that lays one
    coefficient per vector over v."""
    if row_wise:  # vectors along dim 0, one per index of the other dims
        return v.movedim(0, -1).reshape(math.prod(v.shape[1:]), v.shape[0]), (1, *v.shape[1:])
    return v.reshape(math.prod(v.shape[:-1]), v.shape[-1]), (*v.shape[:-1], 1)


def _scalar(x: float) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float64)


def merge_nuslerp(job: TensorJob) -> torch.Tensor:
    """s₀v₀ + s₁v₁ (+ θ₀), in the endpoints' buffers where they are ours to overwrite (task
    vectors always are; the models when the engine hands them over)."""
    v0, v1 = endpoints(job)
    t = interpolation_t(job.params["weight"])
    s0: torch.Tensor | float
    s1: torch.Tensor | float
    if job.params["nuslerp_flatten"] or v0.dim() <= 1:
        if isinstance(job.stats, SlerpSums):  # a row block: the sums over the whole tensor
            sums = job.stats
        elif job.rows is None:
            sums = float64_sums(v0, v1)
        else:
            raise RuntimeError(f"nuslerp: no angle for a row block of tensor {job.name}")
        c0, c1 = coefficients(t, _scalar(sums.aa), _scalar(sums.bb), _scalar(sums.ab))
        s0, s1 = float(c0), float(c1)
    else:
        row_wise = bool(job.params["nuslerp_row_wise"])
        (a, shape), (b, _) = _as_vectors(v0, row_wise), _as_vectors(v1, row_wise)
        c0, c1 = coefficients(t, *vector_sums(a, b))
        s0, s1 = (c.to(device=v0.device, dtype=v0.dtype).view(shape) for c in (c0, c1))
    own = job.models_disposable or job.base is not None
    out = v0.mul_(s0) if own else v0 * s0
    out += v1.mul_(s1) if own else v1 * s1
    if job.base is not None:
        out += job.base
    return out


def _row_local(params: Mapping[str, Any]) -> bool:
    return not params.get("nuslerp_flatten", True) and not params.get("nuslerp_row_wise", False)


def _tensor_reducer(params: Mapping[str, Any], n_models: int) -> SlerpAngle | None:
    return SlerpAngle(endpoints) if params.get("nuslerp_flatten", True) else None


SPEC = register(
    MethodSpec(
        name="nuslerp",
        summary="mergekit's NuSLERP: slerp of two models (or their task vectors) at t = w₂/(w₁+w₂), per tensor or row.",
        params=(WEIGHT, FLATTEN, ROW_WISE),
        merge=merge_nuslerp,
        needs_base=False,
        optional_base=True,
        min_models=2,
        max_models=2,
        row_local=_row_local,
        tensor_reducer=_tensor_reducer,
        paper="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/nuslerp.py",
        doc="methods/nuslerp.md",
    )
)
