"""`hadamard`: multiplicative (HUT) patches as checkpoints: make one, apply it, make it additive.

A multiplier checkpoint M holds, for every float tensor of a base, the elementwise factor with
W' = W ⊙ M. Stored whole it is a portable patch: applied to the base it came from it gives the
fine-tune back, applied to an evolved base (same architecture) it carries the fine-tune over
the way PortLLM carries an additive one. Its shards are marked `mlite_patch: multiplicative`
in their safetensors metadata, so a multiplier is never taken for a model, nor a model for one.

Each tensor is streamed in row blocks (one block of each input in memory, in float64), so big
embeddings cost a few tens of MB, and written into place as it is computed; the output appears
only when complete. The per-tensor report goes into the output as REPORT_FILE.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..dtypes import parse_user_dtype, to_torch, torch_name
from ..engine.plan import resolve_device
from ..errors import CheckpointError, RecipeError, UsageError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.patch_marks import ADDITIVE, MULTIPLICATIVE, PATCH_KEY, patch_kind
from ..io.safetensors_format import PlannedTensor
from ..io.writer import (
    DEFAULT_SHARD_SIZE,
    CheckpointWriter,
    check_output_dir,
    config_dtype_update,
    require_finite,
)
from ..methods.hadamard import COMPUTE, apply_multiplier, delta_from_multiplier, multiplier_from_delta

PathLike = str | os.PathLike

REPORT_FILE = "mlite_hadamard_report.json"
# Elements per row block: each float64 temporary of a block is 32 MB (a handful are alive at once).
BLOCK_ELEMENTS = 1 << 22
Rows = tuple[int, int] | None


@dataclass(frozen=True)
class HadamardRow:
    """One tensor. `kind`: multiplier, multiplied, delta, copied (from the base), skipped.

    `delta_norm` is ‖ΔW‖ = ‖W' − W‖ and `rel_change` ‖ΔW‖/‖W‖ (None where W is all zero and
    ΔW is not). `unrepresentable` counts entries no multiplier expresses, whose delta (of norm
    `dropped_norm`) was left out; `rel_error` is ‖W ⊙ M − W'‖/‖ΔW‖ for M as stored (the absolute
    error where ΔW = 0), reported by to-multiplier only.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    delta_norm: float = 0.0
    rel_change: float | None = 0.0
    unrepresentable: int = 0
    dropped_norm: float = 0.0
    rel_error: float | None = None
    note: str = ""


@dataclass
class HadamardResult:
    operation: str
    output: Path | None
    state_dict: dict[str, torch.Tensor] | None
    tensors: list[HadamardRow] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def unrepresentable(self) -> int:
        return sum(r.unrepresentable for r in self.tensors)

    @property
    def dropped_norm(self) -> float:
        return math.sqrt(sum(r.dropped_norm**2 for r in self.tensors))

    @property
    def max_rel_change(self) -> float:
        return max((r.rel_change for r in self.tensors if r.rel_change is not None), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"operation": self.operation, "output": str(self.output) if self.output else None,
                "unrepresentable": self.unrepresentable, "dropped_norm": self.dropped_norm,
                "max_rel_change": self.max_rel_change, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "seconds": round(self.seconds, 3),
                "tensors": [asdict(r) for r in self.tensors]}


class _Sums:
    """Float64 sums of squares over a tensor's row blocks, for its report row."""

    def __init__(self) -> None:
        self.w2 = self.d2 = self.err2 = self.dropped2 = 0.0
        self.count = 0

    def add(self, w: torch.Tensor, d: torch.Tensor) -> None:
        self.w2 += squares(w)
        self.d2 += squares(d)

    def row(self, name: str, shape: tuple[int, ...], kind: str, *, error: bool = False) -> HadamardRow:
        d, w = math.sqrt(self.d2), math.sqrt(self.w2)
        rel = d / w if w > 0 else (0.0 if d == 0 else None)
        err = (math.sqrt(self.err2) / d if d > 0 else math.sqrt(self.err2)) if error else None
        return HadamardRow(name, shape, kind, d, rel, self.count, math.sqrt(self.dropped2), err)


# ---- the three operations ------------------------------------------------------------------------
def hadamard_to_multiplier(
    base: PathLike,
    model: PathLike,
    *,
    out: PathLike | None = None,
    allow_unrepresentable: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: int | str | None = None,
    force: bool = False,
    progress: bool = False,
    allow_bin: bool = False,
) -> HadamardResult:
    """The multiplier M = W_model / W_base of every float tensor, written to `out` (or returned).

    Where the base is 0 and the model is not, no multiplier exists: that is refused, naming the
    tensor and the count, unless `allow_unrepresentable`, which keeps the base's 0 there (M = 1)
    and reports the dropped ‖ΔW‖. M is stored in float32 unless `dtype` says otherwise (a
    bfloat16 M moves W' by up to 0.4%). Non-float tensors are left out: applying M copies them
    from the base it is applied to.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    m_st = parse_user_dtype(dtype) if dtype is not None else "F32"
    m_dtype = to_torch(m_st)
    base_ck, model_ck = _open_model(base, "base", allow_bin), _open_model(model, "model", allow_bin)
    problems = _mismatches(base_ck, model_ck)
    missing = [n for n, i in base_ck.tensors.items() if i.is_float and n not in model_ck.tensors]
    if missing:
        problems.append(f"{model_ck.label}: tensor {missing[0]!r} of the base is missing"
                        + (f" ({len(missing)} tensors in all)" if len(missing) > 1 else ""))
    _refuse(problems)
    names = [n for n, i in base_ck.tensors.items() if i.is_float]
    planned = [PlannedTensor(n, m_st, base_ck.info(n).shape) for n in names]
    skipped = [HadamardRow(n, i.shape, "skipped", note=f"{i.dtype}: not float, applying M copies the base's")
               for n, i in base_ck.tensors.items() if not i.is_float]

    def compute(name: str, rows: Rows, sums: _Sums) -> torch.Tensor:
        w = _finite_input(base_ck, name, base_ck.load(name, dev, COMPUTE, rows=rows))
        ft = _finite_input(model_ck, name, model_ck.load(name, dev, COMPUTE, rows=rows))
        delta = ft - w
        split = multiplier_from_delta(w, delta, dtype=m_dtype)
        sums.add(w, delta)
        sums.err2 += squares(apply_multiplier(w, split.multiplier, dtype=COMPUTE) - ft)
        sums.count += split.count
        sums.dropped2 += split.dropped_norm**2
        return split.multiplier

    def check(row: HadamardRow) -> HadamardRow:
        if row.unrepresentable == 0:
            return row
        if not allow_unrepresentable:
            raise CheckpointError(
                f"{model_ck.label}: tensor {row.name!r} has {row.unrepresentable} entries where the base is 0 "
                f"and the model is not (or W'/W overflows {torch_name(m_dtype)}): no multiplier gives them; "
                f"pass --allow-unrepresentable (allow_unrepresentable=True) to keep the base's values there "
                f"(dropping ‖ΔW‖ = {row.dropped_norm:.4g} of {row.delta_norm:.4g})")
        return HadamardRow(**{**asdict(row), "note": "unrepresentable entries kept the base's value (M = 1)"})

    return _run("to-multiplier", planned, compute, "multiplier", out=out, force=force, shard_size=shard_size,
                progress=progress, metadata={PATCH_KEY: MULTIPLICATIVE}, inputs=[base_ck, model_ck],
                extra_rows=skipped, check=check, error=True, t0=t0)


def hadamard_apply(
    base: PathLike,
    multiplier: PathLike,
    *,
    out: PathLike | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: int | str | None = None,
    force: bool = False,
    progress: bool = False,
    allow_bin: bool = False,
    allow_unmarked: bool = False,
) -> HadamardResult:
    """W_base ⊙ M for every tensor the multiplier holds; every other tensor is the base's.

    `base` may be the base M was made from (giving the fine-tune back) or an evolved one of the
    same architecture (carrying the fine-tune over). The output has the base's dtypes (or
    `dtype` for its float tensors) and its config and tokenizer files. A multiplier not marked
    as one (made by another tool) is refused unless `allow_unmarked`.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    base_ck, m_ck = _base_and_multiplier(base, multiplier, allow_bin, allow_unmarked)
    out_dtype = parse_user_dtype(dtype) if dtype is not None else None
    planned = [PlannedTensor(n, out_dtype if out_dtype and i.is_float else i.dtype, i.shape)
               for n, i in base_ck.tensors.items()]
    dtypes = {p.name: to_torch(p.dtype) for p in planned}

    def compute(name: str, rows: Rows, sums: _Sums) -> torch.Tensor:
        if name not in m_ck.tensors:  # M = 1: the base's tensor as stored, cast only if asked to
            return base_ck.load(name, "cpu", dtypes[name], rows=rows)
        w = base_ck.load(name, dev, COMPUTE, rows=rows)
        product = apply_multiplier(w, m_ck.load(name, dev, COMPUTE, rows=rows), dtype=COMPUTE)  # exact
        sums.add(w, product - w)
        return _finite_output(name, product.to(dtypes[name]))

    copied = {n for n in base_ck.tensors if n not in m_ck.tensors}
    config = config_dtype_update(out_dtype, base_ck.config) if out_dtype else None
    return _run("apply", planned, compute, "multiplied", out=out, force=force, shard_size=shard_size,
                progress=progress, inputs=[base_ck, m_ck], copied=copied, copy_from=base_ck, config_updates=config,
                t0=t0)


def hadamard_to_delta(
    base: PathLike,
    multiplier: PathLike,
    *,
    out: PathLike | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: int | str | None = None,
    force: bool = False,
    progress: bool = False,
    allow_bin: bool = False,
    allow_unmarked: bool = False,
) -> HadamardResult:
    """The additive delta ΔW = W_base ⊙ (M − 1) of every tensor the multiplier holds.

    Stored in float32 unless `dtype` says otherwise, marked `mlite_patch: additive`; tensors the
    multiplier does not hold have ΔW = 0 and are left out. (`hadamard_apply` gives the additive
    full fine-tune W + ΔW instead, which `patch` and `extract` take with this base.)
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    base_ck, m_ck = _base_and_multiplier(base, multiplier, allow_bin, allow_unmarked)
    d_st = parse_user_dtype(dtype) if dtype is not None else "F32"
    d_dtype = to_torch(d_st)
    names = [n for n in base_ck.tensors if n in m_ck.tensors]
    planned = [PlannedTensor(n, d_st, base_ck.info(n).shape) for n in names]
    skipped = [HadamardRow(n, i.shape, "skipped", note="not in the multiplier: ΔW = 0")
               for n, i in base_ck.tensors.items() if n not in m_ck.tensors]

    def compute(name: str, rows: Rows, sums: _Sums) -> torch.Tensor:
        w = base_ck.load(name, dev, COMPUTE, rows=rows)
        d = delta_from_multiplier(w, m_ck.load(name, dev, COMPUTE, rows=rows), dtype=COMPUTE)
        sums.add(w, d)
        return _finite_output(name, d.to(d_dtype))

    return _run("to-delta", planned, compute, "delta", out=out, force=force, shard_size=shard_size,
                progress=progress, metadata={PATCH_KEY: ADDITIVE}, inputs=[base_ck, m_ck], extra_rows=skipped, t0=t0)


# ---- checks from headers -----------------------------------------------------------------------
def _open_model(ref: PathLike, role: str, allow_bin: bool) -> Checkpoint:
    ck = open_checkpoint(ref, allow_bin=allow_bin)
    kind = patch_kind(ck)
    if kind is not None:
        raise UsageError(f"{ck.label}: is an mlite {kind} patch (safetensors metadata {PATCH_KEY}={kind}), "
                         f"not a model; it cannot be the {role}")
    return ck


def _base_and_multiplier(base: PathLike, multiplier: PathLike, allow_bin: bool,
                         allow_unmarked: bool) -> tuple[Checkpoint, Checkpoint]:
    """A model and a multiplier for it, each what it claims to be, every tensor of M in the base."""
    base_ck = _open_model(base, "base", allow_bin)
    m_ck = _open_multiplier(multiplier, allow_bin, allow_unmarked)
    _refuse(_mismatches(base_ck, m_ck, multiplier=True))
    return base_ck, m_ck


def _open_multiplier(ref: PathLike, allow_bin: bool, allow_unmarked: bool) -> Checkpoint:
    ck = open_checkpoint(ref, allow_bin=allow_bin)
    kind = patch_kind(ck)
    if kind == MULTIPLICATIVE or (kind is None and allow_unmarked):
        return ck
    if kind is not None:
        raise UsageError(f"{ck.label}: is an mlite {kind} patch, not a multiplier ({PATCH_KEY}={kind})")
    raise UsageError(f"{ck.label}: is not marked as a multiplier ({PATCH_KEY}={MULTIPLICATIVE} in its safetensors "
                     "metadata) and may be a model; if it is a multiplier made elsewhere, pass --allow-unmarked "
                     "(allow_unmarked=True)")


def _mismatches(base: Checkpoint, other: Checkpoint, *, multiplier: bool = False) -> list[str]:
    """Every tensor of `other` must be stored in the base with the same shape and kind.

    Stored names only: a tied base has no `lm_head.weight` to multiply, and an output that
    gained one would no longer be tied like its base.
    """
    problems = []
    for name, info in other.tensors.items():
        b = base.tensors.get(name)
        where = f"{info.shard}: tensor {name!r}"
        if b is None:
            problems.append(f"{where} is not stored in the base {base.label}")
        elif info.shape != b.shape:
            problems.append(f"{where} has shape {list(info.shape)} but the base's is {list(b.shape)} ({base.label})")
        elif multiplier and not info.is_float:
            problems.append(f"{where} is {info.dtype}; a multiplier holds float tensors only")
        elif info.is_float != b.is_float:
            problems.append(f"{where} is {info.dtype} but {b.dtype} in the base {base.label}")
    return problems


def _refuse(problems: list[str]) -> None:
    if problems:
        raise CheckpointError(problems[0], problems=problems)


# ---- streaming ---------------------------------------------------------------------------------
def squares(t: torch.Tensor) -> float:
    """Σ t² of a float64 block (one BLAS dot: a third of pow(2).sum()'s time)."""
    flat = t.reshape(-1)
    return float(torch.dot(flat, flat))


def _finite_input(ck: Checkpoint, name: str, t: torch.Tensor) -> torch.Tensor:
    """A block of a model, refused if it holds inf/NaN (they would pass for unrepresentable
    entries). A finite float64 sum proves every element finite, at a fraction of isfinite's cost."""
    if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return t
    raise CheckpointError(f"{ck.label}: tensor {name!r} holds inf or NaN")


def _finite_output(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t`, unless casting W ⊙ M (or the delta) to the output dtype overflowed it."""
    try:
        return require_finite(name, t)
    except RecipeError:
        bad = int((~torch.isfinite(t)).sum())
        raise RecipeError(f"output tensor {name!r}: {bad} of {t.numel()} values are inf or NaN in "
                          f"{torch_name(t.dtype)}: the product overflows it (choose a wider --dtype), or an "
                          "input holds inf/NaN") from None


def row_blocks(shape: tuple[int, ...], elements: int | None = None) -> Iterator[Rows]:
    """Row ranges covering a tensor with about `elements` (BLOCK_ELEMENTS) entries each (None:
    load it whole)."""
    if len(shape) == 0 or shape[0] == 0:
        yield None
        return
    width = max(1, math.prod(shape[1:]))
    step = max(1, (elements or BLOCK_ELEMENTS) // width)
    for a in range(0, shape[0], step):
        yield (a, min(a + step, shape[0]))


Compute = Callable[[str, Rows, _Sums], torch.Tensor]


def _run(operation: str, planned: list[PlannedTensor], compute: Compute, kind: str, *, out: PathLike | None,
         force: bool, shard_size: int | str | None, progress: bool, inputs: list[Checkpoint], t0: float,
         metadata: Mapping[str, str] | None = None, extra_rows: Sequence[HadamardRow] = (),
         check: Callable[[HadamardRow], HadamardRow] | None = None, error: bool = False, copied: Collection[str] = (),
         copy_from: Checkpoint | None = None, config_updates: Mapping[str, Any] | None = None) -> HadamardResult:
    """Compute every planned tensor block by block into a writer (or a state dict), then publish."""
    from ..engine.run import _progress
    from ..units import parse_size

    size = parse_size(shard_size) if shard_size is not None else DEFAULT_SHARD_SIZE
    out_path = Path(out).expanduser().absolute() if out is not None else None
    if out_path is not None:
        check_output_dir(out_path, force, [s for ck in inputs for s in ck.shards])
    rows_out: list[HadamardRow] = []
    state: dict[str, torch.Tensor] | None = {} if out_path is None else None
    writer = CheckpointWriter(out_path, planned, shard_size=size, force=force, metadata=metadata) if out_path else None
    with writer if writer is not None else contextlib.nullcontext(), _progress(progress) as bar:
        task = bar.add_task(operation, total=len(planned), rate="") if bar else None
        for p in planned:
            sums = _Sums()
            for rows in row_blocks(p.shape):
                block = compute(p.name, rows, sums)
                if writer is not None:
                    writer.write(p.name, block, None if rows is None else rows[0])
                else:
                    assert state is not None
                    _keep(state, p, block.cpu(), rows)
            if p.name in copied:
                row = HadamardRow(p.name, p.shape, "copied", note="not in the multiplier: the base's")
            else:
                row = sums.row(p.name, p.shape, kind, error=error)
            rows_out.append(check(row) if check is not None else row)
            if bar is not None:
                bar.update(task, advance=1)
        rows_out.extend(extra_rows)
        result = HadamardResult(operation, out_path, state, rows_out)
        if writer is not None:
            report = json.dumps(result.to_json(), indent=2) + "\n"
            result.output = writer.finish(copy_from=copy_from, config_updates=config_updates,
                                          extra_files={REPORT_FILE: report.encode()})
            result.bytes_written = writer.bytes_written
    result.bytes_read = sum(ck.bytes_read for ck in inputs)
    result.seconds = time.perf_counter() - t0
    return result


def _keep(state: dict[str, torch.Tensor], p: PlannedTensor, block: torch.Tensor, rows: Rows) -> None:
    if rows is None:
        state[p.name] = block
        return
    if p.name not in state:
        state[p.name] = torch.empty(p.shape, dtype=block.dtype)
    state[p.name][rows[0] : rows[1]] = block
