"""passthrough: golden values, its laws, and mergekit's passthrough recipes through the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from test_methods_properties import merge

import mergekit_lite as mlite
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.recipe.model import load_recipe


def test_golden_scale() -> None:
    model = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    # 0.5·[1, −2, 0.5, 0] = [0.5, −1, 0.25, 0] (dyadic: exact); scale 0 gives zeros of the model's signs
    assert merge("passthrough", None, [model], scale=0.5).tolist() == [[0.5, -1.0], [0.25, 0.0]]
    assert merge("passthrough", None, [model], scale=-2.0).tolist() == [[-2.0, 4.0], [-1.0, -0.0]]
    zero = merge("passthrough", None, [model], scale=0.0)
    assert zero.tolist() == [[0.0, -0.0], [0.0, 0.0]] and torch.signbit(zero).tolist() == [[False, True], [False, False]]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-2.0**100, 2.0**100, width=32), min_size=1, max_size=24), st.floats(-4, 4, width=32))
def test_laws(values: list[float], s: float) -> None:
    model = torch.tensor(values)
    # scale 1 is the model, bit for bit (-0.0 included), and never the caller's own tensor
    same = merge("passthrough", None, [model], scale=1.0)
    assert torch.equal(same, model) and torch.equal(torch.signbit(same), torch.signbit(model))
    assert same.data_ptr() != model.data_ptr()
    # any other scale is one float32 product per entry, mergekit's `tensor * scale`
    assert torch.equal(merge("passthrough", None, [model], scale=s), model * s)


def test_disposable_model_is_reused_with_the_same_bits() -> None:
    model = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    spec = get_method("passthrough")
    assert spec is not None
    for s in (1.0, 0.3):
        want = model * s
        mine = model.clone()
        job = TensorJob(name="w", base=None, models=[mine], params={"scale": (s,)}, models_disposable=True)
        got = spec.merge(job)
        assert torch.equal(got, want) and got.data_ptr() == mine.data_ptr()


def test_registry() -> None:
    spec = get_method("passthrough")
    assert spec is not None
    assert (spec.needs_base, spec.min_models, spec.max_models, spec.light) == (False, 1, 1, True)
    assert spec.row_local({}) and spec.defaults() == {"scale": 1.0}


def test_mergekit_recipe_with_scale_rules_is_mergekits_output(model_set: Any) -> None:
    ft = model_set.finetunes[0]
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "models": [{"model": str(ft), "parameters": {"scale": [{"filter": "o_proj", "value": 0.5},
                                                                     {"value": 1.0}]}}]}
    out = mlite.run_recipe(recipe).state_dict
    want = load_dir(ft)
    assert set(out) == set(want)
    for name, w in want.items():
        assert torch.equal(out[name], w * 0.5 if "o_proj" in name else w), name


def test_mergekit_full_slice_converts_the_dtype(model_set: Any, tmp_path: Path) -> None:
    """The classic single-model passthrough: one slice over every layer, written in bfloat16."""
    ft = model_set.finetunes[1]
    recipe = {"merge_method": "passthrough", "dtype": "bfloat16",
              "slices": [{"sources": [{"model": str(ft), "layer_range": [0, 2]}]}]}
    path = mlite.run_recipe(recipe, out=tmp_path / "bf16").output
    out, want = load_dir(path), load_dir(ft)
    assert all(torch.equal(out[n], w.to(torch.bfloat16)) for n, w in want.items())


def test_layer_gradient_on_scale(model_set: Any) -> None:
    ft = model_set.finetunes[0]
    out = mlite.run_recipe({"merge_method": "passthrough", "dtype": "float32", "models": [{"model": str(ft)}],
                            "parameters": {"scale": [0.0, 1.0]}}).state_dict
    want = load_dir(ft)
    # two layers, gradient [0, 1]: layer 0 scaled by 0, layer 1 by 1
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], want["model.layers.0.mlp.up_proj.weight"] * 0.0)
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], want["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("extra,message", [
    ({"models": ["FT1", "FT2"]}, "method 'passthrough' takes at most 1 model(s), got 2"),
    ({"models": ["FT1"], "base_model": "BASE"}, "method 'passthrough' takes no base model and base_model"),
    ({"models": ["FT1"], "parameters": {"scale": "half"}}, "parameter 'scale' of method 'passthrough'"),
])
def test_recipe_mistakes_are_one_line_errors(model_set: Any, extra: dict[str, Any], message: str) -> None:
    names = {"FT1": str(model_set.finetunes[0]), "FT2": str(model_set.finetunes[1]), "BASE": str(model_set.base)}
    recipe: dict[str, Any] = {"merge_method": "passthrough", **extra}
    recipe["models"] = [names[m] for m in recipe["models"]]
    if "base_model" in recipe:
        recipe["base_model"] = names[recipe["base_model"]]
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_recipe(recipe)
    assert "\n" not in str(info.value)
