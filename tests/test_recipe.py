"""Recipe loading: both shapes, normalisation, and every validation error (message, line, key).

Fake methods are put into the registry for the duration of each test so these tests pin the
recipe layer's behaviour independently of the real methods' parameter lists.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from mergekit_lite.errors import RecipeError, UsageError
from mergekit_lite.methods import registry
from mergekit_lite.methods.registry import MethodSpec, Param
from mergekit_lite.recipe import Loc, OutputSpec, StepSpec, load_recipe, resolve_input_path


def _identity(job: registry.TensorJob) -> torch.Tensor:
    return job.models[0]


FAKES = (
    MethodSpec(
        name="fties",
        summary="fake ties",
        params=(
            Param("weight", "float", 1.0, "w", per_model=True),
            Param("density", "float", 1.0, "d", per_model=True, minimum=0.0, maximum=1.0, min_exclusive=True),
            Param("lambda", "float", 1.0, "l", aliases=("scaling_coef",)),
            Param("normalize", "bool", True, "n"),
            Param("rescale", "str", "paper", "r", choices=("paper", "l1", "none")),
            Param("scope", "str", "tensor", "s", choices=("tensor", "global"), per_tensor=False),
            Param("k", "int", 3, "k", minimum=1),
        ),
        merge=_identity,
    ),
    MethodSpec(name="fslerp", summary="fake slerp", params=(Param("t", "float", 0.5, "t", minimum=0, maximum=1),),
               merge=_identity, needs_base=False, min_models=2, max_models=2, ordered=True),
    MethodSpec(name="flinear", summary="fake linear", params=(Param("weight", "float", 1.0, "w", per_model=True),),
               merge=_identity, needs_base=False),
    MethodSpec(name="fpatch", summary="fake patch", params=(Param("lambda", "float", 1.0, "l"),),
               merge=_identity, min_models=0, max_models=0, uses_delta=True),
    MethodSpec(name="fprobe", summary="fake surgery", params=(
        Param("probe", "tensor_file", None, "p", required=True, per_tensor=False),
        Param("alpha", "float", 1.0, "a"),
    ), merge=_identity, min_models=0, max_models=0),
)


@pytest.fixture(autouse=True)
def fake_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.method_names()  # load the real catalog first, then add the fakes on top
    for spec in FAKES:
        monkeypatch.setitem(registry._REGISTRY, spec.name, spec)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for name in ("base", "a", "b", "c"):
        (tmp_path / "models" / name).mkdir(parents=True)
    return tmp_path


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(source: Path | dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(source)
    assert info.value.exit_code == 3
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def one_problem(source: Path | dict) -> str:
    found = problems(source)
    assert len(found) == 1, found
    return found[0]


NATIVE = """
inputs:
  base: ./models/base
  math: ./models/a
  code: ./models/b
steps:
  - id: merged
    method: fties
    base: base
    models: [math, code]
    parameters:
      density: 0.5
  - id: final
    method: flinear
    models: [merged, math]
"""


# ---------------------------------------------------------------------------------------------
# The native shape


def test_native_recipe_parses_to_stepspecs(models: Path) -> None:
    recipe = load_recipe(write(models, NATIVE))
    assert recipe.inputs == {n: str((models / "models" / d).resolve())
                             for n, d in (("base", "base"), ("math", "a"), ("code", "b"))}
    assert [s.id for s in recipe.steps] == ["merged", "final"]
    assert recipe.steps[0] == StepSpec(id="merged", method="fties", base="base", models=["math", "code"],
                                       parameters={"density": 0.5}, loc=Loc(str(models / "recipe.yaml"), 6))
    assert recipe.steps[1].base is None and recipe.steps[1].models == ["merged", "math"]
    assert recipe.output == OutputSpec(step="final")
    assert recipe.output_step.id == "final"
    assert recipe.source == (models / "recipe.yaml").resolve()
    assert recipe.base_dir == models.resolve()
    assert recipe.options == {"allow_bin": False, "vocab": "strict", "allow_vocab_growth": False,
                              "description": None, "notes": []}


def test_native_full_output_device_seed_and_save(models: Path) -> None:
    recipe = load_recipe(write(models, NATIVE + """
    output: {path: ./out, dtype: bf16, shard_size: 2GB, copy_tokenizer_from: base, step: merged}
    device: cuda:1
    seed: 7
    options: {allow_bin: true, vocab: shared}
    description: two steps
    """.replace("\n    ", "\n")))
    assert recipe.output == OutputSpec(path=str((models / "out").resolve()), dtype="BF16", shard_size=2 * 10**9,
                                       copy_tokenizer_from="base", step="merged")
    assert (recipe.device, recipe.seed) == ("cuda:1", 7)
    assert recipe.options["allow_bin"] is True and recipe.options["description"] == "two steps"
    assert recipe.options["vocab"] == "shared" and recipe.options["allow_vocab_growth"] is False


def test_steps_may_be_written_in_any_order(models: Path) -> None:
    path = write(models, """
    inputs: {base: ./models/base, a: ./models/a}
    steps:
      - {id: second, method: fties, base: first, models: [a]}
      - {id: first, method: fties, base: base, models: [a], save: ./mid}
    output: {step: second}
    """)
    recipe = load_recipe(path)
    assert [s.id for s in recipe.steps] == ["first", "second"]
    assert recipe.step("first").save == str((models / "mid").resolve())


def test_default_step_ids_and_model_entries(models: Path) -> None:
    recipe = load_recipe(write(models, """
    inputs: {base: ./models/base, a: ./models/a, b: ./models/b}
    steps:
      - method: fties
        base_model: base
        models:
          - a
          - model: b
            parameters: {weight: 0.25, density: 0.5}
    """))
    step = recipe.steps[0]
    assert step.id == "step1" and step.base == "base" and step.models == ["a", "b"]
    assert step.model_parameters == {"b": {"weight": 0.25, "density": 0.5}}
    assert recipe.output.step == "step1"


def test_dict_source_resolves_against_cwd(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(models)
    recipe = load_recipe({"inputs": {"base": "models/base", "a": "models/a"},
                          "steps": [{"method": "fties", "base": "base", "models": ["a"]}]})
    assert recipe.inputs["a"] == str((models / "models" / "a").resolve())
    assert recipe.source is None and recipe.steps[0].loc == Loc(None, None)


def test_resolve_input_path(tmp_path: Path) -> None:
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert resolve_input_path("/abs/model", tmp_path) == "/abs/model"
    assert resolve_input_path("./m", tmp_path) == str((tmp_path / "m").resolve())
    assert resolve_input_path("../m", tmp_path) == str((tmp_path.parent / "m").resolve())
    assert resolve_input_path("meta-llama/Llama-2-7b", tmp_path) == "meta-llama/Llama-2-7b"
    assert resolve_input_path("hub-org/name@v1.0", tmp_path) == "hub-org/name@v1.0"
    # a local folder shaped like a Hub id wins over the Hub
    assert resolve_input_path("org/local", tmp_path) == str((tmp_path / "org" / "local").resolve())
    assert resolve_input_path("a/b/c", tmp_path) == str((tmp_path / "a/b/c").resolve())
    # the folder `org` exists: `org/missing` is a local path that does not exist yet, not the Hub
    assert resolve_input_path("org/missing", tmp_path) == str((tmp_path / "org" / "missing").resolve())


def test_exponent_without_dot_is_a_float(models: Path) -> None:
    recipe = load_recipe(write(models, NATIVE.replace("density: 0.5", "density: 5e-1")))
    assert recipe.steps[0].parameters["density"] == 0.5


def test_parameter_alias_is_canonicalised(models: Path) -> None:
    recipe = load_recipe(write(models, NATIVE.replace("density: 0.5", "scaling_coef: 0.7")))
    assert recipe.steps[0].parameters == {"lambda": 0.7}


def test_tensor_file_parameter_resolved_next_to_recipe(models: Path) -> None:
    recipe = load_recipe(write(models, """
    inputs: {base: ./models/base}
    steps:
      - {method: fprobe, base: base, parameters: {probe: probe.safetensors}}
    """))
    assert recipe.steps[0].parameters["probe"] == str((models / "probe.safetensors").resolve())


# ---------------------------------------------------------------------------------------------
# The mergekit shape

MERGEKIT_TIES = """
merge_method: fties
base_model: ./models/base
models:
  - model: ./models/base
  - model: ./models/a
    parameters:
      density: 0.5
      weight: 0.6
  - model: ./models/b
    parameters:
      density: [0.2, 0.8]
      weight:
        - filter: mlp
          value: 0.3
        - value: 0.7
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""


def test_mergekit_ties_recipe_normalises(models: Path) -> None:
    recipe = load_recipe(write(models, MERGEKIT_TIES))
    assert recipe.inputs == {n: str((models / "models" / n).resolve()) for n in ("base", "a", "b")}
    assert recipe.steps == [StepSpec(
        id="merge", method="fties", base="base", models=["a", "b"],
        parameters={"normalize": True},
        model_parameters={"a": {"density": 0.5, "weight": 0.6},
                          "b": {"density": [0.2, 0.8], "weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}},
        loc=Loc(str(models / "recipe.yaml"), 1),
    )]
    assert recipe.output == OutputSpec(dtype="BF16", step="merge")
    notes = recipe.options["notes"]
    assert any("int8_mask" in n for n in notes) and any("compute dtype" in n for n in notes)


def test_mergekit_quoted_numbers_are_numbers(models: Path) -> None:
    """mergekit reads `weight: "0.5"` as 0.5 (pydantic); mlite refused it ("expected a number").
    In a mergekit recipe quoted numbers are now numbers, with a note, wherever a value goes;
    a rule's filter stays a string, and an mlite recipe still refuses them."""
    quoted = (MERGEKIT_TIES.replace("density: 0.5", 'density: "0.5"').replace("value: 0.3", 'value: "3e-1"')
              .replace("filter: mlp", 'filter: "1"').replace("[0.2, 0.8]", '["0.2", 0.8]'))
    recipe = load_recipe(write(models, quoted))
    assert recipe.steps[0].model_parameters == {
        "a": {"density": 0.5, "weight": 0.6},
        "b": {"density": [0.2, 0.8], "weight": [{"filter": "1", "value": 0.3}, {"value": 0.7}]}}
    assert any("reads the quoted numbers of 'density' as numbers" in n for n in recipe.options["notes"])
    msg = one_problem({"inputs": {"a": "a", "b": "b"},
                       "steps": [{"id": "m", "method": "linear", "models": ["a", "b"],
                                  "parameters": {"weight": "0.5"}}]})
    assert "expected a number, got '0.5'" in msg


def test_mergekit_out_dtype_wins_and_tokenizer_source(models: Path) -> None:
    text = MERGEKIT_TIES + "out_dtype: float16\ntokenizer_source: base\n"
    recipe = load_recipe(write(models, text))
    assert recipe.output.dtype == "F16" and recipe.output.copy_tokenizer_from == "base"
    recipe = load_recipe(write(models, MERGEKIT_TIES + "tokenizer_source: ./models/c\n"))
    assert recipe.output.copy_tokenizer_from == "c"
    assert recipe.inputs["c"] == str((models / "models" / "c").resolve())
    recipe = load_recipe(write(models, MERGEKIT_TIES + "tokenizer_source: ./models/a\n"))
    assert recipe.output.copy_tokenizer_from == "a"


def test_mergekit_hub_names_and_collisions(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, """
    merge_method: fties
    base_model: org/base-model@main
    models:
      - model: alice/model
      - model: bob/model
    """))
    assert recipe.inputs == {"base-model": "org/base-model@main", "model": "alice/model", "model-2": "bob/model"}
    assert recipe.steps[0].models == ["model", "model-2"]


def test_mergekit_rescale_true_means_l1(models: Path) -> None:
    recipe = load_recipe(write(models, MERGEKIT_TIES.replace("normalize: true", "rescale: true")))
    assert recipe.steps[0].parameters["rescale"] == "l1"
    assert any("rescale: l1" in n for n in recipe.options["notes"])


def test_mergekit_ordered_method_puts_base_first(models: Path) -> None:
    recipe = load_recipe(write(models, """
    merge_method: fslerp
    base_model: ./models/base
    models:
      - model: ./models/a
      - model: ./models/base
    parameters:
      t: [0, 0.5, 1]
    """))
    step = recipe.steps[0]
    assert step.base is None and step.models == ["base", "a"] and step.parameters == {"t": [0, 0.5, 1]}
    # mergekit adds base_model to the inputs when 'models' leaves it out: the same step
    recipe = load_recipe(write(models, "merge_method: fslerp\nbase_model: ./models/base\n"
                                       "models: [{model: ./models/a}]\nparameters: {t: 0.3}\n"))
    assert recipe.steps[0].base is None and recipe.steps[0].models == ["base", "a"]


def test_mergekit_per_model_mapping_by_path(models: Path) -> None:
    text = MERGEKIT_TIES.replace("normalize: true", "lambda: 0.5\n  k: {./models/a: 2}")
    # k is not per-model → refused; a per-model param keyed by the path is accepted
    assert "takes one value for all models" in one_problem(write(models, text))
    recipe = load_recipe(write(models, MERGEKIT_TIES.replace("normalize: true", "weight: {./models/a: 2}")))
    assert recipe.steps[0].parameters["weight"] == {"a": 2}


@pytest.mark.parametrize(("key", "text"), [
    ("modules", "modules: {}\n"),
])
def test_mergekit_unsupported_features_are_errors(tmp_path: Path, key: str, text: str) -> None:
    msg = one_problem(write(tmp_path, "merge_method: fties\nbase_model: x\n" + text))
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}:3: ") and "not supported" in msg and msg.endswith(f"({key})")


def test_mergekit_tokenizer_settings_read_as_a_vocab_spec(models: Path) -> None:
    """tokenizer_source and the tokenizer block become one VocabSpec with the models named as
    inputs; union takes its tokenizer files from the base."""
    recipe = load_recipe(write(models, MERGEKIT_TIES + "tokenizer_source: union\n"))
    spec = recipe.options["vocab_spec"]
    assert (spec.source, spec.base, spec.merge_base, spec.written) == ("union", "base", "base", "tokenizer_source: union")
    assert recipe.output.copy_tokenizer_from == "base"
    block = MERGEKIT_TIES + """tokenizer:
  source: ./models/a
  pad_to_multiple_of: 8
  tokens:
    <|im_start|>: {source: ./models/b, force: true}
    <|im_end|>: {source: {kind: model_token, model: ./models/a, token: "</s>"}}
    <pad>: {source: {kind: zero}}
    <x>: {}
"""
    path = write(models, block)
    spec = load_recipe(path).options["vocab_spec"]
    assert (spec.source, spec.pad_to_multiple_of) == ("a", 8)
    t = spec.tokens
    assert (t["<|im_start|>"].kind, t["<|im_start|>"].model, t["<|im_start|>"].force) == ("model", "b", True)
    assert (t["<|im_end|>"].kind, t["<|im_end|>"].model, t["<|im_end|>"].token) == ("model_token", "a", "</s>")
    assert t["<pad>"].kind == "zero" and t["<x>"].kind == "default"
    assert t["<|im_end|>"].loc.line == path.read_text().splitlines().index("    <|im_end|>: {source: {kind: model_token, "
                                                                          "model: ./models/a, token: \"</s>\"}}") + 1


@pytest.mark.parametrize(("text", "wanted"), [
    ("tokenizer_source: union\ntokenizer: {source: union}\n", "not both (mergekit refuses both)"),
    ("tokenizer: {source: union, tokens: {x: {source: ./models/zzz}}}\n", "'./models/zzz' is not a model of this merge"),
    ("tokenizer: {source: union, tokens: {x: {source: {kind: model_token, model: ./models/a}}}}\n",
     "give exactly one of 'token' and 'token_id'"),
    ("tokenizer: {source: union, tokens: {x: {source: {kind: nope}}}}\n", "tokenizer.tokens.x.source"),
    ("tokenizer: {source: union, pad_to_multiple_of: 0}\n", "pad_to_multiple_of"),
])
def test_mergekit_tokenizer_block_errors_name_the_line(models: Path, text: str, wanted: str) -> None:
    msg = one_problem(write(models, MERGEKIT_TIES + text))
    assert msg.startswith(f"{models / 'recipe.yaml'}:") and wanted in msg, msg


def test_mergekit_tokenizer_source_base_needs_a_base(models: Path) -> None:
    msg = one_problem(write(models, "merge_method: flinear\nmodels: [{model: ./models/a}]\ntokenizer_source: base\n"))
    assert "needs a base_model" in msg


def test_mergekit_linear_averages_a_base_model_left_out_of_models(models: Path) -> None:
    """mergekit 0.1.5 adds base_model to linear's inputs (measured: the mean of base, a and b)."""
    recipe = load_recipe(write(models, "merge_method: linear\nbase_model: ./models/base\n"
                                       "models: [{model: ./models/a}]\nparameters: {weight: 1.0}\n"))
    assert recipe.steps[0].models == ["a", "base"] and recipe.steps[0].base is None
    assert any("'linear' merges it as one more model (the last), as mergekit does" in n
               for n in recipe.options["notes"])


@pytest.mark.parametrize("method", ["linear", "karcher", "passthrough"])
def test_mergekit_slices_leave_a_base_model_out_of_a_method_without_base(models: Path, method: str) -> None:
    """mergekit adds base_model to the inputs only when it turns `models:` into a slice: with
    `slices:` written out, linear and karcher average the sources alone (measured against 0.1.5)."""
    recipe = load_recipe(write(models, f"merge_method: {method}\nbase_model: ./models/base\n"
                                       "slices:\n  - sources:\n      - {model: ./models/a, layer_range: [0, 4]}\n"))
    assert recipe.steps[0].models == ["a"] and recipe.steps[0].base is None
    assert any(f"'{method}' takes no base, and mergekit's slices form leaves it out; ignored" in n
               for n in recipe.options["notes"])


def test_mergekit_base_not_used_by_method(models: Path) -> None:
    msg = one_problem(write(models, "merge_method: flinear\nbase_model: ./models/base\n"
                                    "models: [{model: ./models/a}]\n"))
    assert ":2: method 'flinear' takes no base model" in msg and msg.endswith("(base_model)")
    # listed among the models: fine, and kept as a model
    recipe = load_recipe(write(models, "merge_method: flinear\nbase_model: ./models/base\n"
                                       "models: [{model: ./models/a}, {model: ./models/base}]\n"))
    assert recipe.steps[0].models == ["a", "base"] and recipe.steps[0].base is None


def test_mergekit_non_per_model_param_given_per_model(models: Path) -> None:
    same = MERGEKIT_TIES.replace("      density: 0.5\n", "      density: 0.5\n      lambda: 0.9\n", 1)
    same = same.replace("      density: [0.2, 0.8]\n", "      density: [0.2, 0.8]\n      lambda: 0.9\n")
    # mergekit reads step-wide parameters only under `parameters:`: given for a model, they are
    # ignored there, so here too (with a note), whether the models agree or not
    diff = same.replace("lambda: 0.9\n", "lambda: 0.1\n", 1)
    for text in (same, diff):
        recipe = load_recipe(write(models, text))
        assert all("lambda" not in p for p in recipe.steps[0].model_parameters.values())
        assert "lambda" not in recipe.steps[0].parameters
        assert any("'lambda' given for model" in n and "ignored, as in mergekit" in n for n in recipe.options["notes"])


def test_mergekit_parameters_of_other_methods_are_ignored_typos_are_not(models: Path) -> None:
    text = MERGEKIT_TIES.replace("normalize: true", "normalize: true\n  t: 0.3")  # a slerp parameter on ties
    recipe = load_recipe(write(models, text))
    assert "t" not in recipe.steps[0].parameters
    assert any("'t' is not a parameter of 'fties'; ignored, as mergekit ignores it" in n for n in recipe.options["notes"])
    msg = one_problem(write(models, MERGEKIT_TIES.replace("normalize: true", "normalise: true")))
    assert "unknown parameter 'normalise'" in msg and "did you mean 'normalize'" in msg


def test_mergekit_rescale_on_ties_is_refused_when_it_would_change_the_result(models: Path) -> None:
    from mergekit_lite.methods import ties  # noqa: F401  registers the real method

    text = MERGEKIT_TIES.replace("fties", "ties")
    msg = one_problem(write(models, text.replace("normalize: true", "normalize: true\n  rescale: true")))
    assert "'rescale: true' is not supported for method 'ties'" in msg and "L1-rescales" in msg
    recipe = load_recipe(write(models, text.replace("normalize: true", "normalize: true\n  rescale: false")))
    assert "rescale" not in recipe.steps[0].parameters  # the default: nothing changes


def test_mlite_recipe_step_wide_parameter_per_model_must_agree() -> None:
    step = {"id": "s", "method": "fties", "base": "x", "models": [
        {"model": "a", "parameters": {"lambda": 0.9}}, {"model": "b", "parameters": {"lambda": 0.9}}]}
    doc = {"inputs": {"x": "x", "a": "a", "b": "b"}, "steps": [step]}
    assert load_recipe(doc).steps[0].model_parameters["b"]["lambda"] == 0.9  # mlite's shape: applied
    step["models"][1]["parameters"]["lambda"] = 0.1
    assert "takes one value for all models, but models give different values" in one_problem(doc)


def test_mergekit_dtype_given_twice(models: Path) -> None:
    msg = one_problem(write(models, MERGEKIT_TIES + "output: {dtype: float16}\n"))
    assert "dtype is given twice" in msg


def test_real_ties_mergekit_recipe(models: Path) -> None:
    if registry.get_method("ties") is None:
        pytest.skip("ties not registered yet")
    recipe = load_recipe(write(models, MERGEKIT_TIES.replace("fties", "ties")))
    assert recipe.steps[0].method == "ties" and recipe.steps[0].models == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# Errors: YAML and shape


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert info.value.exit_code == 2 and "not found" in str(info.value)


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    msg = one_problem(write(tmp_path, "inputs:\n  a: ./a\nsteps: [\n  - x\n"))
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}:") and "YAML syntax error" in msg
    msg = one_problem(write(tmp_path, "inputs:\n  a: b: c\n"))
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}:2: YAML syntax error")


def test_control_characters_and_deep_nesting_are_yaml_errors(tmp_path: Path) -> None:
    nul = tmp_path / "nul.yaml"
    nul.write_text("inputs:\n  a: x\x00\nsteps: []\n")
    assert one_problem(nul) == f"{nul}:2: YAML syntax error: control character U+0000 is not allowed in YAML"
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert one_problem(deep) == f"{deep}: YAML syntax error: nested too deeply"


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "inputs:\n  a: ./a\n  a: ./b\nsteps: []\n"))
    assert f"{tmp_path / 'recipe.yaml'}:3: duplicate key 'a' (first written at line 2) (a)" in found


@pytest.mark.parametrize(("text", "expected"), [
    ("", ":1: the recipe is empty"),
    ("- a\n- b\n", ":1: a recipe must be a mapping"),
    ("inputs: {}\n", ":1: a recipe needs 'steps' (mlite) or 'merge_method' (mergekit)"),
    ("steps: []\nmerge_method: x\n", ":2: a recipe has either 'steps'"),
])
def test_top_level_shape_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in one_problem(write(tmp_path, text))


def test_unknown_keys_with_suggestions(models: Path) -> None:
    text = NATIVE.replace("    models: [math, code]", "    modles: [math, code]")
    text = text.replace("steps:", "stepz: 1\nsteps:") + "output: {pth: ./o}\n"
    f = str(models / "recipe.yaml")
    assert problems(write(models, text)) == [
        f"{f}:5: unknown key 'stepz', did you mean 'steps'? (stepz)",
        f"{f}:10: unknown key 'modles', did you mean 'models'? (steps[0].modles)",
        f"{f}:16: unknown key 'pth', did you mean 'path'? (output.pth)",
    ]


def test_unknown_key_in_model_entry_and_mergekit_top(models: Path) -> None:
    found = problems(write(models, MERGEKIT_TIES.replace("    parameters:\n      density: 0.5",
                                                         "    params:\n      density: 0.5") + "base_modle: x\n"))
    f = str(models / "recipe.yaml")
    assert f"{f}:6: unknown key 'params', did you mean 'parameters'? (models[1].params)" in found
    assert f"{f}:20: unknown key 'base_modle', did you mean 'base_model'? (base_modle)" in found


def test_missing_and_mistyped_keys(models: Path) -> None:
    f = str(models / "recipe.yaml")
    found = problems(write(models, """
    inputs: {base: ./models/base}
    steps:
      - id: a
        base: base
      - id: 3
        method: fties
        models: 4
    seed: -1
    """))
    assert f"{f}:3: missing required key 'method' (steps[0].method)" in found
    assert f"{f}:5: input should be a valid string, got 3 (steps[1].id)" in found
    assert f"{f}:7: input should be a valid list, got 4 (steps[1].models)" in found
    assert f"{f}:8: input should be greater than or equal to 0, got -1 (seed)" in found


# ---------------------------------------------------------------------------------------------
# Errors: meaning


def test_unknown_method_suggests(models: Path) -> None:
    msg = one_problem(write(models, NATIVE.replace("method: fties", "method: ftise")))
    assert msg == f"{models / 'recipe.yaml'}:7: unknown method 'ftise', did you mean 'fties'? (steps[0].method)"
    msg = one_problem(write(models, NATIVE.replace("method: fties", "method: zzzzzz")))
    assert "unknown method 'zzzzzz' (known: " in msg


@pytest.mark.parametrize(("params", "line", "message", "key"), [
    ("densty: 0.5", 11, "unknown parameter 'densty' for method 'fties', did you mean 'density'?", "densty"),
    ("density: 1.5", 11, "parameter 'density' of method 'fties': must be <= 1, got 1.5", "density"),
    ("density: 0", 11, "parameter 'density' of method 'fties': must be > 0, got 0", "density"),
    ("density: lots", 11, "parameter 'density' of method 'fties': expected a number, got 'lots'", "density"),
    ("normalize: 1", 11, "parameter 'normalize' of method 'fties': expected true/false, got 1", "normalize"),
    ("rescale: l2", 11, "parameter 'rescale' of method 'fties': expected one of paper, l1, none, got 'l2'",
     "rescale"),
    ("k: 1.5", 11, "parameter 'k' of method 'fties': expected an integer, got 1.5", "k"),
    ("k: [1, 2]", 11, "parameter 'k' is an integer: a layer gradient is not allowed", "k"),
    ("scope: [{match: '*.mlp.*', value: global}]", 11,
     "parameter 'scope' of method 'fties' is the same for every tensor: per-tensor rules and layer gradients "
     "are not allowed", "scope"),
    ("density: [0.5, 2]", 11, "parameter 'density' of method 'fties': must be <= 1, got 2", "density"),
    ("density: [{match: '*', value: 0.5}, {filter: mlp, value: 3}]", 11,
     "parameter 'density' of method 'fties': must be <= 1, got 3", "density"),
    ("lambda: {math: 1, code: 2}", 11,
     "parameter 'lambda' of method 'fties' takes one value for all models, not one per model", "lambda"),
    ("weight: {math: 1, cdoe: 2}", 11,
     "parameter 'weight' names 'cdoe', which is not a model of this step, did you mean 'code'?", "weight.cdoe"),
    ("density: [{mtch: x, value: 1}]", 11, "parameter 'density': unknown rule key 'mtch', did you mean 'match'?",
     "density[0].mtch"),
    ("density: [{match: 're:(', value: 1}]", 11, "parameter 'density': bad regular expression '('", "density[0].match"),
    ("density: [{match: x}]", 11, "parameter 'density': a rule needs a 'value'", "density[0]"),
    ("density: []", 11, "parameter 'density': an empty list is not a value", "density"),
    ("density: {foo: 1}", 11, "parameter 'density' names 'foo', which is not a model of this step", "density.foo"),
    ("lambda: 1\n      scaling_coef: 2", 12, "parameter 'lambda' is given twice (as 'lambda' and 'scaling_coef')",
     "scaling_coef"),
])
def test_parameter_errors(models: Path, params: str, line: int, message: str, key: str) -> None:
    msg = one_problem(write(models, NATIVE.replace("density: 0.5", params)))
    prefix = f"{models / 'recipe.yaml'}:{line}: {message}"
    assert msg.startswith(prefix), msg
    assert msg.endswith(f"(steps[0].parameters.{key})"), msg


def test_rule_error_points_at_the_rule_line(models: Path) -> None:
    text = NATIVE.replace("density: 0.5", "density:\n        - {match: '*', value: 0.5}\n        - {filter: x}")
    msg = one_problem(write(models, text))
    assert msg.startswith(f"{models / 'recipe.yaml'}:13: parameter 'density': a rule needs a 'value'")


def test_unknown_parameter_in_model_entry(models: Path) -> None:
    msg = one_problem(write(models, MERGEKIT_TIES.replace("      weight: 0.6", "      wieght: 0.6")))
    assert msg == (f"{models / 'recipe.yaml'}:8: unknown parameter 'wieght' for method 'fties', "
                   "did you mean 'weight'? (models[1].parameters.wieght)")


def test_required_parameter_missing(models: Path) -> None:
    msg = one_problem(write(models, "inputs: {base: ./models/base}\nsteps:\n  - {method: fprobe, base: base}\n"))
    assert msg.endswith(":3: method 'fprobe' needs parameter 'probe' (steps[0].parameters)")


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("models: [math, code]", "models: [math, cdoe]",
     ":9: model 'cdoe' is neither an input nor a step id, did you mean 'code'? (steps[0].models[1])"),
    ("base: base", "base: bsae", ":8: base 'bsae' is neither an input nor a step id, did you mean 'base'? (steps[0].base)"),
    ("models: [math, code]", "models: [math, merged]", ":9: step 'merged' uses its own result as model"),
    ("models: [math, code]", "models: [math, math]", ":9: model 'math' is listed twice in this step"),
    ("id: final", "id: merged", ":12: duplicate step id 'merged' (first used at "),
    ("id: final", "id: math", ":12: step id 'math' is also the name of an input (steps[1].id)"),
    ("models: [math, code]", "models: []", ":6: method 'fties' needs at least 1 model(s), got 0 (steps[0].models)"),
    ("    base: base\n", "", ":6: method 'fties' needs a base model ('base:') (steps[0].base)"),
    ("    models: [merged, math]", "    base: base\n    models: [merged, math]",
     ":14: method 'flinear' takes no base model (steps[1].base)"),
    ("    models: [merged, math]", "    models: [merged, math]\n    delta: code",
     ":15: method 'flinear' takes no delta (steps[1].delta)"),
    ("    models: [merged, math]", "    models: [merged, math]\n    old_base: code",
     ":15: 'old_base' is only used together with 'delta' (steps[1].old_base)"),
])
def test_reference_and_arity_errors(models: Path, old: str, new: str, expected: str) -> None:
    found = problems(write(models, NATIVE.replace(old, new)))
    assert any(expected in p for p in found), found


def test_too_many_models_and_delta_required(models: Path) -> None:
    found = problems(write(models, """
    inputs: {base: ./models/base, a: ./models/a, b: ./models/b, c: ./models/c}
    steps:
      - {id: s, method: fslerp, models: [a, b, c]}
      - {id: p, method: fpatch, base: s}
      - {id: q, method: fpatch, base: s, delta: a, old_base: base}
    output: {step: q}
    """))
    f = str(models / "recipe.yaml")
    assert found == [
        f"{f}:3: method 'fslerp' takes at most 2 model(s), got 3 (steps[0].models)",
        f"{f}:4: method 'fpatch' needs a delta ('delta:': a PEFT adapter or a fine-tuned model) (steps[1].delta)",
    ]


def test_cycles(models: Path) -> None:
    found = problems(write(models, """
    inputs: {base: ./models/base, a: ./models/a}
    steps:
      - {id: x, method: fties, base: z, models: [a]}
      - {id: y, method: fties, base: x, models: [a]}
      - {id: z, method: fties, base: y, models: [a]}
    """))
    assert found == [f"{models / 'recipe.yaml'}:3: steps form a cycle: x -> z -> y -> x (steps[0].id)"]


@pytest.mark.parametrize(("output", "expected"), [
    ("{dtype: bf17}", "unknown dtype 'bf17' (choose one of bfloat16, float16, float32, float64) (output.dtype)"),
    ("{shard_size: 5XB}", "cannot read size '5XB' (examples: 5GB, 500M, 2000000) (output.shard_size)"),
    ("{shard_size: 0}", "size must be positive, got 0 (output.shard_size)"),
    ("{step: fnal}", "output step 'fnal' is not a step id, did you mean 'final'? (output.step)"),
    ("{copy_tokenizer_from: bsae}", "copy_tokenizer_from 'bsae' is not an input, did you mean 'base'? "
                                    "(output.copy_tokenizer_from)"),
])
def test_output_errors(models: Path, output: str, expected: str) -> None:
    msg = one_problem(write(models, NATIVE + f"output: {output}\n"))
    assert msg == f"{models / 'recipe.yaml'}:15: {expected}"


def test_options_errors(models: Path) -> None:
    found = problems(write(models, NATIVE + "options:\n  vocab: union\n  allow_bn: true\n"))
    f = str(models / "recipe.yaml")
    assert found == [f"{f}:16: input should be 'strict' or 'shared', got 'union' (options.vocab)",
                     f"{f}:17: unknown key 'allow_bn', did you mean 'allow_bin'? (options.allow_bn)"]


def test_device_error(models: Path) -> None:
    msg = one_problem(write(models, NATIVE + "device: gpu\n"))
    assert msg == f"{models / 'recipe.yaml'}:15: unknown device 'gpu' (use cpu, cuda, cuda:N or auto) (device)"


def test_all_problems_reported_at_once_in_line_order(models: Path) -> None:
    text = (NATIVE.replace("method: fties", "method: ftise")
            .replace("models: [merged, math]", "models: [merged, mth]")
            + "output: {dtype: bf17}\ndevice: gpu\n")
    found = problems(write(models, text))
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == [7, 14, 15, 16] and lines == sorted(lines)


def test_dict_source_errors_have_keys(models: Path) -> None:
    msg = one_problem({"inputs": {"a": "x"}, "steps": [{"method": "fties", "base": "a", "models": ["b"]}]})
    assert msg == "<recipe>: model 'b' is neither an input nor a step id (known: a, step1) (steps[0].models[0])"


def test_loc_str() -> None:
    assert str(Loc("recipe.yaml", 12)) == "recipe.yaml:12"
    assert str(Loc("recipe.yaml", None)) == "recipe.yaml"
    assert str(Loc(None, None)) == "<recipe>"


def test_slerp_with_one_endpoint_is_a_recipe_error() -> None:
    """Caught with the recipe (file and step), not at the first tensor of a run."""
    from mergekit_lite.methods import slerp  # noqa: F401  registers the real method

    msg = one_problem({"inputs": {"a": "a"}, "steps": [{"id": "s", "method": "slerp", "models": ["a"]}]})
    assert "method 'slerp' needs 2 inputs (models, or a base and models), got 1" in msg


@pytest.mark.parametrize(("text", "line", "why"), [
    ("slices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n      - {model: b, layer_range: [0, 3]}\n",
     4, "the sources of a slice must give the same number of layers, got [[0, 4], [0, 3]] (slices[0].sources)"),
    ("slices:\n  - sources:\n      - {model: a, layer_range: [2, 2]}\n", 5,
     "layer_range [2, 2] is empty or negative: it takes layers FIRST to END - 1 (slices[0].sources[0].layer_range)"),
    ("slices:\n  - sources:\n      - {model: a}\n", 5,
     "a source needs 'layer_range: [FIRST, END]' (two integers, END excluded) (slices[0].sources[0].layer_range)"),
    ("slices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n    merge_method: slerp\n", 6,
     "unknown key 'merge_method' in a slice (expected base_model, parameters, sources) (slices[0].merge_method)"),
    ("models: [{model: a}]\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n", 4,
     "give 'slices' or 'models', not both (slices)"),
    ("slices: []\n", 3, "'slices' must be a non-empty list of slices, each with 'sources' (slices)"),
    ("slices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n      - {model: a, layer_range: [4, 8]}\n", 6,
     "model 'a' is listed twice in slices[0] (first at"),
    ("slices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n      - {model: x, layer_range: [0, 4]}\n"
     "  - sources:\n      - {model: x, layer_range: [4, 8]}\n", 7,
     "method 'ties' needs at least 1 model(s) per slice, got 0 (slices[1].sources)"),
])
def test_mergekit_slices_shape_mistakes_are_one_line_errors(tmp_path: Path, text: str, line: int, why: str) -> None:
    msg = one_problem(write(tmp_path, "merge_method: ties\nbase_model: x\n" + text))
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}:{line}: ") and why in msg, msg


# A mergekit recipe with one slice over the 4 layers, its base the first source; tests add the
# other sources and the parameters.
ONE_SLICE = """
        merge_method: ties
        base_model: ./models/base
        slices:
          - sources:
              - {model: ./models/base, layer_range: [0, 4]}"""


def test_mergekit_single_slice_reads_as_models(models: Path) -> None:
    """Sources become the models with their own parameters; the slice's parameters override
    the recipe's (mergekit's lookup order)."""
    recipe = load_recipe(write(models, ONE_SLICE + """
              - {model: ./models/a, layer_range: [0, 4], parameters: {weight: 0.7}}
              - {model: ./models/b, layer_range: [0, 4]}
            parameters: {density: 0.4}
        parameters: {density: 0.9, normalize: false}
        """))
    step = recipe.steps[0]
    assert step.base == "base" and step.models == ["a", "b"]
    assert step.parameters == {"density": 0.9, "normalize": False}  # the recipe's own
    (piece,) = step.slices
    assert piece.parameters["density"] == 0.4 and piece.parameters["normalize"] is False
    assert piece.model_parameters == {"a": {"weight": 0.7}}
    assert recipe.options["layer_stack"].num_layers == 4


def test_mergekit_slice_rules_fall_back_to_the_recipe_parameters(models: Path) -> None:
    """mergekit looks a parameter up source → slice → recipe, going on whenever a level's rules
    match nothing. A slice's rule list used to replace the recipe's setting wholesale, so its
    unmatched tensors took the method default (t = 0.5 instead of 0.8 for a slerp's mlp, norm,
    embeddings and head; a ties' lm_head weighted 1.0 instead of 0.5)."""
    from mergekit_lite.methods import ties  # noqa: F401  registers the real method
    from mergekit_lite.recipe.params import SlicedResolver

    recipe = load_recipe(write(models, ONE_SLICE + """
              - model: ./models/a
                layer_range: [0, 4]
                parameters: {weight: [{filter: mlp, value: 0.9}]}
              - {model: ./models/b, layer_range: [0, 4]}
            parameters:
              weight: [{filter: self_attn, value: 0.2}]
              density: {filter: mlp, value: [0.1, 0.7]}
              lambda: [{filter: mlp, value: 2.0}]
        parameters:
          weight: 0.5
          density: [{filter: norm, value: 0.3}, {value: 0.9}]
          lambda: [0.2, 0.8]
        """))
    step = recipe.steps[0]
    r = SlicedResolver(registry.get_method("ties"), step, step.models, recipe.options["layer_stack"])

    def at(name: str, key: str) -> object:
        return r.for_tensor(name)[key]

    mlp, attn, head, norm = ("model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                             "lm_head.weight", "model.layers.3.input_layernorm.weight")
    assert at(mlp, "weight") == (0.9, 0.5)  # a's own rule, b the recipe's (no slice rule for mlp)
    assert at(attn, "weight") == (0.2, 0.2)  # the slice's rule for both
    assert at(head, "weight") == (0.5, 0.5)  # neither matches: the recipe's
    assert at(mlp, "density") == pytest.approx((0.3, 0.3))  # the slice's gradient at layer 1 of 4
    assert at(norm, "density") == (0.3, 0.3) and at(head, "density") == (0.9, 0.9)  # the recipe's rules
    assert at(mlp, "lambda") == 2.0
    assert at(attn, "lambda") == pytest.approx(0.4) and at(head, "lambda") == pytest.approx(0.2)  # the recipe's gradient


def test_mergekit_slice_and_recipe_parameters_are_checked_where_written(models: Path) -> None:
    """Joined before they were checked, a mistake in the recipe's `parameters` was reported under
    the slice's key, with the rule index shifted by the slice's rules (parameters.t[1].valu for
    the recipe's first rule)."""
    path = write(models, ONE_SLICE + """
              - {model: ./models/a, layer_range: [0, 4]}
            parameters:
              density: [{filter: self_attn, value: 0.5}]
        parameters:
          density:
            - filter: mlp
              valu: 0.3
        """)
    assert one_problem(path) == (f"{path}:11: parameter 'density': unknown rule key 'valu', did you mean "
                                 "'value'? (parameters.density[0].valu)")
    path = write(models, ONE_SLICE + """
              - {model: ./models/a, layer_range: [0, 4]}
            parameters:
              density: [{filter: self_attn, value: 1.5}]
        parameters:
          density: 0.5
        """)
    msg = one_problem(path)
    assert msg.startswith(f"{path}:8: parameter 'density' of method 'ties': must be <= 1") and msg.endswith(
        "(slices[0].parameters.density)")


def test_mergekit_slice_rules_before_a_per_model_mapping(models: Path) -> None:
    """mlite's {MODEL: value} mapping at the recipe level cannot follow a slice's rules in one
    rule list (it is no rule value): the slice's rules stand alone, as before the fallback."""
    from mergekit_lite.methods import ties  # noqa: F401  registers the real method
    from mergekit_lite.recipe.params import SlicedResolver

    recipe = load_recipe(write(models, ONE_SLICE + """
              - {model: ./models/a, layer_range: [0, 4]}
              - {model: ./models/b, layer_range: [0, 4]}
            parameters:
              weight: [{filter: mlp, value: 0.2}]
        parameters:
          weight: {./models/a: 0.7, ./models/b: 0.4}
        """))
    step = recipe.steps[0]
    r = SlicedResolver(registry.get_method("ties"), step, step.models, recipe.options["layer_stack"])
    assert r.for_tensor("model.layers.1.mlp.up_proj.weight")["weight"] == (0.2, 0.2)
    assert r.for_tensor("lm_head.weight")["weight"] == (1.0, 1.0)


def test_mergekit_rescale_on_breadcrumbs_ties_is_refused(models: Path) -> None:
    msg = one_problem(write(models, """
        merge_method: breadcrumbs_ties
        base_model: ./models/base
        models: [{model: ./models/a}, {model: ./models/b}]
        parameters: {density: 0.5, rescale: true}
        """))
    assert "'rescale: true' is not supported for method 'breadcrumbs_ties'" in msg
