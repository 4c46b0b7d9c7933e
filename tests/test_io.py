"""The checkpoint reader and shard writer: round trips, laziness, and every failure mode."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from helpers import force_direct_io, leftovers, load_dir
from safetensors.torch import save_file

from mergekit_lite.errors import CheckpointError, ResolveError, UsageError
from mergekit_lite.io.checkpoint import open_checkpoint
from mergekit_lite.io.writer import CheckpointWriter, OutputTensor, plan_shards
from mergekit_lite.synthetic import LlamaShape, make_base, save_checkpoint


def _copy(src_dir: Path, out: Path, shard_size: int, order=None) -> Path:
    ck = open_checkpoint(src_dir)
    plan = [OutputTensor(n, ck.info(n).dtype, ck.info(n).shape) for n in ck.names()]
    with CheckpointWriter(out, plan, shard_size=shard_size) as w:
        for n in order(ck.names()) if order else ck.names():
            w.write(n, ck.load(n))
        return w.finish(copy_from=ck)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sharded_round_trip_is_bit_exact(tmp_path, monkeypatch, dtype, direct):
    if direct:
        force_direct_io(monkeypatch)
    shape = LlamaShape()
    state = make_base(shape, seed=3)
    state["model.rotary.position_ids"] = torch.arange(16, dtype=torch.int64)
    state["model.mask"] = torch.tensor([True, False, True])
    src = save_checkpoint(state, tmp_path / "src", shape=shape, num_shards=3, dtype=dtype)
    out = _copy(src, tmp_path / "out", shard_size=3000, order=lambda ns: list(reversed(ns)))
    got = load_dir(out)
    want = load_dir(src)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k], want[k]), k
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    for shard in set(index["weight_map"].values()):
        assert (out / shard).is_file() and shard.startswith("model-000")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (out / "generation_config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("preadv", [True, False], ids=["preadv", "pread"])
def test_positioned_reads_with_and_without_preadv(tmp_path, monkeypatch, preadv):
    """macOS before 11 has no os.preadv: the pread fallback reads the same bytes, short reads included."""
    from mergekit_lite.io import safetensors_format as fmt

    read = fmt._pread_into if preadv else fmt._pread_copy
    calls: list[int] = []

    def short_reads(fd: int, buffer: memoryview, offset: int) -> int:  # at most 5 bytes a call
        calls.append(offset)
        return read(fd, buffer[:5], offset)

    monkeypatch.setattr(fmt, "_PREAD", short_reads)
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(40)))
    buf = bytearray(12)
    fd = os.open(path, os.O_RDONLY)
    try:
        fmt.pread_exact(fd, memoryview(buf), 7, path)
        assert bytes(buf) == bytes(range(7, 19)) and calls == [7, 12, 17]
        with pytest.raises(CheckpointError, match="truncated while reading at byte 40"):
            fmt.pread_exact(fd, memoryview(buf), 35, path)
    finally:
        os.close(fd)


def test_single_shard_is_named_model_safetensors(tmp_path):
    src = save_checkpoint(make_base(LlamaShape()), tmp_path / "src", shape=LlamaShape())
    out = _copy(src, tmp_path / "out", shard_size=10**9)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_load_touches_only_that_tensor(model_set):
    ck = open_checkpoint(model_set.base)
    assert len(ck.shards) == 3
    name = "model.layers.1.mlp.up_proj.weight"
    t = ck.load(name)
    assert ck.reads == [(name, ck.info(name).nbytes)]
    assert ck.bytes_read == t.numel() * 4
    assert t.shape == ck.info(name).shape


def test_load_casts_to_requested_dtype_and_device(model_set):
    ck = open_checkpoint(model_set.base)
    t = ck.load("model.norm.weight", device="cpu", dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16 and t.device.type == "cpu"


def test_directory_without_index_and_single_file(tmp_path):
    state = make_base(LlamaShape())
    d = tmp_path / "noindex"
    d.mkdir()
    names = list(state)
    save_file({k: state[k] for k in names[:5]}, str(d / "a.safetensors"))
    save_file({k: state[k] for k in names[5:]}, str(d / "b.safetensors"))
    ck = open_checkpoint(d)
    assert set(ck.names()) == set(names)
    single = open_checkpoint(d / "a.safetensors")
    assert ck.tied_embeddings is False and len(single) == 5


def test_tied_embeddings_are_understood(tmp_path):
    shape = LlamaShape(tie_word_embeddings=True)
    src = save_checkpoint(make_base(shape), tmp_path / "tied", shape=shape)
    ck = open_checkpoint(src)
    assert "lm_head.weight" not in ck.names() and ck.tied_embeddings
    # asked for its lm_head, a tied checkpoint answers with its input embedding (as transformers ties it)
    assert "lm_head.weight" in ck and ck.tied_head_source == "model.embed_tokens.weight"
    assert torch.equal(ck.load("lm_head.weight"), ck.load("model.embed_tokens.weight"))
    assert ck.info("lm_head.weight") == ck.info("model.embed_tokens.weight")


def test_plan_shards_respects_byte_bound():
    ts = [OutputTensor(f"t{i}", "F32", (10, 10)) for i in range(10)]  # 400 bytes each
    layouts = plan_shards(ts, shard_size=1000)
    assert [len(lay.tensors) for lay in layouts] == [2, 2, 2, 2, 2]
    assert plan_shards([OutputTensor("big", "F32", (100, 100))], 10)[0].file_name == "model.safetensors"


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def test_truncated_shard(model_set):
    shard = sorted(model_set.base.glob("model-*.safetensors"))[1]
    _truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(CheckpointError, match="truncated") as e:
        open_checkpoint(model_set.base)
    assert shard.name in str(e.value) and e.value.exit_code == 4


def test_corrupt_header(model_set):
    shard = sorted(model_set.base.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"{{{{"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        open_checkpoint(model_set.base)


def test_absurd_header_length(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        open_checkpoint(f)


def _raw_shard(path: Path, header_text: str, data_len: int) -> Path:
    """A shard with a hand-written header (padded to 8 bytes) and `data_len` bytes of data."""
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256))
    return path


@pytest.mark.parametrize(("header", "data_len", "message"), [
    # two tensors reading the same bytes (the safetensors library refuses this file)
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
     ' "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "overlaps the tensor before it"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
     ' "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}', 16, "leaves 4 unused bytes before it"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
     ' "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', 16, "tensor 'a' listed twice"),
    ('{"a": {"dtype": "F32", "shape": [2.9], "data_offsets": [0, 8]}}', 8, "expected lists of non-negative integers"),
    ('{"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}', 8, "expected lists of non-negative integers"),
    ('{"a": {"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 8]}}', 8, "expected lists of non-negative integers"),
    ('{"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}', 8, "expected lists of non-negative integers"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}', 8, "expected lists of non-negative integers"),
    ('{"__metadata__": ["x"], "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "__metadata__"),
    ('{"__metadata__": {"k": {"n": 1}}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "__metadata__"),
    ('{"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', 8, "unsupported dtype"),
    ("[" * 100000 + "]" * 100000, 0, "corrupt safetensors header"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 12, "4 bytes after the last tensor's data"),
])
def test_headers_the_safetensors_library_refuses_are_refused(tmp_path, header, data_len, message):
    shard = _raw_shard(tmp_path / "m.safetensors", header, data_len)
    with pytest.raises(CheckpointError, match=message) as e:
        open_checkpoint(shard)
    assert "m.safetensors" in str(e.value)


def test_missing_shard_named_by_index(model_set):
    shard = sorted(model_set.base.glob("model-*.safetensors"))[2]
    os.remove(shard)
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}' named by the index does not exist"):
        open_checkpoint(model_set.base)


def test_bin_refused_without_opt_in(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(d)
    ck = open_checkpoint(d, allow_bin=True)
    assert torch.equal(ck.load("w"), torch.ones(2))


@pytest.mark.parametrize(("content", "message"), [
    (torch.ones(2), "holds a Tensor, not a state dict"),
    ([torch.ones(2)], "holds a list, not a state dict"),
    ({"w": 3}, "entry 'w' is a int, not a tensor"),
    ({"w": {"inner": torch.ones(2)}}, "entry 'w' is a dict, not a tensor"),
])
def test_bin_that_is_not_a_flat_state_dict_is_refused(tmp_path, content, message):
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(content, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(d, allow_bin=True)


@pytest.mark.parametrize("weight_map", [{"w": 3}, {"w": None}, {"w": ["a.safetensors"]}, {"w": "../x.safetensors"}])
def test_index_whose_weight_map_is_not_file_names_is_refused(tmp_path, weight_map):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="corrupt index file"):
        open_checkpoint(d)


def test_config_that_is_not_utf8_is_a_checkpoint_error(model_set):
    (model_set.base / "config.json").write_bytes(b'{"x": "\xff"}')
    with pytest.raises(CheckpointError, match="unreadable config.json"):
        open_checkpoint(model_set.base)


def test_config_that_is_not_an_object_is_refused(model_set):
    """It was ignored: the output then had no config.json at all."""
    (model_set.base / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json holds a JSON list, not an object"):
        open_checkpoint(model_set.base)


def test_index_that_is_not_json_says_so(model_set):
    (model_set.base / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"corrupt index file, not JSON \(Expecting property name"):
        open_checkpoint(model_set.base)


def test_single_file_beside_an_index_is_read_as_transformers_reads_it(tmp_path, model_set, caplog):
    """transformers loads model.safetensors before an index; the index alone was read, so the
    merge could differ from the weights the model runs with."""
    d = model_set.base
    state = {n: t + 1 for n, t in load_dir(d).items()}
    save_file(state, str(d / "model.safetensors"))
    with caplog.at_level("WARNING"):
        ck = open_checkpoint(d)
    assert ck.shards == [d / "model.safetensors"]
    assert all(torch.equal(ck.load(n), t) for n, t in state.items())
    assert "holds both model.safetensors and model.safetensors.index.json" in caplog.text


def test_unreadable_directory_is_the_systems_refusal_naming_it(tmp_path, model_set, monkeypatch):
    """A directory we may not list (chmod 000; simulated, as tests may run as root) is exit 6
    naming it; the message named an adapter_config.json that does not exist."""
    import errno

    from mergekit_lite.cli.main import app
    from typer.testing import CliRunner

    from mergekit_lite.io import checkpoint

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint.os, "listdir", refuse)
    res = CliRunner().invoke(app, ["inspect", str(model_set.base)])
    assert res.exit_code == 6 and res.output.strip() == f"error: {model_set.base}: Permission denied"


def test_loads_are_the_callers_to_modify(tmp_path, model_set):
    """A .bin checkpoint is held whole in memory; what `load` returns must not be that memory."""
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"w": torch.ones(4, 2)}, d / "pytorch_model.bin")
    for ck in (open_checkpoint(d, allow_bin=True), open_checkpoint(model_set.base)):
        name = next(n for n in ck.names() if len(ck.info(n).shape) == 2)
        first = ck.load(name).clone()
        for kwargs in ({}, {"rows": (1, 3)}, {"dtype": first.dtype}):
            ck.load(name, **kwargs).add_(1)
        assert torch.equal(ck.load(name), first)


def test_non_empty_output_refused_and_nothing_left(tmp_path, model_set):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        _copy(model_set.base, out, 10**9)
    assert (out / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_failure_mid_write_leaves_nothing(tmp_path, model_set):
    ck = open_checkpoint(model_set.base)
    plan = [OutputTensor(n, ck.info(n).dtype, ck.info(n).shape) for n in ck.names()]
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(tmp_path / "out", plan) as w:
        w.write(ck.names()[0], ck.load(ck.names()[0]))
        raise RuntimeError("boom")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / ".out.mlite-partial").exists()


def test_a_full_disk_at_the_resume_key_names_the_file_and_leaves_nothing(tmp_path, model_set, monkeypatch):
    """On a disk already full, writing the resume key fails in write(), which names no file: the
    CLI printed a bare "No space left on device" and left a hidden partial output holding an
    empty key."""
    import errno

    ck = open_checkpoint(model_set.base)
    plan = [OutputTensor(n, ck.info(n).dtype, ck.info(n).shape) for n in ck.names()]
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "mlite-resume.key":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as exc:
        CheckpointWriter(tmp_path / "out", plan, partial_key="k")
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(tmp_path / ".out.mlite-partial" / "mlite-resume.key")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / ".out.mlite-partial").exists()


def test_unwritten_tensor_is_an_error(tmp_path, model_set):
    ck = open_checkpoint(model_set.base)
    plan = [OutputTensor(n, ck.info(n).dtype, ck.info(n).shape) for n in ck.names()]
    with pytest.raises(CheckpointError, match="never written"), CheckpointWriter(tmp_path / "out", plan) as w:
        w.finish()
    assert not (tmp_path / "out").exists()


def test_a_run_that_loses_the_race_to_create_the_partial_output_says_another_run_writes(tmp_path, model_set,
                                                                                        monkeypatch):
    """Two --force runs started together: one said '.out.mlite-partial: File exists', exit 6."""
    ck = open_checkpoint(model_set.base)
    plan = [OutputTensor(n, ck.info(n).dtype, ck.info(n).shape) for n in ck.names()]
    partial = CheckpointWriter.partial_dir(tmp_path / "out")
    real_mkdir = Path.mkdir

    def other_run_first(self, *args, **kwargs):
        if self == partial:
            real_mkdir(self)  # the other run's mkdir lands between our check and ours
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_run_first)
    with pytest.raises(UsageError, match="another mlite run is writing this output now"):
        CheckpointWriter(tmp_path / "out", plan, partial_key="k1", force=True)


@pytest.mark.skipif(os.name != "posix", reason="advisory locks are POSIX")
def test_two_writers_of_one_output_cannot_overlap(tmp_path, model_set):
    ck = open_checkpoint(model_set.base)
    plan = [OutputTensor(n, ck.info(n).dtype, ck.info(n).shape) for n in ck.names()]
    with CheckpointWriter(tmp_path / "out", plan, partial_key="k1") as first:
        for key, resume in (("k2", False), ("k1", True)):  # another recipe, or a resume of this one
            with pytest.raises(UsageError, match="another mlite run is writing this output now"):
                CheckpointWriter(tmp_path / "out", plan, partial_key=key, resume=resume)
        for n in ck.names():
            first.write(n, ck.load(n))
        first.finish()
    assert load_dir(tmp_path / "out").keys() == set(ck.names())
    # once published, the lock is gone: a new run may write (and replace) the output
    with CheckpointWriter(tmp_path / "out", plan, partial_key="k2", force=True) as second:
        for n in ck.names():
            second.write(n, ck.load(n))
        second.finish()
    assert leftovers(tmp_path) == []


def _populate_hub_cache(cache: Path, src: Path, repo: str = "acme/tiny", commit: str = "a" * 40) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_hub_reference_resolves_from_offline_cache(tmp_path, model_set, monkeypatch):
    import huggingface_hub.constants as hc

    _populate_hub_cache(tmp_path / "hub", model_set.base)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ck = open_checkpoint("acme/tiny")
    assert set(ck.names()) == set(open_checkpoint(model_set.base).names())
    ck2 = open_checkpoint("acme/tiny@main")
    assert len(ck2) == len(ck)


def test_hub_reference_missing_offline_is_exit_5(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ResolveError, match=r"^acme/missing: not a local path; cannot resolve Hub reference \(not in") as e:
        open_checkpoint("acme/missing")
    assert e.value.exit_code == 5


def _corrupt_header(ms) -> None:
    shard = sorted(ms.base.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"{{{{"
    shard.write_bytes(bytes(data))


def _drop_shard(ms) -> None:
    os.remove(sorted(ms.base.glob("model-*.safetensors"))[2])


def _truncate_shard(ms) -> None:
    shard = sorted(ms.base.glob("model-*.safetensors"))[1]
    _truncate(shard, shard.stat().st_size - 10)


@pytest.mark.parametrize(("damage", "message"), [
    (_corrupt_header, "corrupt safetensors header"),
    (_drop_shard, "named by the index does not exist"),
    (_truncate_shard, "truncated"),
])
def test_cli_bad_checkpoints_exit_4_with_one_line(tmp_path, model_set, damage, message):
    from mergekit_lite.cli.main import app
    from typer.testing import CliRunner

    damage(model_set)
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(model_set.base)])
    assert res.exit_code == 4 and message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: {{base: {model_set.base}, a: {model_set.finetunes[0]}}}\n"
                      f"steps: [{{id: m, method: task_arithmetic, base: base, models: [a]}}]\n"
                      f"output: {{path: {tmp_path / 'out'}}}\n")
    res = runner.invoke(app, ["merge", str(recipe)])
    assert res.exit_code == 4 and message in res.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / ".out.mlite-partial").exists()


def test_cli_hub_reference_offline_is_exit_5(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    from mergekit_lite.cli.main import app
    from typer.testing import CliRunner

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(app, ["inspect", "acme/not-cached"])
    assert res.exit_code == 5 and "acme/not-cached" in res.output and "Traceback" not in res.output


def _quantize_by_config(model_set) -> str:
    cfg = json.loads((model_set.finetunes[0] / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model_set.finetunes[0] / "config.json").write_text(json.dumps(cfg))
    return "config.json quantization_config, quant_method 'gptq'"


def _quantize_by_tensor(model_set) -> str:
    (model_set.finetunes[0] / "config.json").unlink()
    save_file({"model.layers.0.mlp.up_proj.qweight": torch.zeros(4, 8, dtype=torch.int32)},
              model_set.finetunes[0] / "extra.safetensors")
    index = model_set.finetunes[0] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.0.mlp.up_proj.qweight"] = "extra.safetensors"
    index.write_text(json.dumps(data))
    return "tensor model.layers.0.mlp.up_proj.qweight"


@pytest.mark.parametrize("quantize", [_quantize_by_config, _quantize_by_tensor], ids=["config", "tensor"])
def test_quantized_checkpoints_are_inspected_but_not_merged(tmp_path, model_set, quantize):
    """Packed integers were copied from the base while their scales were merged: a meaningless model."""
    from mergekit_lite.cli.main import app
    from typer.testing import CliRunner

    from mergekit_lite import api

    mark = quantize(model_set)
    ft = model_set.finetunes[0]
    assert api.inspect(ft).quantization == mark
    assert open_checkpoint(model_set.base).quantization is None
    with pytest.raises(CheckpointError, match="a quantized checkpoint") as e:
        open_checkpoint(ft)
    assert e.value.exit_code == 4
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(ft), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["quantized"] == mark
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: {{base: {model_set.base}, a: {ft}}}\n"
                      f"steps: [{{id: m, method: task_arithmetic, base: base, models: [a]}}]\n"
                      f"output: {{path: {tmp_path / 'out'}}}\n")
    want = (f"{ft}: a quantized checkpoint ({mark}); mlite computes on full-precision weights: use the "
            "unquantized model, or dequantize it first")
    for args in (["merge", str(recipe)],
                 ["patch", "--base", str(model_set.base), "--delta", str(ft), "--old-base", str(model_set.base),
                  "--out", str(tmp_path / "out")],
                 ["extract", "--model", str(ft), "--base", str(model_set.base), "--rank", "2",
                  "--out", str(tmp_path / "out")]):
        res = runner.invoke(app, args)
        where = {"merge": f"{recipe}:1: input 'a': ", "patch": "input 'delta': "}.get(args[0], "")
        line = f"error: {where}{want}"
        assert res.exit_code == 4 and res.output.strip() == line, (args, res.output)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / ".out.mlite-partial").exists()


def test_small_file_write_failures_are_os_errors_naming_the_target(tmp_path, monkeypatch):
    """safetensors raises SafetensorError for a refused write: the CLI printed a traceback, exit 1."""
    from safetensors import SafetensorError

    from mergekit_lite.io import safetensors_format as fmt

    def refused(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    monkeypatch.setattr(fmt, "save_file", refused)
    with pytest.raises(OSError) as e:
        fmt.write_file({"a": torch.zeros(2)}, tmp_path / ".tmp-1", target=tmp_path / "bank.safetensors")
    assert (e.value.errno, e.value.strerror, e.value.filename) == (28, os.strerror(28), str(tmp_path / "bank.safetensors"))

    def other(*args, **kwargs):
        raise SafetensorError("Error while serializing: something else")

    monkeypatch.setattr(fmt, "save_file", other)
    with pytest.raises(SafetensorError):  # not an I/O failure: a bug, so it stays what it is
        fmt.write_file({"a": torch.zeros(2)}, tmp_path / "x")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where no file can be created")
def test_cli_bank_add_to_a_place_that_refuses_files_is_one_line_exit_6(model_set):
    from mergekit_lite.cli.main import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["bank", "add", "/proc/bank.safetensors", str(model_set.adapter), "--task", "t0"])
    assert res.exit_code == 6 and res.output.strip() == "error: /proc/bank.safetensors: No such file or directory"


@pytest.mark.parametrize("failure", ["refused", "interrupted"])
def test_a_replaced_output_that_cannot_be_deleted_is_named_not_hidden(tmp_path, monkeypatch, caplog, failure):
    """--force over an old output: the new one was published, but a failed or interrupted delete of
    the old one left .out.mlite-old-* behind in silence (or said 'nothing was published')."""
    import logging
    import shutil

    from mergekit_lite.io import publish

    target, tmp = tmp_path / "out", tmp_path / "new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")

    def rmtree(path, onerror=None):
        if failure == "interrupted":
            raise KeyboardInterrupt
        onerror(os.unlink, str(path / "old.txt"), (PermissionError, PermissionError(13, "Permission denied"), None))

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with caplog.at_level(logging.WARNING, logger="mergekit_lite"):
        publish.put_in_place(tmp, target)
    assert (target / "new.txt").read_text() == "new"
    (trash,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.mlite-old-")]
    assert f"{target} is in place, but the output it replaced could not all be deleted" in caplog.text
    assert f"delete {trash} yourself" in caplog.text
    assert ("interrupted" if failure == "interrupted" else "Permission denied") in caplog.text
