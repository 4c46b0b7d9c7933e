"""Write a sharded checkpoint without buffering shards, and publish it atomically.

The plan knows every output tensor's name, shape and dtype before any data exists, so the
writer lays out all shards up front (which tensor goes where, each shard's header and
offsets). Each tensor is then written straight to its place in its file as soon as it is
computed, in any order; memory holds only the tensor being written (and, for files written
with O_DIRECT, a few 4 KiB blocks where tensors meet: see `shard_file`). Everything goes to a
temporary directory beside the target; `finish` adds the index, config, tokenizer files and
model card, then renames the directory into place, so an output is never seen half-written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..dtypes import CONFIG_NAMES, ITEMSIZE, to_torch, torch_name
from ..errors import CheckpointError, RecipeError, UsageError
from .checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from .publish import beside, remove_replaced
from .safetensors_format import PlannedTensor, layout_header
from .shard_file import BLOCK, ShardFile, direct_io_enabled, open_shard, wants_direct

log = logging.getLogger(__name__)
# A full disk, a full quota, a file-size limit: the work so far is sound, only space ran out.
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

DEFAULT_SHARD_SIZE = 5_000_000_000
OutputTensor = PlannedTensor


@dataclass(frozen=True)
class ShardLayout:
    """One output file: its name, tensors in file order, header bytes and absolute spans."""

    file_name: str
    tensors: tuple[PlannedTensor, ...]
    header: bytes
    spans: Mapping[str, tuple[int, int]]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Sequence[PlannedTensor], shard_size: int = DEFAULT_SHARD_SIZE,
                metadata: Mapping[str, str] | None = None) -> list[ShardLayout]:
    """Cut `tensors` (in order) into shards of at most `shard_size` data bytes.

    A tensor larger than the limit gets a shard of its own. Names follow Hugging Face:
    `model.safetensors` for one shard, `model-0000i-of-0000n.safetensors` otherwise. Every
    shard's header gets `metadata` beside `format: pt` (what marks a file as a patch, say).
    """
    groups: list[list[PlannedTensor]] = []
    current: list[PlannedTensor] = []
    used = 0
    for t in tensors:
        if current and used + t.nbytes > shard_size:
            groups.append(current)
            current, used = [], 0
        current.append(t)
        used += t.nbytes
    if current or not groups:
        groups.append(current)
    n = len(groups)
    layouts = []
    for i, group in enumerate(groups, start=1):
        name = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        header, spans = layout_header(group, {"format": "pt", **(metadata or {})})
        layouts.append(ShardLayout(name, tuple(group), header, spans))
    return layouts


def refuse_over_inputs(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output (file or directory) that is an input file or holds one: writing it,
    --force or not, would destroy what the run reads."""
    target = Path(out).expanduser().resolve()
    for f in inputs:
        path = Path(f).expanduser().resolve()
        if path == target or target in path.parents:
            what = "is" if path == target else "holds"
            raise UsageError(f"{out}: the output {what} input file {f}, which writing it would destroy; "
                             "choose another output path")


def check_output_dir(out: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse a non-empty existing output unless forced, and any output that holds an input.

    Checked before any work starts. Publishing replaces the whole output directory, so an
    output that is an input's folder, or contains one, would delete that input with --force.
    """
    refuse_over_inputs(out, inputs)
    # The output is built beside its target and renamed into place: the parent (or the first
    # part of it that exists) must be writable. Found now, not after a global method's passes.
    parent = out.expanduser().absolute().parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"{out}: cannot create it ({existing} is a file, not a directory)")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{out}: cannot write there ({existing} is not writable)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out}: output directory exists and is not empty (use --force, or force=True, to replace it)")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite (float8, which torch cannot test on the CPU, upcast)."""
    return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())


def require_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t`, after refusing it if it holds inf or NaN: weights or a lambda that overflow the
    output dtype (1e300, or 1e5 in float16) would otherwise be written, exit 0.

    A sum is finite only if every element is (it can overflow on its own, so a non-finite sum
    is confirmed element by element): ~30 µs per 512K-element block, where `isfinite().all()`
    takes ~1 ms. float16 and the float8 formats are summed in float32, where their values cannot
    overflow the sum (and torch has no float8 sum or isfinite on the CPU).
    """
    if not t.is_floating_point() or t.numel() == 0:
        return t
    narrow = t.dtype == torch.float16 or t.element_size() == 1
    total = t.sum(dtype=torch.float32) if narrow else t.sum()
    if bool(torch.isfinite(total)):
        return t
    bad = int((~torch.isfinite(t.float() if t.element_size() == 1 else t)).sum())
    if bad:
        raise RecipeError(f"output tensor {name!r}: {bad} of {t.numel()} values are inf or NaN in "
                          f"{torch_name(t.dtype)}; the weights or lambda overflow it (or an "
                          "input holds inf/NaN)")
    return t


RESUME_KEY = "mlite-resume.key"
RESUME_LOG = "mlite-resume.log"


class CheckpointWriter:
    """Streams tensors into pre-laid-out shards inside a temporary directory.

    Use as a context manager: leaving the block with an exception removes the temporary
    directory, so nothing half-written is ever left where a user would look for a model.

    With a `partial_key` (a fingerprint of everything that decides the output's bytes) the
    temporary directory has a fixed name and logs each completed tensor; an interrupted run
    (Ctrl-C, a killed process) leaves it behind, hidden, and a later writer with the same key
    and `resume=True` continues where it stopped (`done` lists what it skips). A different key,
    or `resume=False`, starts afresh. The log is appended once all of a tensor's bytes have
    left this process (for a direct file, also the blocks it shares with its neighbours), so a
    tensor interrupted mid-write is simply written again; it protects against interrupted
    processes, not against power loss (nothing is fsynced).

    `direct_io` (default: on unless `MLITE_DIRECT_IO=0`) writes big new shards with O_DIRECT.
    `metadata` goes into every shard's header (`plan_shards`).
    """

    def __init__(self, out_dir: str | os.PathLike, tensors: Sequence[PlannedTensor], *,
                 shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False,
                 partial_key: str | None = None, resume: bool = False, direct_io: bool | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.out_dir = Path(out_dir).expanduser().absolute()
        check_output_dir(self.out_dir, force)
        self.force = force
        self.layouts = plan_shards(list(tensors), shard_size, metadata)
        self._where: dict[str, tuple[ShardLayout, int]] = {}
        for layout in self.layouts:
            for t in layout.tensors:
                if t.name in self._where:
                    raise UsageError(f"output tensor {t.name!r} planned twice")
                self._where[t.name] = (layout, layout.spans[t.name][0])
        self._planned = {t.name: t for layout in self.layouts for t in layout.tensors}
        self._remaining = {layout.file_name: {t.name for t in layout.tensors} for layout in self.layouts}
        self._bytes_left: dict[str, int] = {}
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, ShardFile] = {}
        self._unlogged: dict[str, list[str]] = {layout.file_name: [] for layout in self.layouts}
        self._direct = direct_io_enabled() if direct_io is None else direct_io
        self._lock = threading.Lock()
        self.bytes_written = 0
        self._published = False
        self.partial_key = partial_key
        self.done: set[str] = set()
        self._log_fd: int | None = None
        self._lock_fd: int | None = None
        if partial_key is None:
            self.tmp_dir = beside(self.out_dir, "mlite-tmp")
            self.tmp_dir.mkdir()
        else:
            self.tmp_dir = self.partial_dir(self.out_dir)
            self._start_partial(partial_key, resume)

    @staticmethod
    def partial_dir(out_dir: Path) -> Path:
        """Where an interrupted run of `out_dir` keeps its resumable work."""
        return out_dir.parent / f".{out_dir.name}.mlite-partial"

    def _start_partial(self, key: str, resume: bool) -> None:
        if self.tmp_dir.exists():
            self._hold(self.tmp_dir)  # another run still writing this output keeps it: refuse
        key_file = self.tmp_dir / RESUME_KEY
        # Damaged bytes (a crash mid-append, a disk error) decode to names no plan holds: the key
        # then differs and the run starts afresh, or the damaged lines' tensors are written again.
        same = key_file.is_file() and key_file.read_bytes().decode("utf-8", "replace") == key
        if resume and same:
            log_file = self.tmp_dir / RESUME_LOG
            names = log_file.read_bytes().decode("utf-8", "replace").splitlines() if log_file.is_file() else []
            # A logged tensor counts only if its shard is there at its planned size: a shard that
            # is not (killed between a direct write's padded last block and the truncate, or
            # removed by hand) is started afresh, so its tensors must be written again.
            intact = {t.name for layout in self.layouts for t in layout.tensors
                      if (self.tmp_dir / layout.file_name).is_file()
                      and (self.tmp_dir / layout.file_name).stat().st_size == layout.size}
            self.done = {n for n in names if n in self._planned and n in intact}
            for remaining in self._remaining.values():
                remaining -= self.done
        else:
            if self.tmp_dir.exists():
                if resume:  # asked to continue, and cannot: say so, the run starts over
                    log.warning("the partial output at %s is from another recipe or other inputs; "
                                "starting afresh", self.tmp_dir)
                else:
                    log.info("discarding the partial output at %s", self.tmp_dir)
                shutil.rmtree(self.tmp_dir)
            try:
                self.tmp_dir.mkdir()
            except FileExistsError:  # another run started this output in between
                raise self._busy() from None
            self._hold(self.tmp_dir)
            try:
                key_file.write_text(key)
            except OSError as exc:  # a full disk fails the write, not the open: no file name in it
                self._release()
                shutil.rmtree(self.tmp_dir, ignore_errors=True)  # nothing worth keeping yet
                raise OSError(exc.errno, exc.strerror, str(key_file)) from None
        self._log_fd = os.open(self.tmp_dir / RESUME_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    # ---- streaming ---------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor, row_start: int | None = None) -> None:
        """Cast `tensor` to its planned dtype and write it at its planned offset.

        With `row_start`, `tensor` is the block of rows [row_start, row_start + len) of the
        planned tensor; blocks may arrive in any order, and the tensor counts as written when
        all its bytes are. A tensor from `prepare` is already cast, and written without a copy.
        """
        layout, offset, plan = self._place(name, tuple(tensor.shape), row_start)
        t = tensor.detach()
        want = to_torch(plan.dtype)
        if t.dtype != want:
            t = t.to(want)
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        # A flat byte view: len() must count bytes, not rows, for short-write handling.
        data = t.reshape(-1).view(torch.uint8).numpy().data.cast("B") if t.numel() else memoryview(b"")
        with self._lock:
            if name not in self._remaining[layout.file_name]:
                raise UsageError(f"output tensor {name!r} written twice")
        shard = self._open(layout)
        shard.pwrite(data, offset)
        with self._lock:
            self.bytes_written += len(data)
            remaining = self._remaining[layout.file_name]
            left = self._bytes_left.get(name, plan.nbytes) - len(data)
            self._bytes_left[name] = left
            unlogged = self._unlogged[layout.file_name]
            if left <= 0:
                remaining.discard(name)
                unlogged.append(name)
            # This write may also have completed a block that held a neighbour back.
            for n in [n for n in unlogged if shard.settled(*layout.spans[n])]:
                unlogged.remove(n)
                self._log_done(n)
            done = not remaining
        if done:
            self._close(layout)

    def _place(self, name: str, shape: tuple[int, ...], row_start: int | None) -> tuple[ShardLayout, int, PlannedTensor]:
        """The shard and file offset of `name` (or of its rows from `row_start`), shape checked."""
        try:
            layout, offset = self._where[name]
        except KeyError:
            raise UsageError(f"output tensor {name!r} was not planned") from None
        plan = self._planned[name]
        if row_start is None:
            if shape != plan.shape:
                raise CheckpointError(f"output tensor {name!r} has shape {list(shape)}, planned {list(plan.shape)}")
        else:
            if shape[1:] != plan.shape[1:] or row_start < 0 or row_start + shape[0] > plan.shape[0]:
                raise CheckpointError(f"row block {row_start}+{list(shape)} does not fit tensor {name!r} {list(plan.shape)}")
            offset += row_start * (plan.nbytes // plan.shape[0])
        return layout, offset, plan

    def prepare(self, name: str, tensor: torch.Tensor, row_start: int | None = None) -> torch.Tensor:
        """`tensor` cast to its planned dtype, on the CPU, placed for a copy-free direct write.

        A direct shard file writes whole blocks straight from memory whose address agrees with
        their file offset modulo 4 KiB, and copies them through a staging buffer otherwise
        (about 0.1 s of the writer thread per GB). Casting into memory placed that way costs
        nothing beyond the cast itself (1.5B linear on 2 cores: the writer thread's CPU 0.9-1.6 s
        → 0.7-0.8 s, and 4.4-4.7 s against 4.6-5.2 s wall in 4 alternated pairs). The values are
        those of `tensor.to(dtype)`: `copy_` casts exactly as `to` does. `write` takes the result
        like any other tensor.
        """
        layout, offset, plan = self._place(name, tuple(tensor.shape), row_start)
        want = to_torch(plan.dtype)
        src = tensor.detach()
        if src.device.type != "cpu":
            src = src.to(want)  # cast where the tensor is: half the bytes cross the bus
        itemsize = ITEMSIZE[plan.dtype]
        with self._lock:
            shard = self._files.get(layout.file_name)
        direct = shard.direct if shard is not None else wants_direct(self._direct, layout.size, fresh=True)
        on_cpu_already = src.device.type == "cpu" and src.dtype == want
        if not direct or offset % itemsize or src.numel() == 0 or on_cpu_already:
            # Nothing to cast or move (a float32 output): a copy here would only move the writer's.
            return src.to(want).cpu()
        raw = torch.empty(src.numel() * itemsize + BLOCK, dtype=torch.uint8)
        skip = (offset - raw.data_ptr()) % BLOCK  # a multiple of itemsize: torch aligns its allocations
        out = raw[skip : skip + src.numel() * itemsize].view(want).view(src.shape)
        out.copy_(src)  # casts on the CPU, or brings a GPU tensor over in its output dtype
        return out

    def _log_done(self, name: str) -> None:
        if self._log_fd is not None:
            os.write(self._log_fd, (name + "\n").encode())

    def _open(self, layout: ShardLayout) -> ShardFile:
        with self._lock:
            shard = self._files.get(layout.file_name)
            if shard is None:
                path = self.tmp_dir / layout.file_name
                resuming = path.is_file() and path.stat().st_size == layout.size
                shard = open_shard(path, layout.size, fresh=not resuming, direct=self._direct)
                if not resuming:
                    shard.pwrite(memoryview(layout.header), 0)
                    self.bytes_written += len(layout.header)
                self._files[layout.file_name] = shard
            return shard

    def _close(self, layout: ShardLayout) -> None:
        """Close a shard; what it held is then written, so its finished tensors are logged."""
        with self._lock:
            shard = self._files.pop(layout.file_name, None)
            if shard is None:
                return
            shard.close()
            for n in self._unlogged[layout.file_name]:
                self._log_done(n)
            self._unlogged[layout.file_name].clear()

    @property
    def missing(self) -> list[str]:
        return [n for names in self._remaining.values() for n in sorted(names)]

    # ---- publishing --------------------------------------------------------------------
    def finish(self, copy_from: Checkpoint | None = None, config_updates: Mapping | None = None,
               model_card: str | None = None, extra_files: Mapping[str, bytes] | None = None) -> Path:
        """Write the index and side files, then move the directory into place atomically."""
        missing = self.missing
        if missing:
            raise CheckpointError(f"{self.out_dir}: {len(missing)} tensors were never written (first: {missing[0]!r})")
        for layout in self.layouts:
            self._close(layout)
        self._close_log()
        for fname in (RESUME_KEY, RESUME_LOG):
            (self.tmp_dir / fname).unlink(missing_ok=True)
        if len(self.layouts) > 1:
            total = sum(t.nbytes for layout in self.layouts for t in layout.tensors)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {t.name: layout.file_name for layout in self.layouts for t in layout.tensors},
            }
            (self.tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if copy_from is not None:
            for f in copy_from.side_files():
                if f.name == "config.json":
                    continue
                shutil.copyfile(f, self.tmp_dir / f.name)
            if copy_from.config is not None:
                config = dict(copy_from.config)
                config.update(config_updates or {})
                (self.tmp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if model_card is not None:
            (self.tmp_dir / "README.md").write_text(model_card)
        for fname, data in (extra_files or {}).items():
            (self.tmp_dir / fname).write_bytes(data)
        return self.publish()

    def publish(self) -> Path:
        """Rename the temporary directory onto the target (replacing it only when forced)."""
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not self.force:
            raise UsageError(f"{self.out_dir}: output directory appeared while merging; not replaced")
        trash = None
        if self.out_dir.exists():
            trash = beside(self.out_dir, "mlite-old")
            os.rename(self.out_dir, trash)
        os.rename(self.tmp_dir, self.out_dir)
        self._published = True
        self._release()
        if trash is not None:
            remove_replaced(trash, self.out_dir)
        return self.out_dir

    def _hold(self, directory: Path) -> None:
        """Lock `directory` (the partial output) for this writer's life, or refuse at once.

        Two runs writing one output would share the fixed-name partial directory: the second
        would delete the first's work and the first would publish the second's bytes as its
        own. The lock is released when the writer publishes or aborts (or the process dies).
        """
        self._release()
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise self._busy() from None
        self._lock_fd = fd

    def _busy(self) -> UsageError:
        return UsageError(f"{self.out_dir}: another mlite run is writing this output now; wait for it to "
                          "finish or choose another output path")

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _close_log(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    def abort(self, *, keep_partial: bool = False) -> None:
        """Close everything; remove the temporary directory unless it is kept for a resume."""
        for layout in self.layouts:
            self._close(layout)
        self._close_log()
        if not self._published and not (keep_partial and self.partial_key is not None):
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._release()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._published:
            # An interrupt, or a disk that filled up, keeps resumable work (free space, then
            # --resume); an error (a bug, bad data) throws it away.
            keep = exc is not None and (isinstance(exc, KeyboardInterrupt)
                                        or (isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE))
            self.abort(keep_partial=keep)
            if keep and self.partial_key is not None and self.tmp_dir.is_dir():
                exc.resumable = self.tmp_dir  # what the CLI's message points to (`--resume`)


def config_dtype_update(dtype: str, config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """config.json's dtype entries for an output dtype (only floats have a name there).

    transformers up to 4.55 writes and reads `torch_dtype`; later releases write `dtype` and
    read it first, so a config that has `dtype` gets it updated too (a stale "float32" there
    loads a bfloat16 output as float32, at twice the memory). A config with neither gets
    `torch_dtype`, which every release reads.
    """
    if dtype not in CONFIG_NAMES:
        return {}
    keys = [k for k in ("torch_dtype", "dtype") if config is not None and k in config] or ["torch_dtype"]
    return {k: CONFIG_NAMES[dtype] for k in keys}
