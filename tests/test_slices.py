"""mergekit's `slices:` as layer stacks: frankenmerges, depth up-scaling, pruning, per-slice settings.

Golden tests build tiny checkpoints whose every tensor holds one known value (layer i of model m
is filled with 10·m + i + 0.5 fractions below), so each output tensor says which source layer it
came from and how it was combined. benchmarks/vs_mergekit.py compares the same shapes against
mergekit itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit_lite.cli.main import app
from typer.testing import CliRunner

import mergekit_lite as mlite
from mergekit_lite.engine.run import execute
from mergekit_lite.errors import MliteError, RecipeError
from mergekit_lite.methods import registry
from mergekit_lite.recipe import load_recipe
from mergekit_lite.recipe.params import SlicedResolver
from mergekit_lite.recipe.stack import is_pre_weight, renumbered
from mergekit_lite.synthetic import LlamaShape, make_base, save_checkpoint

runner = CliRunner()
SHAPE = LlamaShape(vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=4,
                   num_attention_heads=2, num_key_value_heads=1)
LAYER = "model.layers.{}.mlp.up_proj.weight"


def filled(model: int) -> dict[str, torch.Tensor]:
    """Model `model`: layer i's tensors all equal 10·model + i; embeddings 10·model + 0.25, the
    final norm 10·model + 0.5, the head 10·model + 0.75."""
    state = make_base(SHAPE)
    out = {}
    for name, t in state.items():
        if ".layers." in name:
            value = 10.0 * model + int(name.split(".layers.")[1].split(".")[0])
        else:
            value = 10.0 * model + (0.25 if "embed" in name else 0.75 if "lm_head" in name else 0.5)
        out[name] = torch.full_like(t, value)
    return out


@pytest.fixture
def family(tmp_path: Path) -> dict[str, str]:
    """Models m0 (the base), m1, m2, each 4 layers, 2 shards, with a per-layer config list."""
    paths = {}
    for m in range(3):
        extra = {"layer_types": [f"m{m}-L{i}" for i in range(SHAPE.num_hidden_layers)]}
        paths[f"m{m}"] = str(save_checkpoint(filled(m), tmp_path / f"m{m}", shape=SHAPE, num_shards=2,
                                             extra_config=extra))
    return paths


def src(path: str, first: int, end: int, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": path, "layer_range": [first, end]}
    return {**out, "parameters": params} if params else out


def layer_values(state: dict[str, torch.Tensor]) -> list[float]:
    """The value each output layer holds (its up_proj's first entry), in layer order."""
    n = 1 + max(int(k.split(".layers.")[1].split(".")[0]) for k in state if ".layers." in k)
    return [float(state[LAYER.format(i)].flatten()[0]) for i in range(n)]


def test_frankenmerge_stacks_the_ranges_and_renumbers_the_layers(family: dict[str, str], tmp_path: Path) -> None:
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [src(family["m1"], 0, 3)]},
                                                          {"sources": [src(family["m2"], 1, 4)]}]}
    out_dir = mlite.run_recipe(recipe, out=tmp_path / "out").output
    out = load_dir(out_dir)
    assert layer_values(out) == [10.0, 11.0, 12.0, 21.0, 22.0, 23.0]
    # every tensor of every layer is there, from the right source layer
    for i, want in enumerate([10.0, 11.0, 12.0, 21.0, 22.0, 23.0]):
        layer = {k: v for k, v in out.items() if f".layers.{i}." in k}
        assert len(layer) == 9 and all(torch.all(v == want) for v in layer.values())
    # embeddings from the first slice's model, final norm and head from the last slice's
    assert torch.all(out["model.embed_tokens.weight"] == 10.25)
    assert torch.all(out["model.norm.weight"] == 20.5) and torch.all(out["lm_head.weight"] == 20.75)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert config["layer_types"] == ["m1-L0", "m1-L1", "m1-L2", "m2-L1", "m2-L2", "m2-L3"]


def test_depth_up_scaling_repeats_layers_with_per_slice_scale(family: dict[str, str]) -> None:
    """The SOLAR-style stack: a model's layers [0, 3) then [1, 4), the second copy's o_proj
    scaled to 0 by that slice's own rule (mergekit's way of starting duplicated layers inert)."""
    rule = [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [src(family["m1"], 0, 3)]},
        {"sources": [src(family["m1"], 1, 4)], "parameters": {"scale": rule}}]}
    out = mlite.run_recipe(recipe).state_dict
    assert layer_values(out) == [10.0, 11.0, 12.0, 11.0, 12.0, 13.0]
    for i in range(6):
        o_proj = out[f"model.layers.{i}.self_attn.o_proj.weight"]
        assert torch.all(o_proj == (0.0 if i >= 3 else 10.0 + i))


def test_pruning_leaves_layers_out_and_reads_only_the_layers_kept(family: dict[str, str]) -> None:
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [src(family["m2"], 0, 1)]},
                                                          {"sources": [src(family["m2"], 3, 4)]}]}
    plan = mlite.plan_recipe(recipe)
    result = execute(plan)
    assert layer_values(result.state_dict) == [20.0, 23.0]
    view = plan.checkpoints[plan.steps[plan.final].models[0].key]  # type: ignore[union-attr]
    read = {name for name, _ in view.reads}
    assert read == set(result.state_dict) and view.bytes_read == sum(
        t.numel() * t.element_size() for t in result.state_dict.values())


def test_task_arithmetic_takes_each_slices_weights_and_lambda(family: dict[str, str]) -> None:
    """Output layer 0: m0's layer 0 + 0.5·(m1 − m0) at layer 0 + 0.2·(m2 − m0) at layer 0;
    the second slice pairs m0's layer 1 with m1's layer 2 and m2's layer 3 (shifted ranges), its
    own weights, and lambda 0.5."""
    recipe = {"merge_method": "task_arithmetic", "base_model": family["m0"], "slices": [
        {"sources": [src(family["m0"], 0, 1), src(family["m1"], 0, 1, weight=0.5), src(family["m2"], 0, 1, weight=0.2)]},
        {"sources": [src(family["m0"], 1, 2), src(family["m1"], 2, 3, weight=1.0), src(family["m2"], 3, 4, weight=-1.0)],
         "parameters": {"lambda": 0.5}}]}
    out = mlite.run_recipe(recipe).state_dict
    first = 0.0 + 0.5 * (10.0 - 0.0) + 0.2 * (20.0 - 0.0)
    second = 1.0 + 0.5 * (1.0 * (12.0 - 1.0) - 1.0 * (23.0 - 1.0))
    assert layer_values(out) == pytest.approx([first, second], abs=1e-6)
    # embeddings: the first slice's weights; head and norm: the last slice's weights and lambda
    assert float(out["model.embed_tokens.weight"][0, 0]) == pytest.approx(0.25 + 0.5 * 10 + 0.2 * 20)
    assert float(out["lm_head.weight"][0, 0]) == pytest.approx(0.75 + 0.5 * (10 - 20))


def test_a_slice_that_does_not_list_the_base_takes_it_over_its_first_sources_layers(family: dict[str, str]) -> None:
    recipe = {"merge_method": "task_arithmetic", "base_model": family["m0"], "slices": [
        {"sources": [src(family["m1"], 2, 4, weight=1.0)]}]}
    out = mlite.run_recipe(recipe).state_dict
    assert layer_values(out) == [12.0, 13.0]  # m0's layers 2, 3 + (m1 − m0) there


def test_a_slice_may_name_its_own_base(family: dict[str, str]) -> None:
    """Slice 0 merges into m0, slice 1 into m2 (its own base_model): the base place is m0's
    layers then m2's, and the head comes from the last slice, merged into m2."""
    recipe = {"merge_method": "task_arithmetic", "base_model": family["m0"], "slices": [
        {"sources": [src(family["m0"], 0, 2), src(family["m1"], 0, 2, weight=0.5)]},
        {"sources": [src(family["m2"], 2, 4), src(family["m1"], 2, 4, weight=0.5)], "base_model": family["m2"]}]}
    loaded = load_recipe(recipe)
    assert loaded.steps[0].base == "stack.base" and loaded.steps[0].models == ["m1"]
    out = mlite.run_recipe(recipe).state_dict
    assert layer_values(out) == pytest.approx([5.0, 6.0, 17.0, 18.0])
    assert float(out["lm_head.weight"][0, 0]) == pytest.approx(20.75 + 0.5 * (10.75 - 20.75))
    assert float(out["model.embed_tokens.weight"][0, 0]) == pytest.approx(0.25 + 0.5 * 10.0)


def test_slerp_gradients_spread_over_each_slices_own_layers(family: dict[str, str]) -> None:
    """mergekit's t within a slice: layer i of L is i / (L − 1), 1 for a one-layer slice;
    tensors outside the layers take t = 0 with the first (embeddings) or last (head) slice's setting."""
    recipe = load_recipe({"merge_method": "slerp", "base_model": family["m0"], "parameters": {"t": 0.3}, "slices": [
        {"sources": [src(family["m0"], 0, 3), src(family["m1"], 0, 3)], "parameters": {"t": [0.0, 1.0]}},
        {"sources": [src(family["m0"], 3, 4), src(family["m1"], 3, 4)], "parameters": {"t": [0.2, 0.6]}}]})
    step = recipe.steps[0]
    stack = recipe.options["layer_stack"]
    r = SlicedResolver(registry.get_method("slerp"), step, step.models, stack)
    assert [r.for_tensor(LAYER.format(i))["t"] for i in range(4)] == pytest.approx([0.0, 0.5, 1.0, 0.6])
    assert r.for_tensor("model.embed_tokens.weight")["t"] == 0.0  # slice 0's gradient at t = 0
    assert r.for_tensor("lm_head.weight")["t"] == pytest.approx(0.2)  # the last slice's at t = 0
    assert step.models == ["m0", "m1"]  # one model per position: named as in a models: recipe


def test_positions_filled_by_several_models_are_named_by_the_stack(family: dict[str, str]) -> None:
    recipe = load_recipe({"merge_method": "linear", "slices": [
        {"sources": [src(family["m0"], 0, 2), src(family["m1"], 0, 2)]},
        {"sources": [src(family["m2"], 2, 4), src(family["m1"], 2, 4)]}]})
    assert recipe.steps[0].models == ["stack.1", "m1"]
    out = mlite.run_recipe(recipe).state_dict
    assert layer_values(out) == pytest.approx([5.0, 6.0, 17.0, 18.0])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=3))
def test_slices_that_give_a_model_back_in_order_return_it(family: dict[str, str], cut: int) -> None:
    """Law: a model cut into consecutive slices and stacked again is that model, bit for bit."""
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [src(family["m2"], 0, cut)]},
                                                          {"sources": [src(family["m2"], cut, 4)]}]}
    out = mlite.run_recipe(recipe).state_dict
    want = load_dir(Path(family["m2"]))
    assert set(out) == set(want) and all(torch.equal(out[k], want[k]) for k in want)


def test_a_range_past_a_models_layers_is_a_one_line_error_naming_the_recipe_line(family: dict[str, str],
                                                                                tmp_path: Path) -> None:
    text = (f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {family['m1']}, layer_range: [0, 2]}}\n"
            f"  - sources:\n      - {{model: {family['m2']}, layer_range: [2, 6]}}\n"
            f"output: {{path: {tmp_path / 'out'}}}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 3, res.output
    assert f"{recipe}:6: layer_range [2, 6] but {family['m2']} has 4 layers (0 to 3)" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_slices_of_the_base_alone_are_an_error_saying_so(family: dict[str, str]) -> None:
    recipe = {"merge_method": "ties", "base_model": family["m0"],
              "slices": [{"sources": [src(family["m0"], 0, 2)]}, {"sources": [src(family["m0"], 2, 4)]}]}
    with pytest.raises(RecipeError, match=r"every slice's only source is the base model .*: 'ties' merges models "
                                          r"into it, so give each slice at least one other source \(slices\)"):
        load_recipe(recipe)


def test_a_wrong_number_of_sources_is_reported_at_the_slices(family: dict[str, str], tmp_path: Path) -> None:
    text = (f"merge_method: slerp\nbase_model: {family['m0']}\nparameters: {{t: 0.5}}\nslices:\n  - sources:\n"
            + "".join(f"      - {{model: {family[m]}, layer_range: [0, 2]}}\n" for m in ("m0", "m1", "m2")))
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "r.yaml")
    assert str(info.value) == (f"{tmp_path / 'r.yaml'}:5: method 'slerp' takes at most 2 model(s) per slice, got 3 "
                               "(slices[0].sources)")


def test_a_setting_that_cannot_vary_must_agree_across_slices(family: dict[str, str]) -> None:
    recipe = {"merge_method": "pcb", "base_model": family["m0"], "slices": [
        {"sources": [src(family["m1"], 0, 2)], "parameters": {"ratio": 0.1}},
        {"sources": [src(family["m1"], 2, 4)], "parameters": {"ratio": 0.2}}]}
    with pytest.raises(RecipeError, match=r"parameter 'ratio' .* slices\[0\] gives 0.1 and slices\[1\] 0.2"):
        mlite.plan_recipe(recipe)


def test_pre_and_post_weights_and_renumbering() -> None:
    assert is_pre_weight("model.embed_tokens.weight") and is_pre_weight("transformer.wpe.weight")
    assert not is_pre_weight("lm_head.weight") and not is_pre_weight("gpt_neox.embed_out.weight")
    assert not is_pre_weight("model.layers.0.embed_scale")  # inside a layer
    assert renumbered("model.layers.7.mlp.up_proj.weight", 12) == "model.layers.12.mlp.up_proj.weight"
    assert renumbered("transformer.h.3.attn.c_attn.bias", 0) == "transformer.h.0.attn.c_attn.bias"


def test_model_plus_lora_is_a_whole_place_of_the_stack(model_set: Any) -> None:
    """MODEL+LORA is a step (the adapter merged in): as one slice over all its layers it gives
    the `models:` merge; a part of its layers is a one-line error."""
    lora = f"{model_set.base}+{model_set.adapter}"
    layers = model_set.shape.num_hidden_layers
    common = {"merge_method": "linear", "dtype": "float32"}
    want = mlite.run_recipe({**common, "models": [lora, str(model_set.finetunes[0])]}).state_dict
    got = mlite.run_recipe({**common, "slices": [{"sources": [
        src(lora, 0, layers), src(str(model_set.finetunes[0]), 0, layers)]}]}).state_dict
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(RecipeError, match=r"\(MODEL\+LORA\) can only give its layers whole in a slices recipe: "
                                          rf"the slices take {layers - 1} of its {layers} layers"):
        mlite.plan_recipe({**common, "slices": [{"sources": [src(lora, 0, layers - 1),
                                                             src(str(model_set.finetunes[0]), 0, layers - 1)]}]})
    half = layers // 2  # a slice without the MODEL+LORA source: it would give only part of its layers
    with pytest.raises(RecipeError, match=rf"\(MODEL\+LORA\) can only give its layers whole in a slices recipe: "
                                          rf"the slices take {half} of its {layers} layers"):
        mlite.plan_recipe({**common, "slices": [
            {"sources": [src(str(model_set.finetunes[0]), 0, half), src(lora, 0, half)]},
            {"sources": [src(str(model_set.finetunes[0]), half, layers)]}]})
    with pytest.raises(RecipeError, match=r"a MODEL\+LORA source can only give its layers whole and in order"):
        mlite.plan_recipe({**common, "slices": [{"sources": [src(lora, 1, 2), src(str(model_set.finetunes[0]), 0, 1)]}]})


def test_shipped_frankenmerge_recipe_runs(tmp_path: Path) -> None:
    """recipes/mergekit_frankenmerge.yaml runs as shipped, on the demo models beside it."""
    import shutil

    from mergekit_lite.synthetic import build_model_set

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "recipes" / "mergekit_frankenmerge.yaml", tmp_path / "r.yaml")
    ms = build_model_set(tmp_path / "models")
    out_dir = mlite.run_recipe(tmp_path / "r.yaml", out=tmp_path / "out").output
    out, ft1, ft2 = load_dir(out_dir), load_dir(ms.finetunes[0]), load_dir(ms.finetunes[1])
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 3
    assert torch.equal(out[LAYER.format(1)], ft1[LAYER.format(1)].to(torch.bfloat16))
    assert torch.equal(out[LAYER.format(2)], ft2[LAYER.format(1)].to(torch.bfloat16))
    assert torch.all(out["model.layers.2.self_attn.o_proj.weight"] == 0)
    assert torch.equal(out["lm_head.weight"], ft2["lm_head.weight"].to(torch.bfloat16))


def test_tied_and_untied_models_stacked_keep_a_working_head(family: dict[str, str], tmp_path: Path) -> None:
    """The head is the last slice's model's: its lm_head, or, when that model ties its head to
    its embedding, that embedding, written as lm_head with the config untied."""
    from dataclasses import replace

    tied_shape = replace(SHAPE, tie_word_embeddings=True)
    state = {k: v for k, v in filled(5).items() if k != "lm_head.weight"}
    tied = str(save_checkpoint(state, tmp_path / "tied", shape=tied_shape))
    out_dir = mlite.run_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [src(family["m1"], 0, 2)]}, {"sources": [src(tied, 2, 4)]}]}, out=tmp_path / "a").output
    out = load_dir(out_dir)
    assert torch.all(out["lm_head.weight"] == 50.25)  # the tied model's embedding is its head
    assert torch.all(out["model.embed_tokens.weight"] == 10.25)
    assert json.loads((out_dir / "config.json").read_text())["tie_word_embeddings"] is False
    out_dir = mlite.run_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [src(tied, 0, 2)]}, {"sources": [src(family["m1"], 2, 4)]}]}, out=tmp_path / "b").output
    out = load_dir(out_dir)
    assert torch.all(out["lm_head.weight"] == 10.75) and torch.all(out["model.embed_tokens.weight"] == 50.25)
    assert json.loads((out_dir / "config.json").read_text())["tie_word_embeddings"] is False
    assert layer_values(out) == [50.0, 51.0, 12.0, 13.0]


def test_transformers_loads_a_frankenmerge_and_runs_it(tmp_path: Path) -> None:
    """The written config and tensors agree: transformers builds the deeper model from them, each
    layer holding its source layer's weights, and runs it."""
    transformers = pytest.importorskip("transformers")
    from mergekit_lite.synthetic import make_finetune

    base = make_base(SHAPE, seed=3)
    extra = {"layer_types": ["full_attention"] * SHAPE.num_hidden_layers}
    a = save_checkpoint(base, tmp_path / "a", shape=SHAPE, extra_config=extra)
    b = save_checkpoint(make_finetune(base, seed=4), tmp_path / "b", shape=SHAPE, extra_config=extra)
    out_dir = mlite.run_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [src(str(a), 0, 3)]}, {"sources": [src(str(b), 1, 4)]}]}, out=tmp_path / "fm").output
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    assert model.config.layer_types == ["full_attention"] * 6
    b_state = load_dir(b)
    got = model.model.layers[4].mlp.up_proj.weight.detach()
    assert torch.equal(got, b_state["model.layers.2.mlp.up_proj.weight"])
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, SHAPE.vocab_size) and bool(torch.isfinite(logits).all())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_slices_recipe_merges_or_fails_with_one_line_errors(family: dict[str, str], data: st.DataObject) -> None:
    """Random stacks (ranges in or past the 4 layers, one to three sources, several methods):
    the output has the stack's layers, each from the right place, or the plan refuses cleanly."""
    method = data.draw(st.sampled_from(["passthrough", "linear", "task_arithmetic", "ties", "slerp"]))
    n_sources = 1 if method == "passthrough" else data.draw(st.integers(1, 3))
    pieces = []
    for _ in range(data.draw(st.integers(1, 3))):
        length = data.draw(st.integers(1, 4))
        models = data.draw(st.permutations(["m0", "m1", "m2"]))[:n_sources]
        pieces.append({"sources": [src(family[m], f := data.draw(st.integers(0, 4)), f + length) for m in models]})
    recipe: dict[str, Any] = {"merge_method": method, "slices": pieces}
    if method in ("task_arithmetic", "ties", "slerp"):
        recipe["base_model"] = family["m0"]
    try:
        out = mlite.run_recipe(recipe).state_dict
    except MliteError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return
    total = sum(p["sources"][0]["layer_range"][1] - p["sources"][0]["layer_range"][0] for p in pieces)
    assert len(layer_values(out)) == total
    if method == "passthrough":  # every layer is its source layer
        want = [10.0 * int(Path(s["model"]).name[1]) + i for p in pieces for s in p["sources"]
                for i in range(*s["layer_range"])]
        assert layer_values(out) == want


def test_pickle_checkpoints_stack_when_allowed_and_do_not_mix_with_safetensors(family: dict[str, str],
                                                                               tmp_path: Path) -> None:
    import shutil

    pickled = {}
    for m in ("m1", "m2"):
        dest = tmp_path / f"{m}-bin"
        dest.mkdir()
        torch.save(load_dir(Path(family[m])), dest / "pytorch_model.bin")
        shutil.copy(Path(family[m]) / "config.json", dest / "config.json")
        pickled[m] = str(dest)
    stack = [{"sources": [src(pickled["m1"], 0, 2)]}, {"sources": [src(pickled["m2"], 2, 4)]}]
    out = mlite.run_recipe({"merge_method": "passthrough", "slices": stack, "options": {"allow_bin": True}}).state_dict
    assert layer_values(out) == [10.0, 11.0, 22.0, 23.0] and torch.all(out["lm_head.weight"] == 20.75)
    mixed = [{"sources": [src(pickled["m1"], 0, 2)]}, {"sources": [src(family["m2"], 2, 4)]}]
    with pytest.raises(MliteError, match=r"stack.1: its slices mix .bin and safetensors checkpoints"):
        mlite.plan_recipe({"merge_method": "passthrough", "slices": mixed, "options": {"allow_bin": True}})


def test_dry_run_shows_the_stack_layout(family: dict[str, str], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {family['m1']}, layer_range: [0, 3]}}]\n"
                      f"  - sources: [{{model: {family['m2']}, layer_range: [3, 4]}}]\n")
    res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "layer stack: 4 layers" in res.output
    assert "layers 0-2 ← m1 layers 0-2" in res.output and "layer 3 ← m2 layer 3" in res.output
    layout = mlite.dry_run(recipe, out=tmp_path / "out")["layer_stack"]
    assert layout == [{"layers": [0, 2], "sources": [{"input": "m1", "layers": [0, 2]}]},
                      {"layers": [3, 3], "sources": [{"input": "m2", "layers": [3, 3]}]}]


# ---- slices with different numbers of sources ---------------------------------------------------
def test_a_slice_with_fewer_sources_merges_its_own_models(family: dict[str, str], tmp_path: Path) -> None:
    """Task arithmetic, base m0: layers 0-1 merge m1 (weight 0.5) and m2 (0.25), layers 2-3 only
    m2 (weight 1), as mergekit plans each slice apart. Layer i of model m holds 10·m + i, so
    layer 0 = 0 + 0.5·10 + 0.25·20 = 10, layer 1 = 1 + 0.5·10 + 0.25·20 = 11, layer 2 = 2 + 20 = 22,
    layer 3 = 23. Embeddings (first slice): 0.25 + 0.5·10 + 0.25·20 = 10.25; norm and head (last
    slice, m2 alone): 20.5 and 20.75."""
    recipe = {"merge_method": "task_arithmetic", "base_model": family["m0"], "slices": [
        {"sources": [src(family["m0"], 0, 2), src(family["m1"], 0, 2, weight=0.5),
                     src(family["m2"], 0, 2, weight=0.25)]},
        {"sources": [src(family["m0"], 2, 4), src(family["m2"], 2, 4, weight=1.0)]}]}
    out = load_dir(mlite.run_recipe(recipe, out=tmp_path / "out").output)
    assert layer_values(out) == [10.0, 11.0, 22.0, 23.0]
    assert torch.all(out["model.embed_tokens.weight"] == 10.25)
    assert torch.all(out["model.norm.weight"] == 20.5) and torch.all(out["lm_head.weight"] == 20.75)
    plan = mlite.dry_run(recipe, out=str(tmp_path / "d"))
    assert [len(piece["sources"]) for piece in plan["layer_stack"]] == [3, 2]


def test_linear_normalizes_over_each_slices_own_models(family: dict[str, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear, no base: layers 0-1 average m1 and m2 with weights 1 and 3 ((11 + 3·21) / 4 for
    layer 1), layers 2-3 are m0's alone; the same bits in row blocks."""
    recipe = {"merge_method": "linear", "slices": [
        {"sources": [src(family["m1"], 0, 2, weight=1.0), src(family["m2"], 0, 2, weight=3.0)]},
        {"sources": [src(family["m0"], 2, 4, weight=5.0)]}]}
    out = load_dir(mlite.run_recipe(recipe, out=tmp_path / "whole").output)
    assert layer_values(out) == [(10 + 3 * 20) / 4, (11 + 3 * 21) / 4, 2.0, 3.0]
    assert torch.all(out["lm_head.weight"] == 0.75)
    from mergekit_lite.engine import stream
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 4)
    blocked = load_dir(mlite.run_recipe(recipe, out=tmp_path / "blocked").output)
    assert all(torch.equal(out[k], blocked[k]) for k in out)


def test_uneven_slices_need_each_slices_arity_and_tensor_scope(family: dict[str, str], tmp_path: Path) -> None:
    """slerp needs two models in every slice; a global-scope step gathers statistics over all
    models' tensors, which slices of different sizes do not have: both refused up front."""
    slerp = {"merge_method": "slerp", "base_model": family["m0"], "parameters": {"t": 0.5}, "slices": [
        {"sources": [src(family["m0"], 0, 2), src(family["m1"], 0, 2)]},
        {"sources": [src(family["m0"], 2, 4)]}]}
    with pytest.raises(RecipeError, match=r"method 'slerp' needs 2 inputs per slice .*, got 1 \(slices\[1\].sources\)"):
        mlite.plan_recipe(slerp, out=str(tmp_path / "a"))
    ties = {"merge_method": "ties", "base_model": family["m0"], "parameters": {"density": 0.5, "scope": "global"},
            "slices": [{"sources": [src(family["m0"], 0, 2), src(family["m1"], 0, 2), src(family["m2"], 0, 2)]},
                       {"sources": [src(family["m0"], 2, 4), src(family["m1"], 2, 4)]}]}
    with pytest.raises(RecipeError, match="scope global gathers statistics over every model's tensors"):
        mlite.plan_recipe(ties, out=str(tmp_path / "b"))
    ties["parameters"] = {"density": 0.5}
    assert mlite.plan_recipe(ties, out=str(tmp_path / "c")) is not None


def test_uneven_ties_streams_with_per_tensor_statistics_of_its_own_models(family: dict[str, str], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """TIES' per-tensor top-k over big tensors is gathered block by block before the output
    blocks: a slice with fewer sources counts and votes among its own models there too, to the
    same bits as whole tensors."""
    from mergekit_lite.engine import stream

    models = {k: str(save_checkpoint({n: t + 0.01 * k * torch.randn_like(t) for n, t in filled(k % 3).items()},
                                     tmp_path / f"r{k}", shape=SHAPE)) for k in range(4)}
    recipe = {"merge_method": "ties", "base_model": models[0], "parameters": {"density": 0.4}, "slices": [
        {"sources": [src(models[0], 0, 2), src(models[1], 0, 2, weight=0.5), src(models[2], 0, 2, weight=0.3),
                     src(models[3], 0, 2, weight=0.2)]},
        {"sources": [src(models[0], 2, 4), src(models[2], 2, 4, weight=1.0)]}]}
    whole = mlite.run_recipe(recipe).state_dict  # no output: the tensors come back in memory
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 2)  # matrices over 16 entries: statistics, then blocks
    monkeypatch.setattr(stream, "WHOLE_TENSOR_BLOCKS", 8)
    seen: list[tuple[str, Any]] = []
    blocked = mlite.run_recipe(recipe, tensor_hook=lambda name, job, out: seen.append(
        (name, job.rows, len(job.models)))).state_dict
    assert whole is not None and blocked is not None
    assert [k for k in whole if not torch.equal(whole[k], blocked[k])] == []
    assert {n for n, rows, _ in seen if rows is not None}  # something did stream
    assert {m for n, _, m in seen if ".layers.3." in n} == {1} and {m for n, _, m in seen if ".layers.0." in n} == {3}
