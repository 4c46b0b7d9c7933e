"""karcher (mergekit's Karcher mean on the unit sphere): golden values, laws, mergekit's formula
re-stated, and mergekit-shaped recipes through the engine.

`mk_karcher` below is an independent re-statement of mergekit 0.1.5's merge_methods/karcher.py,
written from the maths (unit vectors, the exponential-map iteration, its branch tests), run on
whole float64 tensors. mlite runs the same iteration on the Gram matrix's coordinates, and
agrees with it to float32 rounding. (mergekit run with `dtype: float32` takes its angles in
float32, where arccos cannot see angles below ~3.5e-4: see docs/methods/karcher.md.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_dir
from hypothesis import given
from hypothesis import strategies as st
from test_method_laws import LAWS
from test_methods_properties import tensors

import mergekit_lite as mlite
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods.karcher import Gram, KarcherGram, gram, karcher_coefficients
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.recipe.model import load_recipe


def job(models: list[torch.Tensor], base: torch.Tensor | None = None, *, disposable: bool = False,
        **params: Any) -> TensorJob:
    resolved = get_method("karcher").defaults()  # type: ignore[union-attr]
    resolved.update(params)
    return TensorJob(name="model.layers.0.mlp.up_proj.weight", base=base, models=models, params=resolved,
                     models_disposable=disposable)


def karcher(models: list[Any], **params: Any) -> torch.Tensor:
    ts = [torch.as_tensor(m, dtype=torch.float32) for m in models]
    return get_method("karcher").merge(job(ts, **params))  # type: ignore[union-attr]


def T(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------ mergekit's formula, re-stated


def mk_karcher(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's karcher, from its maths, on float64 copies of whole tensors."""
    if len(tensors) == 1:
        return tensors[0]
    vs = [t.double().flatten() for t in tensors]
    alphas = [1.0 / len(vs)] * len(vs)
    norms = [float(v.norm()) for v in vs]
    live = [i for i, n in enumerate(norms) if n > tol]
    if not live:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in live)
    w = {i: alphas[i] / total for i in live}
    u = {i: vs[i] / norms[i] for i in live}
    m = sum(w[i] * u[i] for i in live)
    m = u[live[0]].clone() if float(m.norm()) < tol else m / m.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(m)
        for i in live:
            c = float((m @ u[i]).clamp(-1, 1))
            theta = math.acos(c)
            if theta < tol:
                continue
            tangent += w[i] * theta / math.sin(theta) * (u[i] - c * m)
        size = float(tangent.norm())
        if size < tol:
            break
        m = math.cos(size) * m + math.sin(size) * tangent / size
        if float(m.norm()) > tol:
            m = m / m.norm()
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return (scale * m).reshape(tensors[0].shape).float()


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("spread", [1.0, 1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("shape", [(7,), (16, 12), (2, 3, 5)])
def test_karcher_is_mergekit_karcher(n: int, spread: float, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(n * 1000 + len(shape))
    centre = torch.randn(shape, generator=g)
    models = [centre + spread * torch.randn(shape, generator=g) for _ in range(n)]
    ours = get_method("karcher").merge(job([m.clone() for m in models]))  # type: ignore[union-attr]
    torch.testing.assert_close(ours, mk_karcher(models), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("params", [{"max_iter": 0}, {"max_iter": 1}, {"max_iter": 3, "tol": 1e-3},
                                    {"tol": 1e-7}, {"max_iter": 40, "tol": 1e-9}])
def test_karcher_parameters_are_mergekit_parameters(params: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(3)
    models = [torch.randn(40, 30, generator=g) * (1 + i) for i in range(3)]
    ours = get_method("karcher").merge(job([m.clone() for m in models], **params))  # type: ignore[union-attr]
    torch.testing.assert_close(ours, mk_karcher(models, **params), rtol=1e-6, atol=1e-6)


def test_karcher_norm_weights_and_a_zero_model_are_mergekit_karcher() -> None:
    g = torch.Generator().manual_seed(5)
    norms = [torch.ones(16), torch.full((16,), 1.1), 1 + 0.05 * torch.randn(16, generator=g)]  # RMSNorm weights
    torch.testing.assert_close(karcher(norms), mk_karcher(norms), rtol=1e-6, atol=1e-6)
    with_zero = [torch.zeros(16), torch.randn(16, generator=g), torch.randn(16, generator=g)]
    torch.testing.assert_close(karcher(with_zero), mk_karcher(with_zero), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ golden values


def test_golden_orthogonal_pair() -> None:
    # units e1, e2; the normalised mean (1, 1)/√2 is already the centre (the two tangents
    # (1/2, −1/2) and (−1/2, 1/2) cancel); scale = (2 + 4)/2 = 3 → 3/√2 = 2.1213203 each
    torch.testing.assert_close(karcher([[2, 0], [0, 4]]), T([3 / math.sqrt(2)] * 2), rtol=1e-7, atol=0)


def test_golden_iteration_reaches_the_mean_angle() -> None:
    # directions at angles 0, 0 and 90°: on a circle the Karcher mean is the mean angle, 30°.
    # The start, (2/3, 1/3) normalised, sits at atan(1/2) = 26.57°; one step along the mean
    # tangent (its length is the 3.43° still missing) lands on 30°; the next tangent is 0.
    # scale = (2 + 1 + 3)/3 = 2 → 2·(cos 30°, sin 30°) = (1.7320508, 1.0)
    torch.testing.assert_close(karcher([[2, 0], [1, 0], [0, 3]]), T([math.sqrt(3), 1.0]), rtol=1e-7, atol=1e-7)
    # max_iter 0: the start itself, 2·(2, 1)/√5 = (1.7888544, 0.8944272)
    torch.testing.assert_close(karcher([[2, 0], [1, 0], [0, 3]], max_iter=0),
                               T([4 / math.sqrt(5), 2 / math.sqrt(5)]), rtol=1e-7, atol=1e-7)


def test_golden_tiny_norms_count_in_the_scale_only() -> None:
    # ‖(1e-6, 0)‖ ≤ tol: no say in the direction (e2), but its norm is in the scale:
    # (1e-6 + 2)/2 = 1.0000005 → (0, 1.0000005)
    torch.testing.assert_close(karcher([[1e-6, 0], [0, 2]]), T([0.0, 1.0000005]), rtol=1e-7, atol=0)
    # every norm ≤ tol: zeros; with tol 1e-7, (1e-6, 0) counts again: direction (1e-6, 2)/‖·‖
    assert torch.equal(karcher([[1e-6, 0], [0, 5e-6]]), T([0.0, 0.0]))
    out = karcher([[1e-6, 0], [0, 2]], tol=1e-7)
    assert out[0] > 0 and math.isclose(float(out.norm()), 1.0000005, rel_tol=1e-7)


def test_golden_one_model_is_itself_and_no_copy_when_disposable() -> None:
    v = T([[1.5, -2.0], [0.0, 3.0]])
    assert torch.equal(karcher([v]), v)
    mine = v.clone()
    assert get_method("karcher").merge(job([mine], disposable=True)) is mine  # type: ignore[union-attr]


def test_gram_and_coefficients_golden() -> None:
    g = gram([T([3.0, 0.0]), T([0.0, 4.0])])
    assert g.g == ((9.0, 0.0), (0.0, 16.0))
    # the pair: direction (1/3·v₁ + 1/4·v₂)·(1/2)/‖(1/2)(1,1)‖ = (v₁/3 + v₂/4)/√2, scale 3.5
    k = karcher_coefficients(g.g, 10, 1e-5)
    assert k == pytest.approx([3.5 / 3 / math.sqrt(2), 3.5 / 4 / math.sqrt(2)], rel=1e-15)


# ------------------------------------------------------------ laws


@LAWS
@given(data=tensors(n_models=(1, 1)), n=st.integers(2, 5))
def test_n_copies_give_the_model_back_exactly(data: Any, n: int) -> None:
    _, models = data
    out = karcher([models[0].clone() for _ in range(n)])
    assert torch.equal(out, models[0])


@LAWS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 5), shape=st.sampled_from([(4,), (6, 5), (2, 3, 4)]),
       spread=st.sampled_from([1.0, 1e-3]), perm_seed=st.randoms(use_true_random=False))
def test_order_does_not_matter(seed: int, n: int, shape: tuple[int, ...], spread: float, perm_seed: Any) -> None:
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(shape, generator=g)
    models = [centre + spread * torch.randn(shape, generator=g) for _ in range(n)]
    perm = list(range(n))
    perm_seed.shuffle(perm)
    torch.testing.assert_close(karcher([models[i] for i in perm]), karcher(models), rtol=1e-6, atol=1e-6)


@LAWS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 4), c=st.sampled_from([0.5, 2.0, 8.0]))
def test_scaling_every_model_scales_the_mean(seed: int, n: int, c: float) -> None:
    g = torch.Generator().manual_seed(seed)
    models = [torch.randn(5, 3, generator=g) for _ in range(n)]
    torch.testing.assert_close(karcher([m * c for m in models]), karcher(models) * c, rtol=1e-6, atol=1e-6)


def test_disposable_models_give_the_same_bits() -> None:
    g = torch.Generator().manual_seed(11)
    models = [torch.randn(33, 17, generator=g) for _ in range(3)]
    fresh = get_method("karcher").merge(job([m.clone() for m in models]))  # type: ignore[union-attr]
    reused = get_method("karcher").merge(job([m.clone() for m in models], disposable=True))  # type: ignore[union-attr]
    assert torch.equal(fresh, reused)


def test_threads_do_not_change_the_bits() -> None:
    g = torch.Generator().manual_seed(9)
    models = [torch.randn(1024, 1024, generator=g) for _ in range(3)]
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(get_method("karcher").merge(job([m.clone() for m in models])))  # type: ignore[union-attr]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_row_blocks_give_the_bits_of_the_whole_tensor() -> None:
    """The engine streams a big tensor in row blocks after a pass for its Gram matrix: the blocks'
    sums and the whole tensor's are the same bits, and so is every block's output."""
    g = torch.Generator().manual_seed(2)
    models = [torch.randn(300, 7000, generator=g) for _ in range(3)]  # 2.1M entries: two sum groups
    whole = get_method("karcher").merge(job([m.clone() for m in models]))  # type: ignore[union-attr]
    reducer = KarcherGram(3)
    bounds = [(0, 7), (7, 150), (150, 151), (151, 300)]
    for a, b in bounds:
        reducer.observe(TensorJob(name="w", base=None, models=[m[a:b] for m in models], params={}, rows=(a, b)))
    stats = reducer.result()
    assert isinstance(stats, Gram) and stats == gram(models)
    resolved = get_method("karcher").defaults()  # type: ignore[union-attr]
    blocks = [get_method("karcher").merge(TensorJob(  # type: ignore[union-attr]
        name="w", base=None, models=[m[a:b] for m in models], params=resolved, stats=stats, rows=(a, b)))
        for a, b in bounds]
    assert torch.equal(torch.cat(blocks), whole)


# ------------------------------------------------------------ errors


def test_a_base_in_a_job_is_refused() -> None:
    with pytest.raises(RecipeError, match="karcher: takes no base model"):
        get_method("karcher").merge(job([T([1.0])], base=T([1.0])))  # type: ignore[union-attr]


def test_mlite_recipe_with_a_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="method 'karcher' takes no base model"):
        load_recipe({"inputs": {"a": str(tmp_path), "b": str(tmp_path)},
                     "steps": [{"id": "k", "method": "karcher", "base": "a", "models": ["b"]}]})


def test_parameter_ranges(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="max_iter"):
        load_recipe({"inputs": {"a": str(tmp_path)},
                     "steps": [{"id": "k", "method": "karcher", "models": ["a"], "parameters": {"max_iter": -1}}]})
    with pytest.raises(RecipeError, match="tol"):
        load_recipe({"inputs": {"a": str(tmp_path)},
                     "steps": [{"id": "k", "method": "karcher", "models": ["a"], "parameters": {"tol": -1e-5}}]})


# ------------------------------------------------------------ mergekit-shaped recipes end to end


def _direct(models: list[dict[str, torch.Tensor]], **params: Any) -> dict[str, torch.Tensor]:
    return {name: get_method("karcher").merge(job([m[name].float() for m in models], **params))  # type: ignore[union-attr]
            for name in models[0]}


def test_mergekit_recipe_base_model_not_listed_joins_the_models_last(tmp_path: Path, model_set: Any) -> None:
    ms = model_set
    path = tmp_path / "karcher.yaml"
    path.write_text(f"merge_method: karcher\nbase_model: {ms.base}\nmodels:\n"
                    f"  - model: {ms.finetunes[0]}\n  - model: {ms.finetunes[1]}\n"
                    "parameters:\n  max_iter: 4\n  tol: 1.0e-6\ndtype: float32\n")
    recipe = load_recipe(path)
    assert recipe.steps[0].models == ["ft1", "ft2", "base"] and recipe.steps[0].base is None
    assert any("is not among 'models'" in n and "as mergekit does" in n for n in recipe.options["notes"])
    out = mlite.run_recipe(path).state_dict
    expected = _direct([load_dir(p) for p in (ms.finetunes[0], ms.finetunes[1], ms.base)], max_iter=4, tol=1e-6)
    assert out.keys() == expected.keys()
    for name in out:
        assert torch.equal(out[name], expected[name]), name


def test_mergekit_recipe_base_model_listed_stays_where_it_is(tmp_path: Path, model_set: Any) -> None:
    ms = model_set
    path = tmp_path / "karcher.yaml"
    path.write_text(f"merge_method: karcher\nbase_model: {ms.base}\nmodels:\n"
                    f"  - model: {ms.base}\n  - model: {ms.finetunes[0]}\n  - model: {ms.finetunes[1]}\n")
    recipe = load_recipe(path)
    assert recipe.steps[0].models == ["base", "ft1", "ft2"] and recipe.options["notes"] == []
    out = mlite.run_recipe(path).state_dict
    expected = _direct([load_dir(p) for p in (ms.base, ms.finetunes[0], ms.finetunes[1])])
    for name in out:
        assert torch.equal(out[name], expected[name]), name
