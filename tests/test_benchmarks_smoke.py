"""Smoke tests of the benchmark harness (benchmarks/): nothing here times anything.

The generator must produce a valid, reproducible tiny set; the recipes the harness writes must
be accepted by mlite's own recipe loader; the process measurement must report an exit code and
a plausible RSS; the target logic must flag what the issue asks.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH_DIR))
    try:
        yield {name: importlib.import_module(name) for name in ("generate", "bench_recipes", "bench_measure",
                                                               "bench_report")}
    finally:
        sys.path.remove(str(BENCH_DIR))


@pytest.fixture(scope="module")
def tiny_set(bench_modules, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    return bench_modules["generate"].generate_set(root, "1M", quiet=True)


def _load_all(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def test_tiny_set_layout(tiny_set, bench_modules):
    gen = bench_modules["generate"]
    shape = gen.SIZES["1M"]
    assert [m.name for m in tiny_set.models] == ["base", "ft1", "ft2", "ft3"]
    expected = shape.tensor_shapes()
    for model in tiny_set.models:
        shards = sorted(model.glob("*.safetensors"))
        assert [s.name for s in shards] == [gen.shard_file_name(i, 3) for i in (1, 2, 3)]
        index = json.loads((model / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(expected)
        assert index["metadata"]["total_size"] == 2 * shape.num_parameters()
        config = json.loads((model / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
        tensors = _load_all(model)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
        assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    assert tiny_set.num_parameters == shape.num_parameters()
    assert tiny_set.bytes_per_model == sum(p.stat().st_size for p in tiny_set.base.glob("*.safetensors"))
    assert len(tiny_set.input_files()) == 12


def test_finetunes_are_small_distinct_deltas(tiny_set):
    base = _load_all(tiny_set.base)
    fts = [_load_all(ft) for ft in tiny_set.finetunes]
    name = "model.layers.0.mlp.up_proj.weight"
    deltas = [ft[name].float() - base[name].float() for ft in fts]
    for d in deltas:
        rel = d.norm() / base[name].float().norm()
        assert 0.01 < rel < 0.5
    assert not torch.equal(deltas[0], deltas[1])
    # every delta kind occurs: a sparse delta leaves most entries (beyond bf16 rounding) unchanged
    zero_fraction = [float((d == 0).float().mean()) for d in deltas]
    assert max(zero_fraction) > 0.5 > min(zero_fraction)


def test_generation_is_reproducible_and_reused(tiny_set, bench_modules, tmp_path):
    gen = bench_modules["generate"]
    again = gen.generate_set(tmp_path, "1M", quiet=True)
    for a, b in zip(tiny_set.input_files(), again.input_files(), strict=True):
        assert a.read_bytes() == b.read_bytes()
    stamp = (tmp_path / "1M" / gen.MANIFEST).stat().st_mtime_ns
    gen.generate_set(tmp_path, "1M", quiet=True)  # finished set: not regenerated
    assert (tmp_path / "1M" / gen.MANIFEST).stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*.tmp"))


def test_split_shards_balances_bytes(bench_modules):
    gen = bench_modules["generate"]
    shapes = gen.SIZES["100M"].tensor_shapes()
    groups = gen.split_shards(shapes, 3)
    assert len(groups) == 3 and [n for g in groups for n in g] == list(shapes)
    sizes = [sum(math.prod(shapes[n]) for n in g) for g in groups]
    assert max(sizes) < 1.6 * min(sizes)


def test_sizes_hit_their_names(bench_modules):
    targets = {"1M": 1e6, "10M": 1e7, "100M": 1e8, "500M": 5e8, "1.5B": 1.5e9}
    for name, shape in bench_modules["generate"].SIZES.items():
        assert abs(shape.num_parameters() / targets[name] - 1) < 0.16


def test_recipes_are_accepted_by_mlite(tiny_set, bench_modules, tmp_path):
    from mergekit_lite.recipe import load_recipe

    rec = bench_modules["bench_recipes"]
    fts = list(tiny_set.finetunes)
    for method in rec.METHODS.values():
        native = rec.mlite_recipe(method, tiny_set.base, fts, tmp_path / "out")
        recipe = load_recipe(rec.write_yaml(native, tmp_path / f"{method.key}.yaml"))
        assert recipe.steps[0].method == method.mlite_method
        if method.mergekit_method is not None:
            mk = rec.mergekit_recipe(method, tiny_set.base, fts)
            assert mk["dtype"] == "bfloat16" and len(mk.get("models", mk.get("slices", []))) == method.n_models
            assert load_recipe(mk).steps[0].method == method.mlite_method


def test_run_measured_reports_exit_and_memory(bench_modules, tmp_path):
    measure = bench_modules["bench_measure"]
    code = "import sys; b = bytearray(64 * 1024 * 1024); sys.exit(3)"
    m = measure.run_measured([sys.executable, "-c", code], log_path=tmp_path / "log.txt")
    assert m.returncode == 3
    assert m.peak_rss_bytes >= 64 * 1024 * 1024
    assert m.wall_s > 0


def test_floor_reads_every_input_byte(tiny_set, bench_modules, tmp_path):
    floor = bench_modules["bench_measure"].measure_floor(tiny_set.input_files(), 1000, tmp_path, repeats=1)
    assert floor.read_bytes == sum(p.stat().st_size for p in tiny_set.input_files())
    assert floor.write_bytes == 1000 and not list(tmp_path.iterdir())


def test_targets(bench_modules):
    report = bench_modules["bench_report"]
    ok = {"returncode": 0}
    row = {"method": "linear", "ours": ok, "ours_wall": 10.0, "ours_rss": 0.5e9, "vs_mk": 0.4, "vs_floor": 1.2}
    assert report.targets(row, None) == "met"
    assert report.targets({**row, "vs_floor": 2.0}, None).startswith("MISSED: 2.00× floor")
    assert "RSS" in report.targets({**row, "ours_rss": 1.2e9}, None)
    ties = {**row, "method": "ties", "vs_mk": 0.3, "vs_floor": None}
    assert report.targets(ties, None) == "MISSED: 0.30× mergekit > 0.25"
    pcb = {**row, "method": "pcb_global", "ours_rss": 1.2e9, "vs_mk": None, "vs_floor": None}
    assert report.targets(pcb, 2.0) == "MISSED: 5.00× pcb_tensor > 4"
    assert report.targets(pcb, 3.0) == "met"
    assert report.targets({**row, "vs_mk": None}, None) == "met so far (no mergekit)"


def test_cpu_line_is_parsed_from_the_log(bench_modules):
    report = bench_modules["bench_report"]
    log = "$ mlite merge r.yaml\nwrote /x: 3 tensors, read 1 GB, wrote 1 GB in 2.0 s\n" \
          "CPU time: reading 2.9 s · computing 14.4 s · writing 1.1 s\n"
    assert report.parse_cpu_line(log) == {"reading": 2.9, "computing": 14.4, "writing": 1.1}
    assert report.parse_cpu_line("mergekit output only") is None


def test_device_check_compares_every_method_and_flags_a_difference(tmp_path, monkeypatch, capsys):
    """CPU against itself: every method gives the same bits, exit 0. A device whose results differ
    for a method the docs say matches makes the check fail."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        device_check = importlib.import_module("device_check")
    finally:
        sys.path.remove(str(BENCH_DIR))
    from mergekit_lite.synthetic import LlamaShape

    report = tmp_path / "r.json"
    assert device_check.main(["--device", "cpu", "--json", str(report)], shape=LlamaShape()) == 0
    rows = json.loads(report.read_text())["rows"]
    assert len(rows) == len(device_check.cases()) and all(r["differing"] == 0 and r["values"] > 0 for r in rows)
    # row blocks against whole tensors, for the methods that sum over a whole tensor
    blocked = {r["method"]: r["blocks_vs_whole"] for r in rows if "blocks_vs_whole" in r}
    assert set(blocked) == set(device_check.BLOCK_CASES)
    assert all(b["differing"] == 0 and b["values"] > 0 for b in blocked.values())

    real_run = device_check.mlite.run_recipe

    def other_bits_on_the_other_device(recipe, device):
        result = real_run(recipe, device="cpu")
        method = recipe["steps"][0]["method"]
        if device != "cpu" and method in ("ties", "breadcrumbs"):
            name = next(iter(result.state_dict))
            t = result.state_dict[name]
            # ties: one ulp up; breadcrumbs: a zero of the other sign, equal as a value, not as bits
            result.state_dict[name] = (torch.nextafter(t, torch.tensor(float("inf"))) if method == "ties"
                                       else torch.where(t == 0, -t, t))
        if device != "cpu" and method == "della":
            raise RuntimeError("no kernel for this device")
        return result

    monkeypatch.setattr(device_check.mlite, "run_recipe", other_bits_on_the_other_device)
    assert device_check.main(["--device", "meta", "--json", str(report)], shape=LlamaShape()) == 1
    out = capsys.readouterr().out
    assert out.count("UNEXPECTED") >= 1 and "della" in out and "RuntimeError: no kernel" in out
    rows = {r["method"]: r for r in json.loads(report.read_text())["rows"]}
    assert not rows["ties"]["ok"] and not rows["della"]["ok"] and "error" in rows["della"]
    assert rows["linear (normalize)"]["ok"] and rows["linear (normalize)"]["differing"] == 0
