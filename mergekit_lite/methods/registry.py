"""The method registry: one typed description per method, read by the CLI, recipes and API.

A method is described once (`MethodSpec`) and every face of the product reads that one
description: `mlite methods` prints it, the recipe validator checks parameters against it, the
engine calls its functions. Methods themselves are pure functions of tensors (`TensorJob` in,
tensor out): they never read files, so the same maths runs in a notebook, a test or a
streaming merge of a 70B model.

Global-scope methods (statistics over the whole model, e.g. PCB's quantiles or TIES' global
top-k) add a `Reducer`: the engine streams every float tensor through `observe` for as many
passes as the reducer asks for, then hands `result()` to every `TensorJob` of the output pass
as `job.stats`. Reducers keep only bounded summaries (histograms, heaps, counters).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

ParamKind = Literal["float", "int", "bool", "str", "tensor_file"]
Scope = Literal["tensor", "global"]


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its type, default, allowed range and help text.

    `per_model` parameters (weight, density, ...) may be given once for all models or once per
    model; the engine always hands the method a tuple with one value per model. Other
    parameters reach the method as plain scalars. A `tensor_file` parameter names a safetensors
    (or opt-in `.pt`) file that the engine loads before the run and passes as
    `dict[str, Tensor]`, so methods never do I/O.
    """

    name: str
    kind: ParamKind
    default: Any
    help: str
    per_model: bool = False
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    required: bool = False
    per_tensor: bool = True  # may vary by tensor name (rules, layer gradients); False for global knobs

    def check(self, value: Any) -> str | None:
        """Return a problem description for `value`, or None when it is acceptable."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"expected true/false, got {value!r}"
        if self.kind in ("str", "tensor_file"):
            if not isinstance(value, str):
                return f"expected a string, got {value!r}"
            if self.choices is not None and value not in self.choices:
                return f"expected one of {', '.join(self.choices)}, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        try:
            v = float(value)
        except OverflowError:  # an integer with hundreds of digits
            return f"must be a finite number, got an integer of {len(str(abs(value)))} digits"
        if self.kind == "int" and not v.is_integer():
            return f"expected an integer, got {value!r}"
        if v != v:
            return "NaN is not allowed"
        if v in (math.inf, -math.inf):
            return f"must be a finite number, got {value!r}"
        if self.minimum is not None and (v < self.minimum or (self.min_exclusive and v == self.minimum)):
            op = ">" if self.min_exclusive else ">="
            return f"must be {op} {self.minimum:g}, got {value!r}"
        if self.maximum is not None and (v > self.maximum or (self.max_exclusive and v == self.maximum)):
            op = "<" if self.max_exclusive else "<="
            return f"must be {op} {self.maximum:g}, got {value!r}"
        return None

    def describe_range(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        if self.minimum is None and self.maximum is None:
            return ""
        lo = "(" if self.min_exclusive else "["
        hi = ")" if self.max_exclusive else "]"
        a = "-inf" if self.minimum is None else f"{self.minimum:g}"
        b = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"{lo}{a}, {b}{hi}"


@dataclass(frozen=True)
class TensorJob:
    """Everything a method sees for one output tensor.

    Tensors are float32 (float64 if the method asked for it) on the run's device, with the
    same shape. `models` keeps the recipe's order. `params` holds every parameter of the
    method, resolved for this tensor: defaults filled in, per-model parameters as tuples of
    len(models). `delta` is the step's delta source (PortLLM patches), None when the step has
    none or this tensor is not patched.

    `models_disposable` is True when every tensor in `models` is a private copy made for this
    job (the engine's float32 cast of a stored tensor) that nothing reads after `merge`
    returns: the method may then overwrite them, or return one of them, instead of allocating
    and filling buffers of its own (1.5B task arithmetic, 3 models: the merging thread's CPU
    time 3.5-3.7 s → 2.7-3.0 s). `base` is never disposable. Methods give the same bits
    either way.
    """

    name: str
    base: torch.Tensor | None
    models: Sequence[torch.Tensor]
    params: Mapping[str, Any]
    seed: int = 0
    stats: Any = None
    delta: torch.Tensor | None = None
    rows: tuple[int, int] | None = None  # set when the engine streams a big tensor in row blocks
    models_disposable: bool = False


def tensor_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one tensor, independent of visiting order."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Reducer(Protocol):
    """Streaming statistics for a global-scope method.

    The engine calls `observe` once per float tensor per pass (stats passes see jobs with
    `stats=None`), then `end_pass()`; it starts another pass while `end_pass()` returns False.
    Visiting order is the input-shard order, so global reducers must not depend on it; a
    `tensor_reducer` sees one tensor's row blocks in row order (`BlockOrder`). A reducer may
    also offer `expect(numel)`: the engine then says, before the first pass, how many entries
    per model the passes will show it.
    """

    def observe(self, job: TensorJob) -> None: ...

    def end_pass(self) -> bool: ...

    def result(self) -> Any: ...


class BlockOrder:
    """For a per-tensor reducer whose sums regroup a tensor's values (`detmath.FlatSum`): its
    row blocks must arrive in order, each starting where the last one stopped. The engine
    sends them so (`stream.work_items`, `prefetch`); a loader that did not would change the
    sums' bits without a word, so it is checked."""

    def __init__(self) -> None:
        self._next: int | None = 0  # None once a whole tensor was seen: nothing may follow

    def check(self, job: TensorJob) -> None:
        start, stop = job.rows if job.rows is not None else (0, None)
        if self._next is None or start != self._next:
            raise RuntimeError(f"tensor {job.name}: row block {job.rows} out of order for a per-tensor reducer")
        self._next = stop


def reducer_reads(reducer: Reducer) -> Callable[[str], bool]:
    """Which float tensors a statistics pass must load for `reducer`: every one, unless the
    reducer has a `wants(name)` saying otherwise (surgery scores its target tensors only, a
    fifth of a Llama model's bytes, and need not read the rest)."""
    wants = getattr(reducer, "wants", None)
    return wants if callable(wants) else lambda _name: True


MergeFn = Callable[[TensorJob], torch.Tensor]
ReducerFactory = Callable[[Mapping[str, Any], int], Reducer]  # (params, n_models) -> reducer


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    `inputs` says which recipe fields a step of this method uses: "base" (θ₀), "models"
    (θ₁..θₙ), "delta" (a patch: PEFT adapter or fine-tune minus old base). `scope` returns
    "global" when, for the given (resolved, scalar) parameters, the method needs a statistics
    pass; `reducer` builds the statistics object for such runs.
    """

    name: str
    summary: str
    params: tuple[Param, ...]
    merge: MergeFn
    needs_base: bool = True
    # With needs_base False: a base may still be given, and then the method uses it (mergekit's
    # optional base: nuslerp and multislerp work on task vectors when there is one).
    optional_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    uses_delta: bool = False
    ordered: bool = False  # result depends on the order of models (slerp, mos)
    scope: Callable[[Mapping[str, Any]], Scope] = field(default=lambda params: "tensor")
    reducer: ReducerFactory | None = None
    # True when, for these parameters, each output row depends only on the same rows of the
    # inputs (and `job.stats`), and the reducer (if any) accepts any block of whole rows: the
    # engine may then stream big tensors in row blocks (`job.rows` says which), so memory does
    # not grow with the largest tensor. 1-D tensors are never split.
    row_local: Callable[[Mapping[str, Any]], bool] = field(default=lambda params: False)
    # For per-tensor methods with per-tensor statistics (TIES' top-k threshold): a reducer that,
    # run over the row blocks of ONE tensor (parameters resolved for it), gives `merge` what it
    # needs as `job.stats` to work on row blocks of that tensor. Returns None when it does not
    # apply to these parameters. Lets tensors bigger than the memory budget stream in blocks.
    tensor_reducer: Callable[[Mapping[str, Any], int], Reducer | None] | None = None
    paper: str = ""
    doc: str = ""  # path of the docs page, relative to docs/
    # Inputs the method needs counting the base (slerp: two endpoints, a base and a model or two
    # models), checked with the recipe rather than at the first tensor.
    min_inputs: int = 0
    # For a method that takes no base: a mergekit recipe's `base_model` left out of `models` is
    # one more model, last (mergekit adds it to the inputs, and a method that ignores base-ness
    # averages it in: karcher). Otherwise such a base_model is refused.
    base_joins_models: bool = False
    # A problem with one tensor's resolved parameters (params, number of models) that ranges
    # alone cannot express (DELLA: density ± epsilon in (0, 1]); the plan asks it for every
    # tensor before the run, so a bad recipe fails before reading any tensor data.
    check: Callable[[Mapping[str, Any], int], str | None] | None = None
    # Pairs of parameters a recipe may not give together (surgery's top_k and fraction).
    exclusive: tuple[tuple[str, str], ...] = ()
    compute_dtype: torch.dtype = torch.float32
    # True when the per-element work is a few arithmetic operations (no sort, selection or
    # matmul): on a CPU such a merge is bound by copying bytes in and out, and the engine gives
    # torch one thread fewer so the I/O threads keep a core (engine/threads.py).
    light: bool = False
    # For a method whose statistics leave some tensors as they are (surgery edits the rows it
    # selected): (tensor name, the step's statistics) -> True when the step's output for that
    # tensor is its base, bit for bit. The engine then writes the stored bytes where the output
    # dtype is the stored one, without reading them into float32 and back.
    keeps_base: Callable[[str, Any], bool] | None = None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name or name in p.aliases:
                return p
        return None

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: MethodSpec, *, aliases: Sequence[str] = ()) -> MethodSpec:
    """Add a method; called at import time by each method module."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    for a in aliases:
        _ALIASES[a] = spec.name
    return spec


def get_method(name: str) -> MethodSpec | None:
    _load_all()
    return _REGISTRY.get(_ALIASES.get(name, name))


def method_aliases(name: str) -> list[str]:
    """Other names a recipe may give method `name` by (e.g. a paper's own name)."""
    _load_all()
    return sorted(a for a, n in _ALIASES.items() if n == name)


def all_methods() -> list[MethodSpec]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY) + sorted(_ALIASES)


def _load_all() -> None:
    # Importing the package registers every method module listed there.
    from . import catalog  # noqa: F401
