"""The Python API: the same engine as the CLI, for notebooks and scripts.

Every function validates exactly as `mlite` does and raises the same `MliteError`s (with the
same messages) instead of exiting. `merge` and `run_recipe` return an in-memory state dict
when no output path is given, which is handy for small models.

Arguments are checked here, at the door (`arguments.py`), so a wrong type is a one-line
`UsageError` naming the argument; the workflow functions re-exported below get the same checks
through `arguments.checked`, which keeps their signatures and docstrings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from inspect import signature
from pathlib import Path
from typing import Any

import torch

from . import arguments as arg
from .arguments import Check
from .engine.plan import Plan, build_plan
from .engine.run import PublishHook, RunResult, TensorHook, execute
from .errors import UsageError
from .io.checkpoint import Checkpoint, open_checkpoint
from .io.deltas import is_vocab_tensor
from .io.tokenizer_vocab import describe as describe_tokenizer
from .methods.registry import all_methods
from .methods.registry import get_method as _get_method
from .methods.registry import method_aliases as _method_aliases
from .methods.surgery import DEFAULT_FRACTION as SURGERY_DEFAULT_FRACTION
from .methods.surgery import DEFAULT_TARGET as SURGERY_DEFAULT_TARGET
from .recipe.model import Recipe, load_recipe
from .workflows import compat as _compat
from .workflows import demo as _demo
from .workflows import extract as _extract
from .workflows import hadamard as _hadamard
from .workflows import mos as _mos
from .workflows import patch as _patch
from .workflows import surgery as _surgery

__all__ = [
    "SURGERY_DEFAULT_FRACTION", "SURGERY_DEFAULT_TARGET", "all_methods", "get_method", "method_aliases", "run_demo",
    "bank_add", "bank_export", "bank_list", "bank_set_prototypes", "collect_features", "compare_predictions",
    "dry_run", "extract", "hadamard_apply", "hadamard_to_delta", "hadamard_to_multiplier",
    "inspect", "merge", "mos_merge", "patch", "plan_recipe", "retrieve", "run_recipe", "surgery", "train_probe",
    "undo_surgery", "vocabulary",
]

PathLike = str | os.PathLike
NO_OUTPUT = "the recipe names no output.path; pass --out PATH"

# What plan_recipe/dry_run take as **overrides (build_plan's options), and how each is checked.
_PLAN_OPTIONS: tuple[str, ...] = tuple(p for p in signature(build_plan).parameters if p != "recipe")
_OVERRIDE_CHECKS: dict[str, Check] = {
    "out": arg.optional_path, "device": arg.optional_device, "dtype": arg.optional_dtype,
    "shard_size": arg.optional(arg.shard_size), "seed": arg.optional(arg.seed),
    "force": arg.flag, "allow_bin": arg.flag,
}


def _recipe(value: Any) -> Recipe:
    """A recipe given as a Recipe, a dict in the YAML's shape, or a YAML file's path."""
    if isinstance(value, Recipe):
        return value
    if isinstance(value, Mapping):
        return load_recipe(value)
    if arg.is_path(value):
        return load_recipe(Path(value))
    raise UsageError(f"recipe must be a path (str or os.PathLike), a mapping or a Recipe, got {type(value).__name__}")


def _plan(caller: str, recipe: Any, overrides: Mapping[str, Any], allowed: Sequence[str], **fixed: Any) -> Plan:
    """Check `caller`'s **overrides by name and value, then plan; an unknown one names `caller`.

    build_plan's own TypeError would name build_plan, which the caller never called.
    """
    unknown = [k for k in overrides if k not in allowed]
    if unknown:
        raise UsageError(f"{caller}() got an unknown argument {unknown[0]!r} (it takes {', '.join(allowed)})")
    checked = {k: _OVERRIDE_CHECKS[k](v, k) if k in _OVERRIDE_CHECKS else v for k, v in overrides.items()}
    return build_plan(_recipe(recipe), **checked, **fixed)


# ---------------------------------------------------------------------------------------------
# Recipes and single merges


def plan_recipe(recipe: PathLike | Mapping[str, Any] | Recipe, **overrides: Any) -> Plan:
    """Validate a recipe and open its inputs (headers only); nothing is computed or written."""
    return _plan("plan_recipe", recipe, overrides, _PLAN_OPTIONS)


def dry_run(recipe: PathLike | Mapping[str, Any] | Recipe, *, require_output: bool = False,
            **overrides: Any) -> dict[str, Any]:
    """What a run would read and write, its passes, shards and a peak-memory estimate; an output
    the run would refuse (not empty without force, or holding an input) is refused here too, and
    with `require_output` (as `run_recipe`'s) a recipe that names no output."""
    arg.flag(require_output, "require_output")
    allowed = [p for p in _PLAN_OPTIONS if p != "check_output"]  # it refuses what the run would refuse
    plan = _plan("dry_run", recipe, overrides, allowed, check_output=True)
    if require_output and plan.out is None:
        raise UsageError(NO_OUTPUT)
    return plan.estimate()


def run_recipe(
    recipe: PathLike | Mapping[str, Any] | Recipe,
    *,
    out: PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    shard_size: int | str | None = None,
    seed: int | None = None,
    force: bool = False,
    resume: bool = False,
    progress: bool = False,
    allow_bin: bool = False,
    publish_hook: PublishHook | None = None,
    tensor_hook: TensorHook | None = None,
    require_output: bool = False,
    threads: int | None = None,
) -> RunResult:
    """Run a recipe (a YAML path or a dict in the same shape).

    With neither `out` nor `output.path` in the recipe, the result is returned as
    `RunResult.state_dict` instead of written. `resume=True` continues a run that was
    interrupted (its partial output is kept hidden beside the target) when the recipe and
    inputs are unchanged; otherwise the run starts afresh. `threads` fixes torch's CPU threads
    for the run (restored after); by default light methods on the CPU leave one core to I/O.
    """
    arg.optional(arg.function)(publish_hook, "publish_hook")
    arg.optional(arg.function)(tensor_hook, "tensor_hook")
    for name, value in (("resume", resume), ("progress", progress), ("require_output", require_output)):
        arg.flag(value, name)  # force and allow_bin: plan_recipe's checks
    plan = plan_recipe(recipe, out=out, device=device, dtype=dtype, seed=seed, force=force, allow_bin=allow_bin,
                       shard_size=shard_size)
    if require_output and plan.out is None:
        raise UsageError(NO_OUTPUT)
    return execute(plan, progress=progress, publish_hook=publish_hook, tensor_hook=tensor_hook, resume=resume,
                   threads=threads)


def merge(
    method: str,
    *,
    base: PathLike | None = None,
    models: Sequence[PathLike],
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    out: PathLike | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: int | str | None = None,
    seed: int | None = None,
    force: bool = False,
    progress: bool = False,
    threads: int | None = None,
) -> dict[str, torch.Tensor] | Path:
    """One merge step. Returns the output path, or the merged state dict when `out` is None.

    `parameters` apply to the whole step (e.g. `{"density": 0.5, "lambda": 1.0}`, or per-tensor
    rules as in a recipe); `model_parameters` gives one mapping per model for per-model values
    such as `weight` or `density`. For methods without a base (linear, slerp) a given `base`
    becomes the first model of an ordered method (mergekit's slerp shape) and is refused
    otherwise; methods whose base is optional (nuslerp, multislerp) take it as their base.
    """
    arg.string(method, "method")
    base = arg.optional_path(base, "base")
    models = [arg.path_arg(m, f"models[{i}]") for i, m in enumerate(arg.sequence(models, "models"))]
    parameters = arg.optional(arg.mapping)(parameters, "parameters")
    if model_parameters is not None:
        model_parameters = arg.sequence(model_parameters, "model_parameters")
        for i, params in enumerate(model_parameters):
            arg.mapping(params, f"model_parameters[{i}]")
    out = arg.optional_path(out, "out")
    # device, dtype, shard_size, seed, force and progress are checked by run_recipe before anything is read

    spec = _get_method(method)
    if spec is not None and base is not None and not spec.needs_base and not spec.optional_base:
        if not spec.ordered:
            raise UsageError(f"method {method!r} takes no base model; list every model in `models`")
        models, base = [base, *models], None  # mergekit's slerp shape: the base is the start point
    inputs: dict[str, str] = {}
    if base is not None:
        inputs["base"] = str(base)
    names = []
    for i, m in enumerate(models):
        key = f"model_{i}"
        inputs[key] = str(m)
        names.append(key)
    step: dict[str, Any] = {"id": "merge", "method": method, "models": names, "parameters": dict(parameters or {})}
    if base is not None:
        step["base"] = "base"
    if model_parameters is not None:
        if len(model_parameters) != len(names):
            raise UsageError(f"model_parameters has {len(model_parameters)} entries for {len(names)} models")
        per: dict[str, dict[str, Any]] = {}
        for key, params in zip(names, model_parameters, strict=True):
            for pname, value in params.items():
                per.setdefault(pname, {})[key] = value
        step["parameters"].update(per)
    recipe: dict[str, Any] = {"inputs": inputs, "steps": [step], "output": {}}
    if out is not None:
        recipe["output"]["path"] = str(Path(out).absolute())
    result = run_recipe(recipe, device=device, dtype=dtype, shard_size=shard_size, seed=seed, force=force,
                        progress=progress, threads=threads)
    if result.output is not None:
        return result.output
    assert result.state_dict is not None
    return result.state_dict


def inspect(path: PathLike, *, allow_bin: bool = False) -> Checkpoint:
    """Open a checkpoint (headers only) to look at its tensors; quantized ones too (`.quantization`)."""
    return open_checkpoint(arg.path_arg(path, "path"), allow_bin=arg.flag(allow_bin, "allow_bin"),
                           quantized_ok=True)


def vocabulary(checkpoint: PathLike | Checkpoint) -> dict[str, Any] | None:
    """A checkpoint's tokenizer.json in brief (tokens, added tokens, the last few named) with its
    embedding's row count: where fine-tunes differ, a merge wants `tokenizer_source`. Takes a
    checkpoint `inspect` opened, or its path. None when there is no tokenizer.json."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else inspect(arg.path_arg(checkpoint, "checkpoint"))
    info = describe_tokenizer(ckpt.source_dir)
    if info is None:
        return None
    rows = next((t.shape[0] for n, t in ckpt.tensors.items() if is_vocab_tensor(n) and t.shape), None)
    return {**info, "embedding_rows": rows}


# ---------------------------------------------------------------------------------------------
# The workflows, re-exported with their arguments checked first (same signatures and docs).

get_method = arg.checked(_get_method, name=arg.string)
method_aliases = arg.checked(_method_aliases, name=arg.string)
run_demo = arg.checked(_demo.run_demo, folder=arg.path_arg, report=arg.function)

patch = arg.checked(
    _patch.patch, base=arg.path_arg, delta=arg.path_arg, old_base=arg.optional_path, lam=arg.finite,
    rank=arg.optional(arg.positive_int), energy=arg.optional(arg.fraction), budget_rank=arg.optional(arg.positive_int),
    out=arg.optional_path, device=arg.device, dtype=arg.optional_dtype, shard_size=arg.optional(arg.shard_size),
    seed=arg.seed,
)
extract = arg.checked(
    _extract.extract, model=arg.path_arg, base=arg.path_arg, rank=arg.optional(arg.positive_int),
    energy=arg.optional(arg.fraction), budget_rank=arg.optional(arg.positive_int), out=arg.optional_path, seed=arg.seed,
    device=arg.device, dtype=arg.optional_dtype, on_tensor=arg.optional(arg.function),
)

# Multiplicative (HUT) patches: `mlite hadamard to-multiplier | apply | to-delta`.
_HADAMARD_CHECKS: dict[str, Check] = {
    "out": arg.optional_path, "device": arg.device, "dtype": arg.optional_dtype, "shard_size": arg.optional(arg.shard_size),
}
hadamard_to_multiplier = arg.checked(_hadamard.hadamard_to_multiplier, base=arg.path_arg, model=arg.path_arg,
                                     **_HADAMARD_CHECKS)
hadamard_apply = arg.checked(_hadamard.hadamard_apply, base=arg.path_arg, multiplier=arg.path_arg, **_HADAMARD_CHECKS)
hadamard_to_delta = arg.checked(_hadamard.hadamard_to_delta, base=arg.path_arg, multiplier=arg.path_arg,
                                **_HADAMARD_CHECKS)

bank_add = arg.checked(
    _mos.bank_add, bank=arg.path_arg, task=arg.string, source=arg.path_arg, scale=arg.optional(arg.positive),
)
bank_list = arg.checked(_mos.bank_list, bank=arg.path_arg)
bank_export = arg.checked(_mos.bank_export, bank=arg.bank_arg, task=arg.string, out=arg.path_arg)
bank_set_prototypes = arg.checked(
    _mos.bank_set_prototypes, bank=arg.path_arg, prototypes=arg.tensor, class_to_task=arg.class_to_task,
)
mos_merge = arg.checked(_mos.mos_merge, bank=arg.bank_arg, momentum=arg.unit_interval,
                        rank=arg.optional(arg.positive_int), out=arg.optional_path)
retrieve = arg.checked(
    _mos.retrieve, inputs=arg.tensor, feature_fn=arg.function, max_rounds=arg.positive_int,
    first_adapter=arg.optional(arg.index), prototypes=arg.optional(arg.tensor),
    class_to_task=arg.optional(arg.class_to_task), adapters=arg.optional(arg.adapters),
    bank=arg.optional(arg.bank_arg), classifier=arg.optional(arg.function), first_classifier=arg.optional(arg.function),
)

surgery = arg.checked(
    _surgery.surgery, model=arg.path_arg, probe=arg.path_arg, alpha=arg.finite,
    top_k=arg.optional(arg.positive_int), fraction=arg.optional(arg.fraction), target=arg.string, out=arg.optional_path, device=arg.optional_device,
)
undo_surgery = arg.checked(_surgery.undo_surgery, edited_model=arg.path_arg, out=arg.path_arg)
train_probe = arg.checked(
    _surgery.train_probe, features_path=arg.path_arg, out=arg.path_arg, seed=arg.seed, holdout=arg.holdout,
)
collect_features = arg.checked(
    _surgery.collect_features, model_dir=arg.path_arg, pos_texts=arg.texts, neg_texts=arg.texts, out=arg.path_arg,
    batch_size=arg.positive_int, max_length=arg.positive_int, device=arg.device,
)
compare_predictions = arg.checked(
    _compat.compare_predictions, old=arg.path_arg, new=arg.path_arg, metric=arg.optional(arg.string),
    id_field=arg.optional(arg.string), where=arg.optional(arg.mapping),
)
