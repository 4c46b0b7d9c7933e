"""Spherical linear interpolation between two models, per tensor (Shoemake 1985; mergekit's slerp).

Each tensor is treated as one flat vector. With unit directions u₀, u₁ and cos Ω = u₀·u₁:
θ = sin((1−t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁, on the original (unnormalised) tensors, and
plain lerp (1−t)v₀ + t·v₁ when |cos Ω| > 0.9995 (nearly colinear: the sines vanish). A vector of
norm ≤ 1e-8 is left unnormalised, as mergekit does. Norms and the dot product are float64 sums
of float64 products (a 100M-entry float32 dot loses digits that decide the colinear test), in
the fixed order of `detmath.fixed_order_sum`, so the same tensor gives the same bits whether it
is held whole or streamed: a tensor too big to hold whole at little cost (an embedding) is read
twice in row blocks, once for the three sums (`SlerpAngle`, the method's `tensor_reducer`) and
once to write its blocks.

Endpoints: with one model, v₀ = base and v₁ = the model (mergekit's `base_model` + one model);
with two models, v₀ = models[0] and v₁ = models[1] and no base is used. t = 0 gives v₀.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import RecipeError
from .detmath import FlatSum, flat_pieces
from .registry import BlockOrder, MethodSpec, Param, TensorJob, register
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


@dataclass(frozen=True)
class SlerpSums:
    """‖v₀‖², ‖v₁‖² and v₀·v₁ over one whole tensor: all its angle depends on."""

    aa: float
    bb: float
    ab: float


class SlerpAngle:
    """Reducer over the row blocks of one tensor (in order): its `SlerpSums`, with the bits
    `float64_sums` gives on the whole tensor. `ends` picks the two vectors from a job (nuslerp
    passes its own: the task vectors when there is a base)."""

    def __init__(self, ends: Callable[[TensorJob], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self._sums = (FlatSum(), FlatSum(), FlatSum())
        self._order = BlockOrder()
        self._ends = ends if ends is not None else endpoints

    def observe(self, job: TensorJob) -> None:
        self._order.check(job)
        _add_products(self._sums, *self._ends(job))

    def end_pass(self) -> bool:
        return True

    def result(self) -> SlerpSums:
        return SlerpSums(*(s.total() for s in self._sums))


def _add_products(sums: tuple[FlatSum, FlatSum, FlatSum], a: torch.Tensor, b: torch.Tensor) -> None:
    """The float64 products, a bounded piece at a time: no float64 copy of a whole tensor (an
    embedding's would be twice its float32 size, twice over)."""
    for pa, pb in flat_pieces(a, b):
        x, y = pa.to(torch.float64), pb.to(torch.float64)
        sums[0].add(x * x)  # float32 × float32 is exact in float64: only the sums round
        sums[1].add(y * y)
        sums[2].add(x * y)


def float64_sums(a: torch.Tensor, b: torch.Tensor) -> SlerpSums:
    """‖a‖², ‖b‖², a·b as `fixed_order_sum`s of the float64 products (a BLAS dot product's
    order follows the thread count), so the same tensor always gives the same bits."""
    sums = (FlatSum(), FlatSum(), FlatSum())
    _add_products(sums, a, b)
    return SlerpSums(*(s.total() for s in sums))


def coefficients_from_sums(t: float, sums: SlerpSums) -> tuple[float, float]:
    """(s₀, s₁) with result = s₀v₀ + s₁v₁."""
    na, nb = math.sqrt(sums.aa), math.sqrt(sums.bb)
    dot = sums.ab / ((na if na > NORM_EPS else 1.0) * (nb if nb > NORM_EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, dot)))
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """(s₀, s₁) with result = s₀v₀ + s₁v₁, for two whole tensors."""
    return coefficients_from_sums(t, float64_sums(v0, v1))


def merge_slerp(job: TensorJob) -> torch.Tensor:
    """s₀v₀ + s₁v₁, computed in the models' own buffers when the engine hands them over.

    The same three roundings (s₀v₀, s₁v₁, their sum) either way, so the same bits; in place,
    a big tensor needs no float32 temporaries beyond its two endpoints. On a row block
    (`job.rows`) the angle comes from the sums over the whole tensor (`job.stats`).
    """
    v0, v1 = endpoints(job)
    if isinstance(job.stats, SlerpSums):
        sums = job.stats
    elif job.rows is None:
        sums = float64_sums(v0, v1)
    else:
        raise RuntimeError(f"slerp: no angle for a row block of tensor {job.name}")
    s0, s1 = coefficients_from_sums(float(job.params["t"]), sums)
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
        tensor_reducer=lambda params, n_models: SlerpAngle(),
        paper="https://dl.acm.org/doi/10.1145/325165.325242",
        doc="methods/slerp.md",
    )
)
