"""Golden tests for the baseline merge methods: small hand-checkable tensors, values asserted."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite.errors import CheckpointError, RecipeError
from mergekit_lite.methods import draws
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.methods.sparsify import (
    della_probabilities,
    elect_signs,
    keep_count,
    magnitude_mask,
    outlier_counts,
    outlier_mask,
)
from mergekit_lite.methods.stats import RadixSelect, exact_select, float_to_key, key_to_float


def T(values: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype)


def make_job(method: str, base: Any, models: list[Any], *, name: str = "w", seed: int = 0,
             stats: Any = None, dtype: torch.dtype = torch.float32, **params: Any) -> TensorJob:
    spec = get_method(method)
    assert spec is not None
    resolved = spec.defaults()
    resolved.update(params)
    for p in spec.params:
        if p.per_model and not isinstance(resolved[p.name], tuple):
            resolved[p.name] = (resolved[p.name],) * len(models)
    return TensorJob(
        name=name,
        base=None if base is None else T(base, dtype),
        models=[T(m, dtype) for m in models],
        params=resolved,
        seed=seed,
        stats=stats,
    )


def run(method: str, base: Any, models: list[Any], **kw: Any) -> torch.Tensor:
    job = make_job(method, base, models, **kw)
    out = get_method(method).merge(job)  # type: ignore[union-attr]
    assert out.shape == (job.base if job.base is not None else job.models[0]).shape
    return out


def close(a: torch.Tensor, b: Any, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, T(b, a.dtype), rtol=tol, atol=tol)


LAMBDA = "lambda"

# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "name,needs_base,min_models,max_models,ordered",
    [
        ("linear", False, 1, None, False),
        ("task_arithmetic", True, 1, None, False),
        ("ties", True, 1, None, False),
        ("dare_linear", True, 1, None, False),
        ("dare_ties", True, 1, None, False),
        ("slerp", False, 1, 2, True),
        ("model_stock", True, 2, None, False),
        ("breadcrumbs", True, 1, None, False),
        ("breadcrumbs_ties", True, 1, None, False),
        ("della", True, 1, None, False),
        ("della_linear", True, 1, None, False),
        ("nuslerp", False, 2, 2, False),
        ("multislerp", False, 1, None, False),
        ("sce", True, 1, None, False),
        ("nearswap", True, 1, 1, False),
        ("karcher", False, 1, None, False),
        ("arcee_fusion", True, 1, 1, False),
        ("passthrough", False, 1, 1, False),
        ("ram", True, 1, None, False),
        ("ramplus_tl", True, 1, None, False),
    ],
)
def test_registry_entries(name: str, needs_base: bool, min_models: int, max_models: int | None, ordered: bool) -> None:
    spec = get_method(name)
    assert spec is not None
    assert (spec.needs_base, spec.min_models, spec.max_models, spec.ordered) == (
        needs_base, min_models, max_models, ordered
    )
    assert spec.doc and spec.paper
    scope = spec.scope(spec.defaults())
    assert scope == "tensor"


@pytest.mark.parametrize(
    "name,normalize",
    [("linear", True), ("task_arithmetic", False), ("ties", True), ("dare_linear", False),
     ("dare_ties", False), ("breadcrumbs", False), ("breadcrumbs_ties", False), ("della", True),
     ("della_linear", False)],
)
def test_normalize_defaults_follow_mergekit(name: str, normalize: bool) -> None:
    assert get_method(name).defaults()["normalize"] is normalize  # type: ignore[union-attr]


def test_parameter_defaults() -> None:
    d = get_method("ties").defaults()  # type: ignore[union-attr]
    assert (d["weight"], d["density"], d[LAMBDA], d["scope"], d["int8_mask"]) == (1.0, 1.0, 1.0, "tensor", False)
    assert get_method("ties").scope({**d, "scope": "global"}) == "global"  # type: ignore[union-attr]
    assert get_method("dare_ties").defaults()["rescale"] == "paper"  # type: ignore[union-attr]
    assert get_method("breadcrumbs").defaults()["gamma"] == 0.01  # type: ignore[union-attr]
    assert get_method("della").defaults()["epsilon"] == 0.15  # type: ignore[union-attr]
    assert get_method("slerp").defaults()["t"] == 0.5  # type: ignore[union-attr]
    density = get_method("ties").param("density")  # type: ignore[union-attr]
    assert density.check(0.0) and density.check(1.5) and density.check(0.3) is None


# ---------------------------------------------------------------- linear / task arithmetic


def test_linear_weighted_average() -> None:
    close(run("linear", None, [[1, 2], [3, 6]], weight=(1.0, 3.0)), [2.5, 5.0])
    close(run("linear", None, [[1, 2], [3, 6]], weight=(1.0, 3.0), normalize=False), [10.0, 20.0])
    close(run("linear", None, [[1, 2], [3, 6]], weight=(2.0, -1.0), normalize=False), [-1.0, -2.0])
    # the base, when present, is not part of a linear merge
    close(run("linear", [100, 100], [[1, 2], [3, 6]]), [2.0, 4.0])


def test_linear_zero_weight_sum_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="linear.*sum to 0.*tensor w"):
        run("linear", None, [[1, 2], [3, 6]], weight=(1.0, -1.0))


def test_task_arithmetic_golden() -> None:
    base, m1, m2 = [1, 1, 1], [2, 0, 1], [1, 3, 1]  # τ1 = [1,-1,0], τ2 = [0,2,0]
    close(run("task_arithmetic", base, [m1, m2], weight=(1.0, 0.5)), [2, 1, 1])
    close(run("task_arithmetic", base, [m1, m2], weight=(1.0, 0.5), **{LAMBDA: 2.0}), [3, 1, 1])
    # normalize divides by Σw = 1.5 before λ
    close(run("task_arithmetic", base, [m1, m2], weight=(1.0, 0.5), normalize=True, **{LAMBDA: 3.0}), [3, 1, 1])


def test_task_arithmetic_negative_weight_negates() -> None:
    close(run("task_arithmetic", [1, 1, 1], [[2, 0, 1]], weight=(-1.0,)), [0, 2, 1])


def test_mismatched_shapes_are_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="tensor w: model 2 has shape"):
        run("task_arithmetic", [1, 1], [[1, 1], [1, 1, 1]])


def test_base_required() -> None:
    with pytest.raises(RecipeError, match="base model is required"):
        run("ties", None, [[1, 1]])


# ---------------------------------------------------------------- TIES


TAU1 = [3, -2, 1, 0.5, -4, 0]
TAU2 = [-1, 1, 2, -3, 2, 0.5]


def test_ties_golden() -> None:
    # density 0.5 → k = 3: τ̂1 = [3,-2,0,0,-4,0], τ̂2 = [0,0,2,-3,2,0]
    # weights (1, 2): Σwτ̂ = [3,-2,4,-6,0,0] → γ = [+,-,+,-,+,+] (a zero sum elects +)
    # entry 4: only model 2 (w·τ̂ = +4) agrees → 4 / 2 = 2; entry 5: nobody → base
    base = [10.0] * 6
    m1 = [10 + v for v in TAU1]
    m2 = [10 + v for v in TAU2]
    out = run("ties", base, [m1, m2], density=(0.5, 0.5), weight=(1.0, 2.0))
    close(out, [13, 8, 12, 7, 12, 10])
    out = run("ties", base, [m1, m2], density=(0.5, 0.5), weight=(1.0, 2.0), normalize=False, **{LAMBDA: 0.5})
    close(out, [11.5, 9, 12, 7, 12, 10])


def test_elect_signs_zero_sum_elects_plus() -> None:
    assert elect_signs(T([3.0, -0.5, 0.0, -0.0])).tolist() == [1.0, -1.0, 1.0, 1.0]


def test_ties_density_one_two_models() -> None:
    # γ = sign([2,-1,3,-2.5,-2,0.5]); agreeing means: [3, -2, (1+2)/2, -3, -4, 0.5]
    close(run("ties", [0.0] * 6, [TAU1, TAU2]), [3, -2, 1.5, -3, -4, 0.5])


def test_ties_magnitude_ties_are_all_kept() -> None:
    tau = T([1, -1, 1, -1, 0.5, 0])
    assert keep_count(0.5, 6) == 3
    assert magnitude_mask(tau, 0.5).tolist() == [True, True, True, True, False, False]
    close(run("ties", [0.0] * 6, [tau.tolist()], density=(0.5,)), [1, -1, 1, -1, 0, 0])
    # no tie at the cut: exactly k kept
    assert magnitude_mask(T([5, 1, -4, 2]), 0.5).tolist() == [True, False, True, False]


def test_ties_density_rounds_down_but_keeps_at_least_one() -> None:
    assert keep_count(0.1, 6) == 0 and keep_count(0.34, 6) == 2 and keep_count(1.0, 6) == 6
    # mergekit's per-tensor trim keeps max(1, int(density·n)) entries for a positive density
    assert keep_count(0.1, 6, at_least_one=True) == 1 and keep_count(0.0, 6, at_least_one=True) == 0
    close(run("ties", [1.0] * 6, [[1.0, 2.0, 1.0, 1.5, 1.0, 1.0]], density=(0.1,)), [1.0, 2.0, 1.0, 1.0, 1.0, 1.0])


def test_ties_negative_weight() -> None:
    # one model, w = −1: w·τ = −τ everywhere agrees; normalised by Σw = −1 the sign comes back
    # (mergekit's definition); without normalisation it negates the task vector.
    base, model = [0.0, 0.0], [1.0, -2.0]
    close(run("ties", base, [model], weight=(-1.0,)), [1.0, -2.0])
    close(run("ties", base, [model], weight=(-1.0,), normalize=False), [-1.0, 2.0])


def _global_run(method: str, tensors: dict[str, tuple[list[float], list[list[float]]]], **params: Any) -> dict[str, torch.Tensor]:
    """What the engine does for a global-scope step: stats passes, then the output pass."""
    spec = get_method(method)
    jobs = {n: make_job(method, b, ms, name=n, **params) for n, (b, ms) in tensors.items()}
    n_models = len(next(iter(tensors.values()))[1])
    reducer = spec.reducer(next(iter(jobs.values())).params, n_models)  # type: ignore[union-attr,misc]
    for _ in range(10):
        for job in jobs.values():
            reducer.observe(job)
        if reducer.end_pass():
            break
    stats = reducer.result()
    return {n: spec.merge(make_job(method, b, ms, name=n, stats=stats, **params))  # type: ignore[union-attr]
            for n, (b, ms) in tensors.items()}


def test_ties_global_scope_golden() -> None:
    # model-wide |τ| = {5, 4, 1, 2}, density 0.5 → k = 2 → threshold 4: tensor b loses everything,
    # while per-tensor trimming would keep its 2.
    tensors = {"a": ([0.0, 0.0], [[5.0, -4.0]]), "b": ([0.0, 0.0], [[1.0, 2.0]])}
    out = _global_run("ties", tensors, density=(0.5,), scope="global")
    close(out["a"], [5.0, -4.0])
    close(out["b"], [0.0, 0.0])
    close(run("ties", [0.0, 0.0], [[1.0, 2.0]], density=(0.5,)), [0.0, 2.0])


def test_ties_global_equals_flattened_model(rng: torch.Generator) -> None:
    shapes = {"x": (7, 5), "y": (13,), "z": (3, 4)}
    base = {n: torch.randn(s, generator=rng) for n, s in shapes.items()}
    models = [{n: base[n] + torch.randn(s, generator=rng).round(decimals=1) for n, s in shapes.items()}
              for _ in range(3)]
    params = dict(density=(0.3, 0.5, 0.25), weight=(1.0, 0.7, 1.3))
    tensors = {n: (base[n].tolist(), [m[n].tolist() for m in models]) for n in shapes}
    out = _global_run("ties", tensors, scope="global", **params)
    flat_base = torch.cat([base[n].reshape(-1) for n in shapes])
    flat_models = [torch.cat([m[n].reshape(-1) for n in shapes]) for m in models]
    flat = run("ties", flat_base.tolist(), [f.tolist() for f in flat_models], **params)
    assert torch.equal(torch.cat([out[n].reshape(-1) for n in shapes]), flat)


def test_ties_global_rejects_per_tensor_density() -> None:
    tensors = {"a": ([0.0, 0.0], [[5.0, -4.0]])}
    spec = get_method("ties")
    reducer = spec.reducer({"density": (0.5,), "scope": "global"}, 1)  # type: ignore[union-attr,misc]
    job = make_job("ties", *tensors["a"], name="a", density=(0.5,), scope="global")
    reducer.observe(job)
    reducer.end_pass()
    reducer.observe(job)
    assert reducer.end_pass()
    with pytest.raises(RecipeError, match="same for every tensor"):
        spec.merge(make_job("ties", *tensors["a"], name="a", density=(0.25,), scope="global",  # type: ignore[union-attr]
                            stats=reducer.result()))


# ---------------------------------------------------------------- DARE


def _uniforms(name: str, seed: int, shape: tuple[int, ...], n_models: int) -> list[torch.Tensor]:
    job = TensorJob(name=name, base=None, models=[], params={}, seed=seed)
    return [draws.uniforms(job, i, shape) for i in range(n_models)]


def test_dare_paper_rescale_golden() -> None:
    out = run("dare_linear", [0.0] * 8, [[1.0] * 8], density=(0.5,), seed=7, name="layer.0")
    mask = _uniforms("layer.0", 7, (8,), 1)[0] < 0.5
    close(out, torch.where(mask, 2.0, 0.0))
    assert 0 < int(mask.sum()) < 8


def test_dare_l1_rescale_golden() -> None:
    tau = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0])
    out = run("dare_linear", [0.0] * 6, [tau.tolist()], density=(0.5,), rescale="l1", seed=4)
    mask = _uniforms("w", 4, (6,), 1)[0] < 0.5
    kept = tau * mask
    close(out, kept * (tau.abs().sum() / kept.abs().sum()))
    assert math.isclose(float(out.abs().sum()), 21.0, rel_tol=1e-6)


def test_dare_rescale_none_and_density_one() -> None:
    tau = [1.0, -2.0, 3.0, -4.0]
    mask = _uniforms("w", 0, (4,), 1)[0] < 0.5
    close(run("dare_linear", [0.0] * 4, [tau], density=(0.5,), rescale="none"), T(tau) * mask)
    close(run("dare_ties", [0.0] * 4, [tau]), tau)


def test_dare_seed_and_name_determinism() -> None:
    kw = dict(density=(0.5,))
    a = run("dare_linear", [0.0] * 64, [[1.0] * 64], seed=1, name="t", **kw)
    assert torch.equal(a, run("dare_linear", [0.0] * 64, [[1.0] * 64], seed=1, name="t", **kw))
    assert not torch.equal(a, run("dare_linear", [0.0] * 64, [[1.0] * 64], seed=2, name="t", **kw))
    assert not torch.equal(a, run("dare_linear", [0.0] * 64, [[1.0] * 64], seed=1, name="u", **kw))


def test_dare_model_masks_do_not_depend_on_other_densities() -> None:
    u = _uniforms("w", 5, (16,), 2)
    out = run("dare_linear", [0.0] * 16, [[0.0] * 16, [1.0] * 16], density=(1.0, 0.5), seed=5)
    close(out, torch.where(u[1] < 0.5, 2.0, 0.0))


def test_dare_ties_golden() -> None:
    base = [0.0] * 4
    m1, m2 = [1.0, -1.0, 2.0, 0.0], [-3.0, -1.0, 1.0, 2.0]
    u = _uniforms("w", 0, (4,), 2)
    t1 = T(m1) * (u[0] < 0.5) / 0.5
    t2 = T(m2) * (u[1] < 0.5) / 0.5
    gamma = torch.where(t1 + t2 >= 0, 1.0, -1.0)
    expected = t1 * (torch.sign(t1) == gamma) + t2 * (torch.sign(t2) == gamma)  # normalize off
    close(run("dare_ties", base, [m1, m2], density=(0.5, 0.5)), expected)
    close(run("dare_ties", base, [m1, m2]), [-3.0, -2.0, 3.0, 2.0])  # density 1: TIES, unnormalised


# ---------------------------------------------------------------- breadcrumbs

CRUMBS = [0.1, -5, 2, -3, 0.5, 1, 4, -0.2, 0.3, 6]


def test_breadcrumbs_golden() -> None:
    assert outlier_counts(0.5, 0.1, 10) == (4, 1)
    close(run("breadcrumbs", [0.0] * 10, [CRUMBS], density=(0.5,), gamma=(0.1,)), [0, -5, 2, -3, 0, 1, 4, 0, 0, 0])
    # density + gamma > 1: the top cut shrinks so density remains (n_top 6 → 5, n_bottom 0)
    assert outlier_counts(0.5, 0.6, 10) == (0, 5)
    close(run("breadcrumbs", [0.0] * 10, [CRUMBS], density=(0.5,), gamma=(0.6,)),
          [0.1, 0, 0, 0, 0.5, 1, 0, -0.2, 0.3, 0])
    # gamma·n < 1: no outlier cut, plain top-density
    close(run("breadcrumbs", [0.0] * 10, [CRUMBS], density=(0.5,), gamma=(0.05,)), [0, -5, 2, -3, 0, 0, 4, 0, 0, 6])
    # density 1 keeps everything whatever gamma
    close(run("breadcrumbs", [0.0] * 10, [CRUMBS], gamma=(0.3,)), CRUMBS)


def test_breadcrumbs_weights_and_ties_at_cuts() -> None:
    # |τ| = [1,1,2,3,3]: density 0.4, gamma 0.2 → n_top 1, n_bottom 2; both cuts fall in ties
    tau = T([1.0, -1.0, 2.0, 3.0, -3.0])
    assert outlier_counts(0.4, 0.2, 5) == (2, 1)
    # kept interval [a_2, a_3] = [2, 3]: the tied 3s are both kept
    assert outlier_mask(tau, 0.4, 0.2).tolist() == [False, False, True, True, True]
    out = run("breadcrumbs", [1.0] * 5, [(1 + tau).tolist(), [1.0] * 5], density=(0.4, 0.4), gamma=(0.2, 0.2),
              weight=(0.5, 3.0), **{LAMBDA: 2.0})
    close(out, [1, 1, 3, 4, -2])


def test_breadcrumbs_ties_golden() -> None:
    """The same thinning, then TIES' election: entries against the elected sign drop out."""
    a = [0.0, 4.0, -2.0, 1.0, 3.0]
    b = [0.0, -1.0, 2.5, 1.5, -3.0]
    # density 0.8, gamma 0.2 on 5 entries: drop 1 outlier on top and 0 at the bottom
    assert outlier_counts(0.8, 0.2, 5) == (0, 1)
    # thinned: a → [0, 0, -2, 1, 3] (4 is the outlier), b → [0, -1, 2.5, 1.5, 0] (|-3| the outlier)
    # weighted (1, 1) sums: [0, -1, 0.5, 2.5, 3] → signs [+, −, +, +, +]
    close(run("breadcrumbs_ties", [0.0] * 5, [a, b], density=(0.8, 0.8), gamma=(0.2, 0.2)), [0, -1, 2.5, 2.5, 3])
    close(run("breadcrumbs", [0.0] * 5, [a, b], density=(0.8, 0.8), gamma=(0.2, 0.2)), [0, -1, 0.5, 2.5, 3])
    close(run("breadcrumbs_ties", [0.0] * 5, [a, b], density=(0.8, 0.8), gamma=(0.2, 0.2), normalize=True),
          [0, -1, 2.5, 1.25, 3])


# ---------------------------------------------------------------- DELLA


def test_della_probabilities_golden() -> None:
    p = della_probabilities(T([1.0, 3.0, 2.0, -4.0]), 0.5, 0.2)
    close(p, [0.3, 0.3 + 0.4 * 2 / 3, 0.3 + 0.4 / 3, 0.7])
    # equal magnitudes ranked by position; 2-D: per row
    close(della_probabilities(T([2.0, -2.0, 1.0]), 0.5, 0.1), [0.5, 0.6, 0.4])
    close(della_probabilities(T([[1.0, 2.0], [5.0, 0.0]]), 0.5, 0.1), [[0.4, 0.6], [0.6, 0.4]])
    close(della_probabilities(T([7.0]), 0.5, 0.1), [0.5])


def test_della_golden_paper_and_l1() -> None:
    tau = T([1.0, 3.0, 2.0, -4.0, 0.5, -1.5])
    p = della_probabilities(tau, 0.5, 0.2)
    u = _uniforms("w", 0, (6,), 1)[0]
    kept = tau * (u < p)
    assert 0 < int((kept != 0).sum()) < 6  # this seed drops some entries and keeps some
    out = run("della", [0.0] * 6, [tau.tolist()], density=(0.5,), epsilon=(0.2,), seed=0)
    close(out, kept / p)
    out = run("della_linear", [0.0] * 6, [tau.tolist()], density=(0.5,), epsilon=(0.2,), seed=0, rescale="l1")
    close(out, kept * tau.abs().sum() / kept.abs().sum())


def test_della_elects_signs_and_normalises() -> None:
    # density 1: no drop; della = TIES disjoint mean, della_linear = sum
    close(run("della", [0.0] * 6, [TAU1, TAU2]), [3, -2, 1.5, -3, -4, 0.5])
    close(run("della_linear", [0.0] * 6, [TAU1, TAU2]), [2, -1, 3, -2.5, -2, 0.5])


def test_della_epsilon_range_error() -> None:
    with pytest.raises(RecipeError, match="della: model 1, tensor w: density ± epsilon"):
        run("della", [0.0] * 4, [[1.0, 2.0, 3.0, 4.0]], density=(0.1,), epsilon=(0.15,))


# ---------------------------------------------------------------- slerp


def test_slerp_golden() -> None:
    h = math.sqrt(0.5)
    close(run("slerp", None, [[1.0, 0.0], [0.0, 1.0]], t=0.5), [h, h])
    close(run("slerp", None, [[1.0, 0.0], [0.0, 1.0]], t=0.0), [1.0, 0.0])
    close(run("slerp", None, [[1.0, 0.0], [0.0, 1.0]], t=1.0), [0.0, 1.0])
    # base + one model, unnormalised endpoints: Ω = π/2, s0 = s1 = sin(π/4)
    close(run("slerp", [1.0, 0.0], [[0.0, 2.0]], t=0.5), [h, 2 * h])
    # t = 1/3 between orthogonal unit vectors: [cos 30°, sin 30°]
    close(run("slerp", None, [[1.0, 0.0], [0.0, 1.0]], t=1 / 3), [math.sqrt(3) / 2, 0.5])


def test_slerp_sums_in_chunks_without_float64_copies(monkeypatch) -> None:
    """The norms and dot are float64 sums over chunks: equal to the whole-vector float64 sums to
    rounding, and the merge is the same either way the endpoints are held."""
    from mergekit_lite.methods import slerp

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(37, 11, generator=g), torch.randn(37, 11, generator=g)
    whole = slerp.slerp_coefficients(0.3, a, b)
    real = slerp.flat_pieces
    monkeypatch.setattr(slerp, "flat_pieces", lambda *t: real(*t, size=10))  # 41 chunks, the last one short
    chunked = slerp.slerp_coefficients(0.3, a, b)
    assert chunked == pytest.approx(whole, rel=1e-14)
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    omega = math.acos(float(x @ y / (x.norm() * y.norm())))
    assert chunked == pytest.approx((math.sin(0.7 * omega) / math.sin(omega), math.sin(0.3 * omega) / math.sin(omega)))


def test_slerp_lerp_fallback() -> None:
    close(run("slerp", None, [[1.0, 1.0], [2.0, 2.0]], t=0.25), [1.25, 1.25])  # colinear
    close(run("slerp", None, [[1.0, 0.0], [-1.0, 0.0]], t=0.5), [0.0, 0.0])  # antiparallel
    close(run("slerp", None, [[0.0, 0.0], [0.0, 0.0]], t=0.3), [0.0, 0.0])  # zero vectors: no NaN


def test_slerp_needs_two_endpoints() -> None:
    with pytest.raises(RecipeError, match="no base"):
        run("slerp", None, [[1.0, 0.0]])


# ---------------------------------------------------------------- model stock


def test_model_stock_golden() -> None:
    # τ1 = [1,0], τ2 = [1,1]: cos = 1/√2, t = 2c/(1+c), mean = [1, 0.5]
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    close(run("model_stock", [0.0, 0.0], [[1.0, 0.0], [1.0, 1.0]]), [t, t / 2])
    close(run("model_stock", [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]]), [0.0, 0.0])  # orthogonal: t = 0
    # three models, N = 3: pairwise cos (1, 0, 0) → mean 1/3 → t = 1 / (1 + 2/3) = 0.6
    out = run("model_stock", [1.0, 1.0], [[2.0, 1.0], [3.0, 1.0], [1.0, 2.0]])
    close(out, [1.0 + 0.6 * 1.0, 1.0 + 0.6 / 3])


def test_model_stock_filter_wise() -> None:
    base = [[0.0, 0.0], [0.0, 0.0]]
    models = [[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]  # row 0 parallel, row 1 orthogonal
    close(run("model_stock", base, models, filter_wise=True), [[1.0, 0.0], [0.0, 0.0]])


def test_model_stock_needs_two_models() -> None:
    with pytest.raises(RecipeError, match="at least two"):
        run("model_stock", [0.0], [[1.0]])


def test_model_stock_degenerate_cases() -> None:
    close(run("model_stock", [1.0, 2.0], [[2.0, 2.0], [0.0, 2.0]]), [1.0, 2.0])  # τ2 = −τ1
    close(run("model_stock", [1.0, 2.0], [[1.0, 2.0], [1.0, 2.0]]), [1.0, 2.0])  # zero task vectors


# ---------------------------------------------------------------- all-zero task vectors, bf16


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                    "della", "della_linear", "model_stock", "linear", "slerp", "sce"])
@pytest.mark.parametrize("rescale", ["paper", "l1"])
def test_all_zero_task_vectors_give_base(method: str, rescale: str) -> None:
    base = [0.5, -1.0, 2.0, 0.0, 3.0, -0.25]
    params: dict[str, Any] = {}
    spec = get_method(method)
    if spec.param("density"):  # type: ignore[union-attr]
        params["density"] = (0.5, 0.5)
    if spec.param("rescale"):  # type: ignore[union-attr]
        params["rescale"] = rescale
    if spec.param("epsilon"):  # type: ignore[union-attr]
        params["epsilon"] = (0.1, 0.1)
    models = [base, base] if method != "slerp" else [base]
    out = run(method, base, models, **params)
    assert not torch.isnan(out).any()
    close(out, base)


def test_bf16_inputs_golden() -> None:
    # bf16-representable inputs; fp32 maths; one rounding to bf16 at the end gives the exact answer
    base = torch.tensor([1.0, 2.0, -3.0, 0.5], dtype=torch.bfloat16)
    m1 = torch.tensor([1.5, 2.0, -2.0, 0.75], dtype=torch.bfloat16)
    m2 = torch.tensor([0.5, 4.0, -3.0, 0.25], dtype=torch.bfloat16)
    out = run("task_arithmetic", base.float(), [m1.float(), m2.float()], weight=(1.0, 0.5))
    assert out.to(torch.bfloat16).tolist() == [1.25, 3.0, -2.0, 0.625]
    out = run("ties", base.float(), [m1.float(), m2.float()])
    # τ1 = [.5,0,1,.25], τ2 = [-.5,2,0,-.25]: Σ = [0,2,1,0] → + elected; agreeing means
    assert out.to(torch.bfloat16).tolist() == [1.5, 4.0, -2.0, 0.75]


# ---------------------------------------------------------------- radix select


def test_float_keys_order_and_roundtrip() -> None:
    x = T([-float("inf"), -3.5, -1e-45, -0.0, 0.0, 1e-45, 2.0, float("inf")])
    keys = float_to_key(x)
    assert keys[3] == keys[4]  # -0.0 and +0.0 share a key
    assert torch.all(keys[1:] >= keys[:-1]) and torch.all(keys[:3] < keys[3]) and torch.all(keys[5:] > keys[4])
    assert torch.equal(key_to_float(keys)[[0, 1, 2, 5, 6, 7]], x[[0, 1, 2, 5, 6, 7]])


def test_radix_select_equals_sort(rng: torch.Generator) -> None:
    rows = [torch.randn(2000, generator=rng).round(decimals=2) * 100, -torch.rand(777, generator=rng),
            torch.zeros(50)]
    ranks = [[0, 1000, 1999], [0, 400, 776], [0, 25, 49]]
    select = RadixSelect(3, ranks)
    passes = 0
    while True:
        passes += 1
        for r, v in enumerate(rows):
            for chunk in v.split(333):
                select.observe(r, chunk)
        if select.end_pass():
            break
    assert passes == 2
    assert select.counts().tolist() == [2000, 777, 50]
    for r, v in enumerate(rows):
        assert torch.equal(select.values()[r], exact_select(v, ranks[r]))


def test_radix_select_rank_callable_and_empty_row() -> None:
    select = RadixSelect(2, lambda row, n: [n - 1] if n else [0])
    for _ in range(2):
        select.observe(0, T([3.0, 9.0, -1.0]))
        done = select.end_pass()
    assert done
    assert select.values()[0, 0] == 9.0 and math.isnan(float(select.values()[1, 0]))


def test_radix_select_detects_changed_second_pass() -> None:
    select = RadixSelect(1, [[1]])
    select.observe(0, T([1.0, 2.0]))
    select.end_pass()
    select.observe(0, T([1.0]))
    with pytest.raises(RuntimeError, match="different values"):
        select.end_pass()


def test_draws_do_not_depend_on_row_blocks() -> None:
    """u and the keep masks are a function of (seed, tensor, model, position): whole == any row blocks."""
    shape = (37, 5_001)  # rows start at positions that are not multiples of 8 (the PCG64 word)
    whole = draws.uniforms(TensorJob("w", None, [], {}, seed=4), 1, shape)
    probs = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    for step in (1, 5, 21):
        jobs = [(TensorJob("w", None, [], {}, seed=4, rows=(a, min(a + step, 37))), (min(a + step, 37) - a, 5_001))
                for a in range(0, 37, step)]
        assert torch.equal(torch.cat([draws.uniforms(job, 1, part) for job, part in jobs]), whole)
        masks = [draws.keep_mask(job, 1, part, 0.3) for job, part in jobs]
        assert torch.equal(torch.cat(masks), whole < 0.3)
        masks = [draws.keep_mask(job, 1, part, probs[job.rows[0] : job.rows[1]]) for job, part in jobs]  # type: ignore[index]
        assert torch.equal(torch.cat(masks), whole < probs.double())
    other_model = draws.uniforms(TensorJob("w", None, [], {}, seed=4), 2, shape)
    assert not torch.equal(other_model, whole)
    assert 0.49 < float(whole.mean()) < 0.51


def test_draws_are_on_the_2_pow_32_grid_and_spread() -> None:
    u = draws.uniforms(TensorJob("w", None, [], {}, seed=1), 0, (1 << 17,))
    scaled = u * 2.0**32
    assert torch.equal(scaled, scaled.floor()) and float(u.min()) >= 0 and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=16, min=0, max=1)  # 8192 per bin expected, σ ≈ 88
    assert float((counts - 8192).abs().max()) < 600
    low = (scaled.long() & ((1 << draws.FINE_BITS) - 1)).double() / 2.0**draws.FINE_BITS  # F on its own
    assert 0.49 < float(low.mean()) < 0.51


@settings(max_examples=60, deadline=None)
@given(
    p=st.one_of(st.floats(0, 1), st.integers(0, 256).map(lambda k: k / 256), st.sampled_from([1e-9, 1 - 1e-9])),
    seed=st.integers(0, 2**31),
)
def test_keep_mask_is_u_below_p(p: float, seed: int) -> None:
    """The byte-first fast path decides exactly u < p, for one p and for per-entry p."""
    job = TensorJob("t", None, [], {}, seed=seed)
    u = draws.uniforms(job, 0, (3, 700))
    assert torch.equal(draws.keep_mask(job, 0, (3, 700), p), u < p)
    per_entry = torch.full((3, 700), p, dtype=torch.float32)
    per_entry[1] = torch.linspace(0, 1, 700)
    assert torch.equal(draws.keep_mask(job, 0, (3, 700), per_entry), u < per_entry.double())


def test_keep_mask_takes_any_float_dtype_and_out_of_range_probabilities() -> None:
    job = TensorJob("w", None, [], {}, seed=5)
    u = draws.uniforms(job, 0, (4, 999))
    line = torch.linspace(-0.1, 1.1, 4 * 999).reshape(4, 999)
    for p in (line, line.double(), line.bfloat16(), torch.full((4, 999), -0.5), torch.full((4, 999), 1.5)):
        assert torch.equal(draws.keep_mask(job, 0, (4, 999), p), u < p.double()), p.dtype
    for p in (-0.5, 0.0, 1.0, 1.5):
        assert torch.equal(draws.keep_mask(job, 0, (4, 999), p), u < p)


def test_keep_mask_resolves_ties_on_the_byte_with_the_low_bits() -> None:
    """Entries whose byte B equals floor(256p) are decided by F; pick p so that some of them are."""
    job = TensorJob("t", None, [], {}, seed=11)
    u = draws.uniforms(job, 0, (1 << 16,))
    byte = (u * 256).floor()
    p = (100 + 0.5) / 256  # B = 100 is the tied byte; about half of those entries are kept
    tied = byte == 100
    mask = draws.keep_mask(job, 0, (1 << 16,), p)
    assert torch.equal(mask, u < p)
    assert 0 < int(mask[tied].sum()) < int(tied.sum())


def test_pcg64_raw_draws_are_prefixes_and_advance_skips() -> None:
    """draws.top_bytes relies on both: a shorter raw draw is a prefix, advance(k) skips k words."""
    def draw(n: int, skip: int = 0) -> np.ndarray:
        generator = np.random.PCG64(9)
        if skip:
            generator.advance(skip)
        return generator.random_raw(n)

    full = draw(100_000)
    for n in (1, 15, 16, 17, 4097, 99_999):
        assert np.array_equal(draw(n), full[:n])
    for skip in (1, 7, 8, 4096, 65_537):
        assert np.array_equal(draw(100_000 - skip, skip), full[skip:])


def test_fine_bits_are_splitmix64() -> None:
    """F is SplitMix64's standard output (checked against a plain-Python version), top 24 bits."""
    job = TensorJob("t", None, [], {}, seed=3)
    seed, mask = draws.stream_seed(job, 2), (1 << 64) - 1

    def splitmix(k: int) -> int:
        z = (seed + (k + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return (z ^ (z >> 31)) >> 40

    positions = np.array([0, 1, 7, 65_535, 10**9])
    assert draws.fine_bits(job, 2, positions).tolist() == [splitmix(int(k)) for k in positions]
