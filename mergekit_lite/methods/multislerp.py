"""Multi-SLERP: mergekit's barycentric interpolation of any number of models on the hypersphere.

(Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea.) Per tensor, each model
(or with a base, each task vector τᵢ = θᵢ − θ₀) is one flat vector vᵢ with norm nᵢ and direction
uᵢ = vᵢ/(nᵢ + eps). With weights wᵢ (divided by Σ wᵢ when `normalize_weights`):

    m = Σ wᵢuᵢ,  m̂ = m/‖m‖                          the weighted mean direction
    T = Σ wᵢ (uᵢ − (uᵢ·m̂) m̂),  r = ‖T‖ + eps          the mean of the tangent vectors at m̂
    result = (m̂ cos r + T sin(r)/r) · Σ wᵢnᵢ  (+ θ₀)  back onto the sphere, at the mean norm

One model gives that model unchanged.

The tangent mean is zero: Σ wᵢuᵢ = m and Σ wᵢ(uᵢ·m̂) = m·m̂ = ‖m‖, so T = m − ‖m‖m̂ = 0, and
the result is m̂ · cos(eps) · Σ wᵢnᵢ, a linear combination Σ cᵢvᵢ of the inputs. Every cᵢ
follows from the Gram matrix Gᵢⱼ = vᵢ·vⱼ (nᵢ² = Gᵢᵢ, ‖m‖² = Σ aᵢaⱼGᵢⱼ with aᵢ = wᵢ/(nᵢ + eps)),
which we take as float64 sums of the exact float64 products in `detmath`'s fixed order; the
combination is summed in float64 and rounded once (`detmath.combine64`). mergekit computes T in its compute dtype, where it is rounding
noise of the size of that dtype's epsilon relative to m̂, and adds it: the one difference from
it beyond the rounding of the final combination. Like slerp, a big tensor streams in row blocks
after a pass that takes the Gram sums over all of them (`GramSums`).

Degenerate mean (‖m‖ < eps): with two models, the plain weighted sum w₁v₁ + w₂v₂ (+ θ₀), as in
mergekit. With more, mergekit raises; so do we (a recipe error naming the tensor), except when
every vᵢ is zero (a tensor no fine-tune changed: layer norms after LoRA training), where the
result is θ₀ (or zeros) since Σ wᵢnᵢ = 0, and mergekit's error would stop the whole merge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import RecipeError
from .detmath import FlatSum, combine64, flat_pieces
from .registry import BlockOrder, MethodSpec, Param, TensorJob, register
from .task_arithmetic import check_shapes, weight_sum

WEIGHT = Param("weight", "float", None, "This model's weight in the spherical mean (and in the mean norm).",
               per_model=True, required=True)
NORMALIZE_WEIGHTS = Param("normalize_weights", "bool", True, "Divide the weights by their sum first.")
EPS = Param("eps", "float", 1e-8,
            "Added to each norm before dividing by it and to the tangent norm; also the smallest mean direction "
            "norm that is not degenerate.", minimum=0.0, min_exclusive=True)


class GramSums:
    """Gᵢⱼ = vᵢ·vⱼ (i ≤ j) over one whole tensor, fed in consecutive pieces: `FlatSum`s of the
    float64 products of the float32 vectors, so row blocks in order give the whole tensor's bits.
    The method's `tensor_reducer`, and its whole-tensor sums too."""

    def __init__(self, n_models: int) -> None:
        self._n = n_models
        self._sums = {(i, j): FlatSum() for i in range(n_models) for j in range(i, n_models)}
        self._order = BlockOrder()

    def add(self, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        """The products of the task vectors (models − base) or of the models, a bounded piece at a
        time: no whole-tensor task vectors or float64 copies."""
        tensors = [*models] if base is None else [*models, base]
        for piece in flat_pieces(*tensors):
            vs = piece if base is None else [p - piece[-1] for p in piece[:-1]]  # float32 τ, as the output uses
            xs = [v.to(torch.float64) for v in vs]
            for (i, j), acc in self._sums.items():
                acc.add(xs[i] * xs[j])  # float32 × float32 is exact in float64: only the sums round

    def observe(self, job: TensorJob) -> None:
        self._order.check(job)
        _check_job(job)
        self.add(job.models, job.base)

    def end_pass(self) -> bool:
        return True

    def result(self) -> list[list[float]]:
        gram = [[0.0] * self._n for _ in range(self._n)]
        for (i, j), acc in self._sums.items():
            gram[i][j] = gram[j][i] = acc.total()
        return gram


def _check_job(job: TensorJob) -> None:
    if not job.models:
        raise RecipeError(f"multislerp: needs at least one model (tensor {job.name})")
    check_shapes(job, job.models, job.base if job.base is not None else job.models[0])


def multislerp_coefficients(gram: Sequence[Sequence[float]], weights: Sequence[float], *, normalize: bool,
                            eps: float, name: str = "") -> list[float]:
    """(c₁..cₙ) with result = Σ cᵢvᵢ (+ θ₀), from the Gram matrix of the vᵢ; float64, in a fixed order."""
    n = len(weights)
    divisor = weight_sum(weights) if normalize else 1.0  # mergekit divides by the float32 sum
    w = [float(x) / divisor for x in weights]
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    a = [w[i] / (norms[i] + eps) for i in range(n)]
    mean_sq = 0.0
    for i in range(n):
        for j in range(n):
            mean_sq += a[i] * a[j] * gram[i][j]
    mean_norm = math.sqrt(max(mean_sq, 0.0))
    if mean_norm < eps:
        if n == 2:
            return w  # mergekit's fallback: the plain weighted sum
        if all(x == 0.0 for x in norms):
            return [0.0] * n  # nothing moved: Σ wᵢnᵢ = 0 (mergekit raises here)
        raise RecipeError(f"multislerp: tensor {name}: the weighted mean of the {n} models' directions is zero "
                          f"(norm {mean_norm:.3g} < eps {eps:g}): opposite task vectors whose weights balance "
                          "out; change the weights")
    mean_norm_out = sum(wi * ni for wi, ni in zip(w, norms, strict=True))
    scale = math.cos(eps) * mean_norm_out / mean_norm
    return [ai * scale for ai in a]


def merge_multislerp(job: TensorJob) -> torch.Tensor:
    """Σ cᵢvᵢ (+ θ₀), the sum in float64 rounded once (`detmath.combine64`: the cᵢ grow as 1/‖m‖
    and cancel when the directions nearly do, where a float32 sum of the terms would keep
    nothing), written into a model's own buffer when the engine hands them over; on a row block
    the coefficients come from the Gram sums over the whole tensor (`job.stats`)."""
    _check_job(job)
    if len(job.models) == 1:  # no interpolation: the model itself, as mergekit (base or not)
        return job.models[0] if job.models_disposable else job.models[0].clone()
    if isinstance(job.stats, list):
        gram = job.stats
    elif job.rows is None:
        sums = GramSums(len(job.models))
        sums.add(job.models, job.base)
        gram = sums.result()
    else:
        raise RuntimeError(f"multislerp: no Gram sums for a row block of tensor {job.name}")
    coeffs = multislerp_coefficients(gram, job.params["weight"], normalize=bool(job.params["normalize_weights"]),
                                     eps=float(job.params["eps"]), name=job.name)
    first = job.models[0]
    out = first if job.models_disposable and first.is_contiguous() else torch.empty_like(first)
    combine64(job.models, coeffs, out, minus=job.base)
    if job.base is not None:
        out += job.base  # the rounded Σ cᵢτᵢ, then the base, as mergekit adds it
    return out


def _check(params: Mapping[str, Any], n_models: int) -> str | None:
    weights = params.get("weight")
    if n_models > 1 and params.get("normalize_weights", True) and weights is not None and weight_sum(weights) == 0:
        return ("the weights sum to 0 and normalize_weights divides them by their sum; "
                "give other weights or set normalize_weights: false")
    return None


SPEC = register(
    MethodSpec(
        name="multislerp",
        summary="mergekit's Multi-SLERP: weighted spherical mean of any number of models (or task vectors), per tensor.",
        params=(WEIGHT, NORMALIZE_WEIGHTS, EPS),
        merge=merge_multislerp,
        needs_base=False,
        optional_base=True,
        min_models=1,
        tensor_reducer=lambda params, n_models: GramSums(n_models),
        check=_check,
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        doc="methods/multislerp.md",
    )
)
