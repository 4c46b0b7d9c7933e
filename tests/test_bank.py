"""The adapter bank: add/list/export round trips (raw and PEFT LoRA) and refusals of bad input."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_lite.errors import CheckpointError, UsageError
from mergekit_lite.io.bank import load_bank
from mergekit_lite.synthetic import LlamaShape, make_base, make_lora_adapter
from mergekit_lite.workflows.mos import bank_add, bank_export, bank_list, bank_set_prototypes, mos_merge


def _cli_app():
    # Imported lazily so that the pure-maths tests still run when another command module breaks.
    return importlib.import_module("mergekit_lite.cli.main").app


runner = CliRunner()


def mlite(*args: str):
    return runner.invoke(_cli_app(), [str(a) for a in args])


def raw_adapter(path: Path, seed: int, shapes: dict[str, tuple[int, ...]] | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"blocks.0.down.weight": (2, 4), "blocks.0.down.bias": (2,), "blocks.0.up.weight": (4, 2)}
    save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return make_base(LlamaShape())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# round trips


def test_raw_members_round_trip(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    sources = [raw_adapter(tmp_path / f"a{i}.safetensors", i) for i in range(3)]
    for i, src in enumerate(sources):
        r = mlite("bank", "add", bank, "--task", f"task{i}", src)
        assert r.exit_code == 0, r.output
    info = bank_list(bank)
    assert [t["task"] for t in info["tasks"]] == ["task0", "task1", "task2"]
    assert {t["kind"] for t in info["tasks"]} == {"raw"}
    with safe_open(str(bank), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "adapters.task1.blocks.0.down.bias" in keys
    assert json.loads(meta["tasks"]) == ["task0", "task1", "task2"]
    assert json.loads(meta["members"])["task2"] == {"kind": "raw"}
    for i, src in enumerate(sources):
        out = tmp_path / f"out{i}.safetensors"
        r = mlite("bank", "export", bank, "--task", f"task{i}", "--out", out)
        assert r.exit_code == 0, r.output
        want, got = load_file(str(src)), load_file(str(out))
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k])


def test_list_json_and_table(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    bank_add(bank, "a", raw_adapter(tmp_path / "a.safetensors", 0), scale=0.1)
    bank_add(bank, "b", raw_adapter(tmp_path / "b.safetensors", 1))
    r = mlite("bank", "list", bank, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert [t["task"] for t in info["tasks"]] == ["a", "b"]
    assert info["scale"] == 0.1 and info["tasks"][0]["parameters"] == 8 + 2 + 8
    r = mlite("bank", "list", bank)
    assert r.exit_code == 0 and "a" in r.output and "adapter scale: 0.1" in r.output
    with pytest.raises(UsageError, match="scale"):
        bank_add(bank, "c", raw_adapter(tmp_path / "c.safetensors", 2), scale=0.5)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_peft_adapters_round_trip_through_bank(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    bank = tmp_path / "bank.safetensors"
    saved: list[dict[str, torch.Tensor]] = []
    for i in range(3):
        torch.manual_seed(100 + i)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(_tiny_llama(), cfg)
        with torch.no_grad():  # B non-zero so that the adapter is not a no-op
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        model.save_pretrained(tmp_path / f"lora{i}")
        saved.append({k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()})
        assert mlite("bank", "add", bank, "--task", f"t{i}", tmp_path / f"lora{i}").exit_code == 0
    assert [t["r"] for t in bank_list(bank)["tasks"]] == [4, 4, 4]
    for i in range(3):
        out = tmp_path / f"export{i}"
        r = mlite("bank", "export", bank, "--task", f"t{i}", "--out", out)
        assert r.exit_code == 0, r.output
        loaded = peft.PeftModel.from_pretrained(_tiny_llama(), out)
        got = peft.get_peft_model_state_dict(loaded)
        assert got.keys() == saved[i].keys() and len(got) == 8
        for k in got:
            assert torch.equal(got[k], saved[i][k]), k
    r = mlite("bank", "export", bank, "--task", "t0", "--out", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "exported as a PEFT adapter directory" in r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_merged_lora_bank_exports_load_in_peft(tmp_path: Path, base) -> None:
    peft = pytest.importorskip("peft")
    bank = tmp_path / "bank.safetensors"
    for i in range(3):
        bank_add(bank, f"t{i}", make_lora_adapter(base, tmp_path / f"l{i}", seed=i))
    merged = mos_merge(bank, momentum=0.5, space="delta", rank=6, out=tmp_path / "m.safetensors")
    out = bank_export(merged, "t2", tmp_path / "e2")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 6
    model = peft.PeftModel.from_pretrained(_tiny_llama(), out)
    sd = peft.get_peft_model_state_dict(model)
    assert {tuple(v.shape) for k, v in sd.items() if "lora_A" in k} == {(6, 16)}


def test_prototypes_are_stored(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    bank_add(bank, "a", raw_adapter(tmp_path / "a.safetensors", 0))
    bank_add(bank, "b", raw_adapter(tmp_path / "b.safetensors", 1))
    protos = torch.arange(12.0).reshape(4, 3)
    bank_set_prototypes(bank, protos, [0, 0, "b", 1])
    b = load_bank(bank)
    assert b.class_to_task == ["a", "a", "b", "b"] and torch.equal(b.prototypes, protos)
    assert bank_list(bank)["classes"] == 4
    merged = mos_merge(bank, out=tmp_path / "m.safetensors")
    assert load_bank(merged).class_to_task == ["a", "a", "b", "b"]
    with pytest.raises(UsageError, match="class 1"):
        bank_set_prototypes(bank, protos, [0, 7, 1, 1])
    with pytest.raises(UsageError, match="entries"):
        bank_set_prototypes(bank, protos, [0, 1])
    with pytest.raises(UsageError, match="prototypes must be a tensor"):
        bank_set_prototypes(bank, protos.tolist(), [0, 0, 1, 1])
    with pytest.raises(UsageError, match="is a directory"):
        bank_list(tmp_path)


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written


def test_different_shapes_are_refused(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    bank_add(bank, "a", raw_adapter(tmp_path / "a.safetensors", 0))
    before = bank.read_bytes()
    odd = raw_adapter(
        tmp_path / "odd.safetensors", 1, {"blocks.0.down.weight": (3, 4), "blocks.0.down.bias": (3,), "blocks.0.up.weight": (4, 3)}
    )
    r = mlite("bank", "add", bank, "--task", "b", odd)
    assert r.exit_code == 4
    assert "task 'b'" in r.output and "blocks.0.down" in r.output and "shape" in r.output
    assert bank.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "bank.safetensors", "odd.safetensors"]


def test_different_tensor_names_are_refused(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    bank_add(bank, "a", raw_adapter(tmp_path / "a.safetensors", 0))
    other = raw_adapter(tmp_path / "o.safetensors", 1, {"blocks.0.down.weight": (2, 4)})
    with pytest.raises(CheckpointError, match="'blocks.0.down.bias' of task 'a' is missing"):
        bank_add(bank, "b", other)


def test_different_target_modules_are_refused(tmp_path: Path, base) -> None:
    bank = tmp_path / "bank.safetensors"
    bank_add(bank, "a", make_lora_adapter(base, tmp_path / "qv", seed=0))
    before = bank.read_bytes()
    qk = make_lora_adapter(base, tmp_path / "qk", seed=1, target_modules=("q_proj", "k_proj"))
    r = mlite("bank", "add", bank, "--task", "b", qk)
    assert r.exit_code == 4
    assert "task 'b' targets different modules" in r.output and "k_proj" in r.output
    assert bank.read_bytes() == before
    r = mlite("bank", "add", bank, "--task", "c", raw_adapter(tmp_path / "raw.safetensors", 0))
    assert r.exit_code == 4 and "raw adapter" in r.output


def test_existing_task_name_is_refused(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    bank_add(bank, "a", raw_adapter(tmp_path / "a.safetensors", 0))
    before = bank.read_bytes()
    r = mlite("bank", "add", bank, "--task", "a", raw_adapter(tmp_path / "b.safetensors", 1))
    assert r.exit_code == 2 and "already has a task named 'a'" in r.output
    assert bank.read_bytes() == before
    for bad in ("a.b", "", "x y"):
        with pytest.raises(UsageError, match="invalid"):
            bank_add(bank, bad, tmp_path / "b.safetensors")
    assert bank.read_bytes() == before


def _empty_bank(path: Path) -> Path:
    meta = {"format": "pt", "mlite_bank": "1", "tasks": "[]", "members": "{}", "momentum": "null", "scale": "null"}
    save_file({}, str(path), metadata=meta)
    return path


def test_empty_bank_is_refused(tmp_path: Path) -> None:
    bank = _empty_bank(tmp_path / "empty.safetensors")
    assert bank_list(bank)["tasks"] == []
    r = mlite("mos", "merge", bank, "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 2 and "holds no tasks" in r.output
    r = mlite("bank", "export", bank, "--task", "a", "--out", tmp_path / "e")
    assert r.exit_code == 2 and "holds no tasks" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.safetensors"]


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    r = mlite("bank", "list", tmp_path / "nope.safetensors")
    assert r.exit_code == 2 and "does not exist" in r.output
    r = mlite("bank", "add", tmp_path / "bank.safetensors", "--task", "a", tmp_path / "nope")
    assert r.exit_code == 2 and not (tmp_path / "bank.safetensors").exists()
    plain = raw_adapter(tmp_path / "plain.safetensors", 0)
    r = mlite("bank", "list", plain)
    assert r.exit_code == 4 and "not an adapter bank" in r.output
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        bank_add(tmp_path / "b2.safetensors", "a", tmp_path / "junk.safetensors")
    (tmp_path / "notpeft").mkdir()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        bank_add(tmp_path / "b2.safetensors", "a", tmp_path / "notpeft")
    with pytest.raises(UsageError, match="does not exist"):  # a missing file argument: exit 2, as docs/cli.md says
        bank_export(tmp_path / "nope.safetensors", "a", tmp_path / "x")
    with pytest.raises(UsageError, match="does not exist"):
        bank_add(tmp_path / "b2.safetensors", "a", tmp_path / "nope")
    (tmp_path / "strpeft").mkdir()
    (tmp_path / "strpeft" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}')
    with pytest.raises(CheckpointError, match="'r' must be a positive integer, got 0"):
        bank_add(tmp_path / "b2.safetensors", "a", tmp_path / "strpeft")
    assert not (tmp_path / "b2.safetensors").exists()


def test_export_refusals_and_force(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    src = raw_adapter(tmp_path / "a.safetensors", 0)
    bank_add(bank, "a", src)
    r = mlite("bank", "export", bank, "--task", "zzz", "--out", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "no task 'zzz'" in r.output and "tasks: a" in r.output
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"old")
    r = mlite("bank", "export", bank, "--task", "a", "--out", out)
    assert r.exit_code == 2 and "already exists" in r.output and out.read_bytes() == b"old"
    r = mlite("bank", "export", bank, "--task", "a", "--out", out, "--force")
    assert r.exit_code == 0 and load_file(str(out)).keys() == load_file(str(src)).keys()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _rewrite(bank: Path, out: Path, *, tensors=None, **meta_changes) -> Path:
    """A copy of `bank` with header fields replaced (JSON-encoded) and tensors edited by `tensors`."""
    with safe_open(str(bank), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in meta_changes.items():
        meta[key] = value if isinstance(value, str) and key == "mlite_bank" else json.dumps(value)
    if tensors is not None:
        tensors(data)
    save_file(data, str(out), metadata=meta)
    return out


def test_a_malformed_bank_is_refused_on_load_with_one_line(tmp_path: Path) -> None:
    """A bank edited by hand (or written by another tool) is checked as `bank add` checks members:
    the merge, export and retrieval never see mismatched tasks (they crashed with tracebacks)."""
    bank = tmp_path / "bank.safetensors"
    for i in range(2):
        bank_add(bank, f"t{i}", raw_adapter(tmp_path / f"a{i}.safetensors", seed=i))
    bank_set_prototypes(bank, torch.eye(2), ["t0", "t1"])
    key = "adapters.t1.blocks.0.down.weight"

    def reshaped(d):
        d[key] = torch.ones(3, 4)

    def dropped(d):
        del d[key]

    def as_int(d):
        d[key] = torch.ones(2, 4, dtype=torch.int64)

    cases = [
        (_rewrite(bank, tmp_path / "b1.safetensors", tensors=reshaped), "has shape [3, 4], task 't0' has [2, 4]"),
        (_rewrite(bank, tmp_path / "b2.safetensors", tensors=dropped), "of task 't0' is missing"),
        (_rewrite(bank, tmp_path / "b3.safetensors", tensors=as_int), "integer and float parameters"),
        (_rewrite(bank, tmp_path / "b4.safetensors", mlite_bank="99"), "format version '99'"),
        (_rewrite(bank, tmp_path / "b5.safetensors", tasks=["t0", "t1", "t1"]), "listed twice"),
        (_rewrite(bank, tmp_path / "b6.safetensors", tasks=["t0", "t1", "t2"],
                  members={t: {"kind": "raw"} for t in ("t0", "t1", "t2")}), "task 't2' holds no tensors"),
        (_rewrite(bank, tmp_path / "b7.safetensors", class_to_task=["t0", "zz"]), "names task 'zz'"),
        (_rewrite(bank, tmp_path / "b8.safetensors", members={"t0": {"kind": "lora"}, "t1": {"kind": "lora"}}),
         "LoRA task 't0' has no adapter_config"),
        (_rewrite(bank, tmp_path / "b9.safetensors", momentum="fast"), "'momentum' must be a number"),
        (_rewrite(bank, tmp_path / "b10.safetensors", class_to_task=["t0"]), "2 prototype rows but class_to_task has 1"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_bank(path)
        for args in (("mos", "merge", path, "--out", tmp_path / "m.safetensors", "--force"),
                     ("bank", "export", path, "--task", "t1", "--out", tmp_path / "e.safetensors", "--force")):
            r = mlite(*args)
            assert r.exit_code == 4 and message in r.output and "Traceback" not in r.output, (path, r.output)
            assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "e.safetensors").exists()


def test_an_integer_parameter_where_the_bank_has_a_float_one_is_refused(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    bank_add(bank, "t0", raw_adapter(tmp_path / "a0.safetensors", seed=0))
    ints = tmp_path / "ints.safetensors"
    save_file({"blocks.0.down.weight": torch.ones(2, 4, dtype=torch.int32), "blocks.0.down.bias": torch.ones(2),
               "blocks.0.up.weight": torch.ones(4, 2)}, str(ints))
    with pytest.raises(CheckpointError, match="'blocks.0.down.weight' is int32, task 't0' has float32"):
        bank_add(bank, "t1", ints)
    assert load_bank(bank).tasks == ["t0"]


def test_merge_records_say_which_tasks_they_covered(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    for i in range(2):
        bank_add(bank, f"t{i}", raw_adapter(tmp_path / f"a{i}.safetensors", seed=i))
    merged = tmp_path / "merged.safetensors"
    mos_merge(bank, momentum=0.3, out=merged)
    bank_add(merged, "t2", raw_adapter(tmp_path / "a2.safetensors", seed=2))
    assert load_bank(merged).merge["tasks"] == ["t0", "t1"]
    r = mlite("bank", "list", merged)
    assert r.exit_code == 0, r.output
    assert "merged: momentum=0.3 mode=stored space=factors rank=None (tasks t0, t1)" in r.output
    assert "not merged: t2 (added after the merge)" in r.output
    again = tmp_path / "again.safetensors"
    mos_merge(merged, momentum=0.5, out=again)
    record = load_bank(again).merge
    assert record["tasks"] == ["t0", "t1", "t2"] and record["previous"]["momentum"] == 0.3
    r = mlite("bank", "list", again)
    assert "from an earlier merge: momentum=0.3" in r.output and "not merged" not in r.output


def test_a_bank_is_not_added_as_a_task_of_another(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    bank_add(bank, "t0", raw_adapter(tmp_path / "a0.safetensors", seed=0))
    with pytest.raises(UsageError, match="is an adapter bank, not one adapter"):
        bank_add(tmp_path / "other.safetensors", "t0", bank)


def test_an_adapter_holding_nan_is_refused_by_the_bank_and_the_merge(tmp_path: Path) -> None:
    """A diverged adapter spread its NaN to every later task (factors) or crashed the SVD (delta)."""
    bad = raw_adapter(tmp_path / "bad.safetensors", seed=2)
    tensors = load_file(str(bad))
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(bad))
    with pytest.raises(CheckpointError, match=f"bad.safetensors: tensor '{key}' holds inf or NaN"):
        bank_add(tmp_path / "b.safetensors", "t1", bad)
    b = bank_add(tmp_path / "b.safetensors", "t0", raw_adapter(tmp_path / "ok.safetensors", seed=1))
    member = b.members["t0"]
    member.tensors[key] = tensors[key]  # a bank written before bank_add refused such tensors
    with pytest.raises(CheckpointError, match=f"task 't0': tensor '{key}' holds inf or NaN"):
        mos_merge(b)


def test_delta_space_refuses_a_lora_with_zero_scaling(tmp_path: Path, base) -> None:
    for task, alpha in (("t0", 8.0), ("t1", 0.0)):
        bank_add(tmp_path / "b.safetensors", task, make_lora_adapter(base, tmp_path / task, alpha=alpha))
    with pytest.raises(UsageError, match="task 't1': module .* has scaling 0 \\(lora_alpha 0\\)"):
        mos_merge(tmp_path / "b.safetensors", space="delta")


def test_class_to_task_is_checked_for_what_it_may_hold(tmp_path: Path) -> None:
    """Task names need a bank, floats are refused (not truncated), an index tensor is fine,
    zero classes and non-finite prototypes are refused; these were raw errors or accepted."""
    from mergekit_lite.workflows.mos import retrieve

    bank = tmp_path / "b.safetensors"
    for i in range(2):
        bank_add(bank, f"t{i}", raw_adapter(tmp_path / f"a{i}.safetensors", seed=i))
    x, protos = torch.randn(5, 4), torch.randn(4, 4)
    adapters = [{"W": torch.randn(4, 4)} for _ in range(2)]

    def features(inp: torch.Tensor, adapter: dict | None) -> torch.Tensor:
        return inp if adapter is None else inp @ adapter["W"]

    with pytest.raises(UsageError, match="class 0: 't0' is not a task index \\(task names need bank=\\)"):
        retrieve(x, features, protos, ["t0", "t0", "t1", "t1"], adapters)
    with pytest.raises(UsageError, match="class 0: 0.7 is not a task index"):
        retrieve(x, features, protos, [0.7, 0.7, 1.9, 1.9], adapters)
    with pytest.raises(UsageError, match="class_to_task is empty"):
        retrieve(x, features, torch.randn(0, 4), [], adapters)
    b = bank_set_prototypes(bank, protos, torch.tensor([0, 0, 1, 1]))
    assert b.class_to_task == ["t0", "t0", "t1", "t1"]
    with pytest.raises(UsageError, match="prototypes hold inf or NaN"):
        bank_set_prototypes(bank, torch.full((4, 4), float("nan")), [0, 0, 1, 1])
    assert retrieve(x, lambda inp, adapter: inp, class_to_task=["t0", "t0", "t1", "t1"], bank=bank).tasks.shape == (5,)
