"""`patch`: port a fine-tune's patch (PEFT LoRA or full delta) onto a new base (PortLLM).

The patched model is a one-step recipe (`method: portllm`) run by the same streaming engine
as every merge, so it is sharded, atomic and bounded in memory like a merge. With
`as_adapter`, the result is instead a PEFT adapter checked against the new base: a plain LoRA
keeps its factors (λ folded into B); a full or DoRA delta is factored by truncated SVD.
The report lists every patched tensor with ‖Δ‖ and, when the old base is known,
‖θ_new − θ_old‖ — how far the base moved under the patch.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..dtypes import parse_user_dtype, to_torch
from ..engine.plan import resolve_device
from ..errors import CheckpointError, UsageError
from ..io.adapters import copy_adapter, write_adapter
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.deltas import DeltaSource, LoraDelta, Patch, needs_old_base, open_delta, pad_rows, takes_old_base
from ..io.hub import looks_like_hub_ref
from ..io.writer import check_output_dir
from ..methods.lowrank import norm64
from ..methods.registry import TensorJob
from .extract import check_rank_args, dense_to_adapter, require_factors

PathLike = str | os.PathLike
log = logging.getLogger(__name__)
REPORT_FILE = "mlite_patch_report.json"


@dataclass(frozen=True)
class PatchRow:
    """One patched tensor. `kind`: add (θ_new + λΔ), replace (saved tensor), lora/full (adapter)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    delta_norm: float | None
    base_shift: float | None = None  # ‖θ_new − θ_old‖ when the old base is known
    rank: int = 0
    rel_error: float = 0.0
    note: str = ""


@dataclass
class PatchResult:
    output: Path | None
    state_dict: dict[str, torch.Tensor] | None
    tensors: list[PatchRow] = field(default_factory=list)
    as_adapter: bool = False
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def patched(self) -> list[str]:
        return [r.name for r in self.tensors]

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "as_adapter": self.as_adapter,
            "patched": len(self.tensors),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "tensors": [asdict(r) for r in self.tensors],
        }


class _Recording:
    """Wraps the plan's delta source to note each patch's kind and ‖Δ‖ as the engine asks for it."""

    def __init__(self, inner: DeltaSource) -> None:
        self.inner = inner
        self.label = inner.label
        self.seen: dict[str, tuple[str, tuple[int, ...], float | None]] = {}

    @property
    def bytes_read(self) -> int:
        return int(getattr(self.inner, "bytes_read", 0))

    def targets(self) -> dict[str, tuple[int, ...]]:
        return self.inner.targets()

    def check(self, base_shapes: Mapping[str, tuple[int, ...]], *, allow_vocab_growth: bool = False) -> list[str]:
        return self.inner.check(base_shapes, allow_vocab_growth=allow_vocab_growth)

    def patch(self, name: str, base_shape: tuple[int, ...], device: torch.device | str) -> Patch | None:
        p = self.inner.patch(name, base_shape, device)
        if p is not None:
            self.seen[name] = (p.kind, tuple(base_shape), delta_norm(p))
        return p

    def bytes_to_read(self, names: Collection[str] | None = None) -> int:
        return self.inner.bytes_to_read(names)

    def files(self) -> list[Path]:
        return self.inner.files()


def delta_norm(p: Patch) -> float | None:
    """‖Δ‖ before λ: the added tensor's norm; for a replaced tensor, that of the LoRA delta on top
    of it (None when it has none: a replaced tensor is not a delta)."""
    t = p.tensor if p.kind == "add" else p.on_top
    return None if t is None else norm64(t)


def patch(
    base: PathLike,
    delta: PathLike,
    *,
    old_base: PathLike | None = None,
    lam: float = 1.0,
    out: PathLike | None = None,
    as_adapter: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    budget_rank: int | None = None,
    allow_vocab_growth: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: int | str | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
    allow_bin: bool = False,
    resume: bool = False,
) -> PatchResult:
    """θ_new + λ·Δ, with Δ a PEFT LoRA dir or a full fine-tune of `old_base`.

    Returns the output path (or, with no `out`, the patched state dict in memory) and the
    per-tensor report. Everything checkable from headers is checked before any tensor is read.
    `allow_bin` accepts pickle (.bin) checkpoints, loaded with weights_only=True. `resume`
    continues an interrupted patch of the same inputs into the same `out`, as a merge's does.
    """
    if as_adapter and resume:
        raise UsageError("--resume (resume=True) continues a patched model; an adapter (--as-adapter) is "
                         "written at once and has nothing to resume")
    if as_adapter:
        if out is None:
            raise UsageError("--as-adapter needs an output directory (--out)")
        if shard_size is not None:
            raise UsageError("--shard-size (shard_size=) does not apply to --as-adapter (an adapter is written as one file)")
        return _note_replaced(_as_adapter(base, delta, old_base=old_base, lam=lam, out=out, rank=rank, energy=energy,
                           budget_rank=budget_rank, allow_vocab_growth=allow_vocab_growth, device=device, dtype=dtype, seed=seed, force=force,
                           allow_bin=allow_bin))
    if rank is not None or energy is not None or budget_rank is not None:
        raise UsageError("--rank, --energy and --budget-rank (rank=, energy=, budget_rank=) compress the patch into "
                         "an adapter: they need --as-adapter (as_adapter=True)")
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not math.isfinite(lam):
        raise UsageError(f"--lambda (lam=) must be a finite number, got {lam!r}")
    if old_base is None and takes_old_base(delta):
        raise UsageError(needs_old_base(delta))
    from ..api import plan_recipe
    from ..engine.run import execute
    from ..recipe.model import load_recipe

    inputs = {"base": _abs(base), "delta": _abs(delta)}
    step: dict[str, Any] = {"id": "patch", "method": "portllm", "base": "base", "delta": "delta",
                            "parameters": {"lambda": float(lam)}}
    if old_base is not None:
        inputs["old_base"] = _abs(old_base)
        step["old_base"] = "old_base"
    recipe = load_recipe({"inputs": inputs, "steps": [step], "output": {},
                          "options": {"allow_vocab_growth": allow_vocab_growth, "allow_bin": allow_bin}})
    from ..units import parse_size

    plan = plan_recipe(recipe, out=_abs(out) if out is not None else None, device=device, dtype=dtype, force=force,
                       shard_size=parse_size(shard_size) if shard_size is not None else None, seed=seed)
    recorder = _Recording(plan.deltas["delta"])
    plan.deltas["delta"] = recorder
    old_ck = plan.checkpoints.get("old_base")
    shifts: dict[str, float] = {}

    def on_tensor(name: str, job: TensorJob, value: torch.Tensor) -> None:
        if old_ck is not None and job.delta is not None and job.base is not None and name in old_ck:
            old = old_ck.load(name, device=job.base.device, dtype=torch.float32)
            new = job.base
            if old.shape != new.shape:  # grown vocabulary: compare the shared rows
                new = new[: old.shape[0]]
            shifts[name] = norm64(new - old)

    def write_report(tmp_dir: Path, _result: Any) -> None:
        rows = _rows(recorder, shifts)
        (tmp_dir / REPORT_FILE).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")

    run = execute(plan, progress=progress, tensor_hook=on_tensor, resume=resume,
                  publish_hook=write_report if plan.out is not None else None)
    # the plan has warned about tensors the adapter's saved copies replace
    return PatchResult(output=run.output, state_dict=run.state_dict, tensors=_rows(recorder, shifts),
                       bytes_read=run.bytes_read, bytes_written=run.bytes_written, seconds=run.seconds)


def _note_replaced(result: PatchResult) -> PatchResult:
    """Warn about saved tensors (modules_to_save) that replaced the new base's in an adapter
    output (`--as-adapter` builds no plan, whose own check says it for the other paths): they
    were trained from the old base, so they undo the new base's change to those tensors."""
    replaced = [r.name for r in result.tensors if r.kind == "replace"]
    if replaced:
        log.warning("%d tensor(s) replaced by the adapter's saved copies, trained from the old base (%s%s); give "
                    "the old base (--old-base, old_base=) to port them as deltas instead",
                    len(replaced), replaced[0], ", …" if len(replaced) > 1 else "")
    return result


def _rows(recorder: _Recording, shifts: Mapping[str, float]) -> list[PatchRow]:
    return [PatchRow(name, shape, kind, norm, shifts.get(name)) for name, (kind, shape, norm) in recorder.seen.items()]


def _abs(p: PathLike) -> str:
    path = Path(p).expanduser()
    return str(path.absolute()) if path.exists() or not looks_like_hub_ref(str(p)) else str(p)


# ---- --as-adapter ------------------------------------------------------------------------------
def _as_adapter(base: PathLike, delta_ref: PathLike, *, old_base: PathLike | None, lam: float, out: PathLike,
                rank: int | None, energy: float | None, budget_rank: int | None, allow_vocab_growth: bool, device: str, dtype: str | None,
                seed: int, force: bool, allow_bin: bool) -> PatchResult:
    import time

    t0 = time.perf_counter()
    dev = resolve_device(device)  # also when a LoRA's factors are only copied: a bad --device is an error
    new = open_checkpoint(base, allow_bin=allow_bin)
    old = open_checkpoint(old_base, allow_bin=allow_bin) if old_base is not None else None
    src = open_delta(delta_ref, old_base=old, allow_bin=allow_bin)
    shapes = {n: new.info(n).shape for n in new.names()}
    problems = src.check(shapes, allow_vocab_growth=allow_vocab_growth)
    if problems:
        raise CheckpointError(problems[0], problems=problems)
    out_path = Path(out).expanduser().absolute()
    check_output_dir(out_path, force, [*new.shards, *src.files()])
    if isinstance(src, LoraDelta) and not src.adapter.settings.use_dora:
        if rank is not None or energy is not None or budget_rank is not None:
            raise UsageError(f"{delta_ref}: a LoRA adapter keeps its own factors with --as-adapter; --rank, "
                             "--energy and --budget-rank only apply to a dense delta or a DoRA adapter")
        rows = _copy_lora(new, src, lam, out_path, force, to_torch(parse_user_dtype(dtype)) if dtype else None)
    else:
        check_rank_args(rank, energy, budget_rank)
        factor_dtype = to_torch(parse_user_dtype(dtype)) if dtype else torch.float32
        factors, full, reports = dense_to_adapter(new, src, lam=lam, rank=rank, energy=energy, budget_rank=budget_rank,
                                                  seed=seed,
                                                  device=str(dev), factor_dtype=factor_dtype)
        require_factors(factors, reports, str(delta_ref))
        write_adapter(out_path, factors, full, base_model_name_or_path=str(base), dtype=factor_dtype, force=force, base=new,
                      extra_files={REPORT_FILE: json.dumps([asdict(r) for r in reports], indent=2).encode()})
        rows = [PatchRow(r.name, r.shape, r.kind, r.delta_norm, None, r.rank, r.rel_error, r.note) for r in reports]
    written = sum(f.stat().st_size for f in out_path.rglob("*") if f.is_file())
    return PatchResult(output=out_path, state_dict=None, tensors=rows, as_adapter=True, bytes_written=written,
                       bytes_read=new.bytes_read + src_bytes(src), seconds=time.perf_counter() - t0)


def src_bytes(src: DeltaSource) -> int:
    return int(getattr(src, "bytes_read", 0))


def _copy_lora(new: Checkpoint, src: LoraDelta, lam: float, out: Path, force: bool,
               dtype: torch.dtype | None = None) -> list[PatchRow]:
    """The input adapter re-targeted at NEW: λ folded into every B-side tensor, factors padded
    for a grown vocabulary, saved full tensors rewritten as NEW + λ(saved − old) when the old
    base is known (else kept as saved, which is what PEFT loads). Each tensor keeps its stored
    dtype unless `dtype` is given."""
    adapter = src.adapter

    def _dtype(key: str) -> torch.dtype:
        return dtype if dtype is not None else to_torch(adapter.weights.info(key).dtype)

    tensors: dict[str, torch.Tensor] = {}
    rows: list[PatchRow] = []
    for name, mod in adapter.modules.items():
        a = adapter.load(mod.a_key)
        b = adapter.load(mod.b_key) * lam
        want = new.info(name).shape
        if tuple(want) != mod.delta_shape:  # grown vocabulary (check() allowed it)
            if mod.embedding or mod.fan_in_fan_out:
                a = torch.cat([a, a.new_zeros(a.shape[0], want[0] - a.shape[1])], dim=1)
            else:
                b = pad_rows(b, (want[0], b.shape[1]))
        tensors[mod.a_key] = a.to(_dtype(mod.a_key))
        tensors[mod.b_key] = b.to(_dtype(mod.b_key))
        if mod.bias_key is not None:
            tensors[mod.bias_key] = (adapter.load(mod.bias_key) * lam).to(_dtype(mod.bias_key))
    for name, key in adapter.saved.items():
        saved = adapter.load(key)
        if src.old_base is not None:
            d = pad_rows(saved - src.old_base.load(name, dtype=torch.float32), new.info(name).shape)
            value = new.load(name, dtype=torch.float32) + lam * d
        else:
            value = saved
        tensors[key] = value.to(_dtype(key))
    if adapter.head_copy is not None:  # peft loads the tied head's copy from its own key
        head_key, embedding = adapter.head_copy
        tensors[head_key] = tensors[adapter.saved[embedding]].clone()
    for name in src.targets():
        p = src.patch(name, new.info(name).shape, "cpu")
        assert p is not None
        rows.append(PatchRow(name, new.info(name).shape, p.kind, delta_norm(p)))
    copy_adapter(adapter, out, tensors, config_updates={"base_model_name_or_path": str(new.label)}, force=force,
                 extra_files={REPORT_FILE: json.dumps([asdict(r) for r in rows], indent=2).encode()})
    return rows
