"""PCB-Merging: golden values, an independent dense port, and streaming == dense bit for bit."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite.methods import get_method
from mergekit_lite.methods.detmath import exp_f32, tanh_f32
from mergekit_lite.methods.pcb import (
    MAX_MODELS,
    PcbReducer,
    PcbStats,
    clamp_bounds,
    clamp_indices,
    column_scores,
    drop_index,
    fold_sum,
    merge_tensor,
    pcb_dense,
    row_stats,
    score_weights,
)
from mergekit_lite.methods.registry import TensorJob

# --- helpers ---------------------------------------------------------------------------------


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, *, signed_zero: bool = True) -> None:
    """Bitwise equality; `signed_zero=False` treats −0 and +0 as one value (task-vector entries)."""
    assert a.shape == b.shape
    if not signed_zero:
        a, b = a + 0.0, b + 0.0
    diff = (bits(a) != bits(b)).sum().item()
    assert diff == 0, f"{diff} entries differ; max abs diff {(a - b).abs().max().item()}"


def port_pcb(T: torch.Tensor, ratio: float, clamp_ratio: float, lambdas: list[float]) -> torch.Tensor:
    """A plain port of the reference formula: sort-based index quantiles on the whole matrix.

    Written independently of mergekit_lite.methods.pcb; it shares only exp/tanh (detmath), the
    documented way every PCB implementation computes its transcendentals. Sums over models are
    Python's left-to-right `sum` (the association PCB documents; torch.sum(dim=0) regroups
    from 4 rows on and can differ in the last bit).
    """
    n, d = T.shape
    A = T.abs()
    srt = torch.sort(A, dim=1).values
    lo_i = int(d * clamp_ratio)
    hi_i = max(int(d * (1 - clamp_ratio)) - 1, lo_i)
    Ac = torch.clamp(A, srt[:, lo_i : lo_i + 1], srt[:, hi_i : hi_i + 1])
    Tc = torch.sign(T) * Ac
    mn = Ac.min(dim=1, keepdim=True).values
    mx = Ac.max(dim=1, keepdim=True).values
    N = torch.nan_to_num((Ac - mn) / (mx - mn), nan=0.0)  # 0/0 → 0 (documented decision)
    intra = exp_f32(n * N**2)
    inter = tanh_f32(T * sum(T[i] for i in range(n)))
    beta = intra * inter
    t = torch.sort(beta, dim=1).values[:, min(int(d * (1 - ratio)), d - 1)].unsqueeze(1)
    m = beta.max(dim=1, keepdim=True).values
    W = torch.nan_to_num((torch.clamp(beta, t, m) - t) / (m - t), nan=0.0)
    lam = torch.tensor(lambdas, dtype=torch.float32).unsqueeze(1)
    num = sum(Tc[i] * W[i] * lam[i] for i in range(n))
    return num / torch.clamp(sum(W[i] for i in range(n)), min=1e-12)


def job(name: str, base: torch.Tensor, models: list[torch.Tensor], stats=None, **params) -> TensorJob:
    full = {"ratio": 0.1, "clamp_ratio": 0.01, "lambda": 1.0, "weight": (1.0,) * len(models),
            "scope": "global", "memory_budget": 0}
    full.update(params)
    return TensorJob(name=name, base=base, models=models, params=full, stats=stats)


def random_tasks(n: int, d: int, seed: int, kind: str = "dense") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(n, d, generator=g) * 0.01
    if kind == "ties":  # few distinct dyadic values: many ties, and column sums exact in any order
        T = torch.round(T * 256) / 256
    elif kind == "sparse":
        T = T * (torch.rand(n, d, generator=g) < 0.05)
    elif kind == "zeros":  # one model equal to the base
        T[0] = 0.0
    return T


# --- deterministic transcendentals -----------------------------------------------------------


def test_detmath_does_not_depend_on_chunking() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(50_000, generator=g) * 10, torch.randn(50_000, generator=g) * 1e-3])
    for fn in (exp_f32, tanh_f32):
        whole = fn(x)
        for size, span in ((1, 300), (3, 900), (7, 2100), (17, 5100), (1000, 20_000), (4099, 100_000)):
            parts = torch.cat([fn(x[i : i + size]) for i in range(0, span, size)])
            assert_same_bits(parts, whole[: parts.numel()])
        assert_same_bits(fn(x[5:].reshape(-1, 5)).reshape(-1), whole[5:])


def test_fast_path_equals_basic_operation_reference() -> None:
    """torch's float64 kernels + risk check give the basic-operation path's bits everywhere,
    including arguments whose results sit next to a float32 rounding boundary."""
    from mergekit_lite.methods.detmath import _RISK, exp_f32_reference, tanh_f32_reference

    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(200_000, generator=g) * s for s in (1e-3, 0.1, 1.0, 5.0, 40.0)])
    # Adversarial: arguments whose float64 exp/tanh lie within a few ulps of float32 midpoints.
    near = []
    for fn in (torch.exp, torch.tanh):
        y = fn(x.double())
        risky = (y - y.abs() * _RISK * 4).float() != (y + y.abs() * _RISK * 4).float()
        near.append(x[risky])
    x = torch.cat([x, *near, torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 88.7, -103.0])])
    assert_same_bits(exp_f32(x), exp_f32_reference(x))
    assert_same_bits(tanh_f32(x), tanh_f32_reference(x))


def test_detmath_accuracy() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(200_000, generator=g) * 88
    ref = torch.exp(x.double()).float()
    assert (bits(exp_f32(x)).long() - bits(ref).long()).abs().max() <= 1
    for scale in (1e-30, 1e-6, 1e-2, 1.0, 30.0):
        y = torch.randn(100_000, generator=g) * scale
        ref = torch.tanh(y.double()).float()
        assert (bits(tanh_f32(y)).long() - bits(ref).long()).abs().max() <= 1
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-45])
    assert_same_bits(tanh_f32(special), special.clamp(-1.0, 1.0))  # tanh(±0) = ±0, tanh(tiny) = tiny
    assert torch.isnan(tanh_f32(torch.tensor([math.nan]))).all()
    assert exp_f32(torch.tensor([0.0, 89.0])).tolist() == [1.0, math.inf]


# --- index quantiles -------------------------------------------------------------------------


def test_index_quantiles() -> None:
    assert clamp_indices(4, 0.25) == (1, 2)
    assert clamp_indices(10, 0.0) == (0, 9)
    assert clamp_indices(1, 0.3) == (0, 0)  # reference: int(1*0.7 - 1) = 0
    assert clamp_indices(3, 0.45) == (1, 1)  # upper lifted to the lower: lo <= hi always
    assert drop_index(10, 0.1) == 9 and drop_index(10, 1.0) == 0 and drop_index(7, 1e-30) == 6
    for d, p in ((100, 0.7), (1000, 0.29), (12345, 0.01), (999_999, 0.1)):
        assert drop_index(d, p) == int(d * (1 - p))  # Python's float64 product, then floor
    for d, c in ((100, 0.3), (1000, 0.29), (12345, 0.01), (999_999, 0.1)):
        assert clamp_indices(d, c) == (int(d * c), int(d * (1 - c)) - 1)


# --- golden values ---------------------------------------------------------------------------

T_GOLD = torch.tensor([[1.0, -2.0, 0.0, 4.0], [2.0, 1.0, 0.0, -1.0]])


def test_golden_no_clamp() -> None:
    # Row 0: N = |τ|/4, β = [e^.125·tanh3, e^.5·tanh2, 0, e²·tanh12]; t = β sorted[2] = e^.5·tanh2.
    # Row 1: N = |τ|/2, β = [e²·tanh6, −e^.5·tanh1, 0, −e^.5·tanh3]; t = 0. Each row keeps its max.
    stats = row_stats(T_GOLD, 0.5, 0.0)
    assert stats.lo == (0.0, 0.0) and stats.hi == (4.0, 2.0)
    assert stats.t[0] == pytest.approx(math.exp(0.5) * math.tanh(2), rel=1e-6) and stats.t[1] == 0.0
    assert stats.m[0] == pytest.approx(math.exp(2) * math.tanh(12), rel=1e-6)
    assert pcb_dense(T_GOLD, 0.5, 0.0).tolist() == [2.0, 0.0, 0.0, 4.0]
    assert pcb_dense(T_GOLD, 0.5, 0.0, [0.5, 0.5]).tolist() == [1.0, 0.0, 0.0, 2.0]


def test_dense_refuses_more_models_than_exp_allows() -> None:
    # exp(89) overflows float32: every kept score would be inf and the merge all zeros
    rows = torch.linspace(-1, 1, 50).repeat(89, 1)
    assert pcb_dense(rows[:88], 0.5, 0.0).count_nonzero() > 0
    with pytest.raises(ValueError, match="at most 88 models, got 89"):
        pcb_dense(rows, 0.5, 0.0)


def test_golden_clamp() -> None:
    # c = 0.25, D = 4: lo = sorted|τ|[1], hi = sorted|τ|[2]. Row 0: lo 1, hi 2 → T̃₀ = [1, −2, 0, 2];
    # row 1: lo = hi = 1 → N = 0/0 → 0, β₁ = tanh(τ₁·Σ), T̃₁ = [1, 1, 0, −1].
    stats = row_stats(T_GOLD, 0.5, 0.25)
    assert stats.lo == (1.0, 1.0) and stats.hi == (2.0, 1.0)
    assert pcb_dense(T_GOLD, 0.5, 0.25).tolist() == [1.0, 0.0, 0.0, 2.0]


def test_golden_through_the_method_both_scopes() -> None:
    base = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    models = [base + T_GOLD[0].view(2, 2), base + T_GOLD[1].view(2, 2)]
    expect = [[12.0, 20.0], [30.0, 44.0]]  # dropped entries keep the base exactly
    out = merge_tensor(job("w", base, models, scope="tensor", ratio=0.5, clamp_ratio=0.0))
    assert out.tolist() == expect
    stats = row_stats(T_GOLD, 0.5, 0.0)
    out = merge_tensor(job("w", base, models, stats=stats, ratio=0.5, clamp_ratio=0.0))
    assert out.tolist() == expect
    out = merge_tensor(job("w", base, models, stats=stats, ratio=0.5, clamp_ratio=0.0, weight=(2.0, -1.0)))
    assert out.tolist() == [[10.0 - 2.0, 20.0], [30.0, 40.0 + 8.0]]


def test_zero_task_vectors_and_degenerate_rows_give_no_nan() -> None:
    base = torch.arange(64.0) / 8  # dyadic, so base + 0.5 − base is exactly 0.5
    out = merge_tensor(job("z", base, [base.clone(), base.clone()], scope="tensor"))
    assert_same_bits(out, base)
    # a model with every |τ| equal: N = 0/0 → 0 and all β equal → m = t → weight 0 everywhere
    out = merge_tensor(job("c", base, [base + 0.5], scope="tensor", clamp_ratio=0.0))
    assert_same_bits(out, base)
    # one model equal to the base: it gets weight 0; the other decides alone
    T = random_tasks(2, 500, 3, "zeros")
    merged = pcb_dense(T, 0.2, 0.01)
    assert not torch.isnan(merged).any()
    kept = merged != 0
    lo, hi = row_stats(T, 0.2, 0.01).lo[1], row_stats(T, 0.2, 0.01).hi[1]
    clamped = torch.sign(T[1]) * T[1].abs().clamp(lo, hi)
    torch.testing.assert_close(merged[kept], clamped[kept], rtol=1e-6, atol=0)


def test_negative_lambda_is_task_negation() -> None:
    T = random_tasks(3, 400, 4)
    base = torch.randn(400)
    models = [base + T[i] for i in range(3)]
    T_exact = torch.stack([m - base for m in models])
    pos = merge_tensor(job("w", base, models, scope="tensor", ratio=0.3))
    neg = merge_tensor(job("w", base, models, scope="tensor", ratio=0.3, **{"lambda": -1.0}))
    merged = pcb_dense(T_exact, 0.3, 0.01)
    kept = merged != 0
    assert_same_bits(pos[kept], (base + merged)[kept])
    assert_same_bits(neg[kept], (base - merged)[kept])
    assert_same_bits(neg[~kept], base[~kept])


def test_too_many_models_rejected() -> None:
    spec = get_method("pcb")
    assert spec is not None and spec.max_models == MAX_MODELS
    with pytest.raises(ValueError, match="at most 88"):
        PcbReducer({"ratio": 0.1}, 89)


def test_registry_entry() -> None:
    spec = get_method("pcb")
    assert spec is not None and spec.reducer is PcbReducer
    assert spec.scope({"scope": "global"}) == "global" and spec.scope({"scope": "tensor"}) == "tensor"
    assert spec.param("ratio").check(0.0) is not None and spec.param("ratio").check(1.0) is None
    assert spec.param("clamp_ratio").check(0.5) is not None and spec.param("clamp_ratio").check(0.0) is None
    assert spec.defaults()["ratio"] == 0.1 and spec.defaults()["clamp_ratio"] == 0.01


# --- dense implementation against the plain port ---------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "ties", "sparse", "zeros"])
def test_in_place_scoring_equals_the_formulas_bit_for_bit(kind: str) -> None:
    """column_scores / score_weights reuse their buffers; the bits (signed zeros too) are the formulas'."""
    T = random_tasks(3, 2000, seed=7, kind=kind)
    T[1] = 0.25  # every |τ| equal: span 0 → N = 0 (the masked branch)
    before = T.clone()
    lo, hi = clamp_bounds(T, 0.01)
    Tc, beta = column_scores(T, lo, hi)
    lo_c, hi_c, n = lo.reshape(3, 1), hi.reshape(3, 1), 3
    A = torch.clamp(T.abs(), min=lo_c, max=hi_c)
    span = hi_c - lo_c
    N = torch.where(span > 0, (A - lo_c) / torch.where(span > 0, span, 1.0), 0.0)
    want_beta = exp_f32(N * N * float(n)) * tanh_f32(T * fold_sum(T)) + 0.0
    assert_same_bits(Tc, torch.sign(T) * A)
    assert_same_bits(beta, want_beta)
    assert_same_bits(T, before)
    t = torch.stack([row.sort().values[drop_index(2000, 0.1)] for row in beta])
    m = beta.max(dim=1).values
    keep = beta > t.reshape(3, 1)
    want_w = torch.where(keep, (beta - t.reshape(3, 1)) / torch.where(keep, (m - t).reshape(3, 1), 1.0), 0.0)
    assert_same_bits(score_weights(beta, t, m), want_w)
    flat = torch.full((2, 50), 0.5)  # m = t: the formula's 0/0, weight 0 everywhere
    assert_same_bits(score_weights(flat, torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])), torch.zeros(2, 50))


@pytest.mark.parametrize("kind", ["dense", "ties", "sparse", "zeros"])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_dense_equals_port(kind: str, n: int) -> None:
    T = random_tasks(n, 3001, seed=10 * n + len(kind), kind=kind)
    lambdas = [1.0 + 0.25 * i for i in range(n)]
    for ratio in (0.05, 0.1, 0.5, 1.0):
        for clamp_ratio in (0.0, 1e-4, 0.01, 0.2):
            got = pcb_dense(T, ratio, clamp_ratio, lambdas)
            want = port_pcb(T, ratio, clamp_ratio, lambdas)
            assert_same_bits(got, want, signed_zero=False)


def test_tensor_scope_is_dense_per_tensor() -> None:
    T = random_tasks(3, 1200, 7)
    base = torch.randn(30, 40)
    models = [base + T[i].view(30, 40) for i in range(3)]
    T_exact = torch.stack([(m - base).reshape(-1) for m in models])
    out = merge_tensor(job("w", base, models, scope="tensor", ratio=0.2, clamp_ratio=0.05))
    merged = port_pcb(T_exact, 0.2, 0.05, [1.0, 1.0, 1.0])
    expect = torch.where(merged != 0, base.reshape(-1) + merged, base.reshape(-1))
    assert_same_bits(out.reshape(-1), expect)


# --- streaming global scope == dense, bit for bit --------------------------------------------


def make_model(n: int, seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """~360k parameters over 75 tensors of mixed shapes; mixed dense / sparse / tied deltas."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (512, 64), "lm_head.weight": (512, 64), "norm.weight": (64,)}
    for layer in range(8):
        for k, s in {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "up": (128, 64),
                     "down": (64, 128), "ln1": (64,), "ln2": (64,), "gate": (128, 64)}.items():
            shapes[f"layers.{layer}.{k}.weight"] = s
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = []
    for i in range(n):
        ft = {}
        for j, (k, b) in enumerate(base.items()):
            delta = torch.randn(b.shape, generator=g) * 0.01 * (1 + i)
            if j % 3 == 1:
                delta = delta * (torch.rand(b.shape, generator=g) < 0.05)
            elif j % 3 == 2:
                delta = torch.round(delta * 300) / 300
            ft[k] = b + delta
        models.append(ft)
    return base, models


def run_global(base, models, params, shuffle_seed: int) -> tuple[dict[str, torch.Tensor], PcbStats]:
    """Drive the reducer like the engine: passes over tensors in a random order, then output."""
    spec = get_method("pcb")
    reducer = spec.reducer(params, len(models))
    order = random.Random(shuffle_seed)
    names = list(base)
    done = False
    while not done:
        order.shuffle(names)
        for name in names:
            reducer.observe(TensorJob(name, base[name], [m[name] for m in models], params))
        done = reducer.end_pass()
    stats = reducer.result()
    out = {name: spec.merge(TensorJob(name, base[name], [m[name] for m in models], params, stats=stats))
           for name in names}
    return out, stats


def dense_global(base, models, ratio, clamp_ratio, lambdas) -> dict[str, torch.Tensor]:
    names = sorted(base)  # the reference's key order (irrelevant to the result, but faithful)
    flat_base = torch.cat([base[k].reshape(-1) for k in names])
    T = torch.stack([torch.cat([m[k].reshape(-1) for k in names]) - flat_base for m in models])
    merged = port_pcb(T, ratio, clamp_ratio, lambdas)
    assert_same_bits(merged, pcb_dense(T, ratio, clamp_ratio, lambdas), signed_zero=False)
    out_flat = torch.where(merged != 0, flat_base + merged, flat_base)
    out, start = {}, 0
    for k in names:
        size = base[k].numel()
        out[k] = out_flat[start : start + size].view(base[k].shape)
        start += size
    return out


@pytest.mark.parametrize(("ratio", "clamp_ratio", "budget"), [(0.1, 0.01, 0), (0.3, 1e-4, 0), (0.1, 0.01, 1 << 30)])
def test_streaming_global_equals_dense_bit_for_bit(ratio: float, clamp_ratio: float, budget: int) -> None:
    base, models = make_model(3, seed=5)
    assert sum(t.numel() for t in base.values()) > 300_000
    weights = (1.0, 0.5, 2.0)
    params = {"ratio": ratio, "clamp_ratio": clamp_ratio, "lambda": 0.8, "weight": weights,
              "scope": "global", "memory_budget": budget}
    out, stats = run_global(base, models, params, shuffle_seed=int(ratio * 100) + budget % 7)
    assert stats.passes == (4 if budget == 0 else 1)
    want = dense_global(base, models, ratio, clamp_ratio, [0.8 * w for w in weights])
    for k in base:
        assert_same_bits(out[k], want[k])


def test_streaming_stats_equal_sorted_stats() -> None:
    base, models = make_model(2, seed=9)
    params = {"ratio": 0.1, "clamp_ratio": 0.01, "memory_budget": 0}
    _, streamed = run_global(base, models, {**params, "lambda": 1.0, "weight": (1.0, 1.0), "scope": "global"}, 1)
    names = list(base)
    T = torch.stack([torch.cat([m[k].reshape(-1) - base[k].reshape(-1) for k in names]) for m in models])
    dense = row_stats(T, 0.1, 0.01)
    assert (streamed.count, streamed.lo, streamed.hi, streamed.t, streamed.m) == (
        dense.count, dense.lo, dense.hi, dense.t, dense.m)


def test_budget_overflow_falls_back_to_streaming() -> None:
    base, models = make_model(2, seed=11)
    params = {"ratio": 0.2, "clamp_ratio": 0.01, "lambda": 1.0, "weight": (1.0, 1.0), "scope": "global",
              "memory_budget": 1_000_000}  # smaller than 2 × 360k × 4 bytes
    out, stats = run_global(base, models, params, 3)
    assert stats.passes == 4
    want = dense_global(base, models, 0.2, 0.01, [1.0, 1.0])
    for k in base:
        assert_same_bits(out[k], want[k])


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    d=st.integers(1, 60),
    seed=st.integers(0, 10_000),
    ratio=st.sampled_from([0.05, 0.3, 1.0]),
    clamp_ratio=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_properties(n: int, d: int, seed: int, ratio: float, clamp_ratio: float) -> None:
    T = random_tasks(n, d, seed, "ties")
    merged = pcb_dense(T, ratio, clamp_ratio)
    assert not torch.isnan(merged).any()
    assert_same_bits(merged, port_pcb(T, ratio, clamp_ratio, [1.0] * n), signed_zero=False)
    # where some model kept an entry, a weighted mean of clamped task vectors stays within their range
    stats = row_stats(T, ratio, clamp_ratio)
    lo = torch.tensor(stats.lo).unsqueeze(1)
    hi = torch.tensor(stats.hi).unsqueeze(1)
    Tc = torch.sign(T) * T.abs().clamp(lo, hi)
    tol = 1e-6 * Tc.abs().max(dim=0).values
    kept = merged != 0
    assert (merged <= Tc.max(dim=0).values + tol)[kept].all()
    assert (merged >= Tc.min(dim=0).values - tol)[kept].all()
    # the order of the models does not matter: with dyadic data the column sums are exact in any
    # order, so only the final weighted mean's rounding may change (in general a rounding change
    # of Σⱼτⱼ can also flip an entry lying exactly at the threshold t)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(pcb_dense(T[perm], ratio, clamp_ratio), merged, rtol=1e-3, atol=1e-7)
    # no task vectors, no change
    assert (pcb_dense(torch.zeros(n, d), ratio, clamp_ratio) == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_bits() -> None:
    T = random_tasks(3, 50_000, 21, "ties")
    for fn in (exp_f32, tanh_f32):
        assert_same_bits(fn(T.cuda() * 300).cpu(), fn(T * 300))
    assert_same_bits(pcb_dense(T.cuda(), 0.1, 0.01).cpu(), pcb_dense(T, 0.1, 0.01), signed_zero=False)
