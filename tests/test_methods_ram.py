"""ram and ramplus_tl (Reinforced Agent Merging, arXiv 2601.13572; mergekit's merge_methods/ram.py):
golden values worked by hand, their laws, mergekit's formulas re-stated from the maths, the
per-tensor counts over row blocks, mergekit-shaped recipes through the engine, recipe errors.

Against mergekit 0.1.5 itself (`mergekit-yaml`, `dtype: float32`), both methods are bit for bit
(benchmarks/vs_mergekit.py -k ram; docs/methods/ram.md has the numbers).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_disposable_gives_the_same_bits, load_dir
from hypothesis import given
from hypothesis import strategies as st
from test_method_laws import LAWS
from test_methods_properties import merge, tensors

import mergekit_lite as mlite
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods.ram import RamCounter, RamCounts, mask_and_count, ramplus_lambdas, ramplus_problem
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.recipe.model import load_recipe
from mergekit_lite.synthetic import build_model_set


def T(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(a: torch.Tensor, b: Any, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b if isinstance(b, torch.Tensor) else T(b), rtol=tol, atol=tol)


def run(method: str, base: Any, models: list[Any], **params: Any) -> torch.Tensor:
    return merge(method, T(base), [T(m) for m in models], **params)


# ============================================================================ golden values

# base 1 everywhere; the models' changes τ per entry:
#   entry 0: nobody moved                      entry 1: only model 1 (0.5)
#   entry 2: models 1, 2 (0.5, 0.25)           entry 3: all three (3, −1.5, 0.75)
#   entry 4: models 1 and 3 moved by 1e-6 and 3e-6, below ε = 1e-5: not moved
G_BASE = [1.0] * 5
G_MODELS = [[1.0, 1.5, 1.5, 4.0, 1.000001], [1.0, 1.0, 1.25, -0.5, 1.0], [1.0, 1.0, 1.0, 1.75, 1.000003]]


def test_ram_golden() -> None:
    # c = [0, 1, 2, 3, 0]. entry 1: τ₁ whole → 1.5. entry 2: (0.5 + 0.25)/2 = 0.375 → 1.375.
    # entry 3: 3/3 − 1.5/3 + 0.75/3 = 1 − 0.5 + 0.25 = 0.75 → 1.75. entries 0 and 4: the base.
    assert torch.equal(run("ram", G_BASE, G_MODELS), T([1.0, 1.5, 1.375, 1.75, 1.0]))
    # ε = 0: entry 4's tiny changes count as moves; models 1 and 3 both made one, so c = 2 and
    # the entry takes their mean: τ = (1.000001 − 1, 1.000003 − 1) in float32, each halved.
    out = run("ram", G_BASE, G_MODELS, epsilon=0.0)
    tiny = (T(1.000001) - 1) / 2 + (T(1.000003) - 1) / 2
    assert torch.equal(out, torch.stack([T(1.0), T(1.5), T(1.375), T(1.75), 1 + tiny]))
    # ε = 0.6: only |τ| > 0.6 counts. Entries 1 and 2 (changes 0.5 and 0.25) fall back to the
    # base; entry 3's changes 3, −1.5 and 0.75 all count (c = 3): 1.75 as before.
    assert torch.equal(run("ram", G_BASE, G_MODELS, epsilon=0.6), T([1.0, 1.0, 1.0, 1.75, 1.0]))


def test_ramplus_golden_defaults() -> None:
    # moved: m₁ = [0,1,1,1,0], m₂ = [0,0,1,1,0], m₃ = [0,0,0,1,0]; c = [0,1,2,3,0].
    # s = (2, 2, 1) shared, u = (1, 0, 0) unique → ρ = (2, 2/1e-5, 1/1e-5), all clamped to α = 0.2:
    # λ = 1 + 0.1·0.2 = 1.02 for each (float32), only model 1 has a unique entry: 1 + 0.5·1.02.
    lam = 1 + 0.1 * torch.tensor([0.2], dtype=torch.float32)  # as mergekit computes it: float32
    out = run("ramplus_tl", G_BASE, G_MODELS)
    assert torch.equal(out, torch.stack([T(1.0), 1 + T(0.5) * lam[0], T(1.375), T(1.75), T(1.0)]))
    close(out, [1.0, 1.51, 1.375, 1.75, 1.0])
    # r = 0.5, α = 4: λ₁ = 1 + 0.5·min(2, 4) = 2 → entry 1 = 1 + 0.5·2 = 2
    assert torch.equal(run("ramplus_tl", G_BASE, G_MODELS, r=0.5, alpha=4.0), T([1.0, 2.0, 1.375, 1.75, 1.0]))


def test_ramplus_golden_ratio_below_the_cap() -> None:
    # base 0. τ₁ = [1, 2, 0, 4], τ₂ = [1, 0, 3, 0]: c = [2, 1, 1, 1].
    # model 1: s = 1 (entry 0), u = 2 (entries 1, 3) → ρ = 0.5; model 2: s = 1, u = 1 → ρ = 1.
    # r = 1, α = 0.75: λ₁ = 1.5, λ₂ = 1 + min(1, 0.75) = 1.75.
    # entry 0: (1 + 1)/2 = 1; entry 1: 2·1.5 = 3; entry 2: 3·1.75 = 5.25; entry 3: 4·1.5 = 6.
    models = [[1, 2, 0, 4], [1, 0, 3, 0]]
    assert torch.equal(run("ramplus_tl", [0, 0, 0, 0], models, r=1.0, alpha=0.75), T([1, 3, 5.25, 6]))
    # α < 0: torch's clamp(ρ, 0, α) is α (min above max), as in mergekit: λ = 1 − 0.5 for both
    assert torch.equal(run("ramplus_tl", [0, 0, 0, 0], models, r=1.0, alpha=-0.5), T([1, 1, 1.5, 2]))
    # negative r shrinks the unique entries: λ₁ = 1 − 2·0.5 = 0, λ₂ = 1 − 2·0.75 = −0.5
    assert torch.equal(run("ramplus_tl", [0, 0, 0, 0], models, r=-2.0, alpha=0.75), T([1, 0, -1.5, 0]))
    # ε = 1.5: entry 0's changes of 1 are not moves (both dropped: the base stays, though both
    # models moved it); m₁ = [0, 1, 0, 1], m₂ = [0, 0, 1, 0], nothing shared: ρ = 0, λ = 1.
    assert torch.equal(run("ramplus_tl", [0, 0, 0, 0], models, r=1.0, alpha=0.75, epsilon=1.5), T([0, 2, 3, 4]))
    assert torch.equal(run("ram", [0, 0, 0, 0], models, epsilon=1.5), T([0, 2, 3, 4]))


def test_counts_and_lambdas_golden() -> None:
    # moved: m₁ = [1, 1, 0, 1], m₂ = [1, 0, 1, 0], m₃ = [0, 0, 1, 0] (1e-6 ≤ ε); c = [2, 1, 2, 1].
    # model 1: shared entry 0, unique 1 and 3; model 2: shared 0 and 2; model 3: shared 2.
    taus = [T([1, 2, 0, 4]), T([1, 0, 3, 0]), T([0, 0, 3, 1e-6])]
    count, counts = mask_and_count([t.clone() for t in taus], 1e-5, per_model=True)
    assert count.tolist() == [2, 1, 2, 1]
    assert counts == RamCounts(shared=(1, 2, 1), unique=(2, 0, 0))
    lams = ramplus_lambdas(counts, 1.0, 0.75, 1e-5)  # ρ = (1/2, 2/1e-5 → 0.75, 1/1e-5 → 0.75)
    assert lams == [1.5, 1.75, 1.75]
    assert ramplus_lambdas(RamCounts((0,), (0,)), 1.0, 0.75, 1e-5) == [1.0]  # 0/ε: nothing moved
    # one model: every move is unique, ρ = 0
    assert mask_and_count([T([0, 2, -3])], 1e-5, per_model=True)[1] == RamCounts((0,), (2,))


def test_registry() -> None:
    ram, plus = get_method("ram"), get_method("ramplus_tl")
    assert ram is not None and plus is not None
    assert (ram.needs_base, ram.min_models, ram.max_models, ram.ordered) == (True, 1, None, False)
    assert (plus.needs_base, plus.min_models, plus.max_models, plus.ordered) == (True, 1, None, False)
    assert ram.defaults() == {"epsilon": 1e-5}
    assert plus.defaults() == {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}
    assert ram.row_local({}) and ram.light and ram.tensor_reducer is None
    assert not plus.row_local({}) and not plus.light and plus.tensor_reducer is not None
    assert ram.param("epsilon").check(0.0) is None and ram.param("epsilon").check(-1e-5)  # type: ignore[union-attr]
    assert plus.param("epsilon").check(0.0) and plus.param("epsilon").check(1e-30) is None  # type: ignore[union-attr]
    assert plus.param("r").check(-3.0) is None and plus.param("alpha").check(-1.0) is None  # type: ignore[union-attr]


# ============================================================================ laws


@LAWS
@given(data=tensors(n_models=(1, 1)), n=st.integers(1, 5), method=st.sampled_from(["ram", "ramplus_tl"]))
def test_n_copies_give_the_model(data: Any, n: int, method: str) -> None:
    """Every entry a copy moved is moved by all n (shared: their mean, τ; or, for n = 1, unique
    with ρ = 0, λ = 1): the model comes back, up to the rounding of n terms τ/n. (Moves of at most
    ε would be dropped; the strategy's changes are 0 or ≥ 0.25.)"""
    base, (model,) = data
    out = merge(method, base, [model.clone() for _ in range(n)])
    close(out, model, 1e-6)
    if n in (1, 2, 4):  # τ/n and their sum are exact
        assert torch.equal(out, base + (model - base))


@LAWS
@given(flat=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=12),
       n=st.integers(1, 4), method=st.sampled_from(["ram", "ramplus_tl"]), eps=st.sampled_from([0.0, 1e-5, 0.5]))
def test_zero_task_vectors_give_the_base_exactly(flat: list[float], n: int, method: str, eps: float) -> None:
    base = T(flat)
    params = {"epsilon": eps or 1e-30}
    assert torch.equal(merge(method, base, [base.clone() for _ in range(n)], **params), base)


@LAWS
@given(data=tensors(n_models=(2, 4)), perm_seed=st.randoms(use_true_random=False),
       method=st.sampled_from(["ram", "ramplus_tl"]), r=st.sampled_from([0.1, 2.0]))
def test_order_does_not_matter(data: Any, perm_seed: Any, method: str, r: float) -> None:
    """Counts are integers and each model's λ follows it; only the float32 sum of the terms
    rounds in another order (exact for two models: addition commutes)."""
    base, models = data
    perm = list(range(len(models)))
    perm_seed.shuffle(perm)
    params = {"r": r, "alpha": 1.0} if method == "ramplus_tl" else {}
    a = merge(method, base, models, **params)
    b = merge(method, base, [models[i] for i in perm], **params)
    close(a, b, 1e-6)
    if len(models) == 2:
        assert torch.equal(a, b)


@LAWS
@given(data=tensors(n_models=(1, 3)), method=st.sampled_from(["ram", "ramplus_tl"]))
def test_an_extra_model_equal_to_the_base_changes_nothing(data: Any, method: str) -> None:
    """A model that moved nothing is in no count (c, s, u unchanged, its own λ = 1) and adds
    ±0 to every entry: bit for bit the same result."""
    base, models = data
    assert torch.equal(merge(method, base, models), merge(method, base, [*models, base.clone()]))


@LAWS
@given(data=tensors(n_models=(1, 4)), eps=st.sampled_from([0.0, 1e-5, 0.3]))
def test_ramplus_without_a_boost_is_ram(data: Any, eps: float) -> None:
    """r = 0 or α = 0 makes every λ exactly 1: ramplus_tl is then ram, bit for bit."""
    base, models = data
    want = merge("ram", base, models, epsilon=eps)
    assert torch.equal(merge("ramplus_tl", base, models, epsilon=eps or 1e-30, r=0.0), want)
    assert torch.equal(merge("ramplus_tl", base, models, epsilon=eps or 1e-30, alpha=0.0, r=3.0), want)


def test_huge_epsilon_gives_the_base(rng: torch.Generator) -> None:
    base = torch.randn(9, 5, generator=rng)
    models = [base + torch.randn(9, 5, generator=rng) for _ in range(3)]
    for method in ("ram", "ramplus_tl"):
        assert torch.equal(merge(method, base, models, epsilon=1e30), base)


@pytest.mark.parametrize("method,params", [("ram", {}), ("ramplus_tl", {}), ("ramplus_tl", {"r": -0.7, "alpha": 3})])
def test_disposable_models_give_the_same_bits(method: str, params: dict[str, Any], rng: torch.Generator) -> None:
    base = torch.randn(17, 9, generator=rng)
    models = [base + 0.1 * torch.randn(17, 9, generator=rng) * (torch.rand(17, 9, generator=rng) < 0.6)
              for _ in range(3)]
    assert_disposable_gives_the_same_bits(method, base, models, params)


def test_empty_tensors_and_no_models() -> None:
    for shape in ((0,), (0, 4), (3, 0)):
        for method in ("ram", "ramplus_tl"):
            assert merge(method, torch.zeros(shape), [torch.zeros(shape)] * 2).shape == shape
    base = T([1.0, -2.0])
    for method in ("ram", "ramplus_tl"):  # mergekit returns the base (recipes need a model: see below)
        assert torch.equal(get_method(method).merge(  # type: ignore[union-attr]
            TensorJob("w", base, [], get_method(method).defaults())), base)  # type: ignore[union-attr]


def test_non_finite_changes_stay_non_finite() -> None:
    """mergekit multiplies its masks in, so a NaN change (never a move: |NaN| > ε is false) still
    makes NaN; the engine then names the input that holds it. Other entries are unaffected."""
    base = T([0.0, 0.0])
    for method in ("ram", "ramplus_tl"):
        out = run(method, [0.0, 0.0], [[float("nan"), 1.0], [0.0, 1.0]])
        assert out[0].isnan() and out[1] == 1.0
    assert base.tolist() == [0.0, 0.0]


# ============================================================================ mergekit, re-stated


def mk_ram(base: torch.Tensor, models: list[torch.Tensor], eps: float = 1e-5, r: float | None = None,
           alpha: float = 0.2) -> torch.Tensor:
    """RAM (and, with r, RAM+) from the paper's maths as mergekit states them, on stacked
    float32 task vectors: moved entries, the per-entry count, unique entries whole (×λ) and
    shared entries averaged over their movers, the base added last. λ in float64."""
    taus = torch.stack([m - base for m in models])
    hit = taus.abs() > eps
    kept = torch.where(hit, taus, torch.zeros_like(taus))
    c = hit.sum(0)
    alone = c == 1
    if r is None:
        lam = torch.ones(len(models))
    else:
        shared = (hit & (c > 1)).flatten(1).sum(1).double()
        unique = (hit & alone).flatten(1).sum(1).double()
        lam = (1 + r * (shared / unique.clamp(min=eps)).clamp(0, alpha)).float()
    lam = lam.view(-1, *([1] * base.dim()))
    terms = torch.where(alone, kept * lam, kept / c.clamp(min=1))
    return base + terms.sum(0)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.0])
def test_ram_is_mergekit_ram(rng: torch.Generator, eps: float) -> None:
    for shape, n, scale, keep in (((24, 16), 3, 1e-3, 0.5), ((40,), 2, 1e-2, 0.3), ((12, 10), 4, 1.0, 0.8),
                                  ((9, 7), 5, 2e-5, 0.9), ((6, 6), 1, 1e-3, 0.5)):
        base = torch.randn(shape, generator=rng)
        models = [base + scale * torch.randn(shape, generator=rng) * (torch.rand(shape, generator=rng) < keep)
                  for _ in range(n)]
        close(merge("ram", base, models, epsilon=eps), mk_ram(base, models, eps), 1e-6)


@pytest.mark.parametrize("r,alpha,eps", [(0.1, 0.2, 1e-5), (0.3, 0.5, 1e-3), (2.0, 5.0, 1e-4), (-0.5, 1.0, 1e-5),
                                         (1.0, 0.0, 1e-5)])
def test_ramplus_is_mergekit_ramplus(rng: torch.Generator, r: float, alpha: float, eps: float) -> None:
    for shape, n, scale, keep in (((24, 16), 3, 1e-3, 0.5), ((40,), 2, 1e-2, 0.3), ((12, 10), 4, 1.0, 0.8),
                                  ((9, 7), 5, 2e-5, 0.9), ((6, 6), 1, 1e-3, 0.5), ((50, 3), 3, 1e-3, 0.1)):
        base = torch.randn(shape, generator=rng)
        models = [base + scale * torch.randn(shape, generator=rng) * (torch.rand(shape, generator=rng) < keep)
                  for _ in range(n)]
        close(merge("ramplus_tl", base, models, epsilon=eps, r=r, alpha=alpha),
              mk_ram(base, models, eps, r, alpha), 1e-6)


def test_lambdas_are_mergekit_float32() -> None:
    """λ's bits: int64 counts clamped by a float ε become float32 (past 2²⁴ they round), float32
    division and clamp, r·x and 1 + … in float32."""
    counts = RamCounts(shared=(3, 50_000_001, 0, 7), unique=(7, 33_554_433, 0, 0))
    lams = ramplus_lambdas(counts, 0.3, 2.5, 1e-5)
    f = torch.float32
    for i, (s, u) in enumerate(zip(counts.shared, counts.unique, strict=True)):
        rho = torch.tensor(float(s), dtype=f) / torch.tensor(max(float(u), 1e-5), dtype=f)
        want = torch.tensor(1.0, dtype=f) + torch.tensor(0.3, dtype=f) * rho.clamp(0, torch.tensor(2.5, dtype=f))
        assert lams[i] == float(want), i
    assert lams[2] == 1.0 and lams[3] == float(torch.tensor(1.0, dtype=f) + torch.tensor(0.3, dtype=f) * 2.5)


# ============================================================================ row blocks


def test_counts_over_row_blocks_equal_the_whole_tensor(rng: torch.Generator) -> None:
    base = torch.randn(300, 70, generator=rng)
    models = [base + 1e-3 * torch.randn(300, 70, generator=rng) * (torch.rand(300, 70, generator=rng) < 0.4)
              for _ in range(3)]
    params = {**get_method("ramplus_tl").defaults(), "r": 0.5, "alpha": 1.5}  # type: ignore[union-attr]
    whole = get_method("ramplus_tl").merge(TensorJob("w", base, [m.clone() for m in models], params))  # type: ignore[union-attr]
    counter = RamCounter(params, 3)
    bounds = [(0, 7), (7, 150), (150, 151), (151, 300)]
    for a, b in bounds:
        counter.observe(TensorJob("w", base[a:b], [m[a:b] for m in models], params, rows=(a, b)))
    stats = counter.result()
    assert stats == mask_and_count([m - base for m in models], 1e-5, per_model=True)[1]
    blocks = [get_method("ramplus_tl").merge(TensorJob(  # type: ignore[union-attr]
        "w", base[a:b], [m[a:b] for m in models], params, stats=stats, rows=(a, b))) for a, b in bounds]
    assert torch.equal(torch.cat(blocks), whole)
    with pytest.raises(RuntimeError, match="no shared/unique counts"):
        get_method("ramplus_tl").merge(TensorJob("w", base[:7], [m[:7] for m in models], params, rows=(0, 7)))  # type: ignore[union-attr]


def test_ram_row_blocks_are_the_whole_tensor(rng: torch.Generator) -> None:
    base = torch.randn(40, 30, generator=rng)
    models = [base + 1e-3 * torch.randn(40, 30, generator=rng) * (torch.rand(40, 30, generator=rng) < 0.5)
              for _ in range(3)]
    whole = merge("ram", base, models)
    parts = [merge("ram", base[a:b], [m[a:b] for m in models]) for a, b in ((0, 1), (1, 25), (25, 40))]
    assert torch.equal(torch.cat(parts), whole)


# ============================================================================ recipes and the engine


def _mk_recipe(ms: Any, method: str, models: list[Any], parameters: dict[str, Any]) -> dict[str, Any]:
    return {"merge_method": method, "base_model": str(ms.base),
            "models": [{"model": str(ms.base)}, *({"model": str(m), "parameters": {"weight": 0.4}} for m in models)],
            "parameters": parameters, "dtype": "float32"}


@pytest.mark.parametrize("method,params", [("ram", {"epsilon": 1e-3}),
                                           ("ramplus_tl", {"epsilon": 1e-4, "r": 0.5, "alpha": 2.0})])
def test_mergekit_recipe_through_the_engine(model_set: Any, method: str, params: dict[str, Any]) -> None:
    """A mergekit recipe (base listed among the models, a `weight` mergekit ignores) runs
    unchanged and gives the re-stated formula's tensors; the weight is noted as ignored."""
    ms = model_set
    recipe = _mk_recipe(ms, method, list(ms.finetunes), params)
    notes = load_recipe(recipe).options["notes"]
    assert any(f"'weight' is not a parameter of '{method}'; ignored" in n for n in notes)
    out = mlite.run_recipe(recipe).state_dict
    base, fts = load_dir(ms.base), [load_dir(f) for f in ms.finetunes]
    assert set(out) == set(base)
    r = params.get("r")
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        want = mk_ram(b.float(), [f[name].float() for f in fts], params["epsilon"], r, params.get("alpha", 0.2))
        close(out[name], want, 1e-6)
    assert any(not torch.equal(out[k], base[k]) for k in out)


def test_ram_streams_in_row_blocks_with_the_same_bits(model_set: Any, monkeypatch: Any) -> None:
    from mergekit_lite.engine import stream

    recipe = _mk_recipe(model_set, "ram", list(model_set.finetunes), {"epsilon": 1e-3})
    whole = mlite.run_recipe(recipe).state_dict
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 64)
    seen: list[tuple[str, Any]] = []
    blocked = mlite.run_recipe(recipe, tensor_hook=lambda name, job, out: seen.append((name, job.rows))).state_dict
    assert sum(1 for n, r in seen if n == "model.embed_tokens.weight" and r is not None) > 4
    assert [k for k in whole if not torch.equal(whole[k], blocked[k])] == []


def test_ramplus_streams_in_row_blocks_after_counting(model_set: Any, monkeypatch: Any) -> None:
    """A tensor over the whole-tensor limit is read twice in row blocks: once to count, once to
    write. The counts are integers: the same bits as whole tensors."""
    from mergekit_lite.engine import stream

    recipe = _mk_recipe(model_set, "ramplus_tl", list(model_set.finetunes), {"r": 0.5, "alpha": 3.0})
    whole = mlite.run_recipe(recipe).state_dict
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(stream, "WHOLE_TENSOR_BLOCKS", 8)  # matrices over 800 entries: counts, then blocks
    seen: list[tuple[str, Any]] = []
    blocked = mlite.run_recipe(recipe, tensor_hook=lambda name, job, out: seen.append((name, job.rows)))
    assert sum(1 for n, r in seen if n == "model.embed_tokens.weight" and r is not None) > 4
    assert any(p["kind"] == "tensor statistics" for p in blocked.passes)
    assert [k for k in whole if not torch.equal(whole[k], blocked.state_dict[k])] == []


def test_mlite_recipe_and_notes(model_set: Any) -> None:
    ms = model_set
    recipe = {"inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
              "steps": [{"id": "m", "method": "ramplus_tl", "base": "base", "models": ["a", "b"],
                         "parameters": {"r": [{"filter": "mlp", "value": 0.9}, {"value": 0.2}], "alpha": 1.0}}]}
    out = mlite.run_recipe(recipe).state_dict
    base, fts = load_dir(ms.base), [load_dir(f) for f in ms.finetunes]
    name = "model.layers.0.mlp.up_proj.weight"
    close(out[name], mk_ram(base[name], [f[name] for f in fts], 1e-5, 0.9, 1.0), 1e-6)
    name = "model.layers.0.self_attn.q_proj.weight"
    close(out[name], mk_ram(base[name], [f[name] for f in fts], 1e-5, 0.2, 1.0), 1e-6)
    # mergekit ignores r and alpha given to ram: noted, as for its other knobs
    mk = _mk_recipe(ms, "ram", list(ms.finetunes), {"r": 0.5, "alpha": 1.0})
    notes = load_recipe(mk).options["notes"]
    assert any("'r' is not a parameter of 'ram'; ignored, as mergekit ignores it" in n for n in notes)
    assert any("'alpha' is not a parameter of 'ram'; ignored" in n for n in notes)


@pytest.mark.parametrize("recipe,message", [
    ({"merge_method": "ram", "models": ["FT1"], "parameters": {"epsilon": -1e-5}},
     "parameter 'epsilon' of method 'ram': must be >= 0, got -1e-05"),
    ({"merge_method": "ramplus_tl", "models": ["FT1", "FT2"], "parameters": {"epsilon": 0}},
     "parameter 'epsilon' of method 'ramplus_tl': must be > 0, got 0"),
    ({"merge_method": "ramplus_tl", "models": ["FT1"], "parameters": {"r": "big"}},
     "parameter 'r' of method 'ramplus_tl': expected a number"),
    ({"merge_method": "ramplus_tl", "base_model": None, "models": ["FT1", "FT2"]},
     "method 'ramplus_tl' needs a base model"),
    ({"merge_method": "ram", "models": ["BASE"]}, "method 'ram' needs at least 1 model(s), got 0"),
])
def test_recipe_mistakes_are_one_line_errors(model_set: Any, recipe: dict[str, Any], message: str) -> None:
    ms = model_set
    names = {"FT1": str(ms.finetunes[0]), "FT2": str(ms.finetunes[1]), "BASE": str(ms.base)}
    recipe = {"base_model": str(ms.base), **recipe, "models": [names[m] for m in recipe["models"]]}
    if recipe["base_model"] is None:
        del recipe["base_model"]
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(recipe)


@pytest.mark.parametrize("params,message", [
    ({"r": 1e39}, "r = 1e+39 is beyond float32's range"),
    ({"alpha": -4e38}, "alpha = -4e+38 is beyond float32's range"),
    ({"epsilon": 1e39}, "epsilon = 1e+39 is beyond float32's range"),
    ({"r": 1e30, "alpha": 1e30}, "r·alpha = 1e+60 overflows float32"),
    ({"epsilon": 1e-47}, "epsilon = 1e-47 rounds to 0 in float32"),
])
def test_float32_limits_fail_before_the_run(model_set: Any, params: dict[str, Any], message: str) -> None:
    """What mergekit's float32 λ turns into an error or NaN is refused at planning, naming the tensor."""
    resolved = {**get_method("ramplus_tl").defaults(), **params}  # type: ignore[union-attr]
    problem = ramplus_problem(resolved, 2)
    assert problem is not None and message in problem
    ms = model_set
    recipe = {"merge_method": "ramplus_tl", "base_model": str(ms.base),
              "models": [str(f) for f in ms.finetunes], "parameters": params}
    with pytest.raises(RecipeError, match=r"step .*ramplus_tl.*tensor .*" + message.split(" ")[0]):
        mlite.run_recipe(recipe)
    assert ramplus_problem(get_method("ramplus_tl").defaults(), 2) is None  # type: ignore[union-attr]


def test_shipped_recipe_runs(tmp_path: Path) -> None:
    """recipes/ram.yaml runs as shipped, on models beside it."""
    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "recipes" / "ram.yaml", tmp_path / "ram.yaml")
    build_model_set(tmp_path / "models")
    base = load_dir(tmp_path / "models" / "base")
    result = mlite.run_recipe(tmp_path / "ram.yaml", out=tmp_path / "out")
    out = load_dir(result.output)
    assert set(out) == set(base) and any(not torch.equal(out[k], base[k]) for k in out)
