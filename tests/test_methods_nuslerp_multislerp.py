"""nuslerp and multislerp (mergekit's NuSLERP and Multi-SLERP): golden values on hand-checkable
tensors, the sanity laws, an independent re-statement of mergekit's formulas, and
mergekit-shaped recipes run through the engine (whole tensors and row blocks).

`mk_nuslerp` and `mk_multislerp` re-state mergekit 0.1.5's merge_methods/nuslerp.py and
multislerp.py from the maths (as read for this project), in float64 and literally: the tangent
step of multislerp is computed, not simplified away as our implementation does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from helpers import load_dir
from hypothesis import example, given
from hypothesis import strategies as st
from test_methods_properties import SETTINGS, tensors

import mergekit_lite as mlite
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods.nuslerp import COLINEAR_COS
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.recipe.model import load_recipe

R2 = math.sqrt(0.5)  # sin(π/4)
NU = {"nuslerp_flatten": True, "nuslerp_row_wise": False}
MS = {"normalize_weights": True, "eps": 1e-8}


def T(values: Any) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32)


def job(method: str, base: Any, models: list[Any], **params: Any) -> TensorJob:
    resolved = {**(NU if method == "nuslerp" else MS), **params}
    resolved["weight"] = tuple(resolved.get("weight", (1.0,) * len(models)))
    return TensorJob(name="model.layers.0.mlp.up_proj.weight", base=None if base is None else T(base),
                     models=[T(m) for m in models], params=resolved)


def run(method: str, base: Any, models: list[Any], **params: Any) -> torch.Tensor:
    return get_method(method).merge(job(method, base, models, **params))  # type: ignore[union-attr]


def close(a: torch.Tensor, b: Any, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, T(b), rtol=tol, atol=tol)


# ------------------------------------------------------------ registry


def test_registry_entries() -> None:
    nu, ms = get_method("nuslerp"), get_method("multislerp")
    assert nu is not None and ms is not None
    assert (nu.needs_base, nu.optional_base, nu.min_models, nu.max_models, nu.ordered) == (False, True, 2, 2, False)
    assert (ms.needs_base, ms.optional_base, ms.min_models, ms.max_models, ms.ordered) == (False, True, 1, None, False)
    assert nu.defaults() == {"weight": None, "nuslerp_flatten": True, "nuslerp_row_wise": False}
    assert ms.defaults() == {"weight": None, "normalize_weights": True, "eps": 1e-8}
    assert nu.param("weight").required and ms.param("weight").required  # type: ignore[union-attr]
    assert ms.param("eps").check(0.0) and ms.param("eps").check(1e-3) is None  # type: ignore[union-attr]
    assert nu.row_local({**nu.defaults(), "nuslerp_flatten": False})
    assert not nu.row_local(nu.defaults()) and not nu.row_local({"nuslerp_flatten": False, "nuslerp_row_wise": True})


# ------------------------------------------------------------ nuslerp goldens


def test_nuslerp_orthogonal_unit_vectors() -> None:
    # cos = 0, θ = π/2, sin θ = 1. weights (1, 1): t = 1/2, s₀ = s₁ = sin(π/4) = 0.70710678
    close(run("nuslerp", None, [[1, 0], [0, 1]], weight=(1.0, 1.0)), [R2, R2])
    # weights (1, 2): t = 2/3, s₀ = sin(π/6) = 0.5, s₁ = sin(π/3) = 0.8660254
    close(run("nuslerp", None, [[1, 0], [0, 1]], weight=(1.0, 2.0)), [0.5, math.sqrt(3) / 2])
    # the weights' scale does not matter, only their ratio: (3, 6) is (1, 2)
    close(run("nuslerp", None, [[1, 0], [0, 1]], weight=(3.0, 6.0)), [0.5, math.sqrt(3) / 2])


def test_nuslerp_with_a_base_interpolates_the_task_vectors() -> None:
    # base (1, 1); τ₁ = (2, 0), τ₂ = (0, 3): orthogonal, t = 1/2 → base + 0.7071·(2, 3)
    close(run("nuslerp", [1, 1], [[3, 1], [1, 4]], weight=(0.5, 0.5)), [1 + 2 * R2, 1 + 3 * R2])


def test_nuslerp_colinear_and_antipodal_are_lerp() -> None:
    # same direction ((1, 2) and (2, 4)): weights (3, 1) → t = 1/4: 0.75·(1, 2) + 0.25·(2, 4) = (1.25, 2.5)
    close(run("nuslerp", None, [[1, 2], [2, 4]], weight=(3.0, 1.0)), [1.25, 2.5])
    # opposite directions: sin θ = 0, so lerp too; t = 3/4: 0.25·(1, 2) − 0.75·(1, 2) = (−0.5, −1)
    close(run("nuslerp", None, [[1, 2], [-1, -2]], weight=(1.0, 3.0)), [-0.5, -1.0])


def test_nuslerp_cancelling_weights_give_the_midpoint() -> None:
    # |w₁ + w₂| < 1e-6 → t = 1/2 (not ±inf): orthogonal unit vectors → (0.7071, 0.7071)
    close(run("nuslerp", None, [[1, 0], [0, 1]], weight=(1.0, -1.0)), [R2, R2])
    # weights summing to 1e-3 are used as given: t = −1/1e-3 = −1000 (far extrapolation along the arc)
    got = run("nuslerp", None, [[1, 0], [0, 1]], weight=(1.001, -1.0))
    t = -1.0 / (1.001 - 1.0)
    close(got, [math.sin((1 - t) * math.pi / 2), math.sin(t * math.pi / 2)], tol=1e-4)


def test_nuslerp_zero_vector_is_not_colinear() -> None:
    # ‖v₀‖ = 0 is clamped to 1e-7, cos = 0, θ = π/2: sin(tπ/2)·v₁ = 0.7071·(3, 4), as in mergekit
    close(run("nuslerp", None, [[0, 0], [3, 4]], weight=(1.0, 1.0)), [3 * R2, 4 * R2])


def test_nuslerp_per_row_and_per_column() -> None:
    v0, v1 = [[1, 0], [1, 0]], [[0, 1], [2, 0]]
    # rows: row 0 orthogonal → (0.7071, 0.7071); row 1 colinear → lerp ½(1, 0) + ½(2, 0) = (1.5, 0)
    close(run("nuslerp", None, [v0, v1], weight=(1.0, 1.0), nuslerp_flatten=False), [[R2, R2], [1.5, 0]])
    # flattened: v₀ = (1, 0, 1, 0), v₁ = (0, 1, 2, 0); ‖v₀‖ = √2, ‖v₁‖ = √5, v₀·v₁ = 2, cos = 2/√10;
    # at t = ½ both coefficients are sin(θ/2)/sin θ = 1/(2 cos(θ/2)) = 1/√(2 + 2 cos) = 1/√(2 + 4/√10)
    s = 1 / math.sqrt(2 + 4 / math.sqrt(10))  # 0.553433
    close(run("nuslerp", None, [v0, v1], weight=(1.0, 1.0)), [[s, s], [3 * s, 0]])
    # columns (row_wise): col 0 (1, 0) vs (0, 1) orthogonal → 0.7071·(1, 1); col 1 (0, 3) vs (0, 5) colinear → (0, 4)
    close(run("nuslerp", None, [[[1, 0], [0, 3]], [[0, 0], [1, 5]]], weight=(1.0, 1.0), nuslerp_flatten=False,
              nuslerp_row_wise=True), [[R2, 0], [R2, 4]])
    # row_wise without flatten off does nothing: mergekit flattens first
    close(run("nuslerp", None, [v0, v1], weight=(1.0, 1.0), nuslerp_row_wise=True), [[s, s], [3 * s, 0]])


def test_nuslerp_exactly_colinear_directions_take_the_lerp_branch() -> None:
    """v and 2v: the float64 cosine lands within an ulp or two of 1, which rounds to 1 in float32
    (mergekit's test), so the result is the lerp's bits, not the spherical formula's."""
    rng = torch.Generator().manual_seed(3)
    for n in (7, 4096, 70_000):
        v = torch.randn(n, generator=rng)
        for w0, w1 in ((1.0, 1.0), (0.3, 0.9), (2.0, -0.5)):
            t = w1 / (w0 + w1)
            got = get_method("nuslerp").merge(TensorJob("w", None, [v, 2 * v], {**NU, "weight": (w0, w1)}))  # type: ignore[union-attr]
            assert torch.equal(got, v * (1 - t) + (2 * v) * t), (n, w0, w1)
    assert float(torch.tensor(COLINEAR_COS, dtype=torch.float32)) == 1.0
    assert float(torch.tensor(math.nextafter(COLINEAR_COS, 0), dtype=torch.float32)) < 1.0


def test_nuslerp_needs_two_models() -> None:
    with pytest.raises(RecipeError, match=r"nuslerp: needs exactly two models besides the base, got 3 \(tensor"):
        run("nuslerp", None, [[1.0], [2.0], [3.0]], weight=(1.0, 1.0, 1.0))


# ------------------------------------------------------------ multislerp goldens


def test_multislerp_goldens() -> None:
    # orthogonal unit vectors, equal weights: m = (½, ½), m̂ = (0.7071, 0.7071), Σwᵢnᵢ = 1
    close(run("multislerp", None, [[1, 0], [0, 1]]), [R2, R2])
    # norms 2 and 4: the same direction, at the mean norm ½·2 + ½·4 = 3 → 3·0.7071 = 2.1213
    close(run("multislerp", None, [[2, 0], [0, 4]]), [3 * R2, 3 * R2])
    # weights (3, 1) → (¾, ¼): m = (¾, ¼), ‖m‖ = √0.625; m̂ = (0.948683, 0.316228); Σwᵢnᵢ = 1.5 + 1 = 2.5
    k = 2.5 / math.sqrt(0.625)
    close(run("multislerp", None, [[2, 0], [0, 4]], weight=(3.0, 1.0)), [0.75 * k, 0.25 * k])
    # with a base (1, 1): τ = (2, 0), (0, 4) as above, plus the base
    close(run("multislerp", [1, 1], [[3, 1], [1, 5]]), [1 + 3 * R2, 1 + 3 * R2])
    # normalize_weights false, weights (1, 1): m̂ as above, Σwᵢnᵢ = 2 + 4 = 6
    close(run("multislerp", None, [[2, 0], [0, 4]], normalize_weights=False), [6 * R2, 6 * R2])
    # three orthogonal unit vectors: m̂ = (1, 1, 1)/√3, Σwᵢnᵢ = 1
    third = 1 / math.sqrt(3)
    close(run("multislerp", None, [[1, 0, 0], [0, 1, 0], [0, 0, 1]]), [third] * 3)
    # eps = 0.1: uᵢ = vᵢ/1.1 (same m̂), r = ‖T‖ + eps = 0.1 (T = 0): m̂·cos(0.1)·1 = 0.7071·0.995004
    c = R2 * math.cos(0.1)
    close(run("multislerp", None, [[1, 0], [0, 1]], eps=0.1), [c, c])
    # eps = 0.5: uᵢ = vᵢ/1.5, m = (⅓, ⅓), ‖m‖ = 0.4714 < eps: degenerate, so the plain ½v₁ + ½v₂
    close(run("multislerp", None, [[1, 0], [0, 1]], eps=0.5), [0.5, 0.5])


def test_multislerp_one_model_is_that_model() -> None:
    # no interpolation, base or not: the model itself (not base + τ, which could round differently)
    assert torch.equal(run("multislerp", [0.1, 0.2], [[0.3, 1e-9]], weight=(0.25,)), T([0.3, 1e-9]))


def test_multislerp_degenerate_means() -> None:
    # two opposite vectors, equal weights: m = 0 → the plain weighted sum ½(1, 2) + ½(−1, −2) = 0
    close(run("multislerp", None, [[1, 2], [-1, -2]]), [0, 0])
    # unequal weights (¾, ¼): m = ½u₀, m̂ = u₀, Σwᵢnᵢ = √5: the first vector, (1, 2)
    close(run("multislerp", None, [[1, 2], [-1, -2]], weight=(3.0, 1.0)), [1, 2])
    # three models whose directions cancel: mergekit raises; a recipe error naming the tensor
    with pytest.raises(RecipeError, match=r"multislerp: tensor model\.layers\.0\.mlp\.up_proj\.weight: the weighted "
                                          r"mean of the 3 models' directions is zero"):
        run("multislerp", None, [[1, 0], [-1, 0], [0, 0]])
    # three zero task vectors (a tensor nothing changed): the base, where mergekit raises
    assert torch.equal(run("multislerp", [1, -2], [[1, -2]] * 3), T([1, -2]))


# ------------------------------------------------------------ laws

WEIGHTS = st.lists(st.sampled_from([0.25, 0.5, 1.0, 1.7, 3.0]), min_size=4, max_size=4)


@SETTINGS
@given(data=tensors(n_models=(1, 1)), n=st.integers(1, 4), weights=WEIGHTS, with_base=st.booleans(),
       flatten=st.booleans(), row_wise=st.booleans())
def test_copies_of_one_model_give_that_model(data: Any, n: int, weights: list[float], with_base: bool, flatten: bool,
                                             row_wise: bool) -> None:
    base, (model,) = data
    b = base if with_base else None
    nu = get_method("nuslerp").merge(TensorJob("w", b, [model.clone(), model.clone()], {  # type: ignore[union-attr]
        "weight": tuple(weights[:2]), "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}))
    torch.testing.assert_close(nu, model, rtol=1e-6, atol=1e-6)
    ms = get_method("multislerp").merge(TensorJob("w", b, [model.clone() for _ in range(n)], {  # type: ignore[union-attr]
        **MS, "weight": tuple(weights[:n])}))
    torch.testing.assert_close(ms, model, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(data=tensors(n_models=(1, 1)), n=st.integers(1, 4), weights=WEIGHTS, flatten=st.booleans(),
       row_wise=st.booleans(), normalize=st.booleans())
def test_zero_task_vectors_give_the_base(data: Any, n: int, weights: list[float], flatten: bool, row_wise: bool,
                                         normalize: bool) -> None:
    base, _ = data
    nu = get_method("nuslerp").merge(TensorJob("w", base, [base.clone(), base.clone()], {  # type: ignore[union-attr]
        "weight": tuple(weights[:2]), "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}))
    assert torch.equal(nu, base)
    ms = get_method("multislerp").merge(TensorJob("w", base, [base.clone() for _ in range(n)], {  # type: ignore[union-attr]
        "weight": tuple(weights[:n]), "normalize_weights": normalize, "eps": 1e-8}))
    assert torch.equal(ms, base)


@SETTINGS
@given(data=tensors(n_models=(2, 4)), weights=WEIGHTS, with_base=st.booleans(), flatten=st.booleans(),
       row_wise=st.booleans(), seed=st.randoms(use_true_random=False))
def test_order_does_not_matter_with_the_weights_permuted(data: Any, weights: list[float], with_base: bool,
                                                         flatten: bool, row_wise: bool, seed: Any) -> None:
    """nuslerp: swapping the endpoints maps t to 1 − t, the same point of the arc; multislerp's
    means are symmetric. (Not bit for bit: the sums add in another order.)"""
    base, models = data
    b = base if with_base else None
    nu = get_method("nuslerp")
    swap = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    a = nu.merge(TensorJob("w", b, models[:2], {**swap, "weight": (weights[0], weights[1])}))  # type: ignore[union-attr]
    c = nu.merge(TensorJob("w", b, models[1::-1], {**swap, "weight": (weights[1], weights[0])}))  # type: ignore[union-attr]
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    n = len(models)
    perm = list(range(n))
    seed.shuffle(perm)
    w = tuple(weights[:n])
    ms = get_method("multislerp")
    try:
        a = ms.merge(TensorJob("w", b, models, {**MS, "weight": w}))  # type: ignore[union-attr]
    except RecipeError:  # directions that cancel (|τ| of a few quarter-steps): refused in any order
        with pytest.raises(RecipeError):
            ms.merge(TensorJob("w", b, [models[i] for i in perm], {**MS, "weight": tuple(w[i] for i in perm)}))  # type: ignore[union-attr]
        return
    c = ms.merge(TensorJob("w", b, [models[i] for i in perm], {**MS, "weight": tuple(w[i] for i in perm)}))  # type: ignore[union-attr]
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(data=tensors(n_models=(2, 4)), weights=st.lists(st.sampled_from([-1.0, -0.3, 0.3, 1.0, 1.7]), min_size=4,
                                                       max_size=4),
       with_base=st.booleans(), flatten=st.booleans(), row_wise=st.booleans())
def test_disposable_models_give_the_same_bits(data: Any, weights: list[float], with_base: bool, flatten: bool,
                                              row_wise: bool) -> None:
    base, models = data
    b = base if with_base else None
    cases = [("nuslerp", models[:2], {"weight": tuple(weights[:2]), "nuslerp_flatten": flatten,
                                      "nuslerp_row_wise": row_wise})]
    if sum(weights[: len(models)]) != 0:
        cases.append(("multislerp", models, {**MS, "weight": tuple(weights[: len(models)])}))
    for method, ms, params in cases:
        kept = TensorJob("w", b, ms, params)
        spec = get_method(method)
        try:
            want = spec.merge(kept)  # type: ignore[union-attr]
        except RecipeError:
            continue
        given_away = dataclasses.replace(kept, models=[m.clone() for m in ms], models_disposable=True)
        got = spec.merge(given_away)  # type: ignore[union-attr]
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()), method
        if b is not None:
            assert torch.equal(kept.base, base)


@SETTINGS
@given(data=tensors(n_models=(2, 4)), weights=WEIGHTS, with_base=st.booleans(), flatten=st.booleans(),
       row_wise=st.booleans())
# near-opposite directions, ‖m‖ close to eps: the coefficients are large and cancel, and a float32
# sum of the terms gave 0 where the float64 one gives −0.356 (found by this test)
@example(data=(torch.tensor([0.0]), [torch.tensor([0.25]), torch.tensor([-0.5])]), weights=[0.25] * 4,
         with_base=False, flatten=False, row_wise=False)
def test_bf16_inputs_match_the_float64_maths_within_an_ulp(data: Any, weights: list[float], with_base: bool,
                                                           flatten: bool, row_wise: bool) -> None:
    """bf16-exact inputs: the float32 maths rounded once to bf16 is the float64 maths rounded to
    bf16, within one bf16 ulp (plus the inputs' float32 rounding where results cancel)."""
    base, models = data
    b = base if with_base else None
    cases = [("nuslerp", models[:2], {"weight": tuple(weights[:2]), "nuslerp_flatten": flatten,
                                      "nuslerp_row_wise": row_wise}),
             ("multislerp", models, {**MS, "weight": tuple(weights[: len(models)])})]
    for method, ms, params in cases:
        spec = get_method(method)
        try:
            ref = spec.merge(TensorJob("w", None if b is None else b.double(), [m.double() for m in ms], params))  # type: ignore[union-attr]
        except RecipeError:
            continue
        out = spec.merge(TensorJob("w", b, [m.clone() for m in ms], params)).to(torch.bfloat16)  # type: ignore[union-attr]
        ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
        floor = max(float(t.abs().max()) for t in [base, *ms]) * 2.0**-20
        assert torch.all((out.double() - ref.to(torch.bfloat16).double()).abs() <= ulp * 2 + floor + 1e-30), method


def test_empty_tensors_merge_to_empty_tensors() -> None:
    for shape in ((0,), (0, 16), (16, 0), (2, 0, 3)):
        zeros = [torch.zeros(shape) for _ in range(3)]
        for flatten, row_wise in ((True, False), (False, False), (False, True)):
            out = run("nuslerp", torch.zeros(shape), zeros[:2], weight=(1.0, 1.0), nuslerp_flatten=flatten,
                      nuslerp_row_wise=row_wise)
            assert out.shape == shape
        assert run("multislerp", torch.zeros(shape), zeros).shape == shape
        assert run("multislerp", None, zeros[:2]).shape == shape


# ------------------------------------------------------------ mergekit's formulas, re-stated


def mk_nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool, row_wise: bool) -> torch.Tensor:
    """Per vector: norms clamped at 1e-7, cos clamped to [−1, 1]; lerp where 1 − cos² ≤ 1e-16, else
    (sin((1−t)θ)v₀ + sin(tθ)v₁)/sin θ. Vectors: the flat tensor, the last dim, or dim 0 (the
    tensor with dims 0 and −1 swapped)."""
    shape = v0.shape
    a, b = v0.double(), v1.double()
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    out = torch.empty_like(a)
    colinear = (1 - cos * cos <= 1e-16).expand_as(a)
    theta = torch.acos(cos)
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape).float()


def mk_nuslerp_merge(base: torch.Tensor | None, models: list[torch.Tensor], weights: tuple[float, float],
                     **kw: bool) -> torch.Tensor:
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return mk_nuslerp(t, models[0], models[1], **kw)
    return (base.double() + mk_nuslerp(t, models[0] - base, models[1] - base, **kw).double()).float()


def mk_multislerp(base: torch.Tensor | None, models: list[torch.Tensor], weights: list[float], *, normalize: bool,
                  eps: float) -> torch.Tensor:
    """Literally: unit vectors vᵢ/(nᵢ + eps), weighted mean m, m̂; tangents uᵢ − (uᵢ·m̂)m̂, their
    weighted sum T, r = ‖T‖ + eps; (m̂ cos r + T sin(r)/r)·Σwᵢnᵢ, plus the base."""
    if len(models) == 1:
        return models[0]
    vs = torch.stack([(m - base if base is not None else m).double().reshape(-1) for m in models])
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = vs.norm(dim=-1, keepdim=True)
    units = vs / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    if mean.norm() < eps:
        assert len(models) == 2
        res = vs[0] * w[0] + vs[1] * w[1]
    else:
        mean = mean / mean.norm()
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        tangent = (tangents * w[:, None]).sum(0)
        r = tangent.norm() + eps
        res = (mean * torch.cos(r) + tangent * (torch.sin(r) / r)) * (norms.squeeze(-1) * w).sum()
    res = res.reshape(models[0].shape)
    return (res + base.double() if base is not None else res).float()


SHAPES = [(16,), (8, 12), (12, 8), (3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_is_mergekit_nuslerp(rng: torch.Generator, shape: tuple[int, ...], with_base: bool) -> None:
    base = torch.randn(shape, generator=rng) if with_base else None
    models = [torch.randn(shape, generator=rng) * s for s in (0.1, 0.3)]
    if base is not None:
        models = [base + m for m in models]
    for weights in ((0.5, 0.5), (0.7, 0.3), (1.0, -0.25), (2.0, -2.0)):
        for flatten, row_wise in ((True, False), (True, True), (False, False), (False, True)):
            kw = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
            got = get_method("nuslerp").merge(TensorJob("w", base, models, {**kw, "weight": weights}))  # type: ignore[union-attr]
            want = mk_nuslerp_merge(base, models, weights, flatten=flatten, row_wise=row_wise)
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_nuslerp_colinear_rows_are_lerp_and_opposite_rows_the_documented_deviation() -> None:
    """Rows equal or scaled by 2: lerp, and mergekit's value (its spherical branch, where its
    cosine misses 1 by an ulp, agrees with lerp to rounding). Opposite rows (v, −v): we lerp,
    (1 − 2t)·v; mergekit lerps when its float32 cosine lands on −1 and otherwise takes the
    spherical branch, whose limit there is cos(πt)·v (the float64 re-statement always does)."""
    v = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0], [3.0, 0.0, 1.0]])
    w = torch.stack([v[0], 2 * v[1], -v[2]])
    t = 0.6 / 0.8
    got = run("nuslerp", None, [v, w], weight=(0.2, 0.6), nuslerp_flatten=False)
    assert torch.equal(got, v * (1 - t) + w * t)
    mk = mk_nuslerp_merge(None, [v, w], (0.2, 0.6), flatten=False, row_wise=False)
    torch.testing.assert_close(got[:2], mk[:2])
    torch.testing.assert_close(mk[2], math.cos(math.pi * t) * v[2])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_is_mergekit_multislerp(rng: torch.Generator, shape: tuple[int, ...], with_base: bool) -> None:
    base = torch.randn(shape, generator=rng) if with_base else None
    models = [torch.randn(shape, generator=rng) * s for s in (0.1, 0.3, 0.2, 0.05)]
    if base is not None:
        models = [base + m for m in models]
    for n, weights, normalize, eps in ((2, [0.5, 0.5], True, 1e-8), (3, [1.0, 2.0, 0.5], True, 1e-8),
                                       (4, [0.4, 0.3, 0.2, 0.1], False, 1e-8), (3, [1.0, -0.2, 0.6], True, 1e-3),
                                       (1, [2.0], True, 1e-8), (2, [1.5, 0.5], False, 0.1)):
        got = get_method("multislerp").merge(TensorJob(  # type: ignore[union-attr]
            "w", base, models[:n], {"weight": tuple(weights), "normalize_weights": normalize, "eps": eps}))
        want = mk_multislerp(base, models[:n], weights, normalize=normalize, eps=eps)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_multislerp_antipodal_fallback_matches_mergekit() -> None:
    v = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    got = run("multislerp", None, [v, -v], weight=(2.0, 2.0))
    torch.testing.assert_close(got, mk_multislerp(None, [v, -v], [2.0, 2.0], normalize=True, eps=1e-8))


# ------------------------------------------------------------ recipes through the engine


def _mergekit(method: str, base: Any, models: list[tuple[Any, float]], **params: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {"merge_method": method, "dtype": "float32",
                              "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in models]}
    if base is not None:
        recipe["base_model"] = str(base)
    if params:
        recipe["parameters"] = params
    return recipe


@pytest.fixture
def three(tmp_path):
    from mergekit_lite.synthetic import build_model_set

    return build_model_set(tmp_path / "three", n_finetunes=3, num_shards=2)


@pytest.mark.parametrize("params", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False,
                                                                     "nuslerp_row_wise": True}])
@pytest.mark.parametrize("with_base", [True, False])
def test_mergekit_nuslerp_recipe_runs_through_the_engine(three, params, with_base) -> None:
    """A published-style recipe (the base listed among the models with a weight of its own,
    `normalize` and `int8_mask` that nuslerp does not read): the base is θ₀, not an endpoint."""
    ms = three
    models = [(ms.finetunes[0], 0.6), (ms.finetunes[1], 0.2)]
    if with_base:
        recipe = _mergekit("nuslerp", ms.base, [(ms.base, 1.0), *models], normalize=True, int8_mask=True, **params)
    else:
        recipe = _mergekit("nuslerp", None, models, **params)
    notes = load_recipe(recipe).options["notes"]
    assert any("'normalize' is not a parameter of 'nuslerp'" in n for n in notes) == with_base
    got = mlite.run_recipe(recipe).state_dict
    base = load_dir(ms.base) if with_base else None
    a, b = load_dir(ms.finetunes[0]), load_dir(ms.finetunes[1])
    kw = {"flatten": params.get("nuslerp_flatten", True), "row_wise": params.get("nuslerp_row_wise", False)}
    for k in a:
        want = mk_nuslerp_merge(None if base is None else base[k], [a[k], b[k]], (0.6, 0.2), **kw)
        torch.testing.assert_close(got[k], want, rtol=2e-6, atol=2e-6, msg=k)


@pytest.mark.parametrize("with_base", [True, False])
def test_mergekit_multislerp_recipe_runs_through_the_engine(three, with_base) -> None:
    ms = three
    models = [(m, w) for m, w in zip(ms.finetunes, (0.5, 0.3, 0.2), strict=True)]
    recipe = _mergekit("multislerp", ms.base if with_base else None, models)
    got = mlite.run_recipe(recipe).state_dict
    base = load_dir(ms.base) if with_base else None
    loaded = [load_dir(m) for m in ms.finetunes]
    for k in loaded[0]:
        want = mk_multislerp(None if base is None else base[k], [m[k] for m in loaded], [0.5, 0.3, 0.2],
                             normalize=True, eps=1e-8)
        torch.testing.assert_close(got[k], want, rtol=2e-6, atol=2e-6, msg=k)


@pytest.mark.parametrize("step", [
    {"method": "nuslerp", "base": "base", "models": ["a", "b"], "parameters": {"weight": {"a": 0.7, "b": 0.4}}},
    {"method": "nuslerp", "models": ["a", "b"], "parameters": {"weight": {"a": 0.7, "b": 0.4},
                                                             "nuslerp_flatten": False}},
    {"method": "nuslerp", "base": "base", "models": ["a", "b"],
     "parameters": {"weight": {"a": 0.7, "b": 0.4}, "nuslerp_flatten": False, "nuslerp_row_wise": True}},
    {"method": "multislerp", "base": "base", "models": ["a", "b", "c"], "parameters": {"weight": [0.2, 0.5, 1.0]}},
    {"method": "multislerp", "models": ["a", "b"], "parameters": {"weight": {"a": 1.0, "b": 3.0},
                                                                "normalize_weights": False}},
])
def test_row_blocks_give_the_bits_of_whole_tensors(three, monkeypatch, step) -> None:
    """Big tensors stream in row blocks (after a pass for the whole-tensor sums where the method
    needs them): the same bits as whole tensors."""
    from mergekit_lite.engine import stream

    ms = three
    inputs = {"base": str(ms.base), **{k: str(p) for k, p in zip("abc", ms.finetunes, strict=True)}}
    recipe = {"inputs": inputs, "steps": [{"id": "s", **step}]}
    whole = mlite.run_recipe(recipe).state_dict
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(stream, "WHOLE_TENSOR_BLOCKS", 8)
    seen: list[tuple[str, tuple[int, int] | None]] = []
    blocked = mlite.run_recipe(recipe, tensor_hook=lambda name, job, out: seen.append((name, job.rows))).state_dict
    streamed = sum(1 for n, r in seen if n == "model.embed_tokens.weight" and r is not None)
    assert (streamed > 4) == (step["parameters"].get("nuslerp_row_wise") is not True)
    assert [k for k in whole if not torch.equal(whole[k], blocked[k])] == []


def test_api_merge_with_an_optional_base(three) -> None:
    """`mlite.merge(base=...)` gives these methods their base (not a first endpoint, as for slerp)."""
    ms = three
    got = mlite.merge("multislerp", base=ms.base, models=list(ms.finetunes[:2]),
                      model_parameters=[{"weight": 1.0}, {"weight": 1.0}])
    recipe = _mergekit("multislerp", ms.base, [(ms.finetunes[0], 1.0), (ms.finetunes[1], 1.0)])
    want = mlite.run_recipe(recipe).state_dict
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def _problems(recipe: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    return info.value.problems


def test_recipe_mistakes_are_one_line_errors(three, tmp_path) -> None:
    ms = three
    f1, f2, f3 = ms.finetunes
    # nuslerp: exactly two models besides the base (mergekit's base + one model is not enough)
    msg = _problems(_mergekit("nuslerp", ms.base, [(f1, 1.0)]))
    assert len(msg) == 1 and "method 'nuslerp' needs at least 2 model(s), got 1" in msg[0]
    msg = _problems(_mergekit("nuslerp", None, [(f1, 1.0), (f2, 1.0), (f3, 1.0)]))
    assert len(msg) == 1 and "method 'nuslerp' takes at most 2 model(s), got 3" in msg[0]
    # weight is required, as in mergekit
    for method in ("nuslerp", "multislerp"):
        recipe = _mergekit(method, ms.base, [(f1, 1.0), (f2, 1.0)])
        del recipe["models"][1]["parameters"]
        msg = _problems(recipe)
        assert len(msg) == 1 and f"method '{method}' needs parameter 'weight' for model" in msg[0], msg
    # multislerp: weights that sum to 0 are refused before any tensor is read (mergekit: NaN)
    with pytest.raises(RecipeError, match=r"tensor .*: the weights sum to 0 and normalize_weights divides"):
        mlite.dry_run(_mergekit("multislerp", ms.base, [(f1, 1.0), (f2, -1.0)]))
    mlite.dry_run(_mergekit("multislerp", ms.base, [(f1, 1.0), (f2, -1.0)], normalize_weights=False))
    # eps must be positive
    msg = _problems(_mergekit("multislerp", None, [(f1, 1.0), (f2, 1.0)], eps=0))
    assert len(msg) == 1 and "parameter 'eps' of method 'multislerp': must be > 0" in msg[0]
