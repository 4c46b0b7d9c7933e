"""SCE and NearSwap: golden values worked by hand, their laws, mergekit's formulas re-stated from
the maths (arcee-ai/mergekit 0.1.5: merge_methods/sce.py, nearswap.py, and the sign consensus of
generalized_task_arithmetic.py), mergekit-shaped recipes through the engine, and recipe errors.

Against mergekit itself (tiny float32 Llama checkpoints, `mergekit-yaml`), see docs/methods/sce.md
and nearswap.md for the measured numbers: NearSwap is bit for bit, SCE within an ulp or two.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_disposable_gives_the_same_bits, load_dir
from hypothesis import given
from hypothesis import strategies as st
from test_method_laws import LAWS
from test_methods_properties import merge, tensors

import mergekit_lite as mlite
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods import sce
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.recipe.model import load_recipe
from mergekit_lite.synthetic import build_model_set


def T(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(a: torch.Tensor, b: Any, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b if isinstance(b, torch.Tensor) else T(b), rtol=tol, atol=tol)


def run_sce(base: Any, models: list[Any], select_topk: float = 1.0) -> torch.Tensor:
    return merge("sce", T(base), [T(m) for m in models], select_topk=select_topk)


def run_nearswap(base: Any, model: Any, t: float) -> torch.Tensor:
    return merge("nearswap", T(base), [T(model)], t=t)


# ============================================================================ golden values


def test_sce_golden_equal_energies() -> None:
    # τ1 = [1, −2, 0, 3], τ2 = [3, 2, 0, −1]: mean τ² = 14/4 for both → w = ½ each.
    # Σ τ = [4, 0, 0, 2] → γ = + everywhere (a zero sum elects +).
    # Agreeing: entry 0 both; entry 1 τ2 only (τ1 = −2); entry 2 none (zeros never agree); entry 3 τ1 only.
    # Σ wᵢeᵢτᵢ = [2, 1, 0, 1.5], Σ wᵢeᵢ = [1, ½, 0 → 1e-6, ½] → τ = [2, 2, 0, 3]; + base 1.
    close(run_sce([1, 1, 1, 1], [[2, -1, 1, 4], [4, 3, 1, 0]]), [3, 3, 1, 4])


def test_sce_golden_energy_weights() -> None:
    # τ1 = [2, 2] (mean τ² = 4), τ2 = [1, −1] (mean τ² = 1): w = [0.8, 0.2]. γ = sign([3, 1]) = +.
    # entry 0: (0.8·2 + 0.2·1) / (0.8 + 0.2) = 1.8; entry 1: τ2 disagrees, 0.8·2 / 0.8 = 2.
    close(run_sce([0, 0], [[2, 2], [1, -1]]), [1.8, 2.0])


def test_sce_golden_selection_and_a_zero_sum() -> None:
    # τ1 = [1, 0, 2, 5], τ2 = [1, 4, 2, 1], τ3 = [1, 2, −4, 3]. Population variances per entry:
    # [0, 8/3, 8, 8/3]: 3 non-zero. select_topk 0.5 → k = int(3·0.5) = 1 → entry 2 alone.
    # Masked: τ = [0,0,2,0], [0,0,2,0], [0,0,−4,0]; mean τ² = 1, 1, 4 → w = [1/6, 1/6, 4/6].
    # Entry 2: Σ τ = 0 → γ = +; τ1, τ2 agree: (2/6 + 2/6) / (2/6) = 2. Others: nothing agrees → 0.
    models = [[1, 0, 2, 5], [1, 4, 2, 1], [1, 2, -4, 3]]
    close(run_sce([0, 0, 0, 0], models, 0.5), [0, 0, 2, 0])
    # 0.7: k = int(2.1) = 2; entries 1 and 3 tie at 8/3 for second place: exactly k are kept, entry
    # 2 and the first tied entry in index order, entry 1 (mergekit keeps one of the two as well).
    # Entry 0 (variance 0, τ = 1 in every model) is dropped. Masked τ1 = [0, 0, 2, 0],
    # τ2 = [0, 4, 2, 0], τ3 = [0, 2, −4, 0]: mean τ² = [1, 5, 5] → w = [1, 5, 5]/11.
    # Entry 1: τ = [0, 4, 2], γ = +, τ2 and τ3 agree: (5·4 + 5·2)/(5 + 5) = 3.
    # Entry 2: τ = [2, 2, −4], Σ = 0 → +: (1·2 + 5·2)/(1 + 5) = 2. Entry 3: dropped → 0.
    close(run_sce([0, 0, 0, 0], models, 0.7), [0, 3, 2, 0])
    # (keeping both tied entries, as mlite did before, gave [0, 2.84, 2, 253/79]: 3 entries, and
    # weights [29, 21, 29]/79 that moved entry 1 too.)
    close(run_sce([0, 0, 0, 0], models, 0.0), [0, 0, 0, 0])


def test_sce_small_energies_fall_back_to_equal_weights() -> None:
    # τ1 = [1e-4, 1e-4], τ2 = [4e-4, 0]: mean τ² = 1e-8 and 8e-8, sum 9e-8 < 1e-6 → w = ½ each
    # (proportional weights would be 1/9 and 8/9). Entry 0: (1e-4 + 4e-4)/2 = 2.5e-4 (vs 3.7e-4).
    # Entry 1: τ2 = 0 never agrees → τ1 = 1e-4.
    close(run_sce([0, 0], [[1e-4, 1e-4], [4e-4, 0]]), [2.5e-4, 1e-4], tol=1e-10)
    # Scaled up 100×, sum 9e-4: the energy weights apply: (1/9·0.01 + 8/9·0.04)/1 = 0.03667.
    close(run_sce([0, 0], [[1e-2, 1e-2], [4e-2, 0]]), [(0.01 + 8 * 0.04) / 9, 1e-2], tol=1e-8)


def test_sce_divisor_floor() -> None:
    # τ1 = [1, 0], τ2 = [0, 2e-4]: w2 = mean(τ2²)/Σ = 2e-8/(0.5 + 2e-8) ≈ 4e-8 < 1e-6. At entry 1
    # τ2 alone agrees, and the entry is w2·τ2 / 1e-6 ≈ 0.04·τ2, not τ2 (mergekit's floor, kept).
    out = run_sce([0, 0], [[1.0, 0.0], [0.0, 2e-4]])
    w2 = T(2e-8) / (T(0.5) + T(2e-8))
    torch.testing.assert_close(out, torch.stack([T(1.0), T(2e-4) * w2 / T(1e-6)]), rtol=1e-6, atol=0)
    assert 7e-6 < float(out[1]) < 9e-6


def test_nearswap_golden() -> None:
    # t = 0.1. entry 0: |d| = 0.001 ≤ t → w = 1 → 0.001. entry 1: |d| = 0.5 → w = 0.2 → −0.1.
    # entry 2: equal → w = 1 (t/1e-6 clamped) → 0. entry 3: base 1, model 3 → w = 0.05 → 1.1.
    # entry 4: base 5, model 4.95 → w = 1 → 4.95. So θ₀ + clamp(θ₁ − θ₀, −t, t).
    base, model = [0, 0, 0, 1, 5], [0.001, -0.5, 0, 3, 4.95]
    close(run_nearswap(base, model, 0.1), [0.001, -0.1, 0, 1.1, 4.95])
    assert torch.equal(run_nearswap(base, model, 0.0), T(base))
    assert torch.equal(run_nearswap(base, model, 10.0), T(model))


def test_nearswap_below_the_distance_floor() -> None:
    # |d| = 1e-7 < 1e-6: w = t/1e-6 = 0.5 for t = 5e-7, so the entry moves by 5e-8 (half of d).
    out = run_nearswap([1.0], [1.0 + 2.0**-23], 5e-7)
    w = 0.5
    close(out, [w * (1.0 + 2.0**-23) + (1 - w) * 1.0], tol=0)


def test_registry() -> None:
    s, n = get_method("sce"), get_method("nearswap")
    assert s is not None and n is not None
    assert (s.needs_base, s.min_models, s.max_models, s.ordered) == (True, 1, None, False)
    assert (n.needs_base, n.min_models, n.max_models, n.ordered) == (True, 1, 1, False)
    assert s.defaults() == {"select_topk": 1.0, "int8_mask": False}
    assert n.param("t").required and n.param("t").check(-0.1) and n.param("t").check(3.0) is None  # type: ignore[union-attr]
    assert s.param("select_topk").check(1.5) and s.param("select_topk").check(0.0) is None  # type: ignore[union-attr]
    assert n.row_local({}) and n.light and not s.row_local({}) and not s.light


# ============================================================================ laws


@LAWS
@given(data=tensors(n_models=(1, 1)), n=st.integers(1, 4), k=st.sampled_from([0.2, 0.5, 0.99]))
def test_sce_n_copies(data: Any, n: int, k: float) -> None:
    """n copies give the model at select_topk 1 (every copy agrees, equal weights); below 1 the
    variance across copies is 0 everywhere, nothing is selected, and the base comes back (as
    in mergekit: SCE selects disagreement, and copies have none)."""
    base, (model,) = data
    copies = [model.clone() for _ in range(n)]
    close(merge("sce", base, copies), model, 1e-5)
    assert torch.equal(merge("sce", base, [model.clone() for _ in range(n)], select_topk=k), base)


@LAWS
@given(flat=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=12),
       n=st.integers(1, 4), k=st.sampled_from([0.0, 0.3, 1.0]))
def test_sce_zero_task_vectors_give_the_base_exactly(flat: list[float], n: int, k: float) -> None:
    base = T(flat)
    assert torch.equal(merge("sce", base, [base.clone() for _ in range(n)], select_topk=k), base)


@LAWS
@given(data=tensors(n_models=(2, 4)), perm_seed=st.randoms(use_true_random=False),
       k=st.sampled_from([0.3, 0.6, 1.0]))
def test_sce_order_does_not_matter(data: Any, perm_seed: Any, k: float) -> None:
    """Selection (variance: symmetric, exact float64 sums), election (exact in any order) and the
    weights do not depend on the order; only float32 sums of the weights round differently."""
    base, models = data
    perm = list(range(len(models)))
    perm_seed.shuffle(perm)
    close(merge("sce", base, models, select_topk=k), merge("sce", base, [models[i] for i in perm], select_topk=k),
          1e-5)


@LAWS
@given(data=tensors(n_models=(1, 1)), t=st.sampled_from([0.0, 0.1, 0.25, 0.6, 2.0]))
def test_nearswap_moves_each_entry_by_at_most_t(data: Any, t: float) -> None:
    """θ = θ₀ + clamp(θ₁ − θ₀, −t, t) up to rounding (every |θ₁ − θ₀| here is 0 or ≥ 0.25 ≫ 1e-6);
    t = 0 is the base and a t ≥ 2·max|θ₁ − θ₀| the model, exactly."""
    base, (model,) = data
    out = merge("nearswap", base, [model], t=t)
    close(out, base + (model - base).clamp(-t, t), 1e-5)
    if t == 0:
        assert torch.equal(out, base)
    d = float((model - base).abs().max())
    assert torch.equal(merge("nearswap", base, [model], t=2 * d + 1e-5), model)


@pytest.mark.parametrize("method,params", [("sce", {"select_topk": 0.5}), ("sce", {}), ("nearswap", {"t": 0.05})])
def test_disposable_models_give_the_same_bits(method: str, params: dict[str, Any], rng: torch.Generator) -> None:
    base = torch.randn(17, 9, generator=rng)
    n = 1 if method == "nearswap" else 3
    models = [base + 0.1 * torch.randn(17, 9, generator=rng) for _ in range(n)]
    assert_disposable_gives_the_same_bits(method, base, models, params)


def test_empty_tensors() -> None:
    for shape in ((0,), (0, 4), (3, 0)):
        assert merge("sce", torch.zeros(shape), [torch.zeros(shape)] * 2, select_topk=0.5).shape == shape
        assert merge("nearswap", torch.zeros(shape), [torch.zeros(shape)], t=0.1).shape == shape


# ============================================================================ mergekit, re-stated


def mk_sce(base: torch.Tensor, models: list[torch.Tensor], topk: float) -> torch.Tensor:
    """mergekit's sce, re-stated: stacked task vectors, a float32 top-k of the variance, weights from
    the mean square, a float32 sum for the sign vote and for both sums of the combination. Its
    torch.topk breaks ties at the cut in no stated order; here a stable sort takes the first ones
    in flat index order, as mlite does."""
    tv = torch.stack([m - base for m in models])
    n = tv.shape[0]
    if topk < 1:
        if topk <= 0:
            keep = torch.zeros(base.shape)
        else:
            var = ((tv - tv.mean(0)) ** 2).mean(0)
            k = int(torch.count_nonzero(var) * topk)
            keep = torch.zeros(base.numel())
            if k:
                keep[torch.argsort(var.reshape(-1), descending=True, stable=True)[:k]] = 1
            keep = keep.view(base.shape)
        tv = tv * keep
    vote = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tv) == vote).float()
    energy = (tv * tv).reshape(n, -1).mean(1)
    total = float(energy.sum())
    w = torch.full((n,), 1.0 / n) if abs(total) < 1e-6 else energy / total
    ew = w.view(-1, *([1] * base.dim())) * agree
    return base + (tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


def mk_nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    w = (t / (base - model).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * model + (1 - w) * base


def test_sce_is_mergekit_sce(rng: torch.Generator) -> None:
    for shape, n, scale in (((24, 16), 3, 0.05), ((40,), 2, 0.01), ((12, 10), 4, 1.0), ((9, 7), 5, 3e-4)):
        base = torch.randn(shape, generator=rng)
        models = [base + scale * torch.randn(shape, generator=rng) for _ in range(n)]
        models[0].view(-1)[::5] = base.view(-1)[::5]  # zero entries in one task vector: they never agree
        for k in (1.0, 0.8, 0.3, 0.05, 0.0):
            torch.testing.assert_close(merge("sce", base, models, select_topk=k), mk_sce(base, models, k),
                                       rtol=1e-5, atol=1e-6 * (1 + scale))


def test_sce_keep_count_is_mergekits_float32_product() -> None:
    """mergekit multiplies a 0-d int64 count by a Python float: a float32 product. Past 2²⁴ the count
    itself rounds, and near an integer the product may too; k is that product's floor."""
    for nonzero, frac in ((10, 0.7), (131_072_003, 0.5), (33_554_431, 0.3), (7, 0.1), (1000, 0.999)):
        assert sce.keep_count(nonzero, frac) == int(np.float32(nonzero) * np.float32(frac))
    assert sce.keep_count(131_072_003, 0.5) == 65_536_000  # float64 would give 65_536_001


def test_sce_variance_ties_keep_exactly_k_in_index_order() -> None:
    """mergekit keeps exactly k entries (torch.topk); so do we, taking the entries tied with the
    k-th largest variance in flat index order (torch.topk's own tie order is unspecified)."""
    base = T([0, 0, 0])
    models = [T([1, -1, 0]), T([-1, 1, 0])]
    keep = sce.variance_mask([m - base for m in models], 0.5)  # k = int(2·0.5) = 1, variances [1, 1, 0]
    assert keep.tolist() == [True, False, False]
    # τ2 = −τ1, so the spread is 2τ1²: [2, 8, 2, 2, 0, 2, 8], 6 non-zero, on a 1×7 and a 7×1 shape.
    tau = T([1, 2, 1, -1, 0, 1, -2])
    for shape in ((7,), (1, 7), (7, 1)):
        taus = [tau.view(shape), (-tau).view(shape)]
        # 0.5: k = 3, the two 8s and the first 2 (entry 0); 0.7: k = int(4.2) = 4, entries 0 and 2 of
        # the 2s; 0.99: k = int(5.94) = 5, entries 0, 2 and 3 of the 2s (entry 5 is the one left out)
        for topk, want, tie_end in ((0.5, [0, 1, 6], 1), (0.7, [0, 1, 2, 6], 3), (0.99, [0, 1, 2, 3, 6], 4)):
            keep = sce.variance_mask(taus, topk).view(-1)
            assert torch.nonzero(keep).view(-1).tolist() == want, (shape, topk)
            assert sce.variance_cut(sce.spread(taus), len(want)) == sce.Cut(2.0, tie_end)
    # through the merge (τ1 = τ, τ2 = −τ, base 0): at 0.5 the kept entries are 0, 1, 6; entry 0's
    # Σ τ = 0 elects +, τ1 = 1 agrees alone → 1; entry 1: τ1 = 2 → 2; entry 6: Σ = 0, τ2 = 2 → 2.
    close(run_sce([0] * 7, [tau.tolist(), (-tau).tolist()], 0.5), [1, 2, 0, 0, 0, 0, 2])


def test_sce_every_spread_tied() -> None:
    """τ1 = +d, τ2 = −d everywhere: every spread is 2d², so k = int(numel · select_topk) entries
    are kept, the first k in flat index order; whole and streamed alike, both mergekit's count.
    select_topk 1 keeps every entry and 0 none, as before."""
    base = torch.zeros(30, 7)
    d = 2.0**-9
    models = [base + d, base - d]
    for topk in (0.5, 0.3, 0.01, 0.999):
        k = sce.keep_count(210, topk)
        keep = sce.variance_mask([m - base for m in models], topk)
        assert keep.view(-1).tolist() == [i < k for i in range(210)], topk
        want = whole_sce(base, models, select_topk=topk)
        got, stats, _ = streamed("sce", base, models, {"select_topk": topk}, blocks_of(30, 1, 2, 11, 29))
        assert_same_bits(got, want)
        assert stats.cut == sce.Cut(2 * d * d, k)
        torch.testing.assert_close(want, mk_sce(base, models, topk), rtol=0, atol=0)
        # kept entries: Σ τ = 0 elects +, τ1 alone agrees: d; the others the base
        assert torch.equal(want.view(-1), torch.where(torch.arange(210) < k, d, 0.0))
    assert bool(sce.variance_mask([m - base for m in models], 1.0).all())
    assert not bool(sce.variance_mask([m - base for m in models], 0.0).any())
    assert torch.equal(whole_sce(base, models, select_topk=0.0), base)
    torch.testing.assert_close(whole_sce(base, models, select_topk=1.0), mk_sce(base, models, 1.0), rtol=0, atol=0)


def test_sce_keep_count_zero_keeps_nothing() -> None:
    """One non-zero spread and select_topk 0.5: k = int(0.5) = 0, nothing kept, the base, whole
    and streamed (the cut is inf)."""
    base = torch.zeros(4, 3)
    m1, m2 = base.clone(), base.clone()
    m1[2, 1] = 0.5
    assert not bool(sce.variance_mask([m1 - base, m2 - base], 0.5).any())
    got, stats, _ = streamed("sce", base, [m1, m2], {"select_topk": 0.5}, blocks_of(4, 1, 3))
    assert stats.cut == sce.Cut(math.inf, 0)
    assert_same_bits(got, base) and assert_same_bits(whole_sce(base, [m1, m2], select_topk=0.5), base)


def test_nearswap_is_mergekit_nearswap_bit_for_bit(rng: torch.Generator) -> None:
    base = torch.randn(64, 33, generator=rng)
    model = base + 0.01 * torch.randn(64, 33, generator=rng)
    model.view(-1)[::7] = base.view(-1)[::7]
    for t in (0.0, 1e-7, 1e-3, 0.0071, 0.5, 3.0):
        got = merge("nearswap", base, [model], t=t)
        assert torch.equal(got, mk_nearswap(base, model, t)), t


# ============================================================================ recipes and the engine


def _mk_recipe(ms: Any, method: str, models: list[Any], parameters: dict[str, Any]) -> dict[str, Any]:
    return {"merge_method": method, "base_model": str(ms.base),
            "models": [{"model": str(ms.base)}, *({"model": str(m)} for m in models)],
            "parameters": parameters, "dtype": "float32"}


def test_mergekit_sce_recipe_through_the_engine(model_set: Any) -> None:
    ms = model_set
    recipe = _mk_recipe(ms, "sce", list(ms.finetunes), {"select_topk": 0.4, "int8_mask": True, "weight": 0.5})
    result = mlite.run_recipe(recipe)
    assert any("'weight' is not a parameter of 'sce'; ignored" in n for n in load_recipe(recipe).options["notes"])
    base, fts = load_dir(ms.base), [load_dir(f) for f in ms.finetunes]
    out = result.state_dict
    assert set(out) == set(base)
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        want = mk_sce(b.float(), [f[name].float() for f in fts], 0.4)
        torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(out[k], base[k]) for k in out)


def test_mergekit_nearswap_recipe_through_the_engine_in_row_blocks(model_set: Any, monkeypatch: Any) -> None:
    """Row-local: with every matrix streamed in 64-entry blocks the output is mergekit's, bit for bit."""
    from mergekit_lite.engine import stream

    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 64)
    ms = model_set
    out = mlite.run_recipe(_mk_recipe(ms, "nearswap", [ms.finetunes[1]], {"t": 0.01})).state_dict
    base, ft = load_dir(ms.base), load_dir(ms.finetunes[1])
    for name, b in base.items():
        if b.is_floating_point():
            assert torch.equal(out[name], mk_nearswap(b.float(), ft[name].float(), 0.01)), name


@pytest.mark.parametrize("recipe,message", [
    ({"merge_method": "nearswap", "models": ["FT1", "FT2"], "parameters": {"t": 0.1}},
     "method 'nearswap' takes at most 1 model(s), got 2"),
    ({"merge_method": "nearswap", "models": ["FT1"]}, "method 'nearswap' needs parameter 't'"),
    ({"merge_method": "nearswap", "models": ["FT1"], "parameters": {"t": -1}},
     "parameter 't' of method 'nearswap': must be >= 0, got -1"),
    ({"merge_method": "sce", "models": ["FT1"], "parameters": {"select_topk": 1.5}},
     "parameter 'select_topk' of method 'sce': must be <= 1, got 1.5"),
    ({"merge_method": "sce", "base_model": None, "models": ["FT1", "FT2"]}, "method 'sce' needs a base model"),
])
def test_recipe_mistakes_are_one_line_errors(model_set: Any, recipe: dict[str, Any], message: str) -> None:
    ms = model_set
    names = {"FT1": str(ms.finetunes[0]), "FT2": str(ms.finetunes[1])}
    recipe = {"base_model": str(ms.base), **recipe, "models": [names[m] for m in recipe["models"]]}
    if recipe["base_model"] is None:
        del recipe["base_model"]
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(recipe)


def test_shipped_recipes_run(tmp_path: Path) -> None:
    """recipes/sce.yaml and recipes/nearswap.yaml run as shipped, on models beside them."""
    repo = Path(__file__).resolve().parents[1]
    for name in ("sce.yaml", "nearswap.yaml"):
        shutil.copy(repo / "recipes" / name, tmp_path / name)
    build_model_set(tmp_path / "models")
    base = load_dir(tmp_path / "models" / "base")
    for name in ("sce.yaml", "nearswap.yaml"):
        result = mlite.run_recipe(tmp_path / name, out=tmp_path / "out" / name)
        out = load_dir(result.output)
        assert set(out) == set(base) and any(not torch.equal(out[k], base[k]) for k in out)


# ============================================================================ row blocks


def streamed(method: str, base: torch.Tensor, models: list[torch.Tensor], params: dict[str, Any],
             bounds: list[tuple[int, int]]) -> tuple[torch.Tensor, Any, int]:
    """What the engine does for a big tensor: the method's `tensor_reducer` over the row blocks
    (as many passes as it asks for), then every block merged with its statistics."""
    spec = get_method(method)
    assert spec is not None and spec.tensor_reducer is not None
    resolved = {**spec.defaults(), **params}
    reducer = spec.tensor_reducer(resolved, len(models))
    assert reducer is not None
    passes = 0
    while True:
        passes += 1
        for a, b in bounds:
            reducer.observe(TensorJob("w", base[a:b], [m[a:b] for m in models], resolved, rows=(a, b)))
        if reducer.end_pass():
            break
    stats = reducer.result()
    blocks = [spec.merge(TensorJob("w", base[a:b], [m[a:b].clone() for m in models], resolved, stats=stats,
                                   rows=(a, b), models_disposable=True)) for a, b in bounds]
    return torch.cat(blocks), stats, passes


def blocks_of(rows: int, *cuts: int) -> list[tuple[int, int]]:
    edges = [0, *cuts, rows]
    return list(zip(edges[:-1], edges[1:], strict=True))


def whole_sce(base: torch.Tensor, models: list[torch.Tensor], **params: Any) -> torch.Tensor:
    return merge("sce", base, [m.clone() for m in models], **params)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


@pytest.mark.parametrize("topk", [0.5, 0.3, 0.05, 0.999, 1.0, 0.0])
@pytest.mark.parametrize("scale", [1e-1, 1e-4])  # energy weights; the 1e-6 guard firing (equal weights)
def test_sce_row_blocks_give_the_whole_tensors_bits(topk: float, scale: float) -> None:
    g = torch.Generator().manual_seed(int(topk * 1000) + int(scale * 1e4))
    base = torch.randn(300, 70, generator=g)
    models = [base + scale * torch.randn(300, 70, generator=g) * s for s in (1.0, 2.0, 0.5)]
    models[1][::7] = base[::7]  # zero task-vector entries: they never agree
    want = whole_sce(base, models, select_topk=topk)
    got, stats, passes = streamed("sce", base, models, {"select_topk": topk}, blocks_of(300, 1, 90, 91, 200))
    assert_same_bits(got, want)
    assert passes == (3 if 0 < topk < 1 else 1)
    guard = scale < 1e-3 or topk == 0.0  # Σ mean(τ²) ≈ 5e-8 < 1e-6 (or 0): equal weights
    assert len(set(stats.weights)) == (1 if guard else 3)


def test_sce_row_blocks_with_more_values_than_the_selection_sample() -> None:
    """700×500 spreads: the float32 selection samples them (more than SAMPLE_CAP) and is still exact."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(700, 500, generator=g)
    models = [base + 0.01 * torch.randn(700, 500, generator=g) for _ in range(3)]
    want = whole_sce(base, models, select_topk=0.4)
    got, _, _ = streamed("sce", base, models, {"select_topk": 0.4}, blocks_of(700, 100, 333, 600))
    assert_same_bits(got, want)


def test_sce_row_blocks_with_ties_at_the_variance_cut() -> None:
    """bf16-quantised deltas of a few sizes: many entries share a spread, and the cut falls inside a
    run of ties; both paths keep exactly k entries, the tied ones in flat index order."""
    g = torch.Generator().manual_seed(10)
    base = torch.zeros(64, 50)
    steps = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]) * 2.0**-10
    models = [steps[torch.randint(5, (64, 50), generator=g)] for _ in range(3)]
    taus = [m - base for m in models]
    v = sce.spread(taus)
    for topk in (0.5, 0.3, 0.77):
        k = sce.keep_count(int(torch.count_nonzero(v)), topk)
        kept = sce.variance_mask(taus, topk)
        value = float(sce.kth_largest(v, k))
        above, tied = int((v > value).sum()), int((v == value).sum())
        assert above < k < above + tied  # a tie at the cut, only part of it kept
        assert int(kept.sum()) == k and bool(kept[v > value].all())
        kept_ties = torch.nonzero((v == value).view(-1) & kept.view(-1)).view(-1)
        assert kept_ties.tolist() == torch.nonzero((v == value).view(-1)).view(-1)[: k - above].tolist()
        want = whole_sce(base, models, select_topk=topk)
        got, stats, _ = streamed("sce", base, models, {"select_topk": topk}, blocks_of(64, 5, 6, 40))
        assert stats.cut == sce.Cut(value, int(kept_ties[-1]) + 1)
        assert_same_bits(got, want)


@pytest.mark.parametrize("piece", [1 << 20, 37])
def test_sce_row_blocks_with_ties_across_many_blocks(piece: int, monkeypatch: Any) -> None:
    """Spreads of three values, the cut's ties spread over every block: the tied entries to keep
    are counted across blocks (and across the pieces inside a block: `piece` 37) in flat index
    order, so one-row and uneven blocks give the whole tensor's bits; the weights are those of
    exactly k entries, and mergekit's merge with index-ordered ties."""
    monkeypatch.setattr(sce, "_PIECE", piece)
    g = torch.Generator().manual_seed(13)
    base = torch.randint(-4, 5, (90, 11), generator=g).float()  # θ₀ + d − θ₀ is d exactly: ties stay ties
    d = torch.tensor([1.0, 2.0, 4.0])[torch.randint(3, (90, 11), generator=g)] * 2.0**-4
    models = [base + d, base - d, base + 0.5 * d]
    taus = [m - base for m in models]
    for topk in (0.2, 0.5, 0.9):
        want = whole_sce(base, models, select_topk=topk)
        for bounds in (blocks_of(90, 1, 2, 3, 50, 89), [(i, i + 1) for i in range(90)]):
            got, stats, _ = streamed("sce", base, models, {"select_topk": topk}, bounds)
            assert_same_bits(got, want)
            assert stats.cut == sce.variance_cut(sce.spread(taus), sce.keep_count(990, topk))
            assert list(stats.weights) == sce.sce_weights([t * sce.variance_mask(taus, topk) for t in taus])
        assert int(sce.variance_mask(taus, topk).sum()) == sce.keep_count(990, topk)
        torch.testing.assert_close(want, mk_sce(base, models, topk), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("topk", [0.5, 1.0])
def test_sce_row_blocks_where_every_variance_is_zero(topk: float) -> None:
    """Copies of one model (and zero task vectors): no spread to select, k = 0, the base; at
    select_topk 1 the copies give the model."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(40, 30, generator=g)
    model = base + 0.1 * torch.randn(40, 30, generator=g)
    for models in ([model.clone() for _ in range(3)], [base.clone(), base.clone()]):
        want = whole_sce(base, models, select_topk=topk)
        got, stats, _ = streamed("sce", base, models, {"select_topk": topk}, blocks_of(40, 13, 27))
        assert_same_bits(got, want)
        assert stats.cut == (None if topk == 1.0 else sce.Cut(math.inf, 0))
    assert torch.equal(want, base)


def test_sce_row_blocks_at_the_weight_guard() -> None:
    """Σ mean(τᵢ²) on either side of 1e-6 (mergekit's float32 sum): the blocks' weights are the
    whole tensor's, guard decision included."""
    g = torch.Generator().manual_seed(12)
    base = torch.zeros(50, 40)
    noise = [torch.randn(50, 40, generator=g) for _ in range(2)]
    decided = set()
    for target in (0.99e-6, 1.01e-6):
        # scale each model's τ so that its mean square is target/2: the sum sits just off the guard
        models = [n * math.sqrt(target / 2 / float((n.double() ** 2).mean())) for n in noise]
        want = whole_sce(base, models)
        got, stats, _ = streamed("sce", base, models, {}, blocks_of(50, 17, 18))
        assert_same_bits(got, want)
        assert list(stats.weights) == sce.sce_weights([m - base for m in models])
        decided.add(stats.weights == (0.5, 0.5))
    assert decided == {True, False}  # equal weights below the guard, energy weights above


def test_sce_row_block_without_statistics_is_refused() -> None:
    spec = get_method("sce")
    with pytest.raises(RuntimeError, match="no whole-tensor statistics"):
        spec.merge(TensorJob("w", torch.zeros(4, 2), [torch.ones(4, 2)], spec.defaults(), rows=(0, 4)))  # type: ignore[union-attr]


@pytest.mark.parametrize("params", [{"select_topk": 0.5}, {"select_topk": 1.0}, {"select_topk": 0.2}])
def test_sce_big_tensors_stream_through_the_engine(tmp_path: Path, monkeypatch: Any, params: dict[str, Any]) -> None:
    """Tensors over the whole-tensor limit stream in row blocks after SCE's statistics passes,
    the others stay whole; the output is the bits of whole tensors (bf16 checkpoints: tied spreads)."""
    from mergekit_lite.engine import stream

    ms = build_model_set(tmp_path / "m", n_finetunes=3, num_shards=2, dtype=torch.bfloat16)
    recipe = {"merge_method": "sce", "base_model": str(ms.base), "models": [{"model": str(f)} for f in ms.finetunes],
              "parameters": params, "dtype": "float32"}
    whole = mlite.run_recipe(recipe).state_dict
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)  # blocks of 6 rows of 16; whole up to 800 entries
    monkeypatch.setattr(stream, "WHOLE_TENSOR_BLOCKS", 8)
    seen: list[tuple[str, tuple[int, int] | None]] = []
    result = mlite.run_recipe(recipe, tensor_hook=lambda name, job, out: seen.append((name, job.rows)))
    blocked = result.state_dict
    assert sum(1 for n, r in seen if n == "model.embed_tokens.weight" and r is not None) > 4
    assert ("model.layers.0.mlp.up_proj.weight", None) in seen  # 32×16 = 512 entries: whole
    assert [k for k in whole if not torch.equal(whole[k], blocked[k])] == []
    stats_passes = [p for p in result.passes if p["kind"] == "tensor statistics"]
    assert stats_passes and stats_passes[0]["passes"] == (3 if params["select_topk"] < 1 else 1)
