"""The Python API: the same engine as the CLI, for notebooks and scripts.

Every function validates exactly as `mlite` does and raises the same `MliteError`s (with the
same messages) instead of exiting. `merge` and `run_recipe` return an in-memory state dict
when no output path is given, which is handy for small models.

Arguments are checked here, at the door, so a wrong type (`out=5`, `models="a/path"`,
`dtype=16`) is a one-line `UsageError` naming the argument instead of a `TypeError` from deep
inside pathlib or torch. The workflow functions re-exported below get the same checks through
`_checked`, which keeps their signatures and docstrings.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from inspect import signature
from pathlib import Path
from typing import Any, TypeVar

import torch

from .dtypes import CONFIG_NAMES
from .engine.plan import Plan, build_plan
from .engine.run import PublishHook, RunResult, TensorHook, execute
from .errors import UsageError
from .io.bank import Bank
from .io.checkpoint import Checkpoint, open_checkpoint
from .methods.registry import all_methods
from .methods.registry import get_method as _get_method
from .methods.registry import method_aliases as _method_aliases
from .methods.surgery import DEFAULT_FRACTION as SURGERY_DEFAULT_FRACTION
from .methods.surgery import DEFAULT_TARGET as SURGERY_DEFAULT_TARGET
from .recipe.model import Recipe, load_recipe
from .units import parse_size
from .workflows import demo as _demo
from .workflows import extract as _extract
from .workflows import mos as _mos
from .workflows import patch as _patch
from .workflows import surgery as _surgery

__all__ = [
    "SURGERY_DEFAULT_FRACTION", "SURGERY_DEFAULT_TARGET", "all_methods", "get_method", "method_aliases", "run_demo",
    "bank_add", "bank_export", "bank_list", "bank_set_prototypes", "collect_features", "dry_run", "extract",
    "inspect", "merge", "mos_merge", "patch", "plan_recipe", "retrieve", "run_recipe", "surgery", "train_probe",
    "undo_surgery",
]

PathLike = str | os.PathLike
F = TypeVar("F", bound=Callable[..., Any])
Check = Callable[[Any, str], Any]


# ---------------------------------------------------------------------------------------------
# Argument checks: each takes (value, argument name) and returns the value to pass on, or raises
# a UsageError naming the argument. Small and pure, so every public function shares them.


def _path(value: Any, what: str) -> Path:
    """`value` as a Path; only str and os.PathLike are paths (bytes and None are not)."""
    if isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str):
        return Path(value)
    raise UsageError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")


def _path_arg(value: Any, what: str) -> Any:
    """A path argument, passed on as given: a string may also be a Hub reference ('org/name')."""
    _path(value, what)
    return value


def _optional(check: Check) -> Check:
    """`check`, but None passes (the argument's documented 'not given')."""

    def optional_check(value: Any, what: str) -> Any:
        return None if value is None else check(value, what)

    return optional_check


def _bank_arg(value: Any, what: str) -> Any:
    """A bank: a bank file's path or an in-memory `Bank` (what `mos_merge(out=None)` returns)."""
    if isinstance(value, Bank):
        return value
    if isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str):
        return value
    raise UsageError(f"{what} must be a path (str or os.PathLike) or a Bank, got {type(value).__name__}")


def _str_arg(value: Any, what: str) -> str:
    """A name (method, task, module): strings only, so lookups never hash a list."""
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _integer(value: Any, what: str, minimum: int, words: str) -> int:
    """An integer ≥ `minimum`; bools and floats are refused (1.5 or True as a seed is a slip)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UsageError(f"{what} must be {words}, got {value!r}")
    return int(value)


def _positive_int(value: Any, what: str) -> int:
    return _integer(value, what, 1, "a positive integer")


def _real(value: Any, what: str, rule: str = "a finite number") -> float:
    """A finite real number (not bool, not a numeric string); `rule` words the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise UsageError(f"{what} must be {rule}, got {value!r}")
    return float(value)


def _finite(value: Any, what: str) -> float:
    return _real(value, what)


def _positive(value: Any, what: str) -> float:
    """A finite number > 0 (an adapter's output scale)."""
    if _real(value, what, "a finite positive number") <= 0:
        raise UsageError(f"{what} must be a finite positive number, got {value!r}")
    return float(value)


def _holdout(value: Any, what: str) -> float:
    """The held-out share of a probe's samples, in [0, 1) as `fit_probe` requires."""
    if not 0.0 <= _real(value, what, "a number in [0, 1)") < 1.0:
        raise UsageError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def _fraction(value: Any, what: str) -> float:
    """A share of rows, in (0, 1]."""
    if not 0.0 < _real(value, what, "a number in (0, 1]") <= 1.0:
        raise UsageError(f"{what} must be a number in (0, 1], got {value!r}")
    return float(value)


def _seed(value: Any, what: str) -> int:
    """A seed: an integer ≥ 0, as a recipe's `seed:` must be."""
    return _integer(value, what, 0, "an integer >= 0")


def _shard_size(value: Any, what: str) -> int:
    """Bytes per shard: a positive int, or a size string as `--shard-size` takes ('5GB', '500M')."""
    if isinstance(value, str):
        try:
            return parse_size(value)
        except UsageError as exc:  # "cannot read size 'abc'" alone would not say which argument
            raise UsageError(f"{what}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise UsageError(f"{what} must be a positive integer or a size such as '5GB', got {value!r}")
    return int(value)


# Output dtypes by name; a torch.dtype among them is accepted and passed on by name.
_TORCH_DTYPES: dict[torch.dtype, str] = {getattr(torch, name): name for name in CONFIG_NAMES.values()}


def _dtype(value: Any, what: str) -> str:
    """A dtype name ('bfloat16', 'bf16': checked by the engine) or one of the float torch dtypes."""
    if isinstance(value, str):
        if not value.strip():
            raise UsageError(f"{what} is empty; name a dtype such as 'bfloat16'")
        return value
    if isinstance(value, torch.dtype):
        if value not in _TORCH_DTYPES:
            raise UsageError(f"{what} must be one of {', '.join(_TORCH_DTYPES.values())}, got {value}")
        return _TORCH_DTYPES[value]
    raise UsageError(f"{what} must be a dtype name such as 'bfloat16' or a torch dtype, got {type(value).__name__}")


def _device(value: Any, what: str) -> str:
    """A device name ('cpu', 'cuda:1', 'auto': checked by the engine) or a torch.device."""
    if isinstance(value, torch.device):
        return str(value)
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a device name such as 'cpu' or 'cuda' (or a torch.device), "
                         f"got {type(value).__name__}")
    if not value.strip():
        raise UsageError(f"{what} is empty; name a device such as 'cpu' or 'cuda'")
    return value


def _callable(value: Any, what: str) -> Any:
    if not callable(value):
        raise UsageError(f"{what} must be callable, got {type(value).__name__}")
    return value


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise UsageError(f"{what} must be a mapping (dict), got {type(value).__name__}")
    return value


def _sequence(value: Any, what: str) -> list[Any]:
    """An ordered collection as a list; a string is refused, not taken as its characters."""
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
        raise UsageError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def _tensor(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _class_to_task(value: Any, what: str) -> Any:
    """The task of each class: a list of task names or indices, or an index tensor."""
    return value if isinstance(value, torch.Tensor) else _sequence(value, what)


def _adapters(value: Any, what: str) -> list[Mapping[str, torch.Tensor]]:
    """One state dict (name → tensor) per task."""
    return [_mapping(a, f"{what}[{i}]") for i, a in enumerate(_sequence(value, what))]


def _texts(value: Any, what: str) -> Any:
    """A text file (one example per line) or a list of strings."""
    if isinstance(value, (str, os.PathLike)):
        return _path_arg(value, what)
    texts = _sequence(value, what)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UsageError(f"{what}[{i}] must be a string, got {type(text).__name__}")
    return texts


def _checked(fn: F, **checks: Check) -> F:
    """`fn` with its arguments checked first (by name, in signature order), same signature and docs.

    A call that does not fit the signature at all (an unknown keyword, a missing argument) goes
    to `fn` unchanged, so Python's own TypeError names `fn` and the argument.
    """
    sig = signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)
        for name, value in bound.arguments.items():
            if name in checks:
                bound.arguments[name] = checks[name](value, name)
        return fn(*bound.args, **bound.kwargs)

    wrapper.checked_arguments = tuple(checks)  # type: ignore[attr-defined]  # tests hold them to the signature
    return wrapper  # type: ignore[return-value]


_opt_path = _optional(_path_arg)
_opt_device = _optional(_device)
_opt_dtype = _optional(_dtype)

# What plan_recipe/dry_run take as **overrides (build_plan's options), and how each is checked.
_PLAN_OPTIONS: tuple[str, ...] = tuple(p for p in signature(build_plan).parameters if p != "recipe")
_OVERRIDE_CHECKS: dict[str, Check] = {
    "out": _opt_path, "device": _opt_device, "dtype": _opt_dtype,
    "shard_size": _optional(_shard_size), "seed": _optional(_seed),
}


def _recipe(value: Any) -> Recipe:
    """A recipe given as a Recipe, a dict in the YAML's shape, or a YAML file's path."""
    if isinstance(value, Recipe):
        return value
    if isinstance(value, Mapping):
        return load_recipe(value)
    if isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str):
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


def dry_run(recipe: PathLike | Mapping[str, Any] | Recipe, **overrides: Any) -> dict[str, Any]:
    """What a run would read and write, its passes, shards and a peak-memory estimate; an output
    the run would refuse (not empty without force, or holding an input) is refused here too."""
    allowed = [p for p in _PLAN_OPTIONS if p != "check_output"]  # it refuses what the run would refuse
    return _plan("dry_run", recipe, overrides, allowed, check_output=True).estimate()


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
    _optional(_callable)(publish_hook, "publish_hook")
    _optional(_callable)(tensor_hook, "tensor_hook")
    plan = plan_recipe(recipe, out=out, device=device, dtype=dtype, seed=seed, force=force, allow_bin=allow_bin,
                       shard_size=shard_size)
    if require_output and plan.out is None:
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
    _str_arg(method, "method")
    _opt_path(base, "base")
    models = _sequence(models, "models")
    for i, m in enumerate(models):
        _path(m, f"models[{i}]")
    parameters = _optional(_mapping)(parameters, "parameters")
    if model_parameters is not None:
        model_parameters = _sequence(model_parameters, "model_parameters")
        for i, params in enumerate(model_parameters):
            _mapping(params, f"model_parameters[{i}]")
    _opt_path(out, "out")
    # device, dtype, shard_size and seed are checked by run_recipe before anything is read

    spec = _get_method(method)
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
    return open_checkpoint(_path_arg(path, "path"), allow_bin=allow_bin)


# ---------------------------------------------------------------------------------------------
# The workflows, re-exported with their arguments checked first (same signatures and docs).

get_method = _checked(_get_method, name=_str_arg)
method_aliases = _checked(_method_aliases, name=_str_arg)
run_demo = _checked(_demo.run_demo, folder=_path_arg, report=_callable)

patch = _checked(
    _patch.patch, base=_path_arg, delta=_path_arg, old_base=_opt_path, lam=_finite, out=_opt_path,
    device=_device, dtype=_opt_dtype, shard_size=_optional(_shard_size), seed=_seed,
)
extract = _checked(
    _extract.extract, model=_path_arg, base=_path_arg, out=_opt_path, seed=_seed, device=_device,
    dtype=_opt_dtype, on_tensor=_optional(_callable),
)

bank_add = _checked(_mos.bank_add, bank=_path_arg, task=_str_arg, source=_path_arg, scale=_optional(_positive))
bank_list = _checked(_mos.bank_list, bank=_path_arg)
bank_export = _checked(_mos.bank_export, bank=_bank_arg, task=_str_arg, out=_path_arg)
bank_set_prototypes = _checked(_mos.bank_set_prototypes, bank=_path_arg, prototypes=_tensor,
                               class_to_task=_class_to_task)
mos_merge = _checked(_mos.mos_merge, bank=_bank_arg, out=_opt_path)
retrieve = _checked(
    _mos.retrieve, feature_fn=_callable, prototypes=_optional(_tensor), class_to_task=_optional(_class_to_task),
    adapters=_optional(_adapters), bank=_optional(_bank_arg), classifier=_optional(_callable),
    first_classifier=_optional(_callable),
)

surgery = _checked(
    _surgery.surgery, model=_path_arg, probe=_path_arg, top_k=_optional(_positive_int),
    fraction=_optional(_fraction), target=_str_arg, out=_opt_path, device=_opt_device,
)
undo_surgery = _checked(_surgery.undo_surgery, edited_model=_path_arg, out=_path_arg)
train_probe = _checked(_surgery.train_probe, features_path=_path_arg, out=_path_arg, seed=_seed, holdout=_holdout)
collect_features = _checked(
    _surgery.collect_features, model_dir=_path_arg, pos_texts=_texts, neg_texts=_texts, out=_path_arg,
    batch_size=_positive_int, max_length=_positive_int, device=_device,
)
