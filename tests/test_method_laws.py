"""The sanity laws (ALGORITHMS.md, "Sanity laws every method must satisfy") where
test_methods_properties.py leaves gaps: N copies of one model, permutation of the models (with their
per-model parameters), zero task vectors, plus golden tests for those laws on hand-checkable
tensors. Strategies and job helpers are the ones of test_methods_properties.py (and
test_pcb.py / test_surgery.py / test_methods_baselines.py), imported, not copied.

Every hypothesis test here is derandomized (same examples on every run) and small.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_methods_baselines import _global_run
from test_methods_properties import SETTINGS, job, merge, sparse_params, tensors
from test_pcb import job as pcb_job
from test_surgery import GATE
from test_surgery import _job as surgery_job
from test_surgery import _params as surgery_params
from test_surgery import _run as surgery_run

from mergekit_lite.methods.portllm import merge as portllm_merge
from mergekit_lite.methods.portllm import port
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.methods.sparsify import della_probabilities, magnitude_mask, outlier_mask
from mergekit_lite.methods.surgery import surgery_merge

LAWS = settings(SETTINGS, derandomize=True, database=None)

POSITIVE_WEIGHTS = st.lists(st.sampled_from([0.25, 0.3, 0.5, 1.0, 1.7, 3.0]), min_size=4, max_size=4)
SIGNED_WEIGHTS = st.lists(st.sampled_from([-1.0, -0.3, 0.0, 0.3, 1.0, 1.7]), min_size=4, max_size=4)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def pcb_merge(base: torch.Tensor, models: list[torch.Tensor], **params: Any) -> torch.Tensor:
    """The registered pcb method, tensor scope (each tensor its own statistics)."""
    params.setdefault("scope", "tensor")
    if "weight" not in params:
        params["weight"] = (1.0,) * len(models)
    return get_method("pcb").merge(pcb_job("blk.0.w", base, models, **params))  # type: ignore[union-attr]


# =============================================================================================
# N copies of one model
# =============================================================================================


@LAWS
@given(data=tensors(n_models=(1, 1)), method=st.sampled_from(["ties", "breadcrumbs", "breadcrumbs_ties"]),
       n=st.integers(2, 4), density=st.sampled_from([0.2, 0.5, 0.7]), gamma=st.sampled_from([0.0, 0.1, 0.25]),
       weights=POSITIVE_WEIGHTS)
def test_n_copies_equal_one_copy_for_deterministic_trimming(
        data: Any, method: str, n: int, density: float, gamma: float, weights: list[float]) -> None:
    """Deterministic thinning (TIES top-k, breadcrumbs' band) treats every copy alike, so with
    normalize on, n weighted copies merge to exactly what one copy gives: θ₀ + τ ⊙ mask.
    (The existing law test only runs these methods at density 1, where nothing is thinned,
    and breadcrumbs only at gamma 0.01, which cuts nothing on ≤ 12 entries.)"""
    base, (model,) = data
    params: dict[str, Any] = {"density": (density,) * n, "normalize": True, "weight": tuple(weights[:n])}
    one: dict[str, Any] = {"density": (density,), "normalize": True}
    if method != "ties":
        params["gamma"] = (gamma,) * n
        one["gamma"] = (gamma,)
    out = merge(method, base, [model.clone() for _ in range(n)], **params)
    single = merge(method, base, [model], **one)
    close(out, single)
    tau = model - base
    mask = magnitude_mask(tau, density) if method == "ties" else outlier_mask(tau, density, gamma)
    close(single, base + tau * mask)


@LAWS
@given(data=tensors(n_models=(1, 1)), method=st.sampled_from(["ties", "breadcrumbs_ties", "dare_ties", "della"]),
       n=st.integers(2, 4), weights=SIGNED_WEIGHTS, density=st.sampled_from([0.5, 1.0]))
def test_n_copies_with_signed_weights_under_sign_election(
        data: Any, method: str, n: int, weights: list[float], density: float) -> None:
    """With TIES' election and normalisation, n copies give the (thinned) model for ANY weights
    with one non-zero: the agreeing copies all carry the same τ̂, and the divisor is the sum
    of exactly their weights (γ = sign(τ̂·Σw); a zero product never agrees)."""
    base, (model,) = data
    w = tuple(weights[:n])
    if all(x == 0 for x in w):
        w = (1.0, *w[1:])
    if method in ("dare_ties", "della"):
        density = 1.0  # thinning at density < 1 draws a different mask per copy: see the test below
    params = {**sparse_params(method, n, density), "weight": w, "normalize": True}
    out = merge(method, base, [model.clone() for _ in range(n)], **params)
    tau = model - base
    expected = base + (tau * magnitude_mask(tau, density) if method == "ties" else
                       tau * outlier_mask(tau, density, 0.01) if method == "breadcrumbs_ties" else tau)
    close(out, expected)


@LAWS
@given(data=tensors(n_models=(1, 1)), method=st.sampled_from(["dare_ties", "della"]), n=st.integers(2, 4),
       density=st.sampled_from([0.2, 0.5, 0.8]), rescale=st.sampled_from(["paper", "none"]),
       weights=POSITIVE_WEIGHTS, seed=st.integers(0, 2**31))
def test_n_copies_under_random_drop_keep_or_restore_each_entry(
        data: Any, method: str, n: int, density: float, rescale: str, weights: list[float], seed: int) -> None:
    """Seeded form of the N-copies law for the random methods with election: every copy keeps
    entry k with its own draw, but a kept entry always carries τₖ/pₖ (pₖ the same for every
    copy: density, or DELLA's rank probability of τₖ), so the disjoint mean is θ₀ + τₖ/pₖ where
    some copy kept k and θ₀ where none did. (`rescale: l1` scales each copy by its own norm
    ratio, so the law does not hold there.)"""
    base, (model,) = data
    params = {**sparse_params(method, n, density, rescale), "weight": tuple(weights[:n]), "normalize": True}
    j = job(method, base, [model.clone() for _ in range(n)], **params)
    out = get_method(method).merge(TensorJob(j.name, j.base, j.models, j.params, seed=seed))  # type: ignore[union-attr]
    tau = (model - base).double()
    if rescale == "none":
        p = torch.ones_like(tau)
    elif method == "dare_ties":
        p = torch.full_like(tau, density)
    else:
        p = della_probabilities((model - base), density, params["epsilon"][0]).double()
    restored = base.double() + tau / p
    err = torch.minimum((out.double() - base.double()).abs(), (out.double() - restored).abs())
    assert bool((err <= 1e-5 * (1 + restored.abs())).all()), (out, base, restored)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_n_copies_under_random_drop_are_the_model_on_average(method: str) -> None:
    """N-copies law in expectation (paper rescale is unbiased: E[mᵢτ/pᵢ] = τ): four copies with
    weights 1/4 of τ = 1 everywhere, density 0.3, 8192 entries. The mean of the merged delta
    is 1 ± 0.05 (σ of that mean ≈ 0.0085); the seed fixes the draws, so this is deterministic."""
    d = 8192
    base = torch.zeros(d)
    model = torch.ones(d)
    params = {**sparse_params(method, 4, 0.3), "weight": (0.25,) * 4}
    out = merge(method, base, [model.clone() for _ in range(4)], **params)
    assert abs(float(out.mean()) - 1.0) < 0.05
    assert float((out == 0).float().mean()) < 0.5  # 0.7⁴ ≈ 0.24 of entries dropped by every copy


@LAWS
@given(data=tensors(n_models=(1, 1)), n=st.integers(1, 4), weights=POSITIVE_WEIGHTS,
       method=st.sampled_from(["linear", "task_arithmetic", "dare_linear", "della_linear", "breadcrumbs"]))
def test_n_copies_normalised_with_any_positive_weights(data: Any, n: int, weights: list[float], method: str) -> None:
    """Σwᵢθ/Σwᵢ = θ for any positive weights (the existing law test uses only the default
    weights for linear, and 1/n for the unnormalised methods)."""
    base, (model,) = data
    params = {**sparse_params(method, n, 1.0), "weight": tuple(weights[:n]), "normalize": True}
    close(merge(method, base, [model.clone() for _ in range(n)], **params), model)


@LAWS
@given(data=tensors(n_models=(1, 1)), n=st.integers(2, 4))
def test_n_copies_model_stock_filter_wise(data: Any, n: int) -> None:
    """filter_wise (per-row cos and t) is absent from every existing law test. Identical copies
    have cos 1 → t = 1 → the mean, i.e. the model; rows with τ = 0 get t = 0, the base row,
    which equals the model's row too."""
    base, (model,) = data
    close(merge("model_stock", base, [model.clone() for _ in range(n)], filter_wise=True), model)


@LAWS
@given(data=tensors(n_models=(1, 1)), n=st.integers(1, 4), lam=st.sampled_from([1.0, 0.5]))
def test_n_copies_pcb(data: Any, n: int, lam: float) -> None:
    """PCB has no N-copies test at all. n identical rows of T get identical weights W, so
    τₘ = Σ W·T̃ / Σ W = T̃ wherever kept. With clamp_ratio 0 (T̃ = τ) and ratio 1 the drop
    threshold is the row's smallest β; identical copies score β = e^{n·N²}·tanh(n·τ²) ≥ 0 with
    β = 0 exactly at τ = 0, so when τ has a zero entry every non-zero entry is kept: the merge
    returns θ₀ + λτ (the model when λ = 1)."""
    base, (model,) = data
    model = model.clone().reshape(-1)
    model[0] = base.reshape(-1)[0]  # one τ = 0 entry: the row minimum of β is 0
    model = model.reshape(base.shape)
    out = pcb_merge(base, [model.clone() for _ in range(n)], ratio=1.0, clamp_ratio=0.0, **{"lambda": lam})
    close(out, base + lam * (model - base))


# =============================================================================================
# Permutation of the models (with their per-model parameters)
# =============================================================================================


def _permuted(params: dict[str, Any], perm: list[int]) -> dict[str, Any]:
    return {k: (tuple(v[i] for i in perm) if isinstance(v, tuple) else v) for k, v in params.items()}


@LAWS
@given(data=tensors(n_models=(2, 4)), perm_seed=st.randoms(use_true_random=False),
       case=st.sampled_from(["model_stock_filter_wise", "breadcrumbs", "breadcrumbs_ties", "pcb"]),
       density=st.sampled_from([0.3, 0.6, 1.0]), gamma=st.sampled_from([0.1, 0.25]),
       ratio=st.sampled_from([0.3, 0.5, 1.0]), clamp=st.sampled_from([0.0, 0.1]))
def test_order_does_not_matter_where_the_existing_law_test_does_not_look(
        data: Any, perm_seed: Any, case: str, density: float, gamma: float, ratio: float, clamp: float) -> None:
    """Gaps of test_order_does_not_matter: model_stock's filter_wise, breadcrumbs with a gamma
    that actually cuts (the default 0.01 cuts nothing on ≤ 12 entries), and PCB through the
    registered method with per-model weights λᵢ (test_pcb permutes only pcb_dense, equal λ)."""
    base, models = data
    n = len(models)
    perm = list(range(n))
    perm_seed.shuffle(perm)
    weights = tuple(0.5 + i for i in range(n))
    if case == "pcb":
        params: dict[str, Any] = {"weight": weights, "ratio": ratio, "clamp_ratio": clamp}
        a = pcb_merge(base, models, **params)
        b = pcb_merge(base, [models[i] for i in perm], **_permuted(params, perm))
        close(a, b, 1e-4)
        return
    if case == "model_stock_filter_wise":
        method, params = "model_stock", {"filter_wise": True}
    else:
        method, params = case, {"density": (density,) * n, "gamma": (gamma,) * n, "weight": weights}
    a = merge(method, base, models, **params)
    b = merge(method, base, [models[i] for i in perm], **_permuted(params, perm))
    close(a, b)


@LAWS
@given(data=tensors(n_models=(2, 2)), t=st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.7, 1.0]))
def test_slerp_swapping_the_endpoints_mirrors_t(data: Any, t: float) -> None:
    """slerp is ordered, so permutation invariance does not apply; its symmetry is
    slerp(a, b, t) = slerp(b, a, 1 − t) (never tested), and t = 0 / 1 return the endpoints
    exactly (s₀ = sin Ω / sin Ω = 1, s₁ = sin 0 = 0, or lerp's 1 and 0)."""
    _, (a, b) = data
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
    forward = merge("slerp", None, [a, b], t=t)
    torch.testing.assert_close(forward, merge("slerp", None, [b, a], t=1.0 - t), rtol=1e-5, atol=1e-6 * scale)
    assert torch.equal(merge("slerp", None, [a, b], t=0.0), a)
    assert torch.equal(merge("slerp", None, [a, b], t=1.0), b)


# =============================================================================================
# Zero task vectors
# =============================================================================================

EXACT_ZERO_METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                      "della", "della_linear", "model_stock", "pcb", "sce", "ram", "ramplus_tl"]
floats32 = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@LAWS
@given(flat=st.lists(floats32, min_size=1, max_size=12), n=st.integers(2, 3),
       method=st.sampled_from(EXACT_ZERO_METHODS), density=st.sampled_from([0.3, 1.0]),
       rescale=st.sampled_from(["paper", "l1", "none"]), normalize=st.booleans(), lam=st.sampled_from([1.0, 0.7]))
def test_zero_task_vectors_give_the_base_exactly(
        flat: list[float], n: int, method: str, density: float, rescale: str, normalize: bool, lam: float) -> None:
    """τ = θ − θ₀ is exactly 0, every step maps zeros to zeros (0·w, 0/p, a skipped L1 rescale,
    model_stock's t = 0, PCB's weight 0) and θ₀ + 0 = θ₀: the base comes back value for value,
    not just within the 1e-6 of the existing test, on arbitrary (non-dyadic) float32 bases,
    with λ ≠ 1, normalize either way, and with filter_wise / global scope where they exist."""
    base = torch.tensor(flat, dtype=torch.float32)
    same = [base.clone() for _ in range(n)]
    if method == "pcb":
        outs = [pcb_merge(base, same, ratio=0.5, **{"lambda": lam}),
                _global_run("pcb", {"a": (flat, [flat] * n), "b": (flat[::-1], [flat[::-1]] * n)},
                            scope="global", ratio=0.5)["a"]]
    elif method == "model_stock":
        outs = [merge(method, base.reshape(1, -1), [s.reshape(1, -1) for s in same], filter_wise=fw).reshape(-1)
                for fw in (False, True)]
    else:
        params = {**sparse_params(method, n, density, rescale), "normalize": normalize, "lambda": lam,
                  "weight": (0.3, 1.7, -1.0)[:n]}
        if get_method(method).param("gamma"):  # type: ignore[union-attr]
            params["gamma"] = (0.2,) * n
        outs = [merge(method, base, same, **params)]
    for out in outs:
        assert torch.equal(out, base), (out, base)


@LAWS
@given(data=tensors(n_models=(1, 3)), method=st.sampled_from(["task_arithmetic", "ties", "dare_linear", "dare_ties",
                                                              "breadcrumbs", "breadcrumbs_ties", "della",
                                                              "della_linear"]),
       density=st.sampled_from([0.3, 0.5, 1.0]), weights=SIGNED_WEIGHTS, extra=st.sampled_from([0.5, 1.0, -2.0]),
       normalize=st.booleans())
def test_an_extra_model_equal_to_the_base_changes_nothing(
        data: Any, method: str, density: float, weights: list[float], extra: float, normalize: bool) -> None:
    """The per-model form of "zero deltas change nothing": appending a model whose τ is 0 (any
    weight) adds 0 to every sum, never agrees in an election (zeros never do) and so never
    enters a TIES divisor. Exact for the unnormalised sums and for every elected method; the
    random masks of the other models are keyed by their unchanged positions. (Not a law for a
    normalised plain sum, whose divisor Σw grows, nor for PCB/model_stock, where n enters the
    scores.)"""
    base, models = data
    n = len(models)
    elect = method in ("ties", "dare_ties", "breadcrumbs_ties", "della")
    if not elect:
        normalize = False
    params = {**sparse_params(method, n, density), "weight": tuple(weights[:n]), "normalize": normalize}
    more = {**sparse_params(method, n + 1, density), "weight": (*weights[:n], extra), "normalize": normalize}
    if get_method(method).param("gamma"):  # type: ignore[union-attr]
        params["gamma"], more["gamma"] = (0.25,) * n, (0.25,) * (n + 1)
    a = merge(method, base, models, **params)
    b = merge(method, base, [*models, base.clone()], **more)
    assert torch.equal(a, b), (a, b)


@LAWS
@given(flat=st.lists(floats32, min_size=1, max_size=12), lam=st.sampled_from([1.0, -0.5, 3.0]))
def test_portllm_zero_patch_and_zero_lambda_give_the_base(flat: list[float], lam: float) -> None:
    """portllm's golden test covers delta=None only; a patch of zeros (a LoRA with B = 0, as PEFT
    initialises it) or λ = 0 must leave the new base as it is."""
    base = torch.tensor(flat)
    zero = TensorJob("w", base, [], {"lambda": lam}, delta=torch.zeros_like(base))
    assert torch.equal(portllm_merge(zero), base)
    some = torch.linspace(-3.0, 5.0, base.numel())
    assert torch.equal(port(base, some, 0.0), base)


@LAWS
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), direction=st.sampled_from(["suppress", "promote"]))
def test_surgery_alpha_zero_changes_nothing(seed: int, k: int, direction: str) -> None:
    """Surgery has no models (N-copies and permutation do not apply); its zero-edit law is that
    α = 0 selects rows but returns every tensor with its values unchanged."""
    g = torch.Generator().manual_seed(seed)
    state = {GATE.format(i): torch.randn(3, 4, generator=g) for i in range(2)}
    state[GATE.format(0)][1, 2] = -0.0
    w = torch.randn(4, generator=g)
    params = surgery_params(w, top_k=k, alpha=0.0, direction=direction)
    sel = surgery_run(state, params)
    assert sel.k == k
    for name, t in state.items():
        assert torch.equal(surgery_merge(surgery_job(name, t, params, sel)), t)


@LAWS
@given(rows=st.lists(st.lists(st.floats(-100, 100, width=32), min_size=3, max_size=3), min_size=1, max_size=1),
       n=st.integers(1, 5), m=st.floats(0.0, 1.0), mode=st.sampled_from(["stored", "sequential"]))
def test_mos_method_n_copies_float32(rows: list[list[float]], n: int, m: float, mode: str) -> None:
    """test_mos checks the fixed point on the float64 helper; the registered method runs in
    float32 (how the engine calls it). MOS is ordered (no permutation law) and has no base
    (no zero-delta law)."""
    a = torch.tensor(rows[0], dtype=torch.float32)
    out = get_method("mos").merge(TensorJob("w", None, [a.clone() for _ in range(n)],  # type: ignore[union-attr]
                                            {"momentum": m, "mode": mode}))
    close(out, a)


# =============================================================================================
# Golden tests (hand-derived values, asserted exactly)
# =============================================================================================


def test_golden_n_copies_linear_dyadic_weights() -> None:
    # 3 copies of [1, -2, 0.5], weights (0.5, 0.25, 0.25): Σw = 1, every product and sum is
    # dyadic → exactly [1, -2, 0.5]; unnormalised with weights (1, 1, 1) → 3θ = [3, -6, 1.5].
    m = [1.0, -2.0, 0.5]
    t = torch.tensor(m)
    assert merge("linear", None, [t, t, t], weight=(0.5, 0.25, 0.25)).tolist() == m
    assert merge("linear", None, [t, t, t], normalize=False).tolist() == [3.0, -6.0, 1.5]


def test_golden_n_copies_ties_and_breadcrumbs_thinned() -> None:
    # TIES, 3 copies of τ = [3, -2, 1, 0.5, -4, 0] on base 10, density 0.5 → k = 3, |τ| ≥ 2
    # kept: τ̂ = [3, -2, 0, 0, -4, 0]; γ = sign(3τ̂); disjoint mean (3·τ̂)/3 = τ̂ →
    # [13, 8, 10, 10, 6, 10] (N copies give the thinned model, not the model).
    base = torch.full((6,), 10.0)
    m = base + torch.tensor([3.0, -2.0, 1.0, 0.5, -4.0, 0.0])
    assert merge("ties", base, [m, m, m], density=0.5).tolist() == [13.0, 8.0, 10.0, 10.0, 6.0, 10.0]
    # breadcrumbs, 2 copies of CRUMBS with weights (0.5, 0.5), density 0.5, gamma 0.1 on 10 entries:
    # n_top = 1 (drops |6|), n_bottom = 4 (drops 0.1, -0.2, 0.3, 0.5) → [0,-5,2,-3,0,1,4,0,0,0];
    # 0.5·x + 0.5·x = x exactly.
    crumbs = torch.tensor([0.1, -5, 2, -3, 0.5, 1, 4, -0.2, 0.3, 6])
    out = merge("breadcrumbs", torch.zeros(10), [crumbs, crumbs], density=0.5, gamma=0.1, weight=(0.5, 0.5))
    assert out.tolist() == [0.0, -5.0, 2.0, -3.0, 0.0, 1.0, 4.0, 0.0, 0.0, 0.0]


def test_golden_n_copies_pcb() -> None:
    # 2 copies of τ = [0, 1, -2, 0.5] on base 10, clamp 0: lo = 0, hi = 2, N = [0, .5, 1, .25];
    # β = e^{2N²}·tanh(2τ²) = [0, e^.5·tanh 2 ≈ 1.589, e²·tanh 8 ≈ 7.389, e^.125·tanh .5 ≈ 0.524].
    # ratio 1 → t = sorted β[0] = 0: entries 1-3 kept, τₘ = 2Wτ/2W = τ (τ powers of two: exact)
    #   → [10, 11, 8, 10.5], the model.
    # ratio 0.5 → t = sorted β[2] = 1.589 (entry 1): only entry 2 is above t → [10, 10, 8, 10].
    # ratio 0.1 → t = sorted β[int(3.6) = 3] = max β: nothing is above it → the base.
    base = torch.full((4,), 10.0)
    m = base + torch.tensor([0.0, 1.0, -2.0, 0.5])
    assert pcb_merge(base, [m, m], ratio=1.0, clamp_ratio=0.0).tolist() == [10.0, 11.0, 8.0, 10.5]
    assert pcb_merge(base, [m, m], ratio=0.5, clamp_ratio=0.0).tolist() == [10.0, 10.0, 8.0, 10.0]
    assert pcb_merge(base, [m, m], ratio=0.1, clamp_ratio=0.0).tolist() == [10.0] * 4


def test_golden_n_copies_dare_ties_entries() -> None:
    # 3 copies of τ = [1, -2, 4, 0, 0.5, -1, 2, 3] on base 0, density 0.5, paper rescale,
    # normalize: each entry is 0 (no copy kept it) or τ/0.5 = 2τ (the mean of the kept 2τ's).
    tau = torch.tensor([1.0, -2.0, 4.0, 0.0, 0.5, -1.0, 2.0, 3.0])
    allowed = [{0.0, 2.0}, {0.0, -4.0}, {0.0, 8.0}, {0.0}, {0.0, 1.0}, {0.0, -2.0}, {0.0, 4.0}, {0.0, 6.0}]
    out = merge("dare_ties", torch.zeros(8), [tau, tau, tau], density=0.5, normalize=True)
    assert all(v in ok for v, ok in zip(out.tolist(), allowed, strict=True)), out


def test_golden_slerp_swapped_endpoints() -> None:
    # Orthogonal unit vectors, Ω = 90°: slerp([1,0],[0,1], t) = [cos(90°·t), sin(90°·t)], so
    # t = 1/3 gives [cos 30°, sin 30°] = [√3/2, 1/2]; swapped, t = 2/3 gives
    # sin(30°)·[0,1] + sin(60°)·[1,0] = [√3/2, 1/2], the same point.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(merge("slerp", None, [a, b], t=1 / 3), torch.tensor([math.sqrt(3) / 2, 0.5]), 1e-6)
    close(merge("slerp", None, [b, a], t=2 / 3), torch.tensor([math.sqrt(3) / 2, 0.5]), 1e-6)


def test_golden_zero_extra_model_ties() -> None:
    # TIES on base 0 with τ₁ = [3, -2, 1], weight 1 → [3, -2, 1]; add τ₂ = 0 with weight 5:
    # Σwτ = [3, -2, 1] unchanged, 5·0 never agrees, divisor stays 1 → still [3, -2, 1].
    base = torch.zeros(3)
    m = torch.tensor([3.0, -2.0, 1.0])
    assert merge("ties", base, [m]).tolist() == [3.0, -2.0, 1.0]
    assert merge("ties", base, [m, base.clone()], weight=(1.0, 5.0)).tolist() == [3.0, -2.0, 1.0]
    # task_arithmetic with normalize on is NOT invariant: Σw goes 1 → 6, [3,-2,1]/6.
    out = merge("task_arithmetic", base, [m, base.clone()], weight=(1.0, 5.0), normalize=True)
    close(out, torch.tensor([0.5, -1 / 3, 1 / 6]), 1e-6)


def test_golden_pcb_ratio_one_still_drops_each_rows_smallest_score() -> None:
    """Not a law for PCB (docs/methods/pcb.md): at ratio 1 the threshold is the row's smallest β.

    2 copies of τ = [1, 2, 3] on base 0, clamp 0: β = e^{2N²}·tanh(2τ²) grows with |τ|, so
    t = β(τ=1), entry 0 gets weight 0 (β > t fails) and stays at the base: [0, 2, 3].
    """
    base = torch.zeros(3)
    m = torch.tensor([1.0, 2.0, 3.0])
    assert pcb_merge(base, [m, m], ratio=1.0, clamp_ratio=0.0).tolist() == [0.0, 2.0, 3.0]


@pytest.mark.parametrize("shape", [(5, 0), (0, 5), (2, 3, 0)])
def test_model_stock_filter_wise_empty_tensors(shape: tuple[int, ...]) -> None:
    """A tensor with no entries merges to an empty tensor of its shape; filter-wise rows of
    width 0 used to fail in reshape(-1, 0) ("cannot reshape tensor of 0 elements")."""
    base = torch.zeros(shape)
    out = merge("model_stock", base, [base.clone(), base.clone()], filter_wise=True)
    assert out.shape == base.shape
