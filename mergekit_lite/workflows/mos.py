"""MOS in the Python API: adapter banks, the whole-bank merge, and training-free retrieval.

The maths lives in `mergekit_lite.methods.mos` and the file format in `mergekit_lite.io.bank`;
this module strings them together the way a user asks for it ("add this adapter", "merge the
bank", "pick an adapter per sample"). Every function checks its arguments before it reads or
writes anything, and every write is atomic.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mergekit_lite.dtypes import torch_name
from mergekit_lite.errors import CheckpointError, UsageError
from mergekit_lite.io.adapters import pattern_key
from mergekit_lite.io.bank import (
    Bank,
    Member,
    export_member,
    load_bank,
    read_source,
    save_bank,
)
from mergekit_lite.io.writer import all_finite, refuse_over_inputs
from mergekit_lite.methods.mos import MODES, lora_scaling, mos_tensors, refactor_lowrank
from mergekit_lite.precision import full_float32_matmul

SPACES: tuple[str, ...] = ("factors", "delta")

__all__ = [
    "Retrieval",
    "bank_add",
    "bank_export",
    "bank_list",
    "bank_set_prototypes",
    "mos_merge",
    "retrieve",
]


# ---------------------------------------------------------------------------------------------
# Bank management


def bank_add(bank: str | Path, task: str, source: str | Path, *, scale: float | None = None) -> Bank:
    """Append `source` (PEFT LoRA dir or raw safetensors file) as task `task`; creates the bank.

    `scale` records the adapters' output scale (AdaptFormer uses 0.1) for whoever applies them;
    it can be set when the bank is created or must match the recorded one.
    """
    path = Path(bank)
    b = load_bank(path) if path.exists() else Bank(path=path)
    member = read_source(source)
    _require_finite_member(str(source), member)
    b.add(task, member)
    if scale is not None:
        if b.scale is not None and float(b.scale) != float(scale):
            raise UsageError(f"{b.label} records adapter scale {b.scale}, not {scale}")
        b.scale = float(scale)
    save_bank(b, path, overwrite=True)
    return b


def _require_finite_member(where: str, m: Member) -> None:
    """An adapter holding inf/NaN (a diverged run) would spread it to every later task's merge."""
    bad = next((k for k, t in m.tensors.items() if t.is_floating_point() and not all_finite(t)), None)
    if bad is not None:
        raise CheckpointError(f"{where}: tensor {bad!r} holds inf or NaN")


def _member_summary(task: str, m: Member) -> dict[str, Any]:
    dtypes = sorted({torch_name(t.dtype) for t in m.tensors.values()})
    row: dict[str, Any] = {
        "task": task,
        "kind": m.kind,
        "tensors": len(m.tensors),
        "parameters": m.num_parameters(),
        "dtype": ",".join(dtypes),
    }
    if m.kind == "lora":
        cfg = m.adapter_config or {}
        row.update(r=cfg.get("r"), lora_alpha=cfg.get("lora_alpha"), modules=len(m.modules()))
    return row


def bank_list(bank: str | Path) -> dict[str, Any]:
    """What a bank holds, as plain JSON-ready data (tasks in order, merge provenance, classes)."""
    b = load_bank(bank)
    return {
        "path": str(b.path),
        "tasks": [_member_summary(t, m) for t, m in b.members.items()],
        "momentum": b.momentum,
        "scale": b.scale,
        "merge": b.merge,
        "classes": None if b.class_to_task is None else len(b.class_to_task),
        "prototypes": None if b.prototypes is None else list(b.prototypes.shape),
    }


def bank_export(bank: str | Path | Bank, task: str, out: str | Path, *, force: bool = False) -> Path:
    """Task `task` as a PEFT adapter dir (LoRA members) or a safetensors file (raw members).

    `bank` is a bank file or an in-memory bank (what `mos_merge(out=None)` returns)."""
    if not isinstance(bank, Bank):
        refuse_over_inputs(Path(out), [Path(bank)])
    member = (bank if isinstance(bank, Bank) else load_bank(bank)).member(task)
    if member.kind == "lora" and str(out).endswith(".safetensors"):
        raise UsageError(f"{out}: task {task!r} is a LoRA, exported as a PEFT adapter directory; give a directory "
                         "path (without .safetensors)")
    return export_member(member, out, force=force)


def bank_set_prototypes(
    bank: str | Path, prototypes: torch.Tensor, class_to_task: Sequence[str | int]
) -> Bank:
    """Store class prototypes (one row per class) and the task each class belongs to."""
    b = load_bank(bank)
    b.require_tasks()
    if not isinstance(prototypes, torch.Tensor):
        raise UsageError(f"prototypes must be a tensor [classes, features], got {type(prototypes).__name__}")
    if prototypes.dim() != 2:
        raise UsageError(f"prototypes must be a [classes, features] matrix, got shape {list(prototypes.shape)}")
    _require_finite_prototypes(prototypes)
    indices = _class_tasks(class_to_task, b.tasks, b.label)
    if len(indices) != prototypes.shape[0]:
        raise UsageError(f"class_to_task has {len(indices)} entries for {prototypes.shape[0]} prototypes")
    b.prototypes = prototypes.detach().float().cpu()
    b.class_to_task = [b.tasks[i] for i in indices]
    save_bank(b, b.path or bank, overwrite=True)
    return b


# ---------------------------------------------------------------------------------------------
# Merging


def _check_merge_args(momentum: float, mode: str, space: str, rank: int | None) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise UsageError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if space not in SPACES:
        raise UsageError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    if rank is not None:
        if space != "delta":
            raise UsageError("rank only applies to space 'delta' (factors keep their shapes)")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise UsageError(f"rank must be a positive integer, got {rank!r}")


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup (`adapters.pattern_key`), else the default."""
    key = pattern_key(list(patterns or {}), module)
    return default if key is None else patterns[key]  # type: ignore[index]


def _module_scaling(config: Mapping[str, Any], module: str) -> float:
    # Saved keys carry PEFT's wrapper prefix; patterns are written against the model's own names.
    name = module.removeprefix("base_model.model.")
    r = int(_pattern_value(config.get("rank_pattern"), name, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
    return lora_scaling(alpha, r, bool(config.get("use_rslora", False)))


def _scaling_signature(config: Mapping[str, Any] | None) -> tuple[Any, ...]:
    c = config or {}
    return (
        c.get("r"),
        c.get("lora_alpha"),
        bool(c.get("use_rslora", False)),
        sorted((c.get("rank_pattern") or {}).items()),
        sorted((c.get("alpha_pattern") or {}).items()),
    )


def _merge_factors(b: Bank, momentum: float, mode: str) -> list[dict[str, torch.Tensor]]:
    members = list(b.members.values())
    if members[0].kind == "lora":
        first = _scaling_signature(members[0].adapter_config)
        for task, m in b.members.items():
            if _scaling_signature(m.adapter_config) != first:
                raise UsageError(
                    f"task {task!r}: its LoRA scaling (r, lora_alpha, use_rslora, patterns) differs from "
                    f"task {b.tasks[0]!r}, so merging factors would mix scales; use space 'delta'"
                )
    out: list[dict[str, torch.Tensor]] = [{} for _ in members]
    for name in members[0].tensors:
        inputs = [m.tensors[name] for m in members]
        if not inputs[0].is_floating_point():
            for t, x in enumerate(inputs):
                out[t][name] = x.clone()
            continue
        merged = mos_tensors([x.float() for x in inputs], momentum, mode)  # type: ignore[arg-type]
        for t, (x, y) in enumerate(zip(inputs, merged, strict=True)):
            out[t][name] = y.to(x.dtype)
    return out


@full_float32_matmul()
def _merge_delta(
    b: Bank, momentum: float, mode: str, rank: int | None
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]]]:
    members = list(b.members.values())
    if members[0].kind != "lora":
        raise UsageError(f"space 'delta' needs LoRA members; {b.label} holds raw adapters (use space 'factors')")
    modules = members[0].modules()
    expected = {f"{mod}.lora_{x}.weight" for mod in modules for x in "AB"}
    configs: list[dict[str, Any]] = []
    for task, m in b.members.items():
        cfg = copy.deepcopy(m.adapter_config or {})
        if cfg.get("use_dora"):
            raise UsageError(f"task {task!r} is a DoRA adapter; space 'delta' supports plain LoRA only")
        extra = sorted(set(m.tensors) - expected)
        if extra:
            raise UsageError(f"task {task!r}: tensor {extra[0]!r} is not a lora_A/lora_B weight; use space 'factors'")
        missing = sorted(expected - set(m.tensors))
        if missing:
            raise UsageError(f"task {task!r}: no tensor {missing[0]!r} (embedding LoRA?); use space 'factors'")
        flat = sorted(k for k in expected if m.tensors[k].dim() != 2)
        if flat:
            raise UsageError(f"task {task!r}: tensor {flat[0]!r} is not a matrix; space 'delta' supports linear LoRA only")
        silent = next((mod for mod in modules if _module_scaling(cfg, mod) == 0), None)
        if silent is not None:
            raise UsageError(f"task {task!r}: module {silent} has scaling 0 (lora_alpha 0), so no ΔW to re-factor; "
                             "use space 'factors'")
        if rank is not None:
            cfg["r"] = rank
            cfg["rank_pattern"] = {}
        configs.append(cfg)
    out: list[dict[str, torch.Tensor]] = [{} for _ in members]
    for mod in modules:
        a_name, b_name = f"{mod}.lora_A.weight", f"{mod}.lora_B.weight"
        deltas = [
            _module_scaling(m.adapter_config or {}, mod) * (m.tensors[b_name].float() @ m.tensors[a_name].float())
            for m in members
        ]
        merged = mos_tensors(deltas, momentum, mode)  # type: ignore[arg-type]
        for t, (m, cfg, dw) in enumerate(zip(members, configs, merged, strict=True)):
            own_rank = m.tensors[a_name].shape[0]
            r = rank if rank is not None else own_rank
            scaling = _module_scaling(cfg, mod)
            if r == own_rank and scaling == _module_scaling(m.adapter_config or {}, mod) and torch.equal(dw, deltas[t]):
                # A'ₜ = Aₜ (the first task, or momentum 0): the stored factors already are the answer,
                # and an SVD would only rotate them and add rounding.
                out[t][a_name], out[t][b_name] = m.tensors[a_name], m.tensors[b_name]
                continue
            new_b, new_a = refactor_lowrank(dw, r, scaling)
            out[t][a_name] = new_a.to(m.tensors[a_name].dtype)
            out[t][b_name] = new_b.to(m.tensors[b_name].dtype)
    return out, configs


def mos_merge(
    bank: str | Path | Bank,
    momentum: float = 0.1,
    mode: str = "stored",
    space: str = "factors",
    rank: int | None = None,
    out: str | Path | None = None,
    *,
    force: bool = False,
) -> Path | Bank:
    """The MOS merge of every task of a bank, in task order (ALGORITHMS.md §3).

    `space="factors"` applies the rule elementwise to every stored parameter; `space="delta"`
    (LoRA banks) merges each module's dense ΔW = s·B·A and re-factors it by SVD to rank `rank`
    (default: the member's own rank). Writes a new bank to `out` and returns its path, or returns
    the merged bank in memory when `out` is None.
    """
    _check_merge_args(momentum, mode, space, rank)
    if out is not None and not isinstance(bank, Bank):
        refuse_over_inputs(Path(out), [Path(bank)])
    if out is not None and Path(out).exists() and not force:
        raise UsageError(f"{out} already exists; pass --force (force=True) to replace it")
    b = bank if isinstance(bank, Bank) else load_bank(bank)
    b.require_tasks()
    for task, m in b.members.items():  # a bank written before bank_add refused them
        _require_finite_member(f"{b.label}: task {task!r}", m)
    configs: Sequence[dict[str, Any] | None] = [m.adapter_config for m in b.members.values()]
    if space == "factors":
        tensors = _merge_factors(b, float(momentum), mode)
    else:
        tensors, configs = _merge_delta(b, float(momentum), mode, rank)
    result = Bank(
        momentum=float(momentum),
        scale=b.scale,
        class_to_task=list(b.class_to_task) if b.class_to_task is not None else None,
        prototypes=b.prototypes,
        # The tasks it covered (a task added later is not merged) and any earlier merge it was made from.
        merge={"momentum": float(momentum), "mode": mode, "space": space, "rank": rank, "tasks": b.tasks,
               **({"previous": b.merge} if b.merge is not None else {})},
    )
    for (task, m), params, cfg in zip(b.members.items(), tensors, configs, strict=True):
        result.members[task] = Member(m.kind, params, copy.deepcopy(cfg))
    if out is None:
        return result
    return save_bank(result, out, overwrite=force)


# ---------------------------------------------------------------------------------------------
# Retrieval at inference

FeatureFn = Callable[[torch.Tensor, "Mapping[str, torch.Tensor] | None"], torch.Tensor]
Classifier = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Retrieval:
    """The outcome of `retrieve` for a batch of N samples over C classes."""

    scores: torch.Tensor  # [N, C] ensembled probabilities (or the chosen adapter's logits)
    predictions: torch.Tensor  # [N] argmax of scores
    tasks: torch.Tensor  # [N] index of the adapter whose features gave the final logits
    first_predictions: torch.Tensor  # [N] prediction from the first features (adapter first_adapter)
    rounds: torch.Tensor  # [N] adapter evaluations used (1 … max_rounds)


def _cosine_classifier(prototypes: torch.Tensor) -> Classifier:
    protos = F.normalize(prototypes.float(), dim=-1)

    @full_float32_matmul()
    def classify(features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=-1) @ protos.to(features.device).T

    return classify


def _class_tasks(class_to_task: Sequence[str | int] | torch.Tensor, tasks: Sequence[str] | None,
                 where: str | None) -> list[int]:
    """Each class's task as an index: task indices (ints, or an integer tensor) or, where the
    tasks' names are known (a bank), names. Floats are refused rather than truncated."""
    if isinstance(class_to_task, torch.Tensor):
        if class_to_task.is_floating_point() or class_to_task.dtype == torch.bool:
            raise UsageError(f"class_to_task must hold task indices, got a {torch_name(class_to_task.dtype)} tensor")
        entries: list[Any] = class_to_task.flatten().tolist()
    else:
        entries = list(class_to_task)
    if not entries:
        raise UsageError("class_to_task is empty: give the task of at least one class")
    out: list[int] = []
    for c, t in enumerate(entries):
        if isinstance(t, str) and tasks is not None and t in tasks:
            out.append(list(tasks).index(t))
        elif isinstance(t, int) and not isinstance(t, bool) and 0 <= t and (tasks is None or t < len(tasks)):
            out.append(t)
        else:
            of = f" of {where}" if where else " index (task names need bank=)" if isinstance(t, str) else " index"
            raise UsageError(f"class {c}: {t!r} is not a task{of}")
    return out


def _require_finite_prototypes(prototypes: torch.Tensor) -> None:
    if prototypes.numel() and not all_finite(prototypes):
        raise UsageError("prototypes hold inf or NaN")


def _retrieval_inputs(
    bank: str | Path | Bank | None,
    prototypes: torch.Tensor | None,
    class_to_task: Sequence[int] | torch.Tensor | None,
    adapters: Sequence[Mapping[str, torch.Tensor]] | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[Mapping[str, torch.Tensor]] | None]:
    b = load_bank(bank) if isinstance(bank, (str, Path)) else bank
    if b is not None:
        if adapters is None:
            adapters = [m.tensors for m in b.members.values()]
        if prototypes is None:
            prototypes = b.prototypes
        if class_to_task is None and b.class_to_task is not None:
            class_to_task = [b.tasks.index(t) for t in b.class_to_task]
    c2t = None
    if class_to_task is not None:
        c2t = torch.tensor(_class_tasks(class_to_task, b.tasks if b is not None else None,
                                        b.label if b is not None else None), dtype=torch.long)
    if prototypes is not None:
        _require_finite_prototypes(prototypes)
    return prototypes, c2t, None if adapters is None else list(adapters)


@torch.no_grad()
def retrieve(
    inputs: torch.Tensor,
    feature_fn: FeatureFn,
    prototypes: torch.Tensor | None = None,
    class_to_task: Sequence[int] | torch.Tensor | None = None,
    adapters: Sequence[Mapping[str, torch.Tensor]] | None = None,
    *,
    bank: str | Path | Bank | None = None,
    max_rounds: int = 4,
    ensemble: bool = True,
    classifier: Classifier | None = None,
    first_classifier: Classifier | None = None,
    first_adapter: int | None = 0,
) -> Retrieval:
    """MOS's training-free, self-refined adapter retrieval for one batch, as the reference's
    evaluation computes it.

    `feature_fn(inputs, adapter)` returns [N, D] features with `adapter` applied (None: the bare
    backbone). The first prediction comes from the features of adapter `first_adapter` (the
    first task's, as the reference's `forward_orig`; None for the bare backbone), scored by
    `first_classifier` (default: cosine similarity with `prototypes`, the reference's prototype
    classifier). Its class picks a task (`class_to_task`); that task's adapter gives features
    scored by `classifier` (the reference's trained head; default: the prototypes too), whose
    class picks a task again, until the task is stable or `max_rounds` adapter evaluations were
    made. With `ensemble`, the scores are softmax(final logits) + softmax(T · first logits) for
    T tasks. Missing arguments are taken from `bank` when given.
    """
    prototypes, c2t, adapter_list = _retrieval_inputs(bank, prototypes, class_to_task, adapters)
    if not adapter_list:
        raise UsageError("retrieve needs at least one task adapter (adapters= or bank=)")
    if c2t is None:
        raise UsageError("retrieve needs class_to_task (or a bank that records it)")
    if prototypes is not None and (prototypes.dim() != 2 or prototypes.shape[0] != c2t.numel()):
        raise UsageError(f"prototypes {list(prototypes.shape)} do not match {c2t.numel()} classes of class_to_task")
    by_prototypes = prototypes is not None and (first_classifier is None)
    if classifier is None and first_classifier is None and prototypes is None:
        raise UsageError("retrieve needs prototypes or a classifier")
    if prototypes is not None:
        cosine = _cosine_classifier(prototypes)
        first_classifier = first_classifier or cosine
        classifier = classifier or cosine
    first_classifier = first_classifier or classifier
    classifier = classifier or first_classifier
    assert classifier is not None and first_classifier is not None
    if c2t.numel() and (int(c2t.min()) < 0 or int(c2t.max()) >= len(adapter_list)):
        raise UsageError(f"class_to_task names a task outside 0..{len(adapter_list) - 1}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, numbers.Integral) or max_rounds < 1:
        raise UsageError(f"max_rounds must be a positive integer, got {max_rounds!r}")
    if first_adapter is not None and (
        isinstance(first_adapter, bool) or not isinstance(first_adapter, numbers.Integral)
        or not 0 <= first_adapter < len(adapter_list)
    ):
        raise UsageError(f"first_adapter must be None or a task index in 0..{len(adapter_list) - 1}, "
                         f"got {first_adapter!r}")

    cache: dict[int, torch.Tensor] = {}  # features of the whole batch per adapter, computed once
    if first_adapter is None:
        first_features = feature_fn(inputs, None)
    else:
        first_features = cache[first_adapter] = feature_fn(inputs, adapter_list[first_adapter])
    if by_prototypes and prototypes is not None and first_features.shape[-1] != prototypes.shape[1]:
        raise UsageError(f"features have width {first_features.shape[-1]} but the prototypes "
                         f"{list(prototypes.shape)} have {prototypes.shape[1]}")
    first_logits = first_classifier(first_features)
    c2t = c2t.to(first_logits.device)
    first_pred = first_logits.argmax(dim=-1)
    task = c2t[first_pred]
    final = torch.empty_like(first_logits)
    used = task.clone()
    rounds = torch.zeros_like(task)
    active = torch.ones_like(task, dtype=torch.bool)

    for r in range(1, max_rounds + 1):
        idx = active.nonzero().flatten()
        for t in task[idx].unique().tolist():
            if t not in cache:
                cache[t] = feature_fn(inputs, adapter_list[t])
            rows = idx[task[idx] == t]
            final[rows] = classifier(cache[t][rows]).to(final.dtype)
        used[idx] = task[idx]
        rounds[idx] = r
        new_task = c2t[final[idx].argmax(dim=-1)]
        moving = new_task != task[idx]
        if r == max_rounds or not bool(moving.any()):
            break
        active[idx[~moving]] = False
        task[idx[moving]] = new_task[moving]

    if ensemble:
        scores = final.softmax(dim=-1) + (first_logits * len(adapter_list)).softmax(dim=-1)
    else:
        scores = final
    return Retrieval(scores, scores.argmax(dim=-1), used, first_pred, rounds)
