"""The recipe engine end to end: chains, mergekit recipes, dry-run accounting, bounded memory."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import force_direct_io, leftovers, load_dir
from mergekit_lite.cli.main import app
from typer.testing import CliRunner

import mergekit_lite as mlite
from mergekit_lite.engine.plan import build_plan
from mergekit_lite.engine.run import PREFETCH_DEPTH, execute
from mergekit_lite.errors import CheckpointError, UsageError
from mergekit_lite.recipe.model import load_recipe
from mergekit_lite.synthetic import LlamaShape, build_model_set, make_base, make_finetune, save_checkpoint

runner = CliRunner()


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _ta(base, models, lam):
    return base + lam * sum(m - base for m in models)


def test_two_step_chain_equals_separate_steps(tmp_path, model_set):
    ms = model_set
    other_base = save_checkpoint(make_finetune(make_base(ms.shape), seed=99, kind="dense"),
                                 tmp_path / "other", shape=ms.shape, num_shards=2)
    inputs = {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1]), "other": str(other_base)}
    step1 = {"id": "t", "method": "ties", "base": "base", "models": ["a", "b"], "parameters": {"density": 0.5}}
    step2 = {"id": "ta", "method": "task_arithmetic", "base": "other", "models": ["t"], "parameters": {"lambda": 0.5}}
    chain = _write(tmp_path / "chain.yaml", {"inputs": inputs, "steps": [step1, step2],
                                              "output": {"path": str(tmp_path / "chain_out")}})
    assert runner.invoke(app, ["merge", str(chain)]).exit_code == 0

    first = _write(tmp_path / "first.yaml", {"inputs": inputs, "steps": [step1],
                                              "output": {"path": str(tmp_path / "inter")}})
    assert runner.invoke(app, ["merge", str(first)]).exit_code == 0
    second_inputs = {"other": str(other_base), "t": str(tmp_path / "inter")}
    second = _write(tmp_path / "second.yaml", {"inputs": second_inputs, "steps": [step2],
                                                "output": {"path": str(tmp_path / "sep_out")}})
    assert runner.invoke(app, ["merge", str(second)]).exit_code == 0

    chained, separate = load_dir(tmp_path / "chain_out"), load_dir(tmp_path / "sep_out")
    assert chained.keys() == separate.keys()
    for k in chained:  # fp32 checkpoints: the intermediate round trip is lossless
        assert torch.equal(chained[k], separate[k]), k


def test_chain_values_by_hand(tmp_path, model_set):
    ms = model_set
    state = mlite.run_recipe({
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [
            {"id": "avg", "method": "linear", "models": ["a", "b"]},
            {"id": "ta", "method": "task_arithmetic", "base": "base", "models": ["avg"], "parameters": {"lambda": 2.0}},
        ],
    }).state_dict
    base, a, b = (load_dir(p) for p in (ms.base, ms.finetunes[0], ms.finetunes[1]))
    for k, v in state.items():
        want = _ta(base[k], [(a[k] + b[k]) / 2], 2.0)
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6)


def test_a_checkpoint_feeding_two_steps_reaches_both_intact(tmp_path, model_set):
    """Methods may overwrite the model tensors the engine hands them only when nothing reads
    those tensors afterwards; `a` here feeds both steps and `base` is the base and a model."""
    ms = model_set
    state = mlite.run_recipe({
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [
            {"id": "t1", "method": "task_arithmetic", "base": "base", "models": ["a", "b"],
             "parameters": {"weight": 0.5}},
            {"id": "t2", "method": "linear", "models": ["t1", "a", "base"]},
        ],
    }).state_dict
    base, a, b = (load_dir(p) for p in (ms.base, ms.finetunes[0], ms.finetunes[1]))
    for k, v in state.items():
        t1 = _ta(base[k], [a[k], b[k]], 0.5)
        torch.testing.assert_close(v, (t1 + a[k] + base[k]) / 3, rtol=1e-6, atol=1e-6)


def _as_bin(src: Path, dest: Path) -> Path:
    """A copy of checkpoint `src` as a single pickle `.bin` file in `dest`."""
    dest.mkdir()
    torch.save(load_dir(src), dest / "pytorch_model.bin")
    return dest


def test_the_recipe_option_alone_admits_a_bin_input(tmp_path, model_set):
    ft = _as_bin(model_set.finetunes[0], tmp_path / "ft_bin")
    recipe = {"inputs": {"base": str(model_set.base), "a": str(ft)},
              "steps": [{"id": "t", "method": "task_arithmetic", "base": "base", "models": ["a"]}],
              "output": {"path": str(tmp_path / "out")}}
    refused = runner.invoke(app, ["merge", str(_write(tmp_path / "no.yaml", recipe))])
    assert refused.exit_code == 4 and "allow-bin" in refused.output
    recipe["options"] = {"allow_bin": True}
    assert runner.invoke(app, ["merge", str(_write(tmp_path / "yes.yaml", recipe))]).exit_code == 0
    torch.testing.assert_close(load_dir(tmp_path / "out")["model.norm.weight"],
                               load_dir(model_set.finetunes[0])["model.norm.weight"], rtol=1e-6, atol=1e-6)


def test_a_bin_checkpoint_survives_methods_that_compute_in_their_inputs(tmp_path, model_set):
    """A `.bin` input is held whole in memory; a plan run twice must see it unchanged."""
    ms = model_set
    ft = _as_bin(ms.finetunes[0], tmp_path / "ft_bin")
    plan = build_plan(load_recipe({
        "inputs": {"base": str(ms.base), "a": str(ft), "b": str(ms.finetunes[1])},
        "steps": [{"id": "t", "method": "task_arithmetic", "base": "base", "models": ["a", "b"],
                   "parameters": {"weight": 0.5}}],
        "options": {"allow_bin": True},  # the recipe's own opt-in, without build_plan's flag
    }))
    first, second = (execute(plan, progress=False).state_dict for _ in range(2))
    base, a, b = (load_dir(p) for p in (ms.base, ms.finetunes[0], ms.finetunes[1]))
    for k, v in first.items():
        assert torch.equal(v, second[k]), k
        torch.testing.assert_close(v, _ta(base[k], [a[k], b[k]], 0.5), rtol=1e-6, atol=1e-6)


def test_models_are_disposable_only_when_used_once_and_unwatched(model_set):
    from mergekit_lite.engine.run import _Evaluator
    from mergekit_lite.engine.stream import Bundle

    ms = model_set
    inputs = {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])}
    single = build_plan(load_recipe({"inputs": inputs, "steps": [
        {"id": "t", "method": "task_arithmetic", "base": "base", "models": ["a", "b"]}]}))
    shared = build_plan(load_recipe({"inputs": inputs, "steps": [
        {"id": "t1", "method": "task_arithmetic", "base": "base", "models": ["a", "b"]},
        {"id": "t2", "method": "task_arithmetic", "base": "base", "models": ["t1"]},
        {"id": "t3", "method": "linear", "models": ["t2", "b"]}]}))
    name = single.outputs[0].name
    assert _Evaluator(single, {}, None)._disposable(single.steps["t"], Bundle(name))
    assert not _Evaluator(single, {}, lambda *a: None)._disposable(single.steps["t"], Bundle(name))
    ev = _Evaluator(shared, {}, None)
    # t1: b is read again by t3; t2 and t3: a step's result is not a private copy
    assert not any(ev._disposable(st, Bundle(name)) for st in shared.steps.values())


def test_mergekit_single_step_recipe_runs_unchanged(tmp_path, model_set):
    ms = model_set
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(f"""
merge_method: ties
base_model: {ms.base}
models:
  - model: {ms.finetunes[0]}
    parameters:
      density: 0.5
      weight: 0.7
  - model: {ms.finetunes[1]}
    parameters:
      density: 0.3
      weight: 0.3
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
""")
    res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = load_dir(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    base = load_dir(ms.base)
    assert set(out) == set(base)
    assert any(not torch.equal(out[k], base[k].to(torch.bfloat16)) for k in out)


def test_dry_run_json_counts_equal_real_run(tmp_path, model_set):
    ms = model_set
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{"id": "m", "method": "task_arithmetic", "base": "base", "models": ["a", "b"]}],
        "output": {"path": str(tmp_path / "out"), "shard_size": "2000"},
    })
    dry = runner.invoke(app, ["merge", str(recipe), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert not (tmp_path / "out").exists()
    real = runner.invoke(app, ["merge", str(recipe), "--json"])
    assert real.exit_code == 0, real.output
    done = json.loads(real.stdout)
    assert plan["bytes_read"] == done["bytes_read"]
    assert plan["bytes_written"] == done["bytes_written"]
    on_disk = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert on_disk == done["bytes_written"]
    assert len(plan["output_shards"]) == len(list((tmp_path / "out").glob("*.safetensors")))
    assert set(done["cpu_seconds"]) == {"reading", "computing", "writing"}
    assert all(v >= 0 for v in done["cpu_seconds"].values())
    text = runner.invoke(app, ["merge", str(recipe), "--force"])
    assert text.exit_code == 0, text.output
    assert re.search(r"^CPU time: reading [0-9.]+ s · computing [0-9.]+ s · writing [0-9.]+ s$", text.stdout, re.M)


@pytest.mark.parametrize("step", [
    {"method": "ties", "parameters": {"density": 0.5}},  # big tensors: per-tensor statistics passes
    {"method": "breadcrumbs", "parameters": {"density": 0.5, "gamma": 0.1}},
    {"method": "pcb", "parameters": {"ratio": 0.3}},  # task vectors fit the budget: one pass
    {"method": "pcb", "parameters": {"ratio": 0.3, "memory_budget": 0}},  # four streaming passes
    # tensor scope: a big tensor's task vectors fit the budget, one statistics pass (the dry run
    # counted four, the count without the cache); without a budget, four per tensor
    {"method": "pcb", "parameters": {"ratio": 0.3, "scope": "tensor"}},
    {"method": "pcb", "parameters": {"ratio": 0.3, "scope": "tensor", "memory_budget": 0}},
    {"method": "model_stock"},  # big tensors: a pass for their cosines
    {"method": "della", "parameters": {"density": 0.5, "epsilon": 0.1, "rescale": "l1"}},  # ... their L1 norms
    {"method": "slerp", "base": None, "parameters": {"t": 0.3}},  # big tensors: a pass for their angle
    {"method": "karcher", "base": None},  # big tensors: a pass for their Gram matrix
    {"method": "ramplus_tl", "parameters": {"r": 0.5}},  # big tensors: a pass for their shared/unique counts
])
def test_dry_run_bytes_equal_real_run_with_statistics(tmp_path, model_set, monkeypatch, step):
    from mergekit_lite.engine import stream

    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 64)  # every matrix is "big": blocks after statistics
    ms = model_set
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{k: v for k, v in {"id": "m", "base": "base", "models": ["a", "b"], **step}.items() if v is not None}],
        "output": {"path": str(tmp_path / "out")},
    })
    dry = runner.invoke(app, ["merge", str(recipe), "--dry-run", "--json"])
    real = runner.invoke(app, ["merge", str(recipe), "--json"])
    assert dry.exit_code == 0 and real.exit_code == 0, dry.output + real.output
    planned, done = json.loads(dry.stdout), json.loads(real.stdout)
    assert planned["bytes_read"] == done["bytes_read"], (planned["passes"], done["passes"])
    # kind by kind too: per-tensor statistics are listed apart from the output pass in both (the
    # run lists each statistics pass of a global step, the dry run their count)
    def by_kind(passes: list[dict]) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for p in passes:
            out[p["step"], p["kind"]] = out.get((p["step"], p["kind"]), 0) + p["bytes_read"]
        return out

    assert by_kind(planned["passes"]) == by_kind(done["passes"])


def test_dry_run_peak_estimate_follows_what_streams(tmp_path, model_set, monkeypatch):
    """The estimate sizes the largest piece a run holds at once: a row block where the chain
    streams, the whole tensor where it cannot. (It took the largest tensor whole for every
    method: 12 GB for a task-arithmetic merge that peaks at 0.3 GB, and 74 kB for a tiny model
    whose process takes 250 MB.)"""
    from mergekit_lite.engine import stream
    from mergekit_lite.engine.estimate import RUNTIME_BYTES
    from mergekit_lite.engine.run import PREFETCH_DEPTH

    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)  # blocks of 6 rows of 16 (96 entries); whole up to 800
    ms = model_set
    inputs = {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])}

    def estimate(step: dict) -> int:
        recipe = _write(tmp_path / "r.yaml", {"inputs": inputs, "steps": [{"id": "m", **step}],
                                              "output": {"path": str(tmp_path / "out")}})
        res = runner.invoke(app, ["merge", str(recipe), "--dry-run", "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["peak_memory_estimate"]

    def expected(unit: int, inputs: int) -> int:
        return RUNTIME_BYTES + unit * 4 * (inputs + 2) * (PREFETCH_DEPTH + 1)

    # row-local: every matrix in blocks of 96 entries; base + 2 models + the output's own
    assert estimate({"method": "task_arithmetic", "base": "base", "models": ["a", "b"]}) == expected(96, 4)
    # slerp: the 1024-entry embedding and head stream after their sums; a 512-entry MLP weight is whole
    assert estimate({"method": "slerp", "models": ["a", "b"]}) == expected(512, 3)


def test_cpu_time_is_split_by_thread_role(tmp_path, model_set, monkeypatch):
    """The reader's and writer's CPU are counted apart from the rest, and the parts add up."""
    import time

    from mergekit_lite.engine import stream

    ms = model_set
    recipe = load_recipe({
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{"id": "m", "method": "ties", "base": "base", "models": ["a", "b"]}],
        "output": {"path": str(tmp_path / "out")},
    })

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    # Burn a known amount of CPU in each role: 0.2 s per tensor loaded and per tensor written.
    real_write = stream.BackgroundWriter.__init__

    def slow_writer(self, write, depth=2, clock=None):
        def write_and_spin(*args):
            spin(0.02)
            write(*args)
        real_write(self, write_and_spin, depth, clock)

    real_prefetch = stream.prefetch

    def slow_prefetch(items, load, depth, live, clock=None):
        def load_and_spin(item):
            spin(0.02)
            return load(item)
        return real_prefetch(items, load_and_spin, depth, live, clock)

    from mergekit_lite.engine import run as engine_run

    monkeypatch.setattr(engine_run.BackgroundWriter, "__init__", slow_writer)
    monkeypatch.setattr(engine_run, "prefetch", slow_prefetch)
    cpu0 = time.process_time()
    result = execute(build_plan(recipe), progress=False)
    total = time.process_time() - cpu0
    cpu = result.cpu_seconds
    assert cpu["reading"] >= 0.02 * result.tensors
    assert cpu["writing"] >= 0.02 * result.tensors
    assert 0 <= cpu["computing"] <= total
    assert sum(cpu.values()) <= total + 0.05


def test_memory_is_a_bounded_number_of_tensors(tmp_path):
    shape = LlamaShape(num_hidden_layers=6)
    base = make_base(shape)
    paths = [save_checkpoint(base, tmp_path / "base", shape=shape, num_shards=20)]
    for i in range(3):
        paths.append(save_checkpoint(make_finetune(base, seed=i), tmp_path / f"ft{i}", shape=shape, num_shards=20))
    recipe = load_recipe({
        "inputs": {"base": str(paths[0]), **{f"m{i}": str(p) for i, p in enumerate(paths[1:])}},
        "steps": [{"id": "x", "method": "ties", "base": "base", "models": ["m0", "m1", "m2"]}],
        "output": {"path": str(tmp_path / "out")},
    })
    result = execute(build_plan(recipe), progress=False)
    n_inputs = 4
    assert result.tensors == len(shape.tensor_shapes())
    # inputs of at most PREFETCH_DEPTH queued names + the one being computed + one being handed over
    assert 0 < result.max_live_tensors <= n_inputs * (PREFETCH_DEPTH + 2)
    assert result.max_live_tensors < n_inputs * result.tensors // 4


def test_non_float_tensors_are_copied_from_base(tmp_path):
    shape = LlamaShape()
    base = make_base(shape)
    base["model.position_ids"] = torch.arange(10)
    ft = make_finetune(base, seed=1)
    ft["model.position_ids"] = torch.arange(10) * 7
    b = save_checkpoint(base, tmp_path / "b", shape=shape)
    f = save_checkpoint(ft, tmp_path / "f", shape=shape)
    state = mlite.merge("task_arithmetic", base=b, models=[f])
    assert torch.equal(state["model.position_ids"], torch.arange(10))
    assert state["model.position_ids"].dtype == torch.int64


def test_output_keeps_base_dtype_and_config(tmp_path, bf16_model_set):
    ms = bf16_model_set
    out = mlite.merge("linear", models=list(ms.finetunes), out=tmp_path / "o")
    state = load_dir(out)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "mergekit-lite" in card and "merge" in card and card.startswith("---")


@pytest.mark.parametrize("shape", ["mergekit", "mlite"])
def test_mixed_input_dtypes_without_a_dtype(tmp_path, model_set, bf16_model_set, shape):
    """A bf16 base with float32 fine-tunes and no dtype: a mergekit recipe writes float32, the
    promotion mergekit's own arithmetic leaves (its output had the base's bf16: a bf16 rounding
    of every merged value apart); an mlite recipe keeps the base's dtype, as documented."""
    base, ft = bf16_model_set.base, model_set.finetunes[0]
    if shape == "mergekit":
        spec = {"merge_method": "task_arithmetic", "base_model": str(base),
                "models": [{"model": str(ft), "parameters": {"weight": 0.5}}]}
    else:
        spec = {"inputs": {"base": str(base), "a": str(ft)},
                "steps": [{"id": "m", "method": "task_arithmetic", "base": "base", "models": ["a"],
                           "parameters": {"weight": 0.5}}]}
    res = runner.invoke(app, ["merge", str(_write(tmp_path / "r.yaml", spec)), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    state = load_dir(tmp_path / "o")
    want = torch.float32 if shape == "mergekit" else torch.bfloat16
    assert {v.dtype for v in state.values()} == {want}
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == str(want).split(".")[1]
    name = "model.layers.0.mlp.up_proj.weight"
    b = load_dir(base)[name].float()
    expect = b + (load_dir(ft)[name] - b) * 0.5
    assert torch.equal(state[name], expect.to(want))


def test_checkpoint_errors_exit_4_and_write_nothing(tmp_path, model_set):
    ms = model_set
    other = build_model_set(tmp_path / "wide", shape=LlamaShape(hidden_size=32, intermediate_size=48), n_finetunes=1)
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "w": str(other.finetunes[0])},
        "steps": [{"id": "m", "method": "task_arithmetic", "base": "base", "models": ["a", "w"]}],
        "output": {"path": str(tmp_path / "out")},
    })
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 4
    assert "has shape" in res.output and "model.embed_tokens.weight" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_tensor_is_exit_4(tmp_path, model_set):
    ms = model_set
    ft = load_dir(ms.finetunes[0])
    del ft["model.norm.weight"]
    partial = save_checkpoint(ft, tmp_path / "partial")
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"base": str(ms.base), "p": str(partial)},
        "steps": [{"id": "m", "method": "task_arithmetic", "base": "base", "models": ["p"]}],
        "output": {"path": str(tmp_path / "out")},
    })
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 4 and "'model.norm.weight' is missing" in res.output
    assert not (tmp_path / "out").exists()


def test_truncated_input_via_cli_is_exit_4(tmp_path, model_set):
    shard = sorted(model_set.finetunes[0].glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4)
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"base": str(model_set.base), "a": str(shard.parent)},
        "steps": [{"id": "m", "method": "task_arithmetic", "base": "base", "models": ["a"]}],
        "output": {"path": str(tmp_path / "out")},
    })
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 4 and "truncated" in res.output and shard.name in res.output
    assert len([ln for ln in res.output.strip().splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "out").exists()


def test_non_empty_output_refused_via_cli(tmp_path, model_set):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}],
        "output": {"path": str(out)},
    })
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 2 and "not empty" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["x"] and leftovers(tmp_path) == []
    # a dry run says what the run would: refused without --force, planned with it
    assert runner.invoke(app, ["merge", str(recipe), "--dry-run"]).exit_code == 2
    assert runner.invoke(app, ["merge", str(recipe), "--dry-run", "--force"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["x"]
    assert runner.invoke(app, ["merge", str(recipe), "--force"]).exit_code == 0
    assert (out / "model.safetensors").is_file() and not (out / "x").exists()


def test_force_never_replaces_an_input(tmp_path, model_set):
    """Publishing replaces the output directory: an output that is, or holds, an input is refused."""
    a, b = model_set.finetunes[0], model_set.finetunes[1]
    before = {p: p.read_bytes() for d in (a, b) for p in sorted(d.iterdir())}
    recipe = {"inputs": {"a": str(a), "b": str(b)}, "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}]}
    for out in (a, a.parent, tmp_path):  # the input itself, its parent, a grandparent
        res = runner.invoke(app, ["merge", str(_write(tmp_path / "r.yaml", recipe)), "--out", str(out), "--force"])
        assert res.exit_code == 2 and "holds input file" in res.output and str(out) in res.output, res.output
    saving = {**recipe, "steps": [{**recipe["steps"][0], "save": str(b)}, {"id": "n", "method": "linear", "models": ["m"]}],
              "output": {"path": str(tmp_path / "o")}}
    res = runner.invoke(app, ["merge", str(_write(tmp_path / "r.yaml", saving)), "--force"])
    assert res.exit_code == 2 and "holds input file" in res.output, res.output
    assert {p: p.read_bytes() for d in (a, b) for p in sorted(d.iterdir())} == before


def test_force_never_replaces_the_recipe_or_its_folder(tmp_path, model_set, monkeypatch):
    """`--out .` beside the recipe, or an empty output path, replaced the recipe's folder (the recipe
    and every file kept there) with the merged model, exit 0."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    recipe = {"inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
              "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}], "output": {"path": "out"}}
    path = _write(work / "r.yaml", recipe)
    monkeypatch.chdir(work)
    for out in (".", "sub/..", str(tmp_path)):
        res = runner.invoke(app, ["merge", str(path), "--out", out, "--force"])
        assert res.exit_code == 2 and "holds input file" in res.output and "r.yaml" in res.output, res.output
        res = runner.invoke(app, ["merge", str(path), "--out", out, "--force", "--dry-run"])  # as the run would
        assert res.exit_code == 2 and "holds input file" in res.output, res.output
    res = runner.invoke(app, ["merge", str(_write(work / "e.yaml", {**recipe, "output": {"path": ""}})), "--force"])
    assert res.exit_code == 3 and "e.yaml:" in res.output and "output.path is empty" in res.output, res.output
    assert sorted(p.name for p in work.iterdir()) == ["e.yaml", "notes.txt", "r.yaml", "sub"]
    # an output below a file, and a step saved where the output goes, are refused before any work
    res = runner.invoke(app, ["merge", str(path), "--out", str(work / "notes.txt" / "o")])
    assert res.exit_code == 2 and "notes.txt is a file, not a directory" in res.output, res.output
    two = {**recipe, "steps": [{**recipe["steps"][0], "save": str(tmp_path / "o")},
                               {"id": "n", "method": "linear", "models": ["m", "a"]}], "output": {"path": str(tmp_path / "o")}}
    res = runner.invoke(app, ["merge", str(_write(work / "s.yaml", two))])
    assert res.exit_code == 3 and "s.yaml" in res.output and "written twice" in res.output, res.output


def test_system_refusals_are_one_line(tmp_path, model_set, monkeypatch):
    import errno
    import os

    from mergekit_lite.io import writer

    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}],
    })
    full = tmp_path / "full" / "model.safetensors"
    real_write = writer.CheckpointWriter.write

    def fails_after_two(code: int):
        calls = {"n": 0}

        def write(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(code, os.strerror(code), str(full))
            return real_write(self, *args, **kwargs)

        return write

    with monkeypatch.context() as m:  # a disk error while writing: exit 6, the file named, nothing left
        m.setattr(writer.CheckpointWriter, "write", fails_after_two(errno.EIO))
        res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "full")])
    assert res.exit_code == 6 and res.output.strip() == f"error: {full}: {os.strerror(errno.EIO)}", res.output
    partial = tmp_path / ".full.mlite-partial"
    assert not (tmp_path / "full").exists() and not partial.exists() and leftovers(tmp_path) == []
    with monkeypatch.context() as m:  # a disk that fills up: the same, but the work is kept for --resume
        m.setattr(writer.CheckpointWriter, "write", fails_after_two(errno.ENOSPC))
        res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "full")])
    assert res.exit_code == 6 and " ".join(res.output.split()) == (
        f"error: {full}: No space left on device; the work so far is kept in {partial}: free space, then "
        "`mlite merge --resume` (same arguments) continues it"), res.output
    assert not (tmp_path / "full").exists() and partial.is_dir()
    res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "full"), "--resume"])
    assert res.exit_code == 0 and "resumed: 2 tensors" in res.output, res.output
    assert runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "clean")]).exit_code == 0
    got, want = load_dir(tmp_path / "full"), load_dir(tmp_path / "clean")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # an output folder that cannot be written is refused before any work (exit 2)
    monkeypatch.setattr(writer.os, "access", lambda path, mode: not mode & os.W_OK)  # as if read-only
    res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "ro" / "out")])
    assert res.exit_code == 2 and f"{tmp_path} is not writable" in res.output, res.output


@pytest.mark.parametrize(("device", "needle"), [
    ("mps", "device 'mps' is not supported"),
    ("cuda:7", "CUDA"),
    ("xla", "unknown device 'xla'"),
])
def test_unavailable_devices_are_one_line_exit_2(tmp_path, model_set, device, needle):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}],
    })
    res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out"), "--device", device])
    assert res.exit_code == 2 and needle in res.output and res.output.count("\n") == 1, res.output


def test_della_probability_range_fails_before_any_tensor_is_read(tmp_path, model_set):
    ms = model_set
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0])},
        "steps": [{"id": "d", "method": "della", "base": "base", "models": ["a"],
                   "parameters": {"density": 0.1, "epsilon": 0.2}}],
    })
    for extra in (["--dry-run"], []):
        res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out"), *extra])
        assert res.exit_code == 3, res.output
        assert f"{recipe}:5: step 'd' (della), tensor " in res.output and "density ± epsilon must lie in (0, 1]" in res.output
    assert not (tmp_path / "out").exists()


def test_global_ties_with_per_tensor_density_fails_before_the_run(tmp_path, model_set):
    ms = model_set
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{"id": "t", "method": "ties", "base": "base", "models": ["a", "b"],
                   "parameters": {"scope": "global", "density": [{"match": "*.mlp.*", "value": 0.3}, {"value": 0.5}]}}],
    })
    res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 3, res.output
    assert f"{recipe}:6: step 't': ties: with scope: global, density must be the same for every tensor" in res.output


def test_api_refuses_what_the_cli_refuses(tmp_path, model_set):
    from mergekit_lite.errors import UsageError

    recipe = {"inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
              "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}]}
    for threads in (0, -3, 1.5, True):
        with pytest.raises(UsageError, match="threads must be a positive integer"):
            mlite.run_recipe(recipe, threads=threads)
    with pytest.raises(UsageError, match="alpha must be a finite number"):
        mlite.api.surgery(model_set.base, "probe.safetensors", alpha="1")


def test_save_on_the_output_step_is_refused(tmp_path, model_set):
    """The output step goes to output.path; a save: there would silently take its place."""
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "b"], "save": str(tmp_path / "copy")}],
    })
    res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 3 and "step 'm' is the output step" in res.output, res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "copy").exists()


def test_one_checkpoint_under_two_names_is_refused(tmp_path, model_set):
    a = model_set.finetunes[0]
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"a": str(a), "b": str(tmp_path / ".." / tmp_path.name / a.relative_to(tmp_path)),
                   "c": str(model_set.finetunes[1])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "c", "b"]}],
    })
    res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 3 and "inputs 'a' and 'b' are the same checkpoint" in res.output, res.output
    assert re.match(rf"error: {re.escape(str(recipe))}:\d+: step 'm': inputs", res.output), res.output  # the step's line


def test_tied_and_untied_models_merge_as_mergekit_merges_them(tmp_path):
    """A tied model's lm_head is its input embedding; a tied reference merged with an untied
    model gets an lm_head of its own (and an untied config)."""
    untied, tied = LlamaShape(), LlamaShape(tie_word_embeddings=True)
    paths = {}
    for name, shape, seed in (("u0", untied, 1), ("u1", untied, 2), ("t0", tied, 3), ("t1", tied, 4)):
        paths[name] = save_checkpoint(make_base(shape, seed=seed), tmp_path / name, shape=shape)
    ck = {n: mlite.io.checkpoint.open_checkpoint(p) for n, p in paths.items()}
    head, emb = "lm_head.weight", "model.embed_tokens.weight"
    for first, second in (("u0", "t1"), ("t0", "u1")):
        recipe = _write(tmp_path / "r.yaml", {
            "inputs": {"a": str(paths[first]), "b": str(paths[second])},
            "steps": [{"id": "m", "method": "linear", "models": ["a", "b"], "parameters": {"weight": {"a": 0.25, "b": 0.75}}}],
        })
        out = tmp_path / f"out-{first}"
        res = runner.invoke(app, ["merge", str(recipe), "--out", str(out)])
        assert res.exit_code == 0, res.output
        got = load_dir(out)
        want_head = 0.25 * ck[first].load(head) + 0.75 * ck[second].load(head)
        torch.testing.assert_close(got[head], want_head)
        torch.testing.assert_close(got[emb], 0.25 * ck[first].load(emb) + 0.75 * ck[second].load(emb))
        config = json.loads((out / "config.json").read_text())
        assert config["tie_word_embeddings"] is False


def test_unknown_reference_is_exit_3(tmp_path, model_set):
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"a": str(model_set.finetunes[0])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "nope"]}],
        "output": {"path": str(tmp_path / "out")},
    })
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 3 and "nope" in res.output
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_needs_option(tmp_path):
    small, big = LlamaShape(vocab_size=64), LlamaShape(vocab_size=72)
    base = make_base(big)
    b = save_checkpoint(base, tmp_path / "b", shape=big)
    ft_small = make_finetune(make_base(small), seed=2)
    s = save_checkpoint(ft_small, tmp_path / "s", shape=small)
    rec = {"inputs": {"b": str(b), "s": str(s)},
           "steps": [{"id": "m", "method": "task_arithmetic", "base": "b", "models": ["s"]}]}
    with pytest.raises(CheckpointError, match="vocab"):
        mlite.run_recipe(rec)
    state = mlite.run_recipe({**rec, "options": {"vocab": "shared"}}).state_dict
    emb = "model.embed_tokens.weight"
    want = base[emb].clone()
    want[:64] = base[emb][:64] + (ft_small[emb] - base[emb][:64])
    torch.testing.assert_close(state[emb], want)
    assert torch.equal(state[emb][64:], base[emb][64:])


def test_vocab_option_shares_rows_of_vocabulary_tensors_only(tmp_path):
    shape = LlamaShape(intermediate_size=32)
    b = save_checkpoint(make_base(shape), tmp_path / "b", shape=shape)
    wide = LlamaShape(intermediate_size=40)  # more MLP rows: another architecture
    w = save_checkpoint(make_base(wide, seed=3), tmp_path / "w", shape=wide)
    rec = {"inputs": {"b": str(b), "w": str(w)}, "options": {"vocab": "shared"},
           "steps": [{"id": "m", "method": "task_arithmetic", "base": "b", "models": ["w"]}]}
    with pytest.raises(CheckpointError) as e:
        mlite.run_recipe(rec)
    assert "up_proj.weight' has shape [40, 16], expected [32, 16]" in str(e.value)
    assert "vocabulary" not in str(e.value)


def test_inspect_table_and_json(model_set):
    res = runner.invoke(app, ["inspect", str(model_set.base)])
    assert res.exit_code == 0 and "embed_tokens" in res.stdout and "parameters" in res.stdout
    res = runner.invoke(app, ["inspect", str(model_set.base), "--json"])
    data = json.loads(res.stdout)
    assert data["tensors"] == len(data["tensor_list"]) and len(data["shards"]) == 3


def test_version_and_methods():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.startswith("mlite ")
    res = runner.invoke(app, ["methods", "--json"])
    methods = {m["name"]: m for m in json.loads(res.stdout)}
    assert {"linear", "task_arithmetic", "ties", "pcb"} <= methods.keys()
    # the names a recipe may also use are listed
    assert methods["pcb"]["aliases"] == ["pcb_merging"]
    assert {p["name"]: p["aliases"] for p in methods["pcb"]["params"]}["lambda"] == ["scaling_coef"]


def test_demo_runs_every_example(tmp_path):
    res = runner.invoke(app, ["demo", "--dir", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert "demo finished" in res.stdout
    outs = list((tmp_path / "demo" / "out").iterdir())
    assert len(outs) >= 8


def test_row_blocks_give_identical_results(tmp_path, model_set, monkeypatch):
    """Big tensors of elementwise methods are streamed in row blocks; results must not change."""
    from mergekit_lite.engine import stream

    ms = model_set
    recipe = {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{"id": "avg", "method": "linear", "models": ["a", "b"], "parameters": {"weight": {"a": 0.3, "b": 0.7}}},
                  {"id": "ta", "method": "task_arithmetic", "base": "base", "models": ["avg"],
                   "parameters": {"lambda": 1.5}}],
    }
    whole = mlite.run_recipe(recipe).state_dict
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 40)
    seen: list[tuple[str, tuple[int, int] | None]] = []
    blocked = mlite.run_recipe({**recipe, "output": {"path": str(tmp_path / "out")}},
                               tensor_hook=lambda name, job, out: seen.append((name, job.rows)))
    written = load_dir(tmp_path / "out")
    emb_blocks = [rows for name, rows in seen if name == "model.embed_tokens.weight"]
    assert len(emb_blocks) > 4 and all(r is not None for r in emb_blocks)
    assert blocked.max_live_tensors <= 3 * (PREFETCH_DEPTH + 2)
    for k in whole:
        assert torch.equal(whole[k], written[k]), k
    chunked_state = mlite.run_recipe(recipe).state_dict
    for k in whole:
        assert torch.equal(whole[k], chunked_state[k]), k


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"density": 0.3, "scope": "tensor"}),
    ("ties", {"density": 0.3, "scope": "global"}),
    ("dare_ties", {"density": 0.4}),
    ("dare_linear", {"density": 0.6, "rescale": "none"}),
    ("della", {"density": 0.5, "epsilon": 0.2}),
    ("breadcrumbs", {"density": 0.7, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.05}),
    # whole-tensor L1 norms, summed over the blocks first
    ("dare_ties", {"density": 0.4, "rescale": "l1"}),
    ("dare_linear", {"density": 0.6, "rescale": "l1"}),
    ("della", {"density": 0.5, "epsilon": 0.2, "rescale": "l1"}),
    ("della_linear", {"density": 0.5, "epsilon": 0.2, "rescale": "l1"}),
])
def test_row_blocks_equal_whole_tensors(tmp_path, model_set, monkeypatch, method, params):
    """Per-tensor methods stream big tensors in row blocks (per-tensor statistics gathered
    first where needed, position-keyed random draws): the same bits as whole tensors."""
    from mergekit_lite.engine import stream

    ms = model_set
    recipe = {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{"id": "t", "method": method, "base": "base", "models": ["a", "b"],
                   "parameters": {**params, "weight": {"a": 1.0, "b": 0.5}}}],
        "seed": 3,
    }
    whole = mlite.run_recipe(recipe).state_dict
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)
    seen: list[tuple[str, tuple[int, int] | None]] = []
    blocked = mlite.run_recipe(recipe, tensor_hook=lambda name, job, out: seen.append((name, job.rows))).state_dict
    assert sum(1 for n, r in seen if n == "model.embed_tokens.weight" and r is not None) > 4
    for k in whole:
        assert torch.equal(whole[k], blocked[k]), k


@pytest.mark.parametrize("steps", [
    [{"id": "s", "method": "slerp", "models": ["a", "b"], "parameters": {"t": 0.3}}],
    [{"id": "s", "method": "model_stock", "base": "base", "models": ["a", "b", "c"]}],
    [{"id": "s", "method": "karcher", "models": ["a", "b", "c"]}],  # its Gram matrix, then blocks
    [{"id": "s", "method": "ramplus_tl", "base": "base", "models": ["a", "b", "c"]}],  # its counts, then blocks
    [{"id": "s", "method": "model_stock", "base": "base", "models": ["a", "b"], "parameters": {"filter_wise": True}}],
    # six pairs of cosines per row: their mean rounded by the block's height before (blocks of 6 rows, 3 rows)
    [{"id": "s", "method": "model_stock", "base": "base", "models": ["a", "b", "c", "d"],
      "parameters": {"filter_wise": True}}],
    # in a chain: TIES' per-tensor statistics feed slerp's, which feed task arithmetic
    [{"id": "t", "method": "ties", "base": "base", "models": ["a", "b"], "parameters": {"density": 0.4}},
     {"id": "u", "method": "slerp", "models": ["t", "c"], "parameters": {"t": 0.6}},
     {"id": "s", "method": "task_arithmetic", "base": "base", "models": ["u", "a"]}],
])
def test_whole_tensor_angles_stream_in_row_blocks(tmp_path, monkeypatch, steps):
    """slerp's angle and Model Stock's cosines are taken over a whole tensor (or row): a big
    tensor streams in row blocks after a pass that sums over them, in the order the whole
    tensor is summed in, so the bits do not change (these steps held whole tensors and their
    float32 copies: 3.7 GB for slerp and 8.9 GB for model_stock on a 0.55 GB model)."""
    from mergekit_lite.engine import stream
    from mergekit_lite.synthetic import build_model_set

    ms = build_model_set(tmp_path / "four", n_finetunes=4, num_shards=2)
    inputs = {"base": str(ms.base), **{k: str(p) for k, p in zip("abcd", ms.finetunes, strict=True)}}
    recipe = {"inputs": inputs, "steps": steps}
    whole = mlite.run_recipe(recipe).state_dict
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)  # matrices over 800 entries: statistics, then blocks
    monkeypatch.setattr(stream, "WHOLE_TENSOR_BLOCKS", 8)
    seen: list[tuple[str, tuple[int, int] | None]] = []
    blocked = mlite.run_recipe(recipe, tensor_hook=lambda name, job, out: seen.append((name, job.rows))).state_dict
    assert sum(1 for n, r in seen if n == "model.embed_tokens.weight" and r is not None) > 4
    assert [k for k in whole if not torch.equal(whole[k], blocked[k])] == []


@pytest.mark.parametrize("upstream", [
    {"method": "model_stock", "base": "base", "models": ["a", "b"]},
    {"method": "slerp", "models": ["a", "b"], "parameters": {"t": 0.3}},
])
def test_global_statistics_see_whole_tensors_where_a_step_needs_them(tmp_path, model_set, monkeypatch, upstream):
    """A global step's statistics pass streams row blocks only where every step feeding it is
    row-local: model_stock's cosines and slerp's angle are taken over the whole tensor, so
    blocks there gave other statistics, and every output tensor moved."""
    from mergekit_lite.engine import stream

    ms = model_set
    recipe = {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{"id": "u", **upstream},
                  {"id": "g", "method": "ties", "base": "base", "models": ["u", "a"],
                   "parameters": {"density": 0.3, "scope": "global"}}],
    }
    whole = mlite.run_recipe(recipe).state_dict
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)
    blocked = mlite.run_recipe(recipe).state_dict
    assert [k for k in whole if not torch.equal(whole[k], blocked[k])] == []


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.3, "scope": "global"}),
                                                ("pcb", {"scope": "global"})])
def test_global_statistics_with_shared_vocabularies(tmp_path, monkeypatch, method, params):
    """With options.vocab: shared, the statistics count the shared rows of the vocabulary
    tensors once, in blocks or not (row blocks of the base's longer embedding did not line up
    with the trimming)."""
    from mergekit_lite.engine import stream

    small, big = LlamaShape(vocab_size=64), LlamaShape(vocab_size=72)
    b = save_checkpoint(make_base(big), tmp_path / "b", shape=big)
    s = [save_checkpoint(make_finetune(make_base(small), seed=i), tmp_path / f"s{i}", shape=small) for i in (2, 3)]
    recipe = {"inputs": {"b": str(b), "s": str(s[0]), "t": str(s[1])}, "options": {"vocab": "shared"},
              "steps": [{"id": "m", "method": method, "base": "b", "models": ["s", "t"], "parameters": params}]}
    whole = mlite.run_recipe(recipe).state_dict
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)
    blocked = mlite.run_recipe(recipe).state_dict
    assert [k for k in whole if not torch.equal(whole[k], blocked[k])] == []


def test_recipe_errors_via_cli_all_at_once(tmp_path, model_set):
    """Every recipe problem is reported at once, with file:line and key, exit 3, nothing written."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"""inputs:
  base: {model_set.base}
  a: {model_set.finetunes[0]}
steps:
  - id: m
    method: tise
    base: base
    models: [a]
  - id: n
    method: ties
    base: base
    models: [a, ghost]
    parameters:
      densty: 0.5
output:
  path: {tmp_path / "out"}
""")
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 3
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) >= 3
    text = res.output
    assert "bad.yaml:6" in text and "tise" in text and "did you mean 'ties'" in text
    assert "ghost" in text and "densty" in text
    assert "Traceback" not in text
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_yaml_syntax_error_names_the_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("inputs:\n  a: x\nsteps: [\n  - id: m\n")
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 3 and "broken.yaml:" in res.output


def _interrupt_after(n: int):
    """A tensor hook that stops the run (as Ctrl-C does) once n tensors have been computed."""
    calls = []

    def hook(name, job, out):
        calls.append(name)
        if len(calls) == n:
            raise KeyboardInterrupt

    return hook


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_interrupted_run_resumes_where_it_stopped(tmp_path, model_set, monkeypatch, direct):
    """Ctrl-C keeps the partial output; --resume computes only what is missing, same bytes."""
    from mergekit_lite.io.writer import CheckpointWriter

    if direct:
        force_direct_io(monkeypatch)

    ms = model_set
    recipe = {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{"id": "m", "method": "ties", "base": "base", "models": ["a", "b"], "parameters": {"density": 0.5}}],
        "output": {"path": str(tmp_path / "out"), "shard_size": 3000},
    }
    reference = mlite.run_recipe({**recipe, "output": {"path": str(tmp_path / "ref"), "shard_size": 3000}})
    with pytest.raises(KeyboardInterrupt):
        mlite.run_recipe(recipe, tensor_hook=_interrupt_after(8))
    partial = CheckpointWriter.partial_dir(tmp_path / "out")
    assert partial.is_dir() and not (tmp_path / "out").exists()

    resumed_calls = []
    result = mlite.run_recipe(recipe, resume=True, tensor_hook=lambda n, j, o: resumed_calls.append(n))
    assert result.resumed >= 6  # at least the tensors written before the interrupt
    assert len(resumed_calls) == reference.tensors - result.resumed
    assert not partial.exists()
    got, want = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert all(not p.name.startswith("mlite-resume") for p in (tmp_path / "out").iterdir())


def test_resume_rewrites_the_tensors_of_a_shard_of_the_wrong_size(tmp_path, model_set):
    """A shard whose size is off (a kill between a direct write's padded last block and the
    truncate) is started afresh: its logged tensors are computed again, never left as zeros."""
    from mergekit_lite.io.writer import CheckpointWriter

    ms = model_set
    recipe = {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}],
        "output": {"path": str(tmp_path / "out"), "shard_size": 3000},
    }
    reference = mlite.run_recipe({**recipe, "output": {"path": str(tmp_path / "ref"), "shard_size": 3000}})
    with pytest.raises(KeyboardInterrupt):
        mlite.run_recipe(recipe, tensor_hook=_interrupt_after(10))
    partial = CheckpointWriter.partial_dir(tmp_path / "out")
    first = sorted(partial.glob("*.safetensors"))[0]
    with open(first, "ab") as f:
        f.write(b"\0" * 100)
    result = mlite.run_recipe(recipe, resume=True)
    assert 0 < result.resumed < reference.tensors
    got, want = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_with_a_damaged_log_rewrites_what_it_cannot_read(tmp_path, model_set):
    from mergekit_lite.io.writer import RESUME_LOG, CheckpointWriter

    ms = model_set
    recipe = {
        "inputs": {"a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}],
        "output": {"path": str(tmp_path / "out")},
    }
    reference = mlite.run_recipe({**recipe, "output": {"path": str(tmp_path / "ref")}})
    with pytest.raises(KeyboardInterrupt):
        mlite.run_recipe(recipe, tensor_hook=_interrupt_after(10))
    with open(CheckpointWriter.partial_dir(tmp_path / "out") / RESUME_LOG, "ab") as f:
        f.write(b"\xff\xfe garbage\n")
    result = mlite.run_recipe(recipe, resume=True)
    assert 0 < result.resumed < reference.tensors
    got, want = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_too_many_threads_are_refused(tmp_path, model_set):
    recipe = {"inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
              "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}], "output": {"path": str(tmp_path / "o")}}
    with pytest.raises(UsageError, match="threads must be at most"):
        mlite.run_recipe(recipe, threads=100_000)  # OpenMP would start them all and crash


def test_resume_with_changed_recipe_starts_afresh(tmp_path, model_set):
    ms = model_set
    recipe = {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0])},
        "steps": [{"id": "m", "method": "task_arithmetic", "base": "base", "models": ["a"]}],
        "output": {"path": str(tmp_path / "out")},
    }
    with pytest.raises(KeyboardInterrupt):
        mlite.run_recipe(recipe, tensor_hook=_interrupt_after(5))
    changed = {**recipe, "steps": [{**recipe["steps"][0], "parameters": {"lambda": 0.5}}]}
    result = mlite.run_recipe(changed, resume=True)
    assert result.resumed == 0
    base, a = load_dir(ms.base), load_dir(ms.finetunes[0])
    out = load_dir(tmp_path / "out")
    for k in out:
        torch.testing.assert_close(out[k], base[k] + 0.5 * (a[k] - base[k]))


def test_heap_settings_apply_for_the_run_and_are_handed_back(tmp_path, model_set):
    """A notebook's process got one arena and a never-trimmed heap for good after one merge."""
    import platform

    from mergekit_lite.engine import memory

    with memory.streaming_heap() as applied:
        with memory.streaming_heap() as nested:  # a run inside a run keeps the outer settings
            assert nested is applied
        assert memory._state["depth"] == 1
    assert memory._state["depth"] == 0
    if platform.libc_ver()[0] == "glibc":
        assert applied is True
    calls: list[tuple[int, int]] = []
    libc = memory._libc()
    if libc is None:
        return

    class Spy:
        def mallopt(self, opt: int, value: int) -> int:
            calls.append((opt, value))
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append(("trim", pad))
            return 1

    import unittest.mock

    with unittest.mock.patch.object(memory, "_libc", Spy):
        mlite.merge("linear", models=[model_set.finetunes[0], model_set.finetunes[1]], out=tmp_path / "o")
    assert calls[:3] == [(memory._M_ARENA_MAX, 1), (memory._M_MMAP_THRESHOLD, memory._MMAP_THRESHOLD),
                         (memory._M_TRIM_THRESHOLD, memory._TRIM_THRESHOLD)]
    assert calls[3:] == [(memory._M_ARENA_MAX, 8 * (os.cpu_count() or 1)),
                         (memory._M_MMAP_THRESHOLD, 32 << 20), (memory._M_TRIM_THRESHOLD, 64 << 20), ("trim", 0)]


def test_a_run_leaves_the_callers_frozen_objects_frozen(tmp_path, model_set):
    import gc

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        mlite.merge("linear", models=[model_set.finetunes[0], model_set.finetunes[1]], out=tmp_path / "o")
        assert gc.get_freeze_count() > 0.9 * frozen  # it fell to 0 (a few of the caller's objects die meanwhile)
    finally:
        gc.unfreeze()


def test_cli_merge_needs_an_output(tmp_path, model_set):
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}],
    })
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 2 and "--out" in res.output
    assert runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "o")]).exit_code == 0


def test_recipe_mistakes_found_before_any_work(tmp_path, model_set):
    """Each was found only mid-run (a traceback, or exit 2 naming a CLI flag) or silently ignored."""
    ms = model_set
    base = {"inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
            "output": {"path": str(tmp_path / "out")}}
    cases = [
        ({"steps": [{"id": "p", "method": "portllm", "base": "base", "delta": "a"}]}, (), 3,
         "step 'p': delta 'a' is a full checkpoint, so the step needs 'old_base: <input>'"),
        ({"steps": [{"id": "m", "method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                              {"model": "b", "parameters": {"weight": -1.0}}]}]},
         (), 3, "the weights sum to 0"),
        ({"steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}]}, ("--device", ""), 2, "device is empty"),
        ({"steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}]}, ("--dtype", ""), 2, "dtype is empty"),
        ({"steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}]}, ("--shard-size", ""), 2,
         "cannot read size ''"),
        ({"steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}]}, ("--seed", "-1"), 2, "seed"),
    ]
    for i, (steps, args, code, needle) in enumerate(cases):
        recipe = _write(tmp_path / f"r{i}.yaml", {**base, **steps})
        for dry in ((), ("--dry-run",)):
            res = runner.invoke(app, ["merge", str(recipe), *args, *dry])
            assert res.exit_code == code and needle in res.output, (i, dry, res.output)
            assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1, res.output
    assert not (tmp_path / "out").exists()
    res = runner.invoke(app, ["merge", str(tmp_path)])
    assert res.exit_code == 2 and "is a directory; give the recipe's YAML file" in res.output


def test_a_config_that_contradicts_its_tensors_is_a_checkpoint_error(tmp_path, model_set):
    import json

    cfg = model_set.finetunes[0] / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "num_hidden_layers": 1}))
    recipe = _write(tmp_path / "r.yaml", {"inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
                                          "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}],
                                          "output": {"path": str(tmp_path / "out")}})
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 4 and f"{cfg}: num_hidden_layers is 1 but the tensors hold" in res.output, res.output
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "num_hidden_layers": "two"}))
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 4 and f"{cfg}: num_hidden_layers must be an integer, got 'two'" in res.output, res.output
    # more layers than the tensors hold: a warning (gradients are spread over the config's count)
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "num_hidden_layers": 5}))
    two_steps = _write(tmp_path / "r2.yaml", {
        "inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]},
                  {"id": "n", "method": "linear", "models": ["m", "a"]}],
        "output": {"path": str(tmp_path / "out")}})
    res = runner.invoke(app, ["merge", str(two_steps), "--force"])
    assert res.exit_code == 0 and res.output.count(f"warning: {cfg}: num_hidden_layers is 5 but the tensors hold 2 layers") == 1


def test_an_output_that_overflows_is_refused_and_not_published(tmp_path, model_set):
    from mergekit_lite.errors import RecipeError

    ms = model_set
    recipe = {"inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
              "steps": [{"id": "t", "method": "task_arithmetic", "base": "base", "models": ["a", "b"],
                         "parameters": {"lambda": 1e300}}],
              "output": {"path": str(tmp_path / "out")}}
    with pytest.raises(RecipeError, match="values are inf or NaN"):
        mlite.run_recipe(recipe)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    with pytest.raises(RecipeError, match="values are inf or NaN"):  # in memory too
        mlite.run_recipe({**recipe, "output": {}})
    res = runner.invoke(app, ["merge", str(_write(tmp_path / "r.yaml", recipe))])
    assert res.exit_code == 3 and "the weights or lambda overflow it" in res.output


def test_a_model_without_the_head_its_config_promises_is_refused_in_either_order(tmp_path, model_set):
    import json

    from safetensors.torch import save_file

    ms = model_set
    headless = tmp_path / "headless"
    headless.mkdir()
    state = {k: v for k, v in load_dir(ms.finetunes[0]).items() if k != "lm_head.weight"}
    save_file(state, str(headless / "model.safetensors"))
    config = json.loads((ms.finetunes[0] / "config.json").read_text())
    (headless / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    for order in (["x", "b"], ["b", "x"]):
        recipe = {"inputs": {"x": str(headless), "b": str(ms.finetunes[1])},
                  "steps": [{"id": "m", "method": "linear", "models": order}], "output": {"path": str(tmp_path / "o")}}
        res = runner.invoke(app, ["merge", str(_write(tmp_path / "r.yaml", recipe))])
        assert res.exit_code == 4 and "lm_head.weight" in res.output and str(headless) in res.output, (order, res.output)
        assert not (tmp_path / "o").exists()


def test_a_copied_config_describes_the_tensors_written(tmp_path, model_set):
    """copy_tokenizer_from another model: its config's tie flag and vocab size are fixed up to the
    output (a tied config over a stored lm_head would make transformers drop the merged head)."""
    import json

    from safetensors.torch import save_file

    ms = model_set
    src = tmp_path / "tied"
    src.mkdir()
    save_file({k: v for k, v in load_dir(ms.finetunes[0]).items() if k != "lm_head.weight"}, str(src / "model.safetensors"))
    config = json.loads((ms.finetunes[0] / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True, "vocab_size": 999}))
    recipe = {"inputs": {"a": str(ms.finetunes[0]), "b": str(ms.finetunes[1]), "tok": str(src)},
              "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}],
              "output": {"path": str(tmp_path / "out"), "copy_tokenizer_from": "tok"}}
    mlite.run_recipe(recipe)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    rows = load_dir(tmp_path / "out")["model.embed_tokens.weight"].shape[0]
    assert written["tie_word_embeddings"] is False and written["vocab_size"] == rows
    assert "lm_head.weight" in load_dir(tmp_path / "out")


def test_a_step_that_feeds_nothing_is_reported(tmp_path, model_set, caplog):
    recipe = {"inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
              "steps": [{"id": "x", "method": "linear", "models": ["a", "b"]},
                        {"id": "y", "method": "linear", "models": ["a"]}],
              "output": {"path": str(tmp_path / "o"), "step": "y"}}
    with caplog.at_level("WARNING"):
        mlite.dry_run(recipe)
    assert "step 'x' feeds neither the output step 'y' nor a save: path" in caplog.text


def test_a_saved_step_with_another_vocabulary_is_refused_before_any_work(tmp_path, model_set):
    """With options.vocab: shared, a saved step whose reference has fewer vocabulary rows than the
    output was only refused mid-run ("has shape [V1, d], planned [V2, d]")."""
    import json
    import shutil

    from safetensors.torch import save_file

    ms = model_set
    v = tmp_path / "v"
    v.mkdir()
    state = load_dir(ms.finetunes[1])
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], torch.zeros(8, state[key].shape[1], dtype=state[key].dtype)])
    save_file(state, str(v / "model.safetensors"))
    config = json.loads((ms.finetunes[1] / "config.json").read_text())
    (v / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    recipe = {"inputs": {"ft1": str(ms.finetunes[0]), "v": str(v)},
              "steps": [{"id": "a", "method": "linear", "models": ["ft1", "v"], "save": str(tmp_path / "sa")},
                        {"id": "b", "method": "task_arithmetic", "base": "v", "models": ["a"]}],
              "output": {"path": str(tmp_path / "out")}, "options": {"vocab": "shared"}}
    res = runner.invoke(app, ["merge", str(_write(tmp_path / "r.yaml", recipe))])
    assert res.exit_code == 3 and "step 'a' is saved, but its tensor" in res.output, res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "sa").exists()
    recipe["steps"][0].pop("save")
    assert runner.invoke(app, ["merge", str(_write(tmp_path / "r.yaml", recipe))]).exit_code == 0
    shutil.rmtree(tmp_path / "out")


def test_resume_notices_an_input_rewritten_with_its_old_size_and_mtime(tmp_path, model_set):
    """`cp -p`/`touch -r` put size and mtime back; the change time still tells the run to start afresh."""
    import shutil

    ms = model_set
    a = tmp_path / "a"
    shutil.copytree(ms.finetunes[0], a)
    recipe = {
        "inputs": {"base": str(ms.base), "a": str(a)},
        "steps": [{"id": "m", "method": "task_arithmetic", "base": "base", "models": ["a"]}],
        "output": {"path": str(tmp_path / "out")},
    }
    with pytest.raises(KeyboardInterrupt):
        mlite.run_recipe(recipe, tensor_hook=_interrupt_after(5))
    # Same length, other values, the old mtime restored: only the ctime (and contents) differ.
    shard = sorted(a.glob("*.safetensors"))[0]
    before = shard.stat()
    other = sorted(Path(ms.finetunes[1]).glob("*.safetensors"))[0].read_bytes()
    assert len(other) == before.st_size
    shard.write_bytes(other)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == before.st_size and shard.stat().st_mtime_ns == before.st_mtime_ns
    result = mlite.run_recipe(recipe, resume=True)
    assert result.resumed == 0
    fresh = mlite.run_recipe({**recipe, "output": {"path": str(tmp_path / "ref")}})
    got, want = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert fresh.tensors == len(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_dry_run_json_counts_saved_steps_as_the_run_writes_them(tmp_path, model_set):
    """Each `save:` target gets the output's shards: the dry run lists it and counts its bytes once."""
    ms = model_set
    recipe = _write(tmp_path / "r.yaml", {
        "inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
        "steps": [{"id": "m", "method": "task_arithmetic", "base": "base", "models": ["a", "b"],
                   "save": str(tmp_path / "mid")},
                  {"id": "n", "method": "linear", "models": ["m", "a"], "save": str(tmp_path / "out")}],
        "output": {"path": str(tmp_path / "out"), "shard_size": "2000"},
    })
    dry = runner.invoke(app, ["merge", str(recipe), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["saves"] == [{"step": "m", "path": str(tmp_path / "mid")}]  # n's save is the output itself
    real = runner.invoke(app, ["merge", str(recipe), "--json"])
    assert real.exit_code == 0, real.output
    done = json.loads(real.stdout)
    assert plan["bytes_written"] == done["bytes_written"]
    for target in ("out", "mid"):
        shards = sorted((tmp_path / target).glob("*.safetensors"))
        assert [s.name for s in shards] == [s["file"] for s in plan["output_shards"]]
    text = runner.invoke(app, ["merge", str(recipe), "--dry-run", "--force"]).output
    assert "step 'm' saved to" in text and str(tmp_path / "mid") in text.replace("\n", "")


def test_input_and_warning_messages_name_the_recipe_line(tmp_path, model_set, caplog):
    """A missing model path and a mergekit knob with no effect are reported at their line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""merge_method: ties
base_model: {model_set.base}
models:
  - model: {model_set.finetunes[0]}
    parameters: {{weight: 1.0, density: 0.5, lambda: 2}}
  - model: {tmp_path / 'missing'}
dtype: float32
""")
    res = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 5
    assert f"error: {recipe}:6: input 'missing': {tmp_path / 'missing'}: no such file or directory" in res.output
    assert f"warning: {recipe}:5: 'lambda' given for model" in res.output
    assert f"warning: {recipe}:7: mergekit's 'dtype' is the compute dtype there" in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_checkpoints_merge_and_overflow_cleanly(tmp_path, dtype):
    """float8 weights merge in float32 and are written back in float8 (torch has no float8 sum
    or isfinite on the CPU, which the output check used to call: a traceback)."""
    shape = LlamaShape()
    states = [{k: (v * 0.1).to(dtype) for k, v in make_base(shape, seed=s).items()} for s in (1, 2)]
    paths = [save_checkpoint(st, tmp_path / f"m{i}", shape=shape) for i, st in enumerate(states)]
    recipe = {"inputs": {"a": str(paths[0]), "b": str(paths[1])},
              "steps": [{"id": "m", "method": "linear", "models": ["a", "b"], "parameters": {"weight": {"a": 0.25, "b": 0.75}}}],
              "output": {"path": str(tmp_path / "out")}}
    mlite.run_recipe(recipe)
    got = load_dir(tmp_path / "out")
    for name, a in states[0].items():
        want = ((0.25 * a.float() + 0.75 * states[1][name].float()) / 1.0).to(dtype)
        assert got[name].dtype == dtype and torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name
    if dtype == torch.float8_e5m2:  # e5m2 has an infinity: 1e6 overflows it
        overflow = {**recipe, "steps": [{"id": "m", "method": "linear", "models": ["a", "b"],
                                         "parameters": {"normalize": False, "weight": 1e6}}],
                    "output": {"path": str(tmp_path / "out2")}}
        res = runner.invoke(app, ["merge", str(_write(tmp_path / "r.yaml", overflow))])
        assert res.exit_code == 3 and "values are inf or NaN in float8_e5m2" in res.output, res.output
        assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(("keys", "want"), [
    (("torch_dtype",), {"torch_dtype": "bfloat16"}),
    (("dtype",), {"dtype": "bfloat16"}),  # transformers >= 4.56 writes and reads `dtype`
    (("torch_dtype", "dtype"), {"torch_dtype": "bfloat16", "dtype": "bfloat16"}),
    ((), {"torch_dtype": "bfloat16"}),
])
def test_config_dtype_follows_the_output_under_either_name(tmp_path, model_set, keys, want):
    """A float32 base's config said "dtype": "float32" after a bfloat16 merge (only torch_dtype
    was updated), and transformers 5 loaded the output as float32."""
    ms = model_set
    cfg_path = ms.finetunes[0] / "config.json"
    cfg = {k: v for k, v in json.loads(cfg_path.read_text()).items() if k not in ("torch_dtype", "dtype")}
    cfg.update({k: "float32" for k in keys})
    cfg_path.write_text(json.dumps(cfg))
    out = mlite.merge("linear", models=list(ms.finetunes), out=tmp_path / "o", dtype="bfloat16")
    written = json.loads((out / "config.json").read_text())
    assert {k: written[k] for k in ("torch_dtype", "dtype") if k in written} == want


def test_demo_into_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, ["demo", "--dir", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "afile: exists and is not a directory" in res.output


def test_mergekit_single_slice_recipe_merges_as_its_models_form(tmp_path, model_set):
    """mergekit's best-known SLERP example is written with one slice over every layer; it
    gives the models-form merge, and a range past the models' layers is refused before reading."""
    ms = model_set
    t = {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
               {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}
    common = {"merge_method": "slerp", "base_model": str(ms.base), "parameters": t, "dtype": "float32"}
    want = mlite.run_recipe({**common, "models": [{"model": str(ms.base)}, {"model": str(ms.finetunes[0])}]}).state_dict
    layers = ms.shape.num_hidden_layers

    def sliced(stop: int) -> dict:
        return {**common, "slices": [{"sources": [{"model": str(ms.base), "layer_range": [0, stop]},
                                                  {"model": str(ms.finetunes[0]), "layer_range": [0, stop]}]}]}

    got = mlite.run_recipe(sliced(layers)).state_dict
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    recipe = _write(tmp_path / "r.yaml", {**sliced(layers + 1), "output": {"path": str(tmp_path / "out")}})
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 3 and f"layer_range [0, {layers + 1}] but {ms.base} has {layers} layers" in res.output
    assert not (tmp_path / "out").exists()


def test_mergekit_model_plus_lora_reference_merges_the_lora_first(tmp_path, model_set):
    """mergekit's `MODEL+LORA` merges the adapter into the model before the merge (peft's
    merge_and_unload there; a portllm step here): the same as patching first, then merging."""
    ms = model_set
    ref = f"{ms.finetunes[0]}+{ms.adapter}"
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": ref}, {"model": str(ms.finetunes[1])}],
              "parameters": {"weight": {ref: 0.25, str(ms.finetunes[1]): 0.75}}}
    got = mlite.run_recipe(recipe).state_dict
    mlite.patch(ms.finetunes[0], ms.adapter, out=tmp_path / "patched")
    want = mlite.merge("linear", models=[tmp_path / "patched", ms.finetunes[1]],
                       model_parameters=[{"weight": 0.25}, {"weight": 0.75}])
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    bad = _write(tmp_path / "r.yaml", {**recipe, "models": [{"model": f"{ref}+x"}], "parameters": {}})
    res = runner.invoke(app, ["merge", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 3 and "mergekit's form is MODEL or MODEL+LORA" in res.output


def test_dry_run_counts_what_a_filtered_statistics_pass_reads_of_a_lora(tmp_path, model_set):
    """surgery after a LoRA patch scores the gate rows only: its statistics pass reads the
    adapter's factors for those tensors alone (the dry run charged the whole adapter)."""
    from safetensors.torch import save_file

    from mergekit_lite.io.checkpoint import open_checkpoint
    from mergekit_lite.synthetic import make_lora_adapter

    ms = model_set
    base_ck = open_checkpoint(ms.base)
    lora = make_lora_adapter({n: base_ck.load(n) for n in base_ck.names()}, tmp_path / "lora",
                             target_modules=("gate_proj", "q_proj"))
    save_file({"weight": torch.randn(ms.shape.hidden_size)}, str(tmp_path / "probe.safetensors"))
    recipe = {"inputs": {"base": str(ms.base), "lora": str(lora)},
              "steps": [{"id": "a", "method": "portllm", "base": "base", "delta": "lora"},
                        {"id": "b", "method": "surgery", "base": "a",
                         "parameters": {"probe": str(tmp_path / "probe.safetensors"), "top_k": 5}}],
              "output": {"path": str(tmp_path / "out")}}
    planned = mlite.dry_run(recipe)
    run = mlite.run_recipe(recipe)
    assert [(p["kind"], p["bytes_read"]) for p in planned["passes"]] == [
        (p["kind"], p["bytes_read"]) for p in run.passes]
    assert planned["bytes_read"] == run.bytes_read


def test_a_global_step_that_feeds_nothing_runs_no_statistics_pass(tmp_path, model_set):
    ms = model_set
    recipe = {"inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
              "steps": [{"id": "unused", "method": "ties", "base": "base", "models": ["a", "b"],
                         "parameters": {"density": 0.5, "scope": "global"}},
                        {"id": "m", "method": "linear", "models": ["a", "b"]}]}
    run = mlite.run_recipe(recipe)
    assert [p["kind"] for p in run.passes] == ["output"]
    assert [p["kind"] for p in mlite.dry_run(recipe)["passes"]] == ["output"]


def test_resume_fingerprint_follows_a_full_fine_tune_delta(tmp_path, model_set):
    """A full fine-tune given as a delta was left out of the fingerprint (its label is not a
    path), so a resume kept tensors computed from its old contents."""
    from mergekit_lite.engine.fingerprint import fingerprint

    ms = model_set
    recipe = load_recipe({"inputs": {"new": str(ms.finetunes[1]), "ft": str(ms.finetunes[0]), "old": str(ms.base)},
                          "steps": [{"id": "p", "method": "portllm", "base": "new", "delta": "ft", "old_base": "old"}]})
    before = fingerprint(build_plan(recipe))
    shard = sorted(ms.finetunes[0].glob("*.safetensors"))[0]
    os.utime(shard, (shard.stat().st_atime, shard.stat().st_mtime + 5))
    assert fingerprint(build_plan(recipe)) != before


def test_a_base_listed_among_the_models_is_warned_about(tmp_path, model_set, caplog):
    ms = model_set
    recipe = {"inputs": {"base": str(ms.base), "a": str(ms.finetunes[0])},
              "steps": [{"id": "m", "method": "task_arithmetic", "base": "base", "models": ["base", "a"]}]}
    with caplog.at_level("WARNING"):
        mlite.dry_run(recipe)
    assert "step 'm' lists its base 'base' among its models: a zero task vector" in caplog.text


def test_an_input_holding_nan_is_named_as_the_cause(tmp_path, model_set):
    """A NaN in an input made the output check blame 'the weights or lambda' (exit 3); the
    input that holds it is now named (exit 4), be it a checkpoint or a LoRA's factors."""
    from safetensors.torch import load_file, save_file

    ms = model_set
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ms.finetunes[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = sorted(bad.glob("*.safetensors"))[0]
    state = load_file(str(shard))
    name = sorted(state)[0]
    state[name].view(-1)[3] = float("nan")
    save_file(state, str(shard), metadata={"format": "pt"})
    recipe = _write(tmp_path / "r.yaml", {"inputs": {"base": str(ms.base), "a": str(bad)},
                                          "steps": [{"id": "m", "method": "task_arithmetic", "base": "base",
                                                     "models": ["a"]}],
                                          "output": {"path": str(tmp_path / "out")}})
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 4 and f"{bad}: tensor {name!r} holds inf or NaN" in res.output, res.output
    lora = tmp_path / "lora"
    lora.mkdir()
    for f in ms.adapter.iterdir():
        (lora / f.name).write_bytes(f.read_bytes())
    factors = load_file(str(lora / "adapter_model.safetensors"))
    key = sorted(k for k in factors if "lora_B" in k)[0]
    factors[key].view(-1)[0] = float("nan")
    save_file(factors, str(lora / "adapter_model.safetensors"))
    res = runner.invoke(app, ["patch", "--base", str(ms.base), "--delta", str(lora), "--out", str(tmp_path / "p")])
    assert res.exit_code == 4 and f"{lora}: its change to" in res.output and "holds inf or NaN" in res.output
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("tokenizer_source", ["base", "lora_ref"])
def test_mergekit_model_plus_lora_as_base_and_tokenizer_source(tmp_path, model_set, tokenizer_source):
    """A MODEL+LORA base (or tokenizer source) takes its side files from MODEL."""
    ms = model_set
    (ms.finetunes[0] / "tokenizer_config.json").write_text('{"marker": "ft1"}')
    ref = f"{ms.finetunes[0]}+{ms.adapter}"
    recipe = {"merge_method": "task_arithmetic", "base_model": ref, "models": [{"model": str(ms.finetunes[1])}],
              "tokenizer_source": "base" if tokenizer_source == "base" else ref, "out_dtype": "float32",
              "output": {"path": str(tmp_path / "out")}}
    mlite.run_recipe(recipe)
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"marker": "ft1"}'


def _word_level_tokenizer(path, tokens: list[str]) -> None:
    (path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens[:-1])}, "unk_token": tokens[0]},
         "added_tokens": [{"id": len(tokens) - 1, "content": tokens[-1], "special": True}]}))


def test_mergekit_tokenizer_source_lines_rows_up_by_token(tmp_path, model_set):
    """mergekit's tokenizer_source lines embedding rows up by token. A model whose tokenizer
    gives ids 5 and 6 other tokens (x5, x6) lacks the output's t5 and t6: it takes the base's
    rows there, as mergekit does, so its task vector is zero on them; its x5 and x6 rows, which
    the output has no token for, are dropped. Merging a copy of that model with those rows set
    to the base's, by id and without the setting, gives the same bits. A tokenizer shorter
    than the embedding (padding rows) cuts the output to the tokenizer's length, as mergekit
    does, and says so in the dry run."""
    ms = model_set
    base = load_dir(ms.base)
    rows = base["model.embed_tokens.weight"].shape[0]
    tokens = [f"t{i}" for i in range(rows)]
    for ck in (ms.base, ms.finetunes[0]):
        _word_level_tokenizer(ck, tokens)
    _word_level_tokenizer(ms.finetunes[1], tokens[:5] + ["x5", "x6"] + tokens[7:])
    recipe = {"merge_method": "task_arithmetic", "base_model": str(ms.base), "tokenizer_source": "base",
              "models": [{"model": str(ms.finetunes[0])}, {"model": str(ms.finetunes[1])}], "out_dtype": "float32"}
    path = _write(tmp_path / "r.yaml", recipe)
    res = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    fixed = load_dir(ms.finetunes[1])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        fixed[name][5:7] = base[name][5:7]
    save_checkpoint(fixed, tmp_path / "fixed", shape=LlamaShape())
    by_id = {**recipe, "models": [{"model": str(ms.finetunes[0])}, {"model": str(tmp_path / "fixed")}]}
    by_id.pop("tokenizer_source")
    mlite.run_recipe({**by_id, "output": {"path": str(tmp_path / "w")}})
    got, want = load_dir(tmp_path / "o"), load_dir(tmp_path / "w")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    _word_level_tokenizer(ms.base, tokens[:-3])  # 61 tokens over 64 rows: the output has 61
    res = runner.invoke(app, ["merge", str(path), "--dry-run", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0 and f"{rows - 3} tokens, {rows - 3} rows; rows lined up by token" in res.output, res.output
    res = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    cut = load_dir(tmp_path / "o2")
    assert cut["model.embed_tokens.weight"].shape[0] == rows - 3
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["vocab_size"] == rows - 3
    assert torch.equal(cut["model.embed_tokens.weight"][:5], got["model.embed_tokens.weight"][:5])


@pytest.mark.parametrize("chain", ["ties_then_portllm", "pcb_then_portllm"])
def test_a_lora_in_a_chain_keeps_only_the_tensors_it_changes_whole(tmp_path, model_set, monkeypatch, chain):
    """Any delta in a chain made every tensor whole: a PCB→PortLLM chain over a 262144×1024
    embedding the LoRA never touches ran out of 14 GB (memory audit). Now only the LoRA's
    targets are whole; the rest stream in row blocks, with the same bits."""
    from mergekit_lite.engine import run, stream
    from mergekit_lite.io.deltas import open_delta

    ms = model_set
    targets = set(open_delta(str(ms.adapter)).targets())
    inputs = {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1]), "lora": str(ms.adapter)}
    merge_step = ({"method": "pcb", "parameters": {"ratio": 0.3}} if chain == "pcb_then_portllm"
                  else {"method": "ties", "parameters": {"density": 0.5}})
    steps = [{"id": "m", "base": "base", "models": ["a", "b"], **merge_step},
             {"id": "p", "method": "portllm", "base": "m", "delta": "lora"}]
    recipe = {"inputs": inputs, "steps": steps}
    whole = mlite.run_recipe(recipe).state_dict
    modes: dict[str, str] = {}
    real_mode = run._block_mode

    def spying(plan, step_ids, *, local_stats):
        mode = real_mode(plan, step_ids, local_stats=local_stats)

        def spy(name: str) -> str:
            modes[name] = mode(name)
            return modes[name]

        return spy

    monkeypatch.setattr(run, "_block_mode", spying)
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 64)  # every matrix is "big"
    result = mlite.run_recipe(recipe)
    blocked = result.state_dict
    assert mlite.dry_run(recipe)["bytes_read"] == result.bytes_read  # statistics passes foreseen too
    assert whole.keys() == blocked.keys()
    for k in whole:
        assert torch.equal(whole[k], blocked[k]), k
    assert targets and targets <= modes.keys() and all(modes[t] == "whole" for t in targets)
    streamed = {n for n, m in modes.items() if m != "whole"}
    assert "model.embed_tokens.weight" in streamed and not streamed & targets
