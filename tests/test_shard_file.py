"""Output shard files: direct writes split at block edges, held blocks, fallbacks, the resume log."""

from __future__ import annotations

import errno
import fcntl
import os
import random

import pytest
import torch
from helpers import direct_file_on_plain_fd, force_direct_io, load_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite.io import shard_file
from mergekit_lite.io.shard_file import BLOCK, BufferedShardFile, DirectShardFile, open_shard
from mergekit_lite.io.writer import CheckpointWriter, OutputTensor


@pytest.fixture
def disk_writes(monkeypatch):
    """Every (offset, length) that reaches os.pwrite, to check O_DIRECT's alignment rules."""
    seen: list[tuple[int, int]] = []
    real = os.pwrite

    def spy(fd, data, offset):
        seen.append((offset, len(memoryview(data))))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return seen


def _aligned_bytes(size: int, phase: int) -> tuple[torch.Tensor, memoryview]:
    """`size` random bytes whose address is `phase` modulo BLOCK (the tensor keeps them alive)."""
    raw = torch.empty(size + 2 * BLOCK, dtype=torch.uint8)
    skip = (phase - raw.data_ptr()) % BLOCK
    view = raw[skip : skip + size]
    view.copy_(torch.frombuffer(bytearray(os.urandom(size)), dtype=torch.uint8))
    return raw, memoryview(view.numpy())


def _pieces(size: int, cuts: list[int], seed: int) -> list[tuple[int, int]]:
    bounds = sorted({0, size, *(c % size for c in cuts)})
    pieces = list(zip(bounds[:-1], bounds[1:], strict=True))
    random.Random(seed).shuffle(pieces)
    return pieces


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 5 * BLOCK + 77), cuts=st.lists(st.integers(0, 10**6), max_size=12), seed=st.integers(0, 99))
def test_any_split_in_any_order_gives_the_same_bytes_in_aligned_writes(tmp_path_factory, size, cuts, seed):
    path = tmp_path_factory.mktemp("direct") / "f.bin"
    payload = os.urandom(size)
    seen: list[tuple[int, int]] = []
    real = os.pwrite
    os.pwrite = lambda fd, data, off: (seen.append((off, len(memoryview(data)))), real(fd, data, off))[1]
    try:
        f = direct_file_on_plain_fd(path, size)
        for a, b in _pieces(size, cuts, seed):
            f.pwrite(memoryview(payload)[a:b], a)
        f.close()
    finally:
        os.pwrite = real
    assert path.read_bytes() == payload
    assert all(off % BLOCK == 0 and n % BLOCK == 0 for off, n in seen), seen


def test_staging_buffer_chunks_a_long_aligned_middle(tmp_path, disk_writes, monkeypatch):
    monkeypatch.setattr(shard_file, "STAGING_BYTES", 2 * BLOCK)
    size = 7 * BLOCK + 5
    keep, view = _aligned_bytes(size, 8)  # not block-aligned: the middle must be staged
    payload = bytes(view)
    f = direct_file_on_plain_fd(tmp_path / "f.bin", size)
    # Block 0 is held (bytes 0-9 are missing); 6 blocks go through staging, 2 at a time; the
    # last 5 bytes complete the file's last block, which is written padded.
    f.pwrite(view[10:], 10)
    assert disk_writes == [(BLOCK, 2 * BLOCK), (3 * BLOCK, 2 * BLOCK), (5 * BLOCK, 2 * BLOCK), (7 * BLOCK, BLOCK)]
    f.pwrite(memoryview(payload)[:10], 0)  # completes block 0
    assert disk_writes[-1] == (0, BLOCK)
    f.close()  # nothing left to write; the padding is truncated away
    assert len(disk_writes) == 5
    assert (tmp_path / "f.bin").read_bytes() == payload


def test_settled_waits_for_the_neighbour_that_completes_a_block(tmp_path):
    size = 3 * BLOCK
    f = direct_file_on_plain_fd(tmp_path / "f.bin", size)
    a, b = (0, BLOCK + 100), (BLOCK + 100, size)
    f.pwrite(memoryview(b"\1" * (a[1] - a[0])), a[0])
    assert not f.settled(*a)  # its last 100 bytes wait in memory for b's first bytes
    f.pwrite(memoryview(b"\2" * (b[1] - b[0])), b[0])
    assert f.settled(*a) and f.settled(*b) and f.settled(5, 5)
    f.close()
    assert (tmp_path / "f.bin").read_bytes() == b"\1" * (BLOCK + 100) + b"\2" * (2 * BLOCK - 100)


def test_close_writes_held_blocks_with_zero_gaps(tmp_path):
    """An interrupted run leaves what it wrote on disk; the gaps belong to unfinished tensors."""
    f = direct_file_on_plain_fd(tmp_path / "f.bin", 2 * BLOCK + 10)
    f.pwrite(memoryview(b"abc"), 5)
    f.pwrite(memoryview(b"xy"), 2 * BLOCK + 8)
    f.close()
    data = (tmp_path / "f.bin").read_bytes()
    assert len(data) == 2 * BLOCK + 10
    assert data == b"\0" * 5 + b"abc" + b"\0" * (2 * BLOCK) + b"xy"


def test_a_byte_written_twice_is_refused(tmp_path):
    f = direct_file_on_plain_fd(tmp_path / "f.bin", BLOCK)
    f.pwrite(memoryview(b"a" * 100), 0)
    with pytest.raises(ValueError, match="more than once"):
        f.pwrite(memoryview(b"b" * (BLOCK - 50)), 50)
    f.close()


def _is_direct(fd: int) -> bool:
    return bool(os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL))


def test_direct_open_uses_o_direct_where_the_file_system_has_it(tmp_path):
    opened = DirectShardFile.open(tmp_path / "f.bin", 3 * BLOCK + 1)
    if opened is None:
        pytest.skip("this file system refuses O_DIRECT")
    assert _is_direct(opened.fd)
    payload = os.urandom(3 * BLOCK + 1)
    opened.pwrite(memoryview(payload)[7:], 7)
    opened.pwrite(memoryview(payload)[:7], 0)
    opened.close()
    assert (tmp_path / "f.bin").read_bytes() == payload


@pytest.mark.parametrize("where", ["open", "first write"])
def test_file_systems_without_o_direct_fall_back_to_buffered(tmp_path, monkeypatch, where):
    real_open, real_pwrite = os.open, os.pwrite

    def refusing_open(path, flags, *a):
        if where == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    def refusing_pwrite(fd, data, offset):
        if where == "first write" and _is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    f = open_shard(tmp_path / "f.bin", shard_file.DIRECT_MIN_BYTES, fresh=True, direct=True)
    assert isinstance(f, BufferedShardFile)
    f.pwrite(memoryview(b"ok"), 0)
    f.close()
    assert (tmp_path / "f.bin").read_bytes()[:2] == b"ok"


def test_small_resumed_or_unwanted_files_are_buffered(tmp_path, monkeypatch):
    big = shard_file.DIRECT_MIN_BYTES
    for kwargs in ({"size": big - 1, "fresh": True, "direct": True}, {"size": big, "fresh": True, "direct": False}):
        f = open_shard(tmp_path / "f.bin", **kwargs)
        assert isinstance(f, BufferedShardFile)
        f.close()
    (tmp_path / "g.bin").write_bytes(b"\0" * 10)
    f = open_shard(tmp_path / "g.bin", big, fresh=False, direct=True)
    assert isinstance(f, BufferedShardFile)
    f.close()
    monkeypatch.setenv("MLITE_DIRECT_IO", "0")
    assert not shard_file.direct_io_enabled()
    monkeypatch.setenv("MLITE_DIRECT_IO", "1")
    assert shard_file.direct_io_enabled()


def test_writer_round_trip_with_direct_shards_and_row_blocks(tmp_path, monkeypatch):
    force_direct_io(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.w": torch.randn(33, 7 + i, generator=gen).to(torch.bfloat16) for i in range(6)}
    tensors["model.norm.weight"] = torch.randn(5, generator=gen)
    planned = [OutputTensor(n, "BF16" if t.dtype == torch.bfloat16 else "F32", tuple(t.shape)) for n, t in tensors.items()]
    pieces = [(n, r, min(r + 10, t.shape[0])) for n, t in tensors.items() for r in range(0, t.shape[0], 10)]
    random.Random(1).shuffle(pieces)
    with CheckpointWriter(tmp_path / "out", planned, shard_size=1500) as w:
        assert len(w.layouts) > 1
        for n, a, b in pieces:
            w.write(n, tensors[n][a:b], row_start=a)
        out = w.finish()
    got = load_dir(out)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_resume_log_names_a_tensor_only_once_its_shared_block_is_on_disk(tmp_path, monkeypatch):
    force_direct_io(monkeypatch)
    a, b = torch.ones(1000, dtype=torch.float32), torch.zeros(3000, dtype=torch.float32)
    planned = [OutputTensor("a", "F32", (1000,)), OutputTensor("b", "F32", (3000,))]
    log = CheckpointWriter.partial_dir(tmp_path / "out") / "mlite-resume.log"
    with CheckpointWriter(tmp_path / "out", planned, partial_key="k") as w:
        start, end = w.layouts[0].spans["a"]
        assert end % BLOCK, "the test needs 'a' to end inside a block"
        w.write("a", a)
        assert log.read_text() == ""  # a's last bytes wait for b's first ones
        w.write("b", b)  # completes the shard, which is closed
        assert log.read_text().splitlines() == ["a", "b"]
        w.finish()
    got = load_dir(tmp_path / "out")
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)


def test_a_failed_disk_write_surfaces_as_itself_and_the_file_still_closes(tmp_path, monkeypatch):
    f = direct_file_on_plain_fd(tmp_path / "f.bin", 4 * BLOCK)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space left") as failure:
        f.pwrite(memoryview(os.urandom(4 * BLOCK)), 0)
    monkeypatch.undo()
    f.close()  # the traceback in `failure` still holds views of the staging buffer
    assert failure.value.errno == errno.ENOSPC


@pytest.mark.parametrize("phase_matches", [True, False])
def test_block_aligned_memory_goes_to_disk_without_the_staging_copy(tmp_path, disk_writes, phase_matches):
    size, offset = 5 * BLOCK + 300, 1234
    keep, data = _aligned_bytes(size, offset % BLOCK if phase_matches else (offset + 8) % BLOCK)
    f = direct_file_on_plain_fd(tmp_path / "f.bin", offset + size)
    f.pwrite(memoryview(b"h" * offset), 0)
    f.pwrite(data, offset)
    assert (f._staging is None) == phase_matches  # the middle went straight from `data`
    f.close()
    assert (tmp_path / "f.bin").read_bytes() == b"h" * offset + bytes(data)
    assert all(off % BLOCK == 0 and n % BLOCK == 0 for off, n in disk_writes), disk_writes


@pytest.mark.parametrize("direct", [True, False])
def test_prepare_casts_like_to_and_places_the_bytes_for_direct_writes(tmp_path, monkeypatch, direct):
    if direct:
        force_direct_io(monkeypatch)
    else:
        monkeypatch.setenv(shard_file.ENV_DIRECT, "0")
    planned = [OutputTensor("w", "BF16", (64, 33)), OutputTensor("odd", "U8", (3,)), OutputTensor("v", "F16", (5,))]
    x = torch.randn(64, 33) * torch.logspace(-40, 30, 64 * 33, base=2.0).view(64, 33)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1 + 2**-8])  # a tie: rounds to even
    with CheckpointWriter(tmp_path / "out", planned) as w:
        whole = w.prepare("w", x)
        block = w.prepare("w", x[10:20], row_start=10)
        after_odd = w.prepare("v", torch.randn(5))  # starts after 3 bytes: never placed
        ready = x.to(torch.bfloat16)
        assert w.prepare("w", ready).data_ptr() == ready.data_ptr()  # nothing to cast: passed on
        for got, src in ((whole, x), (block, x[10:20])):
            assert got.dtype == torch.bfloat16 and got.shape == src.shape
            assert torch.equal(got.view(torch.int16), src.to(torch.bfloat16).view(torch.int16))
        offset = w._where["w"][1]
        row_bytes = 33 * 2
        if direct:
            assert whole.data_ptr() % BLOCK == offset % BLOCK
            assert block.data_ptr() % BLOCK == (offset + 10 * row_bytes) % BLOCK
        assert after_odd.dtype == torch.float16
        w.write("odd", torch.tensor([1, 2, 3], dtype=torch.uint8))
        w.write("w", whole)
        w.write("v", after_odd)
        w.finish()
    out = load_dir(tmp_path / "out")
    assert torch.equal(out["w"].view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_a_failed_write_names_its_file(tmp_path, monkeypatch):
    """A full disk raises OSError without a file name; the writer adds the shard's path."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shard_file, "pwrite_all", full)
    f = shard_file.BufferedShardFile(tmp_path / "x.safetensors", 16, fresh=True)
    with pytest.raises(OSError) as e:
        f.pwrite(memoryview(b"abcd"), 0)
    f.close()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "x.safetensors")


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_sizing_a_new_shard_names_its_file_when_refused(tmp_path, monkeypatch, direct):
    """A file-size limit (EFBIG) or a full disk at ftruncate said only 'File too large'."""

    def too_large(fd, size):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(os, "ftruncate", too_large)
    path = tmp_path / "model-00001-of-00002.safetensors"
    with pytest.raises(OSError) as e:
        open_shard(path, shard_file.DIRECT_MIN_BYTES, fresh=True, direct=direct)
    assert e.value.errno == errno.EFBIG and e.value.filename == str(path)
