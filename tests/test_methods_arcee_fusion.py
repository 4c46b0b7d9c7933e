"""arcee_fusion (mergekit's Arcee Fusion): golden values, laws, mergekit's formula re-stated, and
mergekit-shaped recipes through the engine.

`mk_fusion` below is an independent re-statement of mergekit 0.1.5's merge_methods/arcee_fusion.py,
written from the maths: importance = |θ₁ − θ₀| · KL(softmax(θ₁) + 1e-8 ‖ softmax(θ₀) + 1e-8) per
vector along the last dimension, index quantiles sorted[int(q·(n − 1))] with q a float32 tensor,
fence = median + 1.5·(Q3 − Q1), θ = θ₀ + (θ₁ − θ₀)·[importance ≥ fence]. For tensors of up to
1M entries (mergekit samples bigger ones) mlite gives its exact bits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_dir
from hypothesis import given
from test_method_laws import LAWS
from test_methods_properties import tensors

import mergekit_lite as mlite
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods.arcee_fusion import fence, quantile_positions, row_kl
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.recipe.model import load_recipe


def job(base: torch.Tensor | None, models: list[torch.Tensor], *, disposable: bool = False) -> TensorJob:
    return TensorJob(name="model.layers.0.mlp.up_proj.weight", base=base, models=models, params={},
                     models_disposable=disposable)


def fusion(base: Any, model: Any) -> torch.Tensor:
    b, m = torch.as_tensor(base, dtype=torch.float32), torch.as_tensor(model, dtype=torch.float32)
    return get_method("arcee_fusion").merge(job(b, [m]))  # type: ignore[union-attr]


def T(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------ mergekit's formula, re-stated


def mk_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion from its maths, for tensors it does not sample (≤ 1M entries)."""
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = (model - base).abs() * kl
    ordered = importance.flatten().sort().values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    keep = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (model - base) * keep


@pytest.mark.parametrize("shape", [(1,), (5,), (64,), (32, 16), (3, 5, 7), (300, 200), (1000, 1000)])
@pytest.mark.parametrize("kind", ["dense", "sparse", "scaled rows"])
def test_fusion_is_mergekit_fusion_bit_for_bit(shape: tuple[int, ...], kind: str) -> None:
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    base = torch.randn(shape, generator=g)
    delta = 0.02 * torch.randn(shape, generator=g)
    if kind == "sparse":
        delta *= torch.rand(shape, generator=g) < 0.1
    elif kind == "scaled rows":  # KL varies a lot between rows
        delta *= torch.rand(*shape[:-1], 1, generator=g) * 10
    model = base + delta
    assert torch.equal(fusion(base, model), mk_fusion(base, model))


def test_fusion_of_rms_norm_weights_is_mergekit_fusion() -> None:
    # ones: softmax of a constant row; a change that keeps the row constant has KL = 0
    g = torch.Generator().manual_seed(4)
    for base, model in ((torch.ones(16), torch.full((16,), 1.01)),
                        (torch.ones(16), 1 + 0.05 * torch.randn(16, generator=g)),
                        (1 + 0.05 * torch.randn(16, generator=g), 1 + 0.05 * torch.randn(16, generator=g))):
        assert torch.equal(fusion(base, model), mk_fusion(base, model))


# ------------------------------------------------------------ golden values


def test_golden_one_row_keeps_the_outlying_changes() -> None:
    # one row: every entry shares one KL > 0, so importance ∝ |Δ| = sorted 0.1 ×4, 0.2 ×2, 0.3, 2.0.
    # n = 8: positions ⌊0.25·7⌋ = 1, ⌊0.5·7⌋ = 3, ⌊0.75·7⌋ = 5 → Q1 = 0.1K, median = 0.1K,
    # Q3 = 0.2K; fence = 0.1K + 1.5·0.1K = 0.25K: only the changes 0.3 and 2.0 are kept.
    base = torch.zeros(8)
    model = T([0.1, -0.1, 0.1, 0.2, -0.2, 0.1, 0.3, 2.0])
    assert torch.equal(fusion(base, model), T([0, 0, 0, 0, 0, 0, 0.3, 2.0]))


def test_golden_a_change_that_leaves_the_softmax_alone_has_no_importance() -> None:
    # row 0 moves every entry by 1: its softmax is unchanged, KL = 0, importance 0 ×4.
    # row 1 (KL = K > 0): importances 0.1K, 0.2K, 0.4K, 3K. Sorted: 0 ×4, 0.1K, 0.2K, 0.4K, 3K;
    # Q1 = 0 (position 1), median = 0 (position 3), Q3 = 0.2K (position 5); fence = 0.3K:
    # row 1's 0.4 and 3.0 are kept, row 0's large change is not.
    base = torch.zeros(2, 4)
    model = T([[1, 1, 1, 1], [0.1, 0.2, 0.4, 3.0]])
    assert torch.equal(fusion(base, model), T([[0, 0, 0, 0], [0, 0, 0.4, 3.0]]))


def test_golden_fewer_than_a_quarter_changed_keeps_the_whole_model() -> None:
    # six of eight importances are 0, so Q1 = median = Q3 = 0 and the fence is 0: every entry
    # (importance ≥ 0) takes the model's value, changed or not — mergekit's rule, kept
    base = torch.zeros(4, 2)
    model = T([[1, 0], [1, 1], [0, 0], [2, 0]])
    assert torch.equal(fusion(base, model), model)


def test_golden_row_kl() -> None:
    # p = softmax(ln 3, 0) = (3/4, 1/4), q = (1/2, 1/2) (+1e-8 each, invisible here):
    # KL = 3/4·ln(3/2) + 1/4·ln(1/2) = 0.1308120
    kl = row_kl(T([[math.log(3), 0.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert kl.shape == (2, 1)
    assert kl[0, 0].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)
    assert kl[1, 0].item() == 0.0


def test_golden_quantile_positions() -> None:
    assert quantile_positions(8) == [1, 3, 5]
    assert quantile_positions(5) == [1, 2, 3]
    assert quantile_positions(1) == [0, 0, 0]
    # float32 product, as mergekit: 0.75·16777213 = 12582909.75 rounds to 12582910 in float32
    assert quantile_positions(16777214) == [4194303, 8388606, 12582910]


def test_fence_uses_exact_quantiles_beyond_mergekits_sample() -> None:
    # mergekit would sort a random sample of 1M entries here; we take every entry's order statistics
    g = torch.Generator().manual_seed(8)
    values = torch.rand(1_200_001, generator=g)
    ordered = values.sort().values
    q1, median, q3 = (ordered[i] for i in (300000, 600000, 900000))
    assert torch.equal(fence(values), median + 1.5 * (q3 - q1))


# ------------------------------------------------------------ laws


@LAWS
@given(data=tensors(n_models=(1, 1)))
def test_a_model_equal_to_the_base_gives_the_base(data: Any) -> None:
    base, _ = data
    assert torch.equal(fusion(base, base.clone()), base)


@LAWS
@given(data=tensors(n_models=(1, 1)))
def test_every_entry_is_the_base_or_the_model(data: Any) -> None:
    base, models = data
    out = fusion(base, models[0])
    delta = models[0] - base
    assert torch.equal(out, base + delta * (out != base))
    assert not torch.isnan(out).any()


def test_disposable_models_give_the_same_bits() -> None:
    g = torch.Generator().manual_seed(12)
    base = torch.randn(40, 33, generator=g)
    model = base + 0.1 * torch.randn(40, 33, generator=g)
    fresh = get_method("arcee_fusion").merge(job(base, [model.clone()]))  # type: ignore[union-attr]
    reused = get_method("arcee_fusion").merge(job(base, [model.clone()], disposable=True))  # type: ignore[union-attr]
    assert torch.equal(fresh, reused)


@pytest.mark.parametrize("shape", [(0,), (0, 16), (16, 0), (2, 0, 3)])
def test_empty_tensors(shape: tuple[int, ...]) -> None:
    assert fusion(torch.zeros(shape), torch.zeros(shape)).shape == shape


def test_threads_do_not_change_the_bits() -> None:
    g = torch.Generator().manual_seed(6)
    before = torch.get_num_threads()
    outs = []
    for shape in ((1 << 20,), (1024, 1024)):
        base = torch.randn(shape, generator=g)
        model = base + 0.01 * torch.randn(shape, generator=g)
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs.append(fusion(base, model))
        finally:
            torch.set_num_threads(before)
        assert torch.equal(outs[-3], outs[-2]) and torch.equal(outs[-3], outs[-1])


# ------------------------------------------------------------ errors and recipes


def test_job_errors_are_recipe_errors() -> None:
    with pytest.raises(RecipeError, match="arcee_fusion: a base model is required"):
        get_method("arcee_fusion").merge(job(None, [T([1.0])]))  # type: ignore[union-attr]
    with pytest.raises(RecipeError, match="exactly one model besides the base, got 2"):
        get_method("arcee_fusion").merge(job(T([1.0]), [T([1.0]), T([2.0])]))  # type: ignore[union-attr]


@pytest.mark.parametrize(("models", "base", "message"), [
    (["a", "b"], "base_model: ./m/base\n", "method 'arcee_fusion' takes at most 1 model(s), got 2 (models)"),
    (["a"], "", "method 'arcee_fusion' needs a base model ('base_model:') (base_model)"),
    # the base alone (mergekit: "requires at least 2 inputs ... got 1")
    (["base"], "base_model: ./m/base\n", "method 'arcee_fusion' needs at least 1 model(s), got 0 (models)"),
])
def test_mergekit_recipe_arity_errors(tmp_path: Path, models: list[str], base: str, message: str) -> None:
    listed = "".join(f"  - model: ./m/{m}\n" for m in models)
    path = tmp_path / "r.yaml"
    path.write_text(f"merge_method: arcee_fusion\n{base}models:\n{listed}")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("listed_base", [False, True])
def test_mergekit_recipe_runs_unchanged(tmp_path: Path, model_set: Any, listed_base: bool) -> None:
    ms = model_set
    path = tmp_path / "fusion.yaml"
    listed = f"  - model: {ms.base}\n" if listed_base else ""
    path.write_text(f"merge_method: arcee_fusion\nbase_model: {ms.base}\nmodels:\n{listed}"
                    f"  - model: {ms.finetunes[1]}\ndtype: float32\n")
    recipe = load_recipe(path)
    assert recipe.steps[0].base == "base" and recipe.steps[0].models == ["ft2"]
    out = mlite.run_recipe(path).state_dict
    base, model = load_dir(ms.base), load_dir(ms.finetunes[1])
    assert out.keys() == base.keys()
    changed = 0
    for name in out:
        assert torch.equal(out[name], mk_fusion(base[name], model[name])), name
        changed += int(not torch.equal(out[name], base[name]))
    assert changed > 0


# ------------------------------------------------------------ row blocks


def streamed(base: torch.Tensor, model: torch.Tensor, bounds: list[tuple[int, int]]) -> tuple[torch.Tensor, int]:
    """What the engine does for a big tensor: `FenceSelect` over its row blocks, then each block."""
    spec = get_method("arcee_fusion")
    assert spec is not None and spec.tensor_reducer is not None
    reducer = spec.tensor_reducer({}, 1)
    assert reducer is not None
    passes = 0
    while True:
        passes += 1
        for a, b in bounds:
            reducer.observe(TensorJob("w", base[a:b], [model[a:b]], {}, rows=(a, b)))
        if reducer.end_pass():
            break
    stats = reducer.result()
    blocks = [spec.merge(TensorJob("w", base[a:b], [model[a:b].clone()], {}, stats=stats, rows=(a, b),
                                   models_disposable=True)) for a, b in bounds]
    return torch.cat(blocks), passes


def blocks_of(rows: int, *cuts: int) -> list[tuple[int, int]]:
    edges = [0, *cuts, rows]
    return list(zip(edges[:-1], edges[1:], strict=True))


@pytest.mark.parametrize("shape", [(300, 200), (700, 500), (40, 6, 9)])
@pytest.mark.parametrize("kind", ["dense", "sparse", "scaled rows"])
def test_row_blocks_give_the_whole_tensors_bits(shape: tuple[int, ...], kind: str) -> None:
    """(700×500: more importances than the selection's sample, so it brackets and gathers.)"""
    g = torch.Generator().manual_seed(shape[0] + len(kind))
    base = torch.randn(shape, generator=g)
    delta = 0.02 * torch.randn(shape, generator=g)
    if kind == "sparse":  # most importances 0: quantiles inside a run of zeros
        delta *= torch.rand(shape, generator=g) < 0.1
    elif kind == "scaled rows":
        delta *= torch.rand(*shape[:-1], 1, generator=g) * 10
    model = base + delta
    got, passes = streamed(base, model, blocks_of(shape[0], 1, shape[0] // 3, shape[0] // 3 + 1))
    assert torch.equal(got, fusion(base, model)) and passes == 2
    if shape == (300, 200):
        assert torch.equal(got, mk_fusion(base, model))


def test_row_blocks_of_constant_rows_and_of_a_model_equal_to_the_base() -> None:
    """Rows of ones (norm weights stacked): a change that keeps a row constant has KL 0, every
    importance is 0, the fence is 0 and every entry takes the model's value; a model equal to
    the base gives the base. Blocks agree with the whole tensor (and with mergekit) on both."""
    g = torch.Generator().manual_seed(13)
    ones = torch.ones(30, 16)
    lifted = torch.cat([torch.full((10, 16), 1.01), torch.ones(20, 16)])
    for base, model in ((ones, lifted), (ones, ones.clone()), (ones, 1 + 0.05 * torch.randn(30, 16, generator=g))):
        got, _ = streamed(base, model, blocks_of(30, 7, 8, 19))
        assert torch.equal(got, fusion(base, model)) and torch.equal(got, mk_fusion(base, model))
    assert torch.equal(streamed(ones, lifted, blocks_of(30, 7))[0], lifted)
    base = torch.randn(50, 20, generator=g)
    assert torch.equal(streamed(base, base.clone(), blocks_of(50, 25))[0], base)


def test_row_block_without_a_fence_is_refused() -> None:
    with pytest.raises(RuntimeError, match="no whole-tensor fence"):
        get_method("arcee_fusion").merge(TensorJob("w", torch.zeros(4, 2), [torch.ones(4, 2)], {}, rows=(0, 4)))  # type: ignore[union-attr]


def test_big_tensors_stream_through_the_engine(tmp_path: Path, model_set: Any, monkeypatch: Any) -> None:
    """Tensors over the whole-tensor limit stream in row blocks after the fence's two passes, the
    others (1-D norms of ones among them) stay whole: the bits of whole tensors, mergekit's."""
    from mergekit_lite.engine import stream

    ms = model_set
    recipe = {"merge_method": "arcee_fusion", "base_model": str(ms.base), "models": [{"model": str(ms.finetunes[0])}],
              "dtype": "float32"}
    whole = mlite.run_recipe(recipe).state_dict
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)  # blocks of 6 rows of 16; whole up to 800 entries
    monkeypatch.setattr(stream, "WHOLE_TENSOR_BLOCKS", 8)
    seen: list[tuple[str, tuple[int, int] | None]] = []
    result = mlite.run_recipe(recipe, tensor_hook=lambda name, job, out: seen.append((name, job.rows)))
    assert sum(1 for n, r in seen if n == "model.embed_tokens.weight" and r is not None) > 4
    assert ("model.layers.0.input_layernorm.weight", None) in seen
    assert [k for k in whole if not torch.equal(whole[k], result.state_dict[k])] == []
    base, model = load_dir(ms.base), load_dir(ms.finetunes[0])
    assert all(torch.equal(result.state_dict[n], mk_fusion(base[n], model[n])) for n in base)
    assert [p["passes"] for p in result.passes if p["kind"] == "tensor statistics"] == [2]
