"""The Python API refuses wrong-typed arguments with a one-line UsageError naming the argument.

Before these checks, `merge(models=None)`, `out=5`, `dtype=16`, `parameters="density=0.5"` and
the like surfaced as TypeError/AttributeError/ValueError from pathlib, torch or dict(); and a
string `models` was taken as a list of one-character paths. Every case here runs on tiny
checkpoints written under a temporary directory: nothing is downloaded.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mergekit_lite import api
from mergekit_lite.errors import UsageError
from mergekit_lite.synthetic import build_model_set


@dataclass(frozen=True)
class Inputs:
    """Valid inputs for every public function, so each case differs only in its bad argument."""

    base: str
    ft1: str
    ft2: str
    lora: str
    probe: str
    features: str
    bank: str
    recipe: dict[str, Any]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("api_arguments")
    ms = build_model_set(root / "models", num_shards=1)
    hidden = ms.shape.hidden_size
    probe = root / "probe.safetensors"
    save_file({"weight": torch.randn(2, hidden), "bias": torch.zeros(2)}, str(probe))
    features = root / "features.safetensors"
    save_file({"features": torch.randn(40, 8), "labels": torch.arange(40) % 2}, str(features))
    bank = root / "bank.safetensors"
    api.bank_add(str(bank), "t0", str(ms.adapter))
    base, ft1, ft2 = str(ms.base), str(ms.finetunes[0]), str(ms.finetunes[1])
    recipe = {"inputs": {"a": ft1, "b": ft2}, "steps": [{"method": "linear", "models": ["a", "b"]}]}
    return Inputs(base, ft1, ft2, str(ms.adapter), str(probe), str(features), str(bank), recipe)


Call = Callable[[Inputs, Path], Any]


def _merge(**kw: Any) -> Call:
    """A valid two-model linear merge with `kw` overriding its arguments."""
    return lambda i, t: api.merge(**{"method": "linear", "models": [i.ft1, i.ft2], **kw})


def _ties(**kw: Any) -> Call:
    return lambda i, t: api.merge(**{"method": "ties", "base": i.base, "models": [i.ft1, i.ft2],
                                     "parameters": {"density": 0.5}, **kw})


def _run(**kw: Any) -> Call:
    return lambda i, t: api.run_recipe(**{"recipe": i.recipe, **kw})


def _dry(**kw: Any) -> Call:
    return lambda i, t: api.dry_run(**{"recipe": i.recipe, **kw})


def _patch(**kw: Any) -> Call:
    return lambda i, t: api.patch(**{"base": i.base, "delta": i.lora, "out": t / "o", **kw})


def _extract(**kw: Any) -> Call:
    return lambda i, t: api.extract(**{"model": i.ft1, "base": i.base, "rank": 2, **kw})


def _to_multiplier(**kw: Any) -> Call:
    return lambda i, t: api.hadamard_to_multiplier(**{"base": i.base, "model": i.ft1, "out": t / "o", **kw})


def _hadamard(fn: str, **kw: Any) -> Call:
    """hadamard_apply / hadamard_to_delta with a model given as an (unmarked) multiplier: each
    case's bad argument is refused before the multiplier is even opened."""
    return lambda i, t: getattr(api, fn)(**{"base": i.base, "multiplier": i.ft1, "out": t / "o",
                                            "allow_unmarked": True, **kw})


def _surgery(**kw: Any) -> Call:
    return lambda i, t: api.surgery(**{"model": i.ft1, "probe": i.probe, "top_k": 4, "out": t / "o", **kw})


def _train(**kw: Any) -> Call:
    return lambda i, t: api.train_probe(**{"features_path": i.features, "out": t / "p.safetensors", **kw})


def _feature_fn(x: torch.Tensor, adapter: Any) -> torch.Tensor:
    return x


def _retrieve(**kw: Any) -> Call:
    return lambda i, t: api.retrieve(**{"inputs": torch.randn(3, 4), "feature_fn": _feature_fn,
                                        "prototypes": torch.randn(2, 4), "class_to_task": [0, 0],
                                        "adapters": [{}], **kw})


# (case id, call, the argument the message must name)
CASES: list[tuple[str, Call, str]] = [
    # merge
    ("merge-models-None", _ties(models=None), "models"),
    ("merge-models-str", lambda i, t: api.merge("linear", models=i.ft1), "models"),
    ("merge-models-int-items", _merge(models=[1, 2]), "models[0]"),
    ("merge-models-dict", lambda i, t: api.merge("linear", models={"a": i.ft1, "b": i.ft2}), "models"),
    ("merge-method-None", _merge(method=None), "method"),
    ("merge-method-list", _merge(method=["linear"]), "method"),
    ("merge-base-int", _ties(base=5), "base"),
    ("merge-parameters-str", _ties(parameters="density=0.5"), "parameters"),
    ("merge-parameters-list", _ties(parameters=[("density", 0.5)]), "parameters"),
    ("merge-model_parameters-ints", _ties(model_parameters=[1, 2]), "model_parameters[0]"),
    ("merge-model_parameters-str", _ties(model_parameters="ab"), "model_parameters"),
    ("merge-model_parameters-dict", _ties(model_parameters={"weight": 1.0, "density": 0.5}), "model_parameters"),
    ("merge-out-int", _merge(out=5), "out"),
    ("merge-out-bytes", _merge(out=b"o"), "out"),
    ("merge-dtype-int", _merge(dtype=16), "dtype"),
    ("merge-dtype-torch-int8", _merge(dtype=torch.int8), "dtype"),
    ("merge-device-int", _merge(device=0), "device"),
    ("merge-device-float", _merge(device=1.5), "device"),
    ("merge-seed-str", _ties(seed="x"), "seed"),
    ("merge-seed-float", _ties(seed=1.5), "seed"),
    ("merge-seed-negative", _ties(seed=-1), "seed"),
    ("merge-seed-bool", _ties(seed=True), "seed"),
    ("merge-shard_size-bool", _merge(shard_size=True), "shard_size"),
    ("merge-shard_size-float", _merge(shard_size=1.5), "shard_size"),
    ("merge-shard_size-list", _merge(shard_size=[1]), "shard_size"),
    ("merge-shard_size-zero", _merge(shard_size=0), "shard_size"),
    ("merge-shard_size-text", _merge(shard_size="abc"), "shard_size"),
    # run_recipe, dry_run, plan_recipe
    ("run_recipe-recipe-int", lambda i, t: api.run_recipe(5), "recipe"),
    ("run_recipe-recipe-None", lambda i, t: api.run_recipe(None), "recipe"),
    ("run_recipe-recipe-list", lambda i, t: api.run_recipe([1, 2]), "recipe"),
    ("run_recipe-recipe-bytes", lambda i, t: api.run_recipe(b"steps: []"), "recipe"),
    ("run_recipe-out-int", _run(out=5), "out"),
    ("run_recipe-dtype-torch-int", _run(dtype=torch.int64), "dtype"),
    ("run_recipe-device-list", _run(device=["cpu"]), "device"),
    ("run_recipe-seed-float", _run(seed=2.0), "seed"),
    ("run_recipe-shard_size-float", _run(shard_size=3.5), "shard_size"),
    ("run_recipe-tensor_hook-int", _run(tensor_hook=5), "tensor_hook"),
    ("run_recipe-publish_hook-str", _run(publish_hook="hook"), "publish_hook"),
    ("dry_run-recipe-float", lambda i, t: api.dry_run(3.5), "recipe"),
    ("dry_run-unknown-keyword", _dry(bogus=1), "bogus"),
    ("dry_run-check_output", _dry(check_output=True), "check_output"),
    ("dry_run-seed-str", _dry(seed="x"), "seed"),
    ("dry_run-shard_size-str", _dry(shard_size="x"), "shard_size"),
    ("dry_run-dtype-float", _dry(dtype=3.5), "dtype"),
    ("dry_run-out-list", _dry(out=["o"]), "out"),
    ("plan_recipe-unknown-keyword", lambda i, t: api.plan_recipe(i.recipe, threads=2), "threads"),
    ("plan_recipe-recipe-None", lambda i, t: api.plan_recipe(None), "recipe"),
    # inspect
    ("inspect-path-int", lambda i, t: api.inspect(5), "path"),
    ("compare_predictions-old-int", lambda i, t: api.compare_predictions(5, "n.jsonl"), "old"),
    ("compare_predictions-new-None", lambda i, t: api.compare_predictions("o.jsonl", None), "new"),
    ("compare_predictions-metric-list",
     lambda i, t: api.compare_predictions("o.jsonl", "n.jsonl", metric=["acc"]), "metric"),
    ("compare_predictions-id_field-int",
     lambda i, t: api.compare_predictions("o.jsonl", "n.jsonl", id_field=1), "id_field"),
    ("compare_predictions-where-list",
     lambda i, t: api.compare_predictions("o.jsonl", "n.jsonl", where=["filter=x"]), "where"),
    ("inspect-path-None", lambda i, t: api.inspect(None), "path"),
    ("vocabulary-checkpoint-int", lambda i, t: api.vocabulary(5), "checkpoint"),
    # patch, extract
    ("patch-base-None", _patch(base=None), "base"),
    ("patch-delta-int", _patch(delta=5), "delta"),
    ("patch-old_base-int", _patch(old_base=5), "old_base"),
    ("patch-out-int", _patch(out=5), "out"),
    ("patch-lam-str", _patch(lam="x"), "lam"),
    ("patch-lam-nan", _patch(lam=float("nan")), "lam"),
    ("patch-device-float", _patch(device=3.5), "device"),
    ("patch-dtype-int", _patch(dtype=16), "dtype"),
    ("patch-seed-str", _patch(seed="x"), "seed"),
    ("patch-shard_size-float", _patch(shard_size=2.5), "shard_size"),
    ("extract-model-int", _extract(model=5), "model"),
    ("extract-base-None", _extract(base=None), "base"),
    ("extract-out-int", _extract(out=5), "out"),
    ("extract-device-None", _extract(device=None), "device"),
    ("extract-dtype-torch-bool", _extract(dtype=torch.bool), "dtype"),
    ("extract-seed-negative", _extract(seed=-1), "seed"),
    ("extract-on_tensor-int", _extract(on_tensor=5), "on_tensor"),
    # multiplicative (HUT) patches
    ("hadamard_to_multiplier-base-None", _to_multiplier(base=None), "base"),
    ("hadamard_to_multiplier-model-int", _to_multiplier(model=5), "model"),
    ("hadamard_to_multiplier-out-int", _to_multiplier(out=5), "out"),
    ("hadamard_to_multiplier-dtype-torch-int8", _to_multiplier(dtype=torch.int8), "dtype"),
    ("hadamard_to_multiplier-shard_size-float", _to_multiplier(shard_size=2.5), "shard_size"),
    ("hadamard_to_multiplier-allow_unrepresentable-str", _to_multiplier(allow_unrepresentable="no"),
     "allow_unrepresentable"),
    ("hadamard_apply-multiplier-None", _hadamard("hadamard_apply", multiplier=None), "multiplier"),
    ("hadamard_apply-device-float", _hadamard("hadamard_apply", device=3.5), "device"),
    ("hadamard_apply-allow_unmarked-str", _hadamard("hadamard_apply", allow_unmarked="yes"), "allow_unmarked"),
    ("hadamard_to_delta-base-int", _hadamard("hadamard_to_delta", base=5), "base"),
    ("hadamard_to_delta-dtype-int", _hadamard("hadamard_to_delta", dtype=16), "dtype"),
    ("hadamard_to_delta-force-str", _hadamard("hadamard_to_delta", force="false"), "force"),
    # banks and MOS
    ("bank_add-bank-int", lambda i, t: api.bank_add(5, "t0", i.lora), "bank"),
    ("bank_add-source-int", lambda i, t: api.bank_add(str(t / "b.safetensors"), "t0", 5), "source"),
    ("bank_add-task-None", lambda i, t: api.bank_add(str(t / "b.safetensors"), None, i.lora), "task"),
    ("bank_add-scale-str", lambda i, t: api.bank_add(str(t / "b.safetensors"), "t0", i.lora, scale="x"), "scale"),
    ("bank_add-scale-negative", lambda i, t: api.bank_add(str(t / "b.safetensors"), "t0", i.lora, scale=-1.0),
     "scale"),
    ("bank_add-scale-bool", lambda i, t: api.bank_add(str(t / "b.safetensors"), "t0", i.lora, scale=True), "scale"),
    ("bank_list-bank-None", lambda i, t: api.bank_list(None), "bank"),
    ("bank_export-bank-int", lambda i, t: api.bank_export(5, "t0", t / "o"), "bank"),
    ("bank_export-task-list", lambda i, t: api.bank_export(i.bank, ["t0"], t / "o"), "task"),
    ("bank_export-out-None", lambda i, t: api.bank_export(i.bank, "t0", None), "out"),
    ("bank_set_prototypes-bank-int",
     lambda i, t: api.bank_set_prototypes(5, torch.randn(1, 4), [0]), "bank"),
    ("bank_set_prototypes-class_to_task-int",
     lambda i, t: api.bank_set_prototypes(i.bank, torch.randn(1, 4), 0), "class_to_task"),
    ("mos_merge-bank-int", lambda i, t: api.mos_merge(5, out=t / "m.safetensors"), "bank"),
    ("mos_merge-out-int", lambda i, t: api.mos_merge(i.bank, out=5), "out"),
    ("retrieve-feature_fn-str", _retrieve(feature_fn="f"), "feature_fn"),
    ("retrieve-bank-int", _retrieve(adapters=None, bank=5), "bank"),
    ("retrieve-adapters-ints", _retrieve(adapters=[1]), "adapters[0]"),
    ("retrieve-prototypes-list", _retrieve(prototypes=[[1.0] * 4] * 2), "prototypes"),
    ("retrieve-class_to_task-int", _retrieve(class_to_task=0), "class_to_task"),
    ("retrieve-classifier-int", _retrieve(classifier=1), "classifier"),
    # surgery and probes
    ("surgery-model-None", _surgery(model=None), "model"),
    ("surgery-probe-tensor", _surgery(probe=torch.randn(2, 16)), "probe"),
    ("surgery-out-int", _surgery(out=5), "out"),
    ("surgery-top_k-str", _surgery(top_k="x"), "top_k"),
    ("surgery-fraction-str", _surgery(top_k=None, fraction="x"), "fraction"),
    ("surgery-target-int", _surgery(target=5), "target"),
    ("surgery-device-float", _surgery(device=3.5), "device"),
    ("undo_surgery-edited_model-None", lambda i, t: api.undo_surgery(None, out=t / "o"), "edited_model"),
    ("undo_surgery-out-int", lambda i, t: api.undo_surgery(i.ft1, out=5), "out"),
    ("train_probe-features_path-int", lambda i, t: api.train_probe(5, out=t / "p.safetensors"), "features_path"),
    ("train_probe-out-None", _train(out=None), "out"),
    ("train_probe-holdout-str", _train(holdout="x"), "holdout"),
    ("train_probe-holdout-None", _train(holdout=None), "holdout"),
    ("train_probe-seed-negative", _train(seed=-1), "seed"),
    ("collect_features-model_dir-int",
     lambda i, t: api.collect_features(5, ["a"], ["b"], t / "f.safetensors"), "model_dir"),
    ("collect_features-pos_texts-None",
     lambda i, t: api.collect_features(i.ft1, None, ["b"], t / "f.safetensors"), "pos_texts"),
    ("collect_features-neg_texts-ints",
     lambda i, t: api.collect_features(i.ft1, ["a"], [1], t / "f.safetensors"), "neg_texts[0]"),
    ("collect_features-out-int", lambda i, t: api.collect_features(i.ft1, ["a"], ["b"], 5), "out"),
    ("collect_features-device-None",
     lambda i, t: api.collect_features(i.ft1, ["a"], ["b"], t / "f.safetensors", device=None), "device"),
    ("collect_features-batch_size-str",
     lambda i, t: api.collect_features(i.ft1, ["a"], ["b"], t / "f.safetensors", batch_size="8"), "batch_size"),
    # registry and demo
    ("get_method-name-list", lambda i, t: api.get_method(["ties"]), "name"),
    ("method_aliases-name-None", lambda i, t: api.method_aliases(None), "name"),
    ("run_demo-folder-int", lambda i, t: api.run_demo(5), "folder"),
    ("run_demo-report-str", lambda i, t: api.run_demo(t / "demo", report="print"), "report"),
    # on/off switches: True or False only ("false" is truthy, 1 is a slip)
    ("merge-force-str", _merge(force="false"), "force"),
    ("merge-progress-int", _merge(progress=1), "progress"),
    ("run_recipe-force-str", _run(force="false"), "force"),
    ("run_recipe-allow_bin-str", _run(allow_bin="no"), "allow_bin"),
    ("run_recipe-resume-str", _run(resume="no"), "resume"),
    ("run_recipe-require_output-None", _run(require_output=None), "require_output"),
    ("dry_run-force-str", _dry(force="false"), "force"),
    ("dry_run-allow_bin-int", _dry(allow_bin=1), "allow_bin"),
    ("dry_run-require_output-str", _dry(require_output="yes"), "require_output"),
    ("inspect-allow_bin-str", lambda i, t: api.inspect(i.base, allow_bin="no"), "allow_bin"),
    ("patch-force-str", _patch(force="false"), "force"),
    ("patch-as_adapter-str", _patch(as_adapter="no"), "as_adapter"),
    ("patch-allow_vocab_growth-str", _patch(allow_vocab_growth="no"), "allow_vocab_growth"),
    ("extract-full_tensors-str", _extract(full_tensors="no"), "full_tensors"),
    ("surgery-allow_pt-str", _surgery(allow_pt="no"), "allow_pt"),
    ("surgery-progress-str", _surgery(progress="no"), "progress"),
    ("undo_surgery-force-str", lambda i, t: api.undo_surgery(i.ft1, out=t / "o", force="false"), "force"),
    ("train_probe-force-str", _train(force="false"), "force"),
    ("mos_merge-force-str", lambda i, t: api.mos_merge(i.bank, out=t / "m.safetensors", force="false"), "force"),
    ("bank_export-force-int", lambda i, t: api.bank_export(i.bank, "t0", t / "o", force=0), "force"),
    ("retrieve-ensemble-str", _retrieve(ensemble="no"), "ensemble"),
]


@pytest.mark.parametrize(("call", "argument"), [pytest.param(c, a, id=i) for i, c, a in CASES])
def test_wrong_argument_is_a_usage_error_naming_it(inputs: Inputs, tmp_path: Path, call: Call, argument: str) -> None:
    with pytest.raises(UsageError, match=rf"(?<![\w\[]){re.escape(argument)}(?![\w\[])") as info:
        call(inputs, tmp_path)
    assert "\n" not in str(info.value)  # one line, as the CLI prints it
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_unknown_keyword_names_the_public_function(inputs: Inputs) -> None:
    with pytest.raises(UsageError, match=r"^dry_run\(\) got an unknown argument 'bogus'"):
        api.dry_run(inputs.recipe, bogus=1)


def test_wrong_keyword_of_a_fixed_signature_stays_pythons_error(inputs: Inputs, tmp_path: Path) -> None:
    """patch takes no **kwargs: Python's own TypeError already names patch and the keyword."""
    with pytest.raises(TypeError, match=r"patch\(\) got an unexpected keyword argument 'scale'"):
        api.patch(base=inputs.base, delta=inputs.lora, out=tmp_path / "o", scale=2.0)


def test_torch_dtype_is_accepted_by_name(inputs: Inputs) -> None:
    state = api.merge("linear", models=[inputs.ft1, inputs.ft2], dtype=torch.float16)
    assert isinstance(state, dict)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float16}
    plan = api.plan_recipe(inputs.recipe, dtype=torch.bfloat16)
    assert {o.dtype for o in plan.outputs if o.dtype.startswith(("F", "BF"))} == {"BF16"}


def test_accepted_forms_still_work(inputs: Inputs, tmp_path: Path) -> None:
    """Tuples of Paths, a torch.device, a size string and integer seeds all pass."""
    out = api.merge("dare_ties", base=Path(inputs.base), models=(Path(inputs.ft1), Path(inputs.ft2)),
                    parameters={"density": 0.5}, model_parameters=({"weight": 0.5}, {"weight": 0.5}),
                    out=tmp_path / "m", device=torch.device("cpu"), shard_size="1MB", seed=0)
    assert Path(out).samefile(tmp_path / "m")
    plan = api.plan_recipe(inputs.recipe, shard_size="4kB", seed=3, device=torch.device("cpu"))
    assert (plan.shard_size, plan.seed, plan.device) == (4000, 3, torch.device("cpu"))


WRAPPED = ["get_method", "method_aliases", "run_demo", "patch", "extract", "hadamard_to_multiplier", "hadamard_apply",
           "hadamard_to_delta", "bank_add", "bank_list", "bank_export",
           "bank_set_prototypes", "mos_merge", "retrieve", "surgery", "undo_surgery", "train_probe",
           "collect_features", "compare_predictions"]


@pytest.mark.parametrize("name", WRAPPED)
def test_checked_functions_keep_their_signature_and_docs(name: str) -> None:
    fn = getattr(api, name)
    original = fn.__wrapped__
    assert inspect.signature(fn) == inspect.signature(original)
    assert fn.__doc__ == original.__doc__ and fn.__name__ == original.__name__
    # every check names a real parameter (a renamed one would silently go unchecked)
    assert set(fn.checked_arguments) <= set(inspect.signature(original).parameters)


def test_every_public_function_is_covered() -> None:
    """A new public function gets a case here (or is argument-free)."""
    covered = {case_id.split("-")[0] for case_id, _, _ in CASES}
    callables = {n for n in api.__all__ if callable(getattr(api, n))}
    assert callables - covered == {"all_methods"}


def test_force_as_a_string_leaves_an_existing_output_alone(inputs: Inputs, tmp_path: Path) -> None:
    """force="false" was truthy and replaced the directory; now it is refused before anything."""
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(UsageError, match="force must be True or False"):
        api.run_recipe(inputs.recipe, out=out, force="false")
    assert (out / "precious.txt").read_text() == "x"


def test_home_relative_paths_are_expanded_everywhere(inputs: Inputs, tmp_path: Path, monkeypatch) -> None:
    """merge(out=), bank_add, mos_merge(out=) and bank_export(out=) wrote into a literal ./~ folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/")  # inputs too: a model given as ~/… from the root
    out = api.merge("linear", models=["~" + inputs.ft1, inputs.ft2], out=f"~{tmp_path}/m")
    assert Path(out) == tmp_path / "m" and (tmp_path / "m" / "config.json").is_file()
    monkeypatch.setenv("HOME", str(tmp_path))
    api.bank_add("~/bank.safetensors", "t0", inputs.lora)
    api.mos_merge("~/bank.safetensors", out="~/mos")
    api.bank_export("~/bank.safetensors", "t0", "~/exported")
    assert {p.name for p in tmp_path.iterdir()} == {"m", "bank.safetensors", "mos", "exported"}


def test_numpy_numbers_are_taken_as_python_numbers(inputs: Inputs, tmp_path: Path) -> None:
    """np.int64 ranks and np.float32 alphas were refused by some functions and taken by others
    (extract then failed writing its JSON report); recipes refused np.float32 weights."""
    np = pytest.importorskip("numpy")
    res = api.extract(model=inputs.ft1, base=inputs.base, rank=np.int64(2), out=tmp_path / "l")
    assert res.output is not None and (tmp_path / "l" / "adapter_model.safetensors").is_file()
    api.extract(model=inputs.ft1, base=inputs.base, energy=np.float32(0.9), out=tmp_path / "l2")
    api.surgery(inputs.base, inputs.probe, alpha=np.float32(0.5), top_k=np.int64(2), out=tmp_path / "s")
    api.mos_merge(inputs.bank, momentum=np.float32(0.2), out=tmp_path / "b.safetensors")
    api.patch(inputs.base, inputs.lora, lam=np.float32(0.5), out=tmp_path / "p")
    recipe = {**inputs.recipe, "steps": [{"method": "linear", "models": ["a", "b"],
                                          "parameters": {"weight": {"a": np.float32(0.25), "b": np.int64(3)}}}]}
    result = api.run_recipe(recipe, seed=np.int64(3), threads=np.int64(1))
    assert result.state_dict is not None
    want = api.run_recipe({**inputs.recipe, "steps": [{"method": "linear", "models": ["a", "b"],
                                                       "parameters": {"weight": {"a": 0.25, "b": 3}}}]})
    assert all(torch.equal(result.state_dict[k], want.state_dict[k]) for k in want.state_dict)
    with pytest.raises(UsageError, match="momentum must be a number in \\[0, 1\\], got 1.5"):
        api.mos_merge(inputs.bank, momentum=1.5)
