"""The Python API: the same engine as the CLI, for notebooks and scripts.

Every function validates exactly as `mlite` does and raises the same `MliteError`s (with the
same messages) instead of exiting. `merge` and `run_recipe` return an in-memory state dict
when no output path is given, which is handy for small models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .engine.plan import Plan, build_plan
from .engine.run import PublishHook, RunResult, TensorHook, execute
from .io.checkpoint import Checkpoint, open_checkpoint
from .methods.registry import all_methods, get_method, method_aliases
from .methods.surgery import DEFAULT_FRACTION as SURGERY_DEFAULT_FRACTION
from .methods.surgery import DEFAULT_TARGET as SURGERY_DEFAULT_TARGET
from .recipe.model import Recipe, load_recipe
from .workflows.demo import run_demo
from .workflows.extract import extract
from .workflows.mos import bank_add, bank_export, bank_list, bank_set_prototypes, mos_merge, retrieve
from .workflows.patch import patch
from .workflows.surgery import collect_features, surgery, train_probe, undo_surgery

__all__ = [
    "SURGERY_DEFAULT_FRACTION", "SURGERY_DEFAULT_TARGET", "all_methods", "get_method", "method_aliases", "run_demo",
    "bank_add", "bank_export", "bank_list", "bank_set_prototypes", "collect_features", "dry_run", "extract",
    "inspect", "merge", "mos_merge", "patch", "plan_recipe", "retrieve", "run_recipe", "surgery", "train_probe",
    "undo_surgery",
]

PathLike = str | os.PathLike


def plan_recipe(recipe: PathLike | Mapping[str, Any] | Recipe, **overrides: Any) -> Plan:
    """Validate a recipe and open its inputs (headers only); nothing is computed or written."""
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe if isinstance(recipe, Mapping) else Path(recipe))
    return build_plan(rec, **overrides)


def dry_run(recipe: PathLike | Mapping[str, Any] | Recipe, **overrides: Any) -> dict[str, Any]:
    """What a run would read and write, its passes, shards and a peak-memory estimate."""
    return plan_recipe(recipe, check_output=False, **overrides).estimate()


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
    from .units import parse_size

    plan = plan_recipe(
        recipe, out=out, device=device, dtype=dtype, seed=seed, force=force, allow_bin=allow_bin,
        shard_size=parse_size(shard_size) if shard_size is not None else None,
    )
    if require_output and plan.out is None:
        from .errors import UsageError

        raise UsageError("the recipe names no output.path; pass --out PATH")
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
    otherwise.
    """
    from .errors import UsageError

    spec = get_method(method)
    models = list(models)
    if spec is not None and base is not None and not spec.needs_base:
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
    """Open a checkpoint (headers only) to look at its tensors."""
    return open_checkpoint(path, allow_bin=allow_bin)
