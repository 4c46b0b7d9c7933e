"""Per-tensor parameter resolution: precedence, rules, layer gradients (hand-computed values)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite.errors import RecipeError
from mergekit_lite.methods.registry import MethodSpec, Param, TensorJob
from mergekit_lite.recipe import ParamResolver, StepSpec, count_layers, layer_index, layer_position
from mergekit_lite.recipe.settings import Gradient


def _identity(job: TensorJob) -> torch.Tensor:
    return job.models[0]


SPEC = MethodSpec(
    name="fties",
    summary="fake",
    params=(
        Param("weight", "float", 1.0, "w", per_model=True),
        Param("density", "float", 1.0, "d", per_model=True),
        Param("lambda", "float", 1.0, "l", aliases=("scaling_coef",)),
        Param("normalize", "bool", True, "n"),
        Param("mode", "str", "a", "m", choices=("a", "b", "c")),
        Param("scope", "str", "tensor", "s", per_tensor=False),
        Param("k", "int", 3, "k"),
    ),
    merge=_identity,
)
REQ = MethodSpec(name="freq", summary="fake", params=(Param("t", "float", None, "t", required=True),),
                 merge=_identity, needs_base=False)

L0 = "model.layers.0.mlp.up_proj.weight"
L1 = "model.layers.1.self_attn.q_proj.weight"
L2 = "model.layers.2.mlp.down_proj.weight"
L3 = "model.layers.3.self_attn.o_proj.weight"
L4 = "model.layers.4.mlp.gate_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"


def resolver(parameters: dict | None = None, model_parameters: dict | None = None, models=("a", "b"),
             num_layers: int | None = 5, spec: MethodSpec = SPEC) -> ParamResolver:
    step = StepSpec(id="s", method=spec.name, base="base", models=list(models), parameters=parameters or {},
                    model_parameters=model_parameters or {})
    return ParamResolver(spec, step, list(models), num_layers)


# ---------------------------------------------------------------------------------------------
# layer index and position


@pytest.mark.parametrize(("name", "index"), [
    (L1, 1), ("model.layers.12.mlp.experts.3.w1.weight", 12), ("transformer.h.7.attn.c_attn.weight", 7),
    ("encoder.layer.0.attention.self.query.weight", 0), ("layers.5.feed_forward.w1.weight", 5),
    (EMBED, None), (HEAD, None), ("model.layers_norm.weight", None), ("model.head.3.weight", None),
])
def test_layer_index(name: str, index: int | None) -> None:
    assert layer_index(name) == index


def test_count_layers() -> None:
    assert count_layers([EMBED, L0, L4, L2, HEAD]) == 5
    assert count_layers([EMBED, HEAD]) is None


def test_layer_position_matches_mergekit() -> None:
    # layer i of L: i / (L - 1); embeddings before the layers: 0; norm and head after: 1
    assert [layer_position(n, 5) for n in (L0, L1, L2, L3, L4)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert layer_position(EMBED, 5) == 0.0 and layer_position("transformer.wte.weight", 5) == 0.0
    # mergekit plans the post-layer tensors with t = 0 too (MergePlanner.plan_module)
    assert layer_position(NORM, 5) == 0.0 and layer_position(HEAD, 5) == 0.0
    assert layer_position(L0, 1) == 1.0  # a single layer sits at t = 1, as in mergekit
    assert layer_position(EMBED, None) == 0.0  # non-layer tensors need no layer count
    with pytest.raises(ValueError, match="unknown"):
        layer_position(L1, None)
    with pytest.raises(ValueError, match="outside"):
        layer_position(L4, 4)


# ---------------------------------------------------------------------------------------------
# gradients, hand-computed


def test_two_point_gradient() -> None:
    r = resolver({"lambda": [0.2, 0.8]})
    # t = 0.75 for layer 3 of 5 → 0.2·0.25 + 0.8·0.75 = 0.65
    assert r.for_tensor(L3)["lambda"] == pytest.approx(0.65)
    assert r.for_tensor(L0)["lambda"] == pytest.approx(0.2)
    assert r.for_tensor(L4)["lambda"] == pytest.approx(0.8)
    assert r.for_tensor(EMBED)["lambda"] == pytest.approx(0.2)
    assert r.for_tensor(HEAD)["lambda"] == pytest.approx(0.2)  # mergekit plans lm_head at t = 0


def test_three_point_gradient() -> None:
    r = resolver({"lambda": [1, 0, 1]})
    # t = .25 → scaled .5 → 0.5; t = .5 → exactly the middle point; t = .75 → scaled 1.5 → 0.5
    assert [r.for_tensor(n)["lambda"] for n in (L0, L1, L2, L3, L4)] == pytest.approx([1.0, 0.5, 0.0, 0.5, 1.0])
    r9 = resolver({"lambda": [0, 1, 0.5]}, num_layers=9)
    # layer 3 of 9: t = 3/8, scaled .75 → 0.75; layer 5: t = 5/8, scaled 1.25 → .75·1 + .25·.5 = 0.875
    assert r9.for_tensor("model.layers.3.x")["lambda"] == pytest.approx(0.75)
    assert r9.for_tensor("model.layers.5.x")["lambda"] == pytest.approx(0.875)
    assert r9.for_tensor("model.layers.6.x")["lambda"] == pytest.approx(0.75)


def test_string_gradient_picks_entries() -> None:
    r = resolver({"mode": ["a", "b", "c"]})
    # index int(t · (n − 1)): t = .5 → 1, t = .75 → int(1.5) = 1, t = 1 → 2
    assert [r.for_tensor(n)["mode"] for n in (L0, L1, L2, L3, L4)] == ["a", "a", "b", "b", "c"]


def test_per_model_gradient_in_tuple() -> None:
    r = resolver(model_parameters={"b": {"weight": [0, 1]}}, parameters={"weight": 0.5})
    assert r.for_tensor(L1)["weight"] == pytest.approx((0.5, 0.25))


def test_gradient_needs_layer_count() -> None:
    r = resolver({"lambda": [0, 1]}, num_layers=None)
    assert r.for_tensor(EMBED)["lambda"] == 0.0
    with pytest.raises(RecipeError, match="number of layers is unknown"):
        r.for_tensor(L1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=6), st.integers(1, 40), st.data())
def test_gradient_laws(values: list[float], n_layers: int, data: st.DataObject) -> None:
    g = Gradient(tuple(values))
    assert g.at(0.0) == values[0] and g.at(1.0) == values[-1]
    layer = data.draw(st.integers(0, n_layers - 1))
    v = g.at(layer_position(f"model.layers.{layer}.w", n_layers))
    assert min(values) - 1e-9 <= v <= max(values) + 1e-9


# ---------------------------------------------------------------------------------------------
# rules and precedence


def test_first_matching_rule_wins() -> None:
    r = resolver({"lambda": [
        {"match": "*.mlp.down_proj.*", "value": 0.1},
        {"match": "re:mlp\\.(up|down)_proj", "value": 0.2},
        {"filter": "self_attn", "value": 0.3},
        {"value": 0.9},
    ]})
    assert r.for_tensor(L2)["lambda"] == 0.1  # glob and regex both match: first wins
    assert r.for_tensor(L0)["lambda"] == 0.2  # regex searches anywhere in the name
    assert r.for_tensor(L1)["lambda"] == 0.3  # substring filter (mergekit)
    assert r.for_tensor(L4)["lambda"] == 0.9  # default entry
    assert r.for_tensor(EMBED)["lambda"] == 0.9


def test_glob_matches_whole_name_and_star_filter() -> None:
    r = resolver({"lambda": [{"match": "mlp", "value": 0.1}, {"filter": "*", "value": 0.5}]})
    assert r.for_tensor(L0)["lambda"] == 0.5  # a glob without wildcards matches only the whole name
    r = resolver({"lambda": [{"match": "re:^lm_head", "value": 2}]})
    assert r.for_tensor(HEAD)["lambda"] == 2.0 and r.for_tensor(L0)["lambda"] == 1.0  # no match → default
    # mergekit reads `filter: null` as a catch-all (mlite refused it: "'filter' must be a string")
    r = resolver({"lambda": [{"filter": "mlp", "value": 0.25}, {"filter": None, "value": 0.75}]})
    assert r.for_tensor(L0)["lambda"] == 0.25 and r.for_tensor(HEAD)["lambda"] == 0.75


def test_rule_value_can_be_a_gradient() -> None:
    r = resolver({"lambda": [{"filter": "mlp", "value": [0, 1]}, {"value": 5}]})
    assert r.for_tensor(L1)["lambda"] == 5.0
    assert r.for_tensor(L2)["lambda"] == pytest.approx(0.5)
    assert r.for_tensor(L3)["lambda"] == 5.0


def test_single_rule_without_list() -> None:
    r = resolver({"lambda": {"filter": "mlp", "value": 0.25}})
    assert r.for_tensor(L0)["lambda"] == 0.25 and r.for_tensor(L1)["lambda"] == 1.0


def test_model_setting_beats_step_setting_then_default() -> None:
    r = resolver(
        parameters={"density": 0.5, "weight": [{"filter": "mlp", "value": 2}]},
        model_parameters={"a": {"density": [{"filter": "attn", "value": 0.1}]}, "b": {"weight": 3}},
    )
    p = r.for_tensor(L1)  # attention tensor
    assert p["density"] == (0.1, 0.5)  # a: own rule matches; b: step value
    assert p["weight"] == (1.0, 3.0)  # a: step rule misses → default; b: own value
    p = r.for_tensor(L0)  # mlp tensor
    assert p["density"] == (0.5, 0.5)  # a: own rule misses → falls through to the step value
    assert p["weight"] == (2.0, 3.0)


def test_per_model_mapping_and_tuple_order() -> None:
    r = resolver({"weight": {"b": 0.7, "a": [{"filter": "mlp", "value": 0.2}]}}, models=("a", "b", "c"))
    assert r.for_tensor(L0)["weight"] == (0.2, 0.7, 1.0)
    assert r.for_tensor(L1)["weight"] == (1.0, 0.7, 1.0)
    r2 = resolver({"weight": {"b": 0.7}}, models=("b", "a"))
    assert r2.for_tensor(L0)["weight"] == (0.7, 1.0)


def test_non_per_model_param_from_model_entries() -> None:
    r = resolver(parameters={"lambda": 2}, model_parameters={"b": {"lambda": 0.5}})
    assert r.for_tensor(L0)["lambda"] == 0.5  # mergekit: a model's value first, then the global one


def test_every_param_present_with_types() -> None:
    p = resolver({"lambda": 2, "k": 4.0, "weight": 1}).for_tensor(L0)
    assert p == {"weight": (1.0, 1.0), "density": (1.0, 1.0), "lambda": 2.0, "normalize": True, "mode": "a",
                 "scope": "tensor", "k": 4}
    assert isinstance(p["lambda"], float) and isinstance(p["k"], int) and isinstance(p["weight"][0], float)


def test_aliases_accepted() -> None:
    assert resolver({"scaling_coef": 0.3}).for_tensor(L0)["lambda"] == 0.3


def test_scalar_values_leave_out_varying_params() -> None:
    r = resolver({"lambda": [0, 1], "scope": "global", "weight": {"a": 2}})
    assert r.scalar_values() == {"weight": (2.0, 1.0), "density": (1.0, 1.0), "normalize": True, "mode": "a",
                                 "scope": "global", "k": 3}
    assert r.varies_by_tensor and not resolver({"lambda": 2}).varies_by_tensor


def test_results_are_fresh_dicts() -> None:
    r = resolver({"lambda": [0, 1]})
    first = r.for_tensor(L1)
    first["lambda"] = 99
    assert r.for_tensor(L1)["lambda"] == pytest.approx(0.25)
    fixed = resolver({"lambda": 2})
    fixed.for_tensor(L1)["lambda"] = 99
    assert fixed.for_tensor(L1)["lambda"] == 2.0


def test_required_without_value_raises_per_tensor() -> None:
    r = resolver({"t": [{"filter": "mlp", "value": 0.5}]}, spec=REQ)
    assert r.for_tensor(L0)["t"] == 0.5
    with pytest.raises(RecipeError, match="no value for tensor 'model.layers.1"):
        r.for_tensor(L1)


def test_unknown_parameter_raises() -> None:
    with pytest.raises(RecipeError, match="unknown parameter 'densty'"):
        resolver({"densty": 1})
    with pytest.raises(RecipeError, match="takes one value for all models"):
        resolver({"lambda": {"a": 1}})


def test_lookup_cost_is_bounded_by_rules() -> None:
    # Many tensors, a few rules: every lookup touches only the rules (and is cached).
    rules = [{"match": f"*.layers.{i}.*", "value": i / 100} for i in range(50)]
    r = resolver({"lambda": rules}, num_layers=80)
    names = [f"model.layers.{i}.mlp.w{j}.weight" for i in range(80) for j in range(20)]
    values = [r.for_tensor(n)["lambda"] for n in names]
    assert values[0] == 0.0 and values[20 * 49] == 0.49 and values[20 * 50] == 1.0
    assert len(r._cache) == len(names)


def test_an_integer_too_big_for_a_float_is_a_problem_not_an_overflow() -> None:
    from mergekit_lite.methods.registry import Param

    assert Param("lambda", "float", 1.0, "").check(10**400) == "must be a finite number, got an integer of 401 digits"
