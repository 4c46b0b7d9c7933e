"""Karcher (Fréchet) mean of the models on the unit sphere, per tensor (mergekit's `karcher`).

Each tensor of each model is one flat vector vᵢ with norm nᵢ and direction uᵢ = vᵢ/nᵢ. The
merged direction m is the point of the unit sphere that minimises Σ αᵢ·angle(m, uᵢ)² (the
Riemannian centre of mass, αᵢ = 1/N), found as mergekit finds it: start from the normalised
Σ αᵢuᵢ, then at most `max_iter` times step along the mean tangent vector
T = Σ αᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·m) (θᵢ = arccos(m·uᵢ); inputs with θᵢ < `tol` skipped) with
the exponential map m ← cos‖T‖·m + sin‖T‖·T/‖T‖, stopping once ‖T‖ < `tol`. The result is
m scaled by the mean norm Σ nᵢ/N. Inputs with nᵢ ≤ `tol` take no part in the direction (their
norm still counts in the scale); with none left the result is zeros; one input is itself.

Why no unit vectors are ever built: m starts in the span of the uᵢ and every step adds a
combination of the uᵢ and m, so m = Σ cᵢvᵢ for N coefficients cᵢ, and every angle and norm the
iteration needs is a function of the Gram matrix Gᵢⱼ = vᵢ·vⱼ alone. One pass over the tensor
takes the N(N+1)/2 inner products (float64 sums of the exact float64 products, in the fixed
order of `detmath.FlatSum`); the iteration then runs in float64 on N-vectors: coordinates of
the vᵢ in an orthonormal basis of their span (from the eigendecomposition of G), where the
geometry is plain Euclidean and a small tangent's norm is not lost to cancellation as it would
be in cᵀGc. The output Σ (scale·cᵢ)·vᵢ is summed in float64 and rounded once to float32. So
memory is the inputs and the output (no N unit tensors, no float64 copy of a tensor), the bits
do not depend on threads, and a big tensor streams in row blocks after a pass for G
(`KarcherGram`, the method's `tensor_reducer`), with the bits it has held whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import RecipeError
from .detmath import FlatSum, combine64, flat_pieces
from .registry import BlockOrder, MethodSpec, Param, TensorJob, register
from .task_arithmetic import check_shapes

MAX_ITER = Param("max_iter", "int", 10, "Most steps of the mean's iteration on the sphere.", minimum=0)
TOL = Param(
    "tol",
    "float",
    1e-5,
    "Convergence and degeneracy threshold: stop once the mean tangent's norm is below it; inputs "
    "with a norm at or below it, or at an angle below it from the mean, do not move the mean.",
    minimum=0.0,
)


@dataclass(frozen=True)
class Gram:
    """vᵢ·vⱼ for every pair of one tensor's inputs (float64): all the merged direction depends on."""

    g: tuple[tuple[float, ...], ...]


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i, n)]


def _add_product(acc: FlatSum, a: torch.Tensor, b: torch.Tensor) -> None:
    """Feed acc the float64 products a·b, a bounded piece at a time (a float32 product is exact
    in float64: only the sum rounds)."""
    if a is b:
        for (piece,) in flat_pieces(a):
            x = piece.to(torch.float64)
            acc.add(x * x)
        return
    for pa, pb in flat_pieces(a, b):
        acc.add(pa.to(torch.float64) * pb.to(torch.float64))


def _symmetric(n: int, sums: dict[tuple[int, int], float]) -> Gram:
    return Gram(tuple(tuple(sums[min(i, j), max(i, j)] for j in range(n)) for i in range(n)))


def gram(models: Sequence[torch.Tensor]) -> Gram:
    """The Gram matrix of whole tensors, one inner product at a time (one sum's buffer alive)."""
    sums = {}
    for i, j in _pairs(len(models)):
        acc = FlatSum()
        _add_product(acc, models[i], models[j])
        sums[i, j] = acc.total()
    return _symmetric(len(models), sums)


class KarcherGram:
    """Reducer over the row blocks of one tensor (in order): its `Gram`, with the bits `gram`
    gives on the whole tensor (`FlatSum` regroups the pieces as a whole-tensor sum groups them)."""

    def __init__(self, n_models: int) -> None:
        self._n = n_models
        self._sums = {pair: FlatSum() for pair in _pairs(n_models)}
        self._order = BlockOrder()

    def observe(self, job: TensorJob) -> None:
        self._order.check(job)
        models = _inputs(job)
        for (i, j), acc in self._sums.items():
            _add_product(acc, models[i], models[j])

    def end_pass(self) -> bool:
        return True

    def result(self) -> Gram:
        return _symmetric(self._n, {pair: acc.total() for pair, acc in self._sums.items()})


def _coordinates(g: Sequence[Sequence[float]]) -> torch.Tensor:
    """Columns yᵢ with yᵢ·yⱼ = Gᵢⱼ (to float64 rounding): the inputs in an orthonormal basis of
    their span. Rank-deficient G (copies of one model) gives zero rows, harmless."""
    mat = torch.tensor(g, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(mat)
    return eigenvalues.clamp(min=0).sqrt().unsqueeze(1) * eigenvectors.T


def karcher_coefficients(g: Sequence[Sequence[float]], max_iter: int, tol: float) -> list[float]:
    """kᵢ with the merged tensor = Σ kᵢvᵢ, from the Gram matrix of the N inputs.

    Follows mergekit's iteration step for step (branch tests, clamping, renormalising), in
    float64 on coordinates instead of float32 on whole tensors.
    """
    n = len(g)
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    alphas = [1.0 / n] * n
    scale = sum(a * nrm for a, nrm in zip(alphas, norms, strict=True))  # over every input, valid or not
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    alpha_sum = sum(alphas[i] for i in valid)
    weight = {i: alphas[i] / alpha_sum for i in valid}

    y = _coordinates(g)
    units = {i: y[:, i] / norms[i] for i in valid}  # uᵢ in coordinates
    basis = torch.eye(n, dtype=torch.float64)  # cᵢ: the same vectors as combinations of the vᵢ
    unit_c = {i: basis[i] / norms[i] for i in valid}

    mean = sum((weight[i] * units[i] for i in valid), torch.zeros(n, dtype=torch.float64))
    coef = sum((weight[i] * unit_c[i] for i in valid), torch.zeros(n, dtype=torch.float64))
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < tol:  # the directions cancel out: start from the first valid one
        mean, coef = units[valid[0]].clone(), unit_c[valid[0]].clone()
    else:
        mean, coef = mean / mean_norm, coef / mean_norm

    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        tangent_c = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            dot = min(max(float(mean @ units[i]), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            # θ/sin θ → 1 as θ → 0 (reached only with tol = 0, where mergekit divides 0 by 0)
            factor = weight[i] * (theta / math.sin(theta) if theta > 0 else 1.0)
            tangent += factor * (units[i] - dot * mean)
            tangent_c += factor * (unit_c[i] - dot * coef)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        cos_s, sin_s = math.cos(step), math.sin(step)
        mean = cos_s * mean + sin_s * (tangent / step)
        coef = cos_s * coef + sin_s * (tangent_c / step)
        length = float(torch.linalg.vector_norm(mean))
        if length > tol:
            mean, coef = mean / length, coef / length
    return [scale * c for c in coef.tolist()]


def _inputs(job: TensorJob) -> Sequence[torch.Tensor]:
    if job.base is not None:
        raise RecipeError(f"karcher: takes no base model; list it among the models (tensor {job.name})")
    if not job.models:
        raise RecipeError(f"karcher: needs at least one model (tensor {job.name})")
    check_shapes(job, job.models, job.models[0])
    return job.models


def merge_karcher(job: TensorJob) -> torch.Tensor:
    models = _inputs(job)
    own = job.models_disposable
    if len(models) == 1:
        return models[0] if own else models[0].clone()
    if isinstance(job.stats, Gram):
        g = job.stats.g
    elif job.rows is None:
        g = gram(models).g
    else:
        raise RuntimeError(f"karcher: no Gram matrix for a row block of tensor {job.name}")
    coefficients = karcher_coefficients(g, int(job.params["max_iter"]), float(job.params["tol"]))
    if all(k == 0.0 for k in coefficients):  # no input has a norm above tol
        return torch.zeros_like(models[0])
    out = models[0] if own and models[0].is_contiguous() else torch.empty_like(models[0])
    return combine64(models, coefficients, out)


SPEC = register(
    MethodSpec(
        name="karcher",
        summary="Karcher mean: the models' mean direction on the unit sphere, scaled by their mean norm.",
        params=(MAX_ITER, TOL),
        merge=merge_karcher,
        needs_base=False,
        min_models=1,
        base_joins_models=True,
        tensor_reducer=lambda params, n_models: KarcherGram(n_models),
        paper="https://arxiv.org/abs/2603.04972",
        doc="methods/karcher.md",
    )
)
