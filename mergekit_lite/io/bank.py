"""The adapter bank: many tasks' adapters over one backbone, in one safetensors file.

MOS keeps one small adapter per task; they only make sense together (merging pulls each towards
the earlier ones, retrieval picks one per sample), so they travel as one file:

* tensors `adapters.<task>.<parameter name>` for every task, under the member's own names (PEFT
  key names for LoRA members, the source file's names for raw members), plus an optional
  `prototypes` matrix (one row per class) for retrieval;
* the safetensors header's `__metadata__` (string → string, structured values JSON-encoded):
  `mlite_bank` (format version), `tasks` (task order), `members` (per task: `kind` lora|raw and,
  for LoRA, its `adapter_config`), `momentum`, `scale` (the adapter's output scale, e.g. 0.1 for
  AdaptFormer), optional `class_to_task` (task name per class row of `prototypes`) and, for
  merged banks, `merge` (the momentum, mode, space and rank that produced it).

Banks are small, so everything is read into memory; writes go to a temporary file beside the
target and are renamed into place, so a failed command leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from mergekit_lite.dtypes import torch_name
from mergekit_lite.errors import CheckpointError, UsageError
from mergekit_lite.io.adapters import settings_from_config
from mergekit_lite.io.publish import beside, put_in_place
from mergekit_lite.io.safetensors_format import write_file

BANK_FORMAT = "1"
ADAPTER_PREFIX = "adapters."
PROTOTYPES = "prototypes"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")
_LORA_KEY = re.compile(r"(.+)\.lora_(?:embedding_)?[AB](?:\.|$)")

MemberKind = Literal["lora", "raw"]


def check_task_name(task: str) -> None:
    """Task names become tensor-name components, so dots (and anything odd) are refused."""
    if not isinstance(task, str) or not _TASK_NAME.fullmatch(task):
        raise UsageError(f"task name {task!r} is invalid: use letters, digits, '_' or '-'")


@dataclass
class Member:
    """One task's adapter: its tensors under their own names, and its PEFT config for LoRA."""

    kind: MemberKind
    tensors: dict[str, torch.Tensor]
    adapter_config: dict[str, Any] | None = None

    def modules(self) -> list[str]:
        """LoRA: the adapted module names (key minus `.lora_A.weight` etc.); raw: empty."""
        if self.kind != "lora":
            return []
        found = {m.group(1) for k in self.tensors if (m := _LORA_KEY.match(k))}
        return sorted(found)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


@dataclass
class Bank:
    """An in-memory adapter bank; `members` keeps the task order."""

    members: dict[str, Member] = field(default_factory=dict)
    momentum: float | None = None
    scale: float | None = None
    class_to_task: list[str] | None = None
    prototypes: torch.Tensor | None = None
    merge: dict[str, Any] | None = None
    path: Path | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.members)

    @property
    def label(self) -> str:
        return f"bank {self.path}" if self.path is not None else "bank"

    def member(self, task: str) -> Member:
        self.require_tasks()
        if task not in self.members:
            raise UsageError(f"{self.label} has no task {task!r} (tasks: {', '.join(self.tasks)})")
        return self.members[task]

    def require_tasks(self) -> None:
        if not self.members:
            raise UsageError(f"{self.label} holds no tasks; add one with `mlite bank add`")

    def add(self, task: str, member: Member) -> None:
        """Append a task after checking it fits the members already here (names, shapes, modules)."""
        check_task_name(task)
        if task in self.members:
            raise UsageError(f"{self.label} already has a task named {task!r}")
        if not member.tensors:
            raise CheckpointError(f"task {task!r}: the adapter holds no tensors")
        if self.members:
            check_compatible(task, member, next(iter(self.members.items())))
        self.members[task] = member


def check_compatible(task: str, member: Member, reference: tuple[str, Member]) -> None:
    """Refuse a member whose kind, LoRA target modules, tensor names or shapes differ from the bank's.

    MOS merges parameter by parameter, so every task must hold the same parameters; checking when a
    task is added keeps a broken bank from ever being written.
    """
    ref_task, ref = reference
    if member.kind != ref.kind:
        raise CheckpointError(f"task {task!r} is a {member.kind} adapter but the bank holds {ref.kind} adapters")
    if member.kind == "lora":
        mine, theirs = set(member.modules()), set(ref.modules())
        if mine != theirs:
            extra = sorted(mine - theirs)
            missing = sorted(theirs - mine)
            what = f"adapts {extra[0]!r}" if extra else f"does not adapt {missing[0]!r}"
            raise CheckpointError(
                f"task {task!r} targets different modules than task {ref_task!r}: it {what} "
                f"({len(extra)} extra, {len(missing)} missing)"
            )
    for name in member.tensors:
        if name not in ref.tensors:
            raise CheckpointError(f"task {task!r}: tensor {name!r} is not in task {ref_task!r}")
    for name, t in ref.tensors.items():
        if name not in member.tensors:
            raise CheckpointError(f"task {task!r}: tensor {name!r} of task {ref_task!r} is missing")
        mine_t = member.tensors[name]
        got = tuple(mine_t.shape)
        if got != tuple(t.shape):
            raise CheckpointError(
                f"task {task!r}: tensor {name!r} has shape {list(got)}, task {ref_task!r} has {list(t.shape)}"
            )
        if mine_t.is_floating_point() != t.is_floating_point():
            # the merge copies integer parameters and averages float ones: a mix has no right answer
            raise CheckpointError(
                f"task {task!r}: tensor {name!r} is {torch_name(mine_t.dtype)}, task {ref_task!r} has "
                f"{torch_name(t.dtype)} (integer and float parameters cannot be merged together)"
            )


# ---------------------------------------------------------------------------------------------
# Reading sources and banks


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def read_source(source: str | Path) -> Member:
    """A bank member from a PEFT LoRA directory or a safetensors file of raw adapter parameters."""
    path = Path(source)
    if not path.exists():
        raise UsageError(f"adapter source {path} does not exist")
    if path.is_dir():
        cfg_path = path / PEFT_CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: not a PEFT adapter directory (no {PEFT_CONFIG})")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise CheckpointError(f"{cfg_path}: invalid JSON ({exc.__class__.__name__})") from None
        settings_from_config(config, str(cfg_path))
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
        weights = path / PEFT_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{path}: no {PEFT_WEIGHTS} (only safetensors adapters are supported)")
        tensors, _ = _read_safetensors(weights)
        member = Member("lora", tensors, config)
        if not member.modules():
            raise CheckpointError(f"{weights}: no lora_A/lora_B tensors")
        return member
    tensors, metadata = _read_safetensors(path)
    if "mlite_bank" in metadata:
        raise UsageError(f"{path} is an adapter bank, not one adapter; export a task from it (mlite bank export) "
                         "and add that")
    return Member("raw", tensors, None)


def _json_field(path: Path, metadata: Mapping[str, str], key: str, default: Any = None) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except ValueError:
        raise CheckpointError(f"bank {path}: metadata field {key!r} is not valid JSON") from None


def load_bank(path: str | Path) -> Bank:
    """Read a whole bank, checking that its header and tensors agree."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"bank {path} is a directory; a bank is one .safetensors file")
    if not path.is_file():
        raise UsageError(f"bank {path} does not exist")
    tensors, metadata = _read_safetensors(path)
    if "mlite_bank" not in metadata:
        raise CheckpointError(f"{path} is not an adapter bank (no mlite_bank metadata)")
    tasks = _json_field(path, metadata, "tasks", [])
    members_meta = _json_field(path, metadata, "members", {})
    _check_header(path, metadata, tasks)
    if not isinstance(members_meta, dict):
        raise CheckpointError(f"bank {path}: metadata 'members' must be an object")
    grouped: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    prototypes = None
    for key, tensor in tensors.items():
        if key == PROTOTYPES:
            prototypes = tensor
            continue
        task, _, name = key[len(ADAPTER_PREFIX) :].partition(".")
        if not key.startswith(ADAPTER_PREFIX) or task not in grouped or not name:
            raise CheckpointError(f"bank {path}: tensor {key!r} belongs to no task of the bank")
        grouped[task][name] = tensor
    bank = Bank(
        momentum=_json_field(path, metadata, "momentum"),
        scale=_json_field(path, metadata, "scale"),
        class_to_task=_json_field(path, metadata, "class_to_task"),
        prototypes=prototypes,
        merge=_json_field(path, metadata, "merge"),
        path=path,
    )
    for task in tasks:
        meta = members_meta.get(task)
        if not isinstance(meta, dict) or meta.get("kind") not in ("lora", "raw"):
            raise CheckpointError(f"bank {path}: task {task!r} has no valid member description")
        config = meta.get("adapter_config")
        if meta["kind"] == "lora":
            if not isinstance(config, dict):
                raise CheckpointError(f"bank {path}: LoRA task {task!r} has no adapter_config")
            settings_from_config(config, f"bank {path}: task {task!r}")
        if not grouped[task]:
            raise CheckpointError(f"bank {path}: task {task!r} holds no tensors")
        member = Member(meta["kind"], dict(sorted(grouped[task].items())), config)
        if bank.members:
            try:
                check_compatible(task, member, next(iter(bank.members.items())))
            except CheckpointError as exc:
                raise CheckpointError(f"bank {path}: {exc}") from None
        bank.members[task] = member
    _check_bank_fields(bank, path)
    return bank


def _check_header(path: Path, metadata: Mapping[str, str], tasks: Any) -> None:
    """The header fields every reader relies on, checked before any tensor is grouped."""
    if metadata["mlite_bank"] != BANK_FORMAT:
        raise CheckpointError(f"bank {path}: format version {metadata['mlite_bank']!r} is not one this mlite "
                              f"reads ({BANK_FORMAT!r}); upgrade mlite")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise CheckpointError(f"bank {path}: metadata 'tasks' must be a list of task names")
    seen: set[str] = set()
    for t in tasks:
        if not _TASK_NAME.fullmatch(t):
            raise CheckpointError(f"bank {path}: task name {t!r} is invalid")
        if t in seen:
            raise CheckpointError(f"bank {path}: task {t!r} is listed twice")
        seen.add(t)


def _check_bank_fields(bank: Bank, path: Path) -> None:
    """Momentum, scale, merge record, prototypes and class map: the types the rest of mlite assumes."""
    for name in ("momentum", "scale"):
        value = getattr(bank, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CheckpointError(f"bank {path}: metadata {name!r} must be a number or null, got {value!r}")
    if bank.merge is not None and not isinstance(bank.merge, dict):
        raise CheckpointError(f"bank {path}: metadata 'merge' must be an object or null")
    protos, c2t = bank.prototypes, bank.class_to_task
    if protos is not None and (protos.dim() != 2 or not protos.is_floating_point()):
        raise CheckpointError(f"bank {path}: prototypes must be a float matrix [classes, features], "
                              f"got {torch_name(protos.dtype)} {list(protos.shape)}")
    if c2t is not None:
        if not isinstance(c2t, list) or not all(isinstance(t, str) for t in c2t):
            raise CheckpointError(f"bank {path}: metadata 'class_to_task' must be a list of task names")
        unknown = [t for t in c2t if t not in bank.members]
        if unknown:
            raise CheckpointError(f"bank {path}: class_to_task names task {unknown[0]!r}, which the bank does not hold")
        if protos is not None and protos.shape[0] != len(c2t):
            raise CheckpointError(f"bank {path}: {protos.shape[0]} prototype rows but class_to_task has {len(c2t)} classes")


# ---------------------------------------------------------------------------------------------
# Writing


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; pass --force (force=True) to replace it")


def _discard(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        tmp.unlink()


def _owned(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    # safetensors refuses tensors that share storage; banks built in memory may alias.
    t = t.detach().to("cpu").contiguous()
    ptr = t.untyped_storage().data_ptr()
    if ptr in seen:
        t = t.clone()
    seen.add(t.untyped_storage().data_ptr())
    return t


def bank_metadata(bank: Bank) -> dict[str, str]:
    """The header metadata of `bank` (string → string)."""
    members = {
        task: {"kind": m.kind, **({"adapter_config": m.adapter_config} if m.kind == "lora" else {})}
        for task, m in bank.members.items()
    }
    meta = {
        "format": "pt",
        "mlite_bank": BANK_FORMAT,
        "tasks": json.dumps(bank.tasks),
        "members": json.dumps(members),
        "momentum": json.dumps(bank.momentum),
        "scale": json.dumps(bank.scale),
    }
    if bank.class_to_task is not None:
        meta["class_to_task"] = json.dumps(bank.class_to_task)
    if bank.merge is not None:
        meta["merge"] = json.dumps(bank.merge)
    return meta


def save_bank(bank: Bank, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `bank` atomically; refuses an empty bank and, unless `overwrite`, an existing file."""
    target = Path(path)
    bank.require_tasks()
    _check_target(target, overwrite)
    if target.is_dir():
        raise UsageError(f"{target} is a directory; a bank is one .safetensors file")
    seen: set[int] = set()
    tensors = {
        f"{ADAPTER_PREFIX}{task}.{name}": _owned(t, seen)
        for task, m in bank.members.items()
        for name, t in m.tensors.items()
    }
    if bank.prototypes is not None:
        tensors[PROTOTYPES] = _owned(bank.prototypes, seen)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = beside(target, "mlite-tmp")
    try:
        write_file(tensors, tmp, bank_metadata(bank), target=target)
        put_in_place(tmp, target)
    except BaseException:
        _discard(tmp)
        raise
    return target


def export_member(member: Member, out: str | Path, *, force: bool = False) -> Path:
    """A LoRA member as a PEFT adapter directory; a raw member as a safetensors file."""
    target = Path(out)
    _check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = beside(target, "mlite-tmp")
    seen: set[int] = set()
    tensors = {name: _owned(t, seen) for name, t in member.tensors.items()}
    try:
        if member.kind == "lora":
            tmp.mkdir()
            (tmp / PEFT_CONFIG).write_text(json.dumps(member.adapter_config or {}, indent=2) + "\n")
            write_file(tensors, tmp / PEFT_WEIGHTS, {"format": "pt"}, target=target)
        else:
            write_file(tensors, tmp, {"format": "pt"}, target=target)
        put_in_place(tmp, target)
    except BaseException:
        _discard(tmp)
        raise
    return target
