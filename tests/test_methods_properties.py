"""Property tests (hypothesis) for the baseline methods: the sanity laws of ALGORITHMS.md.

- n identical models merge to that model (with parameters under which the law holds: density 1
  for the sparsifying methods, weights summing to 1 where the method does not normalise);
- zero task vectors change nothing (any density, any rescale);
- model order does not matter (except slerp, and except the random masks of DARE/DELLA, which
  belong to a model's position: those are checked at density 1);
- bf16 inputs: fp32 maths rounded once to bf16 equals the float64 reference rounded to bf16
  within one bf16 ulp (the maths adds no error beyond the output rounding).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.methods.stats import RadixSelect, exact_select

SETTINGS = settings(max_examples=25, deadline=None)

TASK_METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
                "della_linear"]
ALL_METHODS = [*TASK_METHODS, "linear", "model_stock", "slerp", "sce", "ram", "ramplus_tl"]
UNNORMALISED = {"task_arithmetic", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della_linear"}

# quantised values: small tensors full of ties in magnitude, exactly representable in bf16
values = st.integers(min_value=-16, max_value=16).map(lambda v: v / 4)
shapes = st.sampled_from([(1,), (5,), (12,), (3, 4), (2, 3, 2)])


@st.composite
def tensors(draw: Any, n_models: tuple[int, int] = (1, 4)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    shape = draw(shapes)
    numel = 1
    for s in shape:
        numel *= s
    n = draw(st.integers(*n_models))
    flat = draw(st.lists(values, min_size=numel * (n + 1), max_size=numel * (n + 1)))
    t = torch.tensor(flat, dtype=torch.float32).reshape(n + 1, *shape)
    return t[0], [t[i + 1] for i in range(n)]


def job(method: str, base: torch.Tensor | None, models: list[torch.Tensor], dtype: torch.dtype = torch.float32,
        **params: Any) -> TensorJob:
    spec = get_method(method)
    resolved = spec.defaults()  # type: ignore[union-attr]
    resolved.update(params)
    for p in spec.params:  # type: ignore[union-attr]
        if p.per_model and not isinstance(resolved[p.name], tuple):
            resolved[p.name] = (resolved[p.name],) * len(models)
    return TensorJob(name="blk.0.w", base=None if base is None else base.to(dtype),
                     models=[m.to(dtype) for m in models], params=resolved, seed=42)


def merge(method: str, base: torch.Tensor | None, models: list[torch.Tensor], **params: Any) -> torch.Tensor:
    return get_method(method).merge(job(method, base, models, **params))  # type: ignore[union-attr]


def sparse_params(method: str, n: int, draw_density: float, rescale: str = "paper") -> dict[str, Any]:
    spec = get_method(method)
    out: dict[str, Any] = {}
    if spec.param("density"):  # type: ignore[union-attr]
        out["density"] = (draw_density,) * n
    if getattr(spec.param("epsilon"), "per_model", False):  # DELLA's; ram's is a threshold, left at its default
        out["epsilon"] = (min(0.1, draw_density / 2, 1 - draw_density) if draw_density < 1 else 0.1,) * n
    if spec.param("rescale"):  # type: ignore[union-attr]
        out["rescale"] = rescale
    return out


def endpoints(method: str, base: torch.Tensor, models: list[torch.Tensor]) -> list[torch.Tensor]:
    if method == "slerp":
        return models[:1]
    if method == "model_stock" and len(models) < 2:
        return models * 2
    return models


@SETTINGS
@given(data=tensors(), method=st.sampled_from(ALL_METHODS))
def test_identical_models_give_that_model(data: Any, method: str) -> None:
    base, models = data
    model = models[0]
    n = 2 if method == "slerp" else max(len(models), 2 if method == "model_stock" else 1)
    same = [model.clone() for _ in range(n)]
    params: dict[str, Any] = {}
    if method in UNNORMALISED:
        params["weight"] = (1.0 / n,) * n
    if method == "slerp":
        out = merge(method, None, same, t=0.3)
    else:
        out = merge(method, base, same, **params)
    torch.testing.assert_close(out, model, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(data=tensors(), method=st.sampled_from(ALL_METHODS), density=st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0]),
       rescale=st.sampled_from(["paper", "l1", "none"]))
def test_zero_task_vectors_change_nothing(data: Any, method: str, density: float, rescale: str) -> None:
    base, models = data
    same = [base.clone() for _ in endpoints(method, base, models)]
    out = merge(method, base, same, **sparse_params(method, len(same), density, rescale))
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(data=tensors(n_models=(2, 4)), method=st.sampled_from([m for m in ALL_METHODS if m != "slerp"]),
       density=st.sampled_from([0.2, 0.5, 1.0]), seed=st.randoms(use_true_random=False))
def test_order_does_not_matter(data: Any, method: str, density: float, seed: Any) -> None:
    base, models = data
    n = len(models)
    if method in ("dare_linear", "dare_ties", "della", "della_linear"):
        density = 1.0  # random masks belong to positions
    params = sparse_params(method, n, density)
    spec = get_method(method)
    weights = [0.5 + i for i in range(n)]
    if spec.param("weight"):  # type: ignore[union-attr]
        params["weight"] = tuple(weights)
    perm = list(range(n))
    seed.shuffle(perm)
    permuted = {k: (tuple(v[i] for i in perm) if isinstance(v, tuple) else v) for k, v in params.items()}
    a = merge(method, base, models, **params)
    b = merge(method, base, [models[i] for i in perm], **permuted)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(data=tensors(), method=st.sampled_from(ALL_METHODS), density=st.sampled_from([0.3, 0.7, 1.0]),
       rescale=st.sampled_from(["paper", "l1"]), lam=st.sampled_from([1.0, 0.75]))
def test_bf16_inputs_match_float64_reference_within_one_ulp(
    data: Any, method: str, density: float, rescale: str, lam: float
) -> None:
    base, models = data
    models = endpoints(method, base, models)
    params = sparse_params(method, len(models), density, rescale)
    if get_method(method).param("lambda"):  # type: ignore[union-attr]
        params["lambda"] = lam
    if method == "linear":
        params["weight"] = tuple(1.0 + i for i in range(len(models)))
    spec = get_method(method)
    ref = spec.merge(job(method, base, models, dtype=torch.float64, **params))  # type: ignore[union-attr]
    out = spec.merge(job(method, base, models, dtype=torch.float32, **params)).to(torch.bfloat16)  # type: ignore[union-attr]
    ref_bf16 = ref.to(torch.bfloat16)
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    # Results that cancel to ~0 carry the float32 rounding of the inputs' scale, not of the result's.
    scale = max(float(t.abs().max()) for t in [base, *models]) if base is not None else max(
        float(t.abs().max()) for t in models)
    floor = scale * 2.0**-20
    assert torch.all((out.double() - ref_bf16.double()).abs() <= ulp * 2 + floor + 1e-30)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.one_of(st.floats(width=32, allow_nan=False), st.sampled_from([0.0, -0.0, 1.0, -1.0])),
                 min_size=1, max_size=60),
        min_size=1, max_size=3,
    ),
    fractions=st.lists(st.floats(min_value=0.0, max_value=0.999), min_size=1, max_size=3),
    chunk=st.integers(1, 17),
)
def test_radix_select_equals_sorting(rows: list[list[float]], fractions: list[float], chunk: int) -> None:
    tensors_ = [torch.tensor(r, dtype=torch.float32) for r in rows]
    select = RadixSelect(len(rows), lambda row, n: [int(f * n) for f in fractions])
    for _ in range(2):
        for i, t in enumerate(tensors_):
            for part in t.split(chunk):
                select.observe(i, part)
        done = select.end_pass()
    assert done
    for i, t in enumerate(tensors_):
        expected = exact_select(t, [int(f * t.numel()) for f in fractions])
        got = select.values()[i]
        assert torch.equal(got == 0, expected == 0)  # ±0 are one value
        assert torch.equal(got[expected != 0], expected[expected != 0])


@SETTINGS
@given(data=tensors(), weights=st.lists(st.sampled_from([-1.0, -0.3, 0.0, 0.3, 1.0, 1.7]), min_size=4, max_size=4),
       normalize=st.booleans(), lam=st.sampled_from([1.0, 0.5, 2.0]))
def test_task_arithmetic_in_place_equals_the_generic_combination(
        data: Any, weights: list[float], normalize: bool, lam: float) -> None:
    """The in-place fast path does the generic path's float32 ops in the same order, on copies."""
    from mergekit_lite.methods.task_arithmetic import add_to_base, task_vectors

    base, models = data
    params = {"weight": tuple(weights[: len(models)]), "normalize": normalize, "lambda": lam}
    j = job("task_arithmetic", base, models, **params)
    before = [t.clone() for t in (j.base, *j.models)]
    fast = get_method("task_arithmetic").merge(j)  # type: ignore[union-attr]
    generic = add_to_base(j, task_vectors(j, "task_arithmetic"), elect=False)
    assert torch.equal(fast, generic) and torch.equal(fast.signbit(), generic.signbit())
    assert all(torch.equal(a, b) for a, b in zip(before, (j.base, *j.models), strict=True))


@SETTINGS
@given(data=tensors(n_models=(2, 4)), weights=st.lists(st.sampled_from([-1.0, -0.3, 0.0, 0.3, 1.0, 1.7]),
                                                       min_size=4, max_size=4),
       elect=st.booleans(), normalize=st.booleans(), lam=st.sampled_from([1.0, 0.5]))
def test_combining_owned_deltas_gives_the_bits_of_untouched_ones(
        data: Any, weights: list[float], elect: bool, normalize: bool, lam: float) -> None:
    """`owned` lets combine overwrite the deltas with their weighted products; the bits (signed
    zeros included) are those of the path that leaves them untouched, which it does."""
    from mergekit_lite.methods.task_arithmetic import combine

    base, models = data
    deltas = [m - base for m in models]
    w = weights[: len(deltas)]
    before = [d.clone() for d in deltas]
    want = combine(deltas, w, elect=elect, normalize=normalize, lam=lam)
    assert all(torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()) for a, b in zip(deltas, before, strict=True))
    got = combine([d.clone() for d in deltas], w, elect=elect, normalize=normalize, lam=lam, owned=True)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


@SETTINGS
@given(method=st.sampled_from([*ALL_METHODS, "mos", "pcb"]), data=tensors(n_models=(2, 4)),
       weights=st.lists(st.sampled_from([-1.0, -0.3, 0.0, 0.3, 1.0, 1.7]), min_size=4, max_size=4),
       signs=st.lists(st.booleans(), min_size=60, max_size=60), density=st.sampled_from([1.0, 0.5]))
def test_disposable_models_give_the_same_bits(method: str, data: Any, weights: list[float], signs: list[bool],
                                              density: float) -> None:
    """A method that may overwrite its models (`models_disposable`) returns the bits it returns on
    untouchable ones, signed zeros included; the base is left alone either way."""
    base, models = data
    flip = torch.tensor(signs[: base.numel()]).reshape(base.shape)
    base = torch.where(flip & (base == 0), -base, base)  # some −0 entries in the base too
    params: dict[str, Any] = {}
    if method in (*TASK_METHODS, "linear"):
        params["weight"] = tuple(weights[: len(models)])
    if method in TASK_METHODS and method != "task_arithmetic":
        params["density"] = density
    if method == "linear" and sum(params["weight"]) == 0:
        params["normalize"] = False
    if method == "pcb":
        params["scope"] = "tensor"
    if method == "slerp":
        base, models = None, models[:2]
    if method == "mos":
        base = None
    kept = job(method, base, models, **params)
    base_before = None if kept.base is None else kept.base.clone()
    spec = get_method(method)
    want = spec.merge(kept)  # type: ignore[union-attr]
    given_away = dataclasses.replace(kept, models=[m.clone() for m in kept.models], models_disposable=True)
    got = spec.merge(given_away)  # type: ignore[union-attr]
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    if base_before is not None:
        assert torch.equal(kept.base, base_before) and torch.equal(kept.base.signbit(), base_before.signbit())


def test_empty_tensors_merge_to_empty_tensors() -> None:
    """A tensor with no entries (a (0, d) buffer) passes through every method, sparse or not."""
    for method in ALL_METHODS:
        for shape in ((0,), (0, 16), (16, 0), (2, 0, 3)):
            models = [torch.zeros(shape), torch.zeros(shape)]
            params = {"density": 0.5} if method in TASK_METHODS and method != "task_arithmetic" else {}
            out = merge(method, torch.zeros(shape), models, **params)
            assert out.shape == shape, (method, shape)
