"""Checks of the Python API's arguments: each takes (value, argument name) and returns the value
to pass on, or raises a `UsageError` naming the argument.

The API is a door for notebooks and scripts, where a wrong type (`out=5`, `models="a/path"`,
`dtype=16`) would otherwise surface as a TypeError from deep inside pathlib or torch. Small and
pure, so every public function shares them; `checked` applies them to a whole function.
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
from .errors import UsageError
from .io.bank import Bank
from .units import parse_size

F = TypeVar("F", bound=Callable[..., Any])
Check = Callable[[Any, str], Any]


def is_path(value: Any) -> bool:
    """Only str and os.PathLike naming a str are paths (bytes, bytes-paths and None are not)."""
    return isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str)


def as_path(value: Any, what: str) -> Path:
    """`value` as a Path, or a UsageError naming the argument."""
    if is_path(value):
        return Path(value)
    raise UsageError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")


def path_arg(value: Any, what: str) -> Any:
    """A path argument: `~` expanded as a shell would, anything else passed on as given (a
    string may also be a Hub reference 'org/name', which never starts with `~`)."""
    path = as_path(value, what)
    return path.expanduser() if os.fspath(value).startswith("~") else value


def optional(check: Check) -> Check:
    """`check`, but None passes (the argument's documented 'not given')."""

    def optional_check(value: Any, what: str) -> Any:
        return None if value is None else check(value, what)

    return optional_check


def bank_arg(value: Any, what: str) -> Any:
    """A bank: a bank file's path or an in-memory `Bank` (what `mos_merge(out=None)` returns)."""
    if isinstance(value, Bank):
        return value
    if is_path(value):
        return path_arg(value, what)
    raise UsageError(f"{what} must be a path (str or os.PathLike) or a Bank, got {type(value).__name__}")


def flag(value: Any, what: str) -> bool:
    """An on/off switch: True or False only. A string such as "false" is truthy, so taking it
    would turn on what the caller meant to turn off (force=\"false\" replacing an output)."""
    if not isinstance(value, bool):
        raise UsageError(f"{what} must be True or False, got {value!r}")
    return value


def string(value: Any, what: str) -> str:
    """A name (method, task, module): strings only, so lookups never hash a list."""
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a string, got {type(value).__name__}")
    return value


def integer(value: Any, what: str, minimum: int, words: str) -> int:
    """An integer ≥ `minimum`; bools and floats are refused (1.5 or True as a seed is a slip)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UsageError(f"{what} must be {words}, got {value!r}")
    return int(value)


def positive_int(value: Any, what: str) -> int:
    return integer(value, what, 1, "a positive integer")


def real(value: Any, what: str, rule: str = "a finite number") -> float:
    """A finite real number (not bool, not a numeric string); `rule` words the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise UsageError(f"{what} must be {rule}, got {value!r}")
    return float(value)


def finite(value: Any, what: str) -> float:
    return real(value, what)


def positive(value: Any, what: str) -> float:
    """A finite number > 0 (an adapter's output scale)."""
    if real(value, what, "a finite positive number") <= 0:
        raise UsageError(f"{what} must be a finite positive number, got {value!r}")
    return float(value)


def holdout(value: Any, what: str) -> float:
    """The held-out share of a probe's samples, in [0, 1) as `fit_probe` requires."""
    if not 0.0 <= real(value, what, "a number in [0, 1)") < 1.0:
        raise UsageError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def fraction(value: Any, what: str) -> float:
    """A share of rows, in (0, 1]."""
    if not 0.0 < real(value, what, "a number in (0, 1]") <= 1.0:
        raise UsageError(f"{what} must be a number in (0, 1], got {value!r}")
    return float(value)


def unit_interval(value: Any, what: str) -> float:
    """A number in [0, 1] (MOS's momentum)."""
    if not 0.0 <= real(value, what, "a number in [0, 1]") <= 1.0:
        raise UsageError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def index(value: Any, what: str) -> int:
    """A position in a list: an integer >= 0."""
    return integer(value, what, 0, "an integer >= 0")


def seed(value: Any, what: str) -> int:
    """A seed: an integer ≥ 0, as a recipe's `seed:` must be."""
    return integer(value, what, 0, "an integer >= 0")


def shard_size(value: Any, what: str) -> int:
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
TORCH_DTYPES: dict[torch.dtype, str] = {getattr(torch, name): name for name in CONFIG_NAMES.values()}


def dtype(value: Any, what: str) -> str:
    """A dtype name ('bfloat16', 'bf16': checked by the engine) or one of the float torch dtypes."""
    if isinstance(value, str):
        if not value.strip():
            raise UsageError(f"{what} is empty; name a dtype such as 'bfloat16'")
        return value
    if isinstance(value, torch.dtype):
        if value not in TORCH_DTYPES:
            raise UsageError(f"{what} must be one of {', '.join(TORCH_DTYPES.values())}, got {value}")
        return TORCH_DTYPES[value]
    raise UsageError(f"{what} must be a dtype name such as 'bfloat16' or a torch dtype, got {type(value).__name__}")


def device(value: Any, what: str) -> str:
    """A device name ('cpu', 'cuda:1', 'auto': checked by the engine) or a torch.device."""
    if isinstance(value, torch.device):
        return str(value)
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a device name such as 'cpu' or 'cuda' (or a torch.device), "
                         f"got {type(value).__name__}")
    if not value.strip():
        raise UsageError(f"{what} is empty; name a device such as 'cpu' or 'cuda'")
    return value


def function(value: Any, what: str) -> Any:
    if not callable(value):
        raise UsageError(f"{what} must be callable, got {type(value).__name__}")
    return value


def mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise UsageError(f"{what} must be a mapping (dict), got {type(value).__name__}")
    return value


def sequence(value: Any, what: str) -> list[Any]:
    """An ordered collection as a list; a string is refused, not taken as its characters."""
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
        raise UsageError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def tensor(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    return value


def class_to_task(value: Any, what: str) -> Any:
    """The task of each class: a list of task names or indices, or an index tensor."""
    return value if isinstance(value, torch.Tensor) else sequence(value, what)


def adapters(value: Any, what: str) -> list[Mapping[str, torch.Tensor]]:
    """One state dict (name → tensor) per task."""
    return [mapping(a, f"{what}[{i}]") for i, a in enumerate(sequence(value, what))]


def texts(value: Any, what: str) -> Any:
    """A text file (one example per line) or a list of strings."""
    if isinstance(value, (str, os.PathLike)):
        return path_arg(value, what)
    texts = sequence(value, what)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UsageError(f"{what}[{i}] must be a string, got {type(text).__name__}")
    return texts


def checked(fn: F, **checks: Check) -> F:
    """`fn` with its arguments checked first (by name, in signature order), same signature and docs.

    Every argument annotated `bool` is held to `flag` unless `checks` says otherwise. A call
    that does not fit the signature at all (an unknown keyword, a missing argument) goes to
    `fn` unchanged, so Python's own TypeError names `fn` and the argument.
    """
    sig = signature(fn)
    checks = {**{name: flag for name, p in sig.parameters.items() if p.annotation in ("bool", bool)}, **checks}

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


optional_path = optional(path_arg)
optional_device = optional(device)
optional_dtype = optional(dtype)
