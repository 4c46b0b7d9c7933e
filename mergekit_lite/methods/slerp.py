"""Spherical linear interpolation between two models, per tensor (Shoemake 1985; mergekit's slerp).

Each tensor is treated as one flat vector. With unit directions u₀, u₁ and cos Ω = u₀·u₁:
θ = sin((1−t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁, on the original (unnormalised) tensors, and
plain lerp (1−t)v₀ + t·v₁ when |cos Ω| > 0.9995 (nearly colinear: the sines vanish). A vector of
norm ≤ 1e-8 is left unnormalised, as mergekit does. Norms and the dot product are accumulated in
float64, chunk by chunk (a 100M-entry float32 dot loses digits that decide the colinear test).

Endpoints: with one model, v₀ = base and v₁ = the model (mergekit's `base_model` + one model);
with two models, v₀ = models[0] and v₁ = models[1] and no base is used. t = 0 gives v₀.
"""

from __future__ import annotations

import math

import torch

from ..errors import RecipeError
from .detmath import fixed_order_sum
from .registry import MethodSpec, Param, TensorJob, register
from .task_arithmetic import check_shapes

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8

T = Param("t", "float", 0.5, "Interpolation position: 0 = first endpoint, 1 = second.", minimum=0.0, maximum=1.0)


def endpoints(job: TensorJob) -> tuple[torch.Tensor, torch.Tensor]:
    if len(job.models) == 2:
        v0, v1 = job.models
    elif len(job.models) == 1:
        if job.base is None:
            raise RecipeError(f"slerp: one model given and no base to interpolate from (tensor {job.name})")
        v0, v1 = job.base, job.models[0]
    else:
        raise RecipeError(f"slerp: needs exactly two endpoints, got {len(job.models)} models")
    check_shapes(job, [v1], v0)
    return v0, v1


# Entries per float64 chunk of the norm and dot sums: the sums never need float64 copies of
# whole tensors (an embedding's would be twice its float32 size, twice over).
SUM_CHUNK = 1 << 20


def _float64_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """‖a‖², ‖b‖², a·b accumulated in float64, chunk by chunk of the flattened tensors, each
    chunk's sum in a fixed order (`fixed_order_sum`; a BLAS dot product's order follows the
    thread count), so the same shape always gives the same bits."""
    a, b = a.reshape(-1), b.reshape(-1)
    aa = bb = ab = 0.0
    for start in range(0, a.numel(), SUM_CHUNK):
        x = a[start : start + SUM_CHUNK].to(torch.float64)
        y = b[start : start + SUM_CHUNK].to(torch.float64)
        aa += fixed_order_sum(x * x)
        bb += fixed_order_sum(y * y)
        ab += fixed_order_sum(x * y)
    return aa, bb, ab


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """(s₀, s₁) with result = s₀v₀ + s₁v₁."""
    aa, bb, ab = _float64_sums(v0, v1)
    na, nb = math.sqrt(aa), math.sqrt(bb)
    dot = ab / ((na if na > NORM_EPS else 1.0) * (nb if nb > NORM_EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, dot)))
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def merge_slerp(job: TensorJob) -> torch.Tensor:
    """s₀v₀ + s₁v₁, computed in the models' own buffers when the engine hands them over.

    The same three roundings (s₀v₀, s₁v₁, their sum) either way, so the same bits; in place,
    a big tensor needs no float32 temporaries beyond its two endpoints.
    """
    v0, v1 = endpoints(job)
    s0, s1 = slerp_coefficients(float(job.params["t"]), v0, v1)
    own = job.models_disposable
    out = v0.mul_(s0) if own and len(job.models) == 2 else v0 * s0
    out += v1.mul_(s1) if own else v1 * s1
    return out


SPEC = register(
    MethodSpec(
        name="slerp",
        summary="Spherical interpolation between two endpoints per tensor; lerp when nearly colinear.",
        params=(T,),
        merge=merge_slerp,
        needs_base=False,
        min_models=1,
        max_models=2,
        min_inputs=2,
        ordered=True,
        paper="https://dl.acm.org/doi/10.1145/325165.325242",
        doc="methods/slerp.md",
    )
)
