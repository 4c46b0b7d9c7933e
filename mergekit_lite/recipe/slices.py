"""Reading mergekit's `slices:` recipes (see `stack.py` for the layout they describe).

A `models:` recipe is, to mergekit, one slice over layers [0, N) of every model; any other
slices stack, repeat or leave out layers. Both run here as a layer stack, whose positions are
the models of one merge (an unchanged model is used as it is, so one full slice gives exactly
the `models:` merge).

Two stages, as the rest of the loader: `read_slices` checks the shape (keys, ranges, equal
lengths within a slice) and keeps every value with its line; `assign_positions` then decides,
from the method's needs and `base_model`, which source of each slice is the base and which
are the other positions, exactly as `models:` is read for the same method:

- a method that takes a base (ties, task_arithmetic, …, and nuslerp/multislerp's optional
  base): the slice's `base_model` source is the base position; a slice that does not list the
  base takes it over the same layers as its first source (as a one-slice recipe does);
- an ordered method (slerp): `base_model` is the first position, listed or not;
- any other method: the sources in the order written; a `base_model` no slice lists is
  ignored (noted), as mergekit's slices form leaves it out.

A slice with fewer sources than another leaves the last positions empty: its layers merge only
its own sources, as mergekit plans each slice apart. A model may appear only once in a slice
(mergekit would silently keep one of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .model import Loc
from .problems import Problems
from .raw import Item
from .settings import is_rule_mapping
from .yaml_lines import line_of, plain

SLICE_KEYS = frozenset({"sources", "parameters", "base_model"})
SOURCE_KEYS = frozenset({"model", "layer_range", "parameters"})
BASE_POSITION = "stack.base"


def position_name(j: int) -> str:
    """The input name of the j-th non-base position (1-based, as users count models)."""
    return f"stack.{j}"


@dataclass
class DraftSource:
    ref: Item
    start: int
    end: int
    parameters: dict[str, Item]
    loc: Loc


@dataclass
class DraftSlice:
    sources: list[DraftSource]
    parameters: dict[str, Item]
    base: Item | None
    loc: Loc
    key: str

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass
class Positions:
    """The result of `assign_positions`: per slice, one source (or None) per position (base
    first when `base` is set), and what the step does with the base. A position that one model fills in
    every slice is named by that model, as in a `models:` recipe (its per-model settings and
    messages then use the model's name); the others are `stack.base`, `stack.1`, …"""

    names: list[str]  # a model reference where every slice gives the position one model, else a stack name
    base: str | None  # the step's base position (methods that take a base)
    per_slice: list[list[DraftSource | None]]  # None: the slice has fewer sources and none there
    virtual: set[str] = field(default_factory=set)  # the stack names: positions no single model fills
    notes: list[str] = field(default_factory=list)


def _params(container: Any, key: str, prefix: str, file: str | None, problems: Problems) -> dict[str, Item]:
    value = container.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(Loc(file, line_of(container, key)), f"'{key}' must be a mapping of parameter names to values",
                     prefix)
        return {}
    return {str(k): Item(plain(v), Loc(file, line_of(value, k)), f"{prefix}.{k}", v) for k, v in value.items()}


def read_slices(raw: dict[str, Any], file: str | None, problems: Problems) -> list[DraftSlice] | None:
    """The slices as written, shape-checked, or None after adding the problems found."""
    before = len(problems)
    slices = raw["slices"]
    where = Loc(file, line_of(raw, "slices"))
    if "models" in raw:
        problems.add(where, "give 'slices' or 'models', not both", "slices")
        return None
    if not isinstance(slices, list) or not slices:
        problems.add(where, "'slices' must be a non-empty list of slices, each with 'sources'", "slices")
        return None
    drafts: list[DraftSlice] = []
    for k, piece in enumerate(slices):
        key = f"slices[{k}]"
        loc = Loc(file, line_of(slices, k))
        if not isinstance(piece, dict):
            problems.add(loc, "a slice must be a mapping with 'sources'", key)
            continue
        for unknown in sorted(set(piece) - SLICE_KEYS):
            problems.add(Loc(file, line_of(piece, unknown)), f"unknown key '{unknown}' in a slice "
                         f"(expected {', '.join(sorted(SLICE_KEYS))})", f"{key}.{unknown}")
        base = None
        if piece.get("base_model") is not None:
            value = piece["base_model"]
            if not isinstance(value, str) or not value.strip():
                problems.add(Loc(file, line_of(piece, "base_model")), "base_model must be a model reference",
                             f"{key}.base_model")
            else:
                base = Item(value, Loc(file, line_of(piece, "base_model")), f"{key}.base_model")
        sources = piece.get("sources")
        if not isinstance(sources, list) or not sources:
            problems.add(Loc(file, line_of(piece, "sources")), "a slice needs a non-empty list of 'sources'",
                         f"{key}.sources")
            continue
        drafts_of_slice = [d for j in range(len(sources))
                           if (d := _source(sources, j, f"{key}.sources[{j}]", file, problems)) is not None]
        if len(drafts_of_slice) != len(sources):
            continue
        lengths = {s.end - s.start for s in drafts_of_slice}
        if len(lengths) > 1:
            problems.add(Loc(file, line_of(piece, "sources")), "the sources of a slice must give the same number "
                         f"of layers, got {[[s.start, s.end] for s in drafts_of_slice]}", f"{key}.sources")
            continue
        drafts.append(DraftSlice(drafts_of_slice, _params(piece, "parameters", f"{key}.parameters", file, problems),
                                 base, loc, key))
    return drafts if len(problems) == before else None


def _source(sources: list[Any], j: int, key: str, file: str | None, problems: Problems) -> DraftSource | None:
    source = sources[j]
    loc = Loc(file, line_of(sources, j))
    if not isinstance(source, dict):
        problems.add(loc, "a source must be a mapping with 'model' and 'layer_range'", key)
        return None
    ok = True
    for unknown in sorted(set(source) - SOURCE_KEYS):
        problems.add(Loc(file, line_of(source, unknown)), f"unknown key '{unknown}' in a slice source "
                     f"(expected {', '.join(sorted(SOURCE_KEYS))})", f"{key}.{unknown}")
        ok = False
    model = source.get("model")
    if not isinstance(model, str) or not model.strip():
        problems.add(Loc(file, line_of(source, "model") or loc.line), "a source needs 'model: <reference>'",
                     f"{key}.model")
        ok = False
    span = source.get("layer_range")
    span_loc = Loc(file, line_of(source, "layer_range") or loc.line)
    if not (isinstance(span, list) and len(span) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
        problems.add(span_loc, "a source needs 'layer_range: [FIRST, END]' (two integers, END excluded)",
                     f"{key}.layer_range")
        return None
    if not 0 <= span[0] < span[1]:
        problems.add(span_loc, f"layer_range {list(span)} is empty or negative: it takes layers FIRST to END - 1",
                     f"{key}.layer_range")
        ok = False
    if not ok:
        return None
    ref = Item(model, Loc(file, line_of(source, "model")), f"{key}.model")
    params: dict[str, Item] = {}
    if source.get("parameters") is not None:
        params = _params(source, "parameters", f"{key}.parameters", file, problems)
    return DraftSource(ref, span[0], span[1], params, span_loc)


def assign_positions(drafts: list[DraftSlice], base: Item | None, method: str, *, takes_base: bool,
                     ordered: bool, problems: Problems) -> Positions | None:
    """Each slice's sources put in position order (see the module docstring)."""
    before = len(problems)
    wants_base = takes_base or ordered
    per_slice: list[list[DraftSource]] = []
    notes: list[str] = []
    unlisted_everywhere = True
    for piece in drafts:
        seen: dict[str, DraftSource] = {}
        for src in piece.sources:
            if src.ref.value in seen:
                problems.add(src.ref.loc, f"model '{src.ref.value}' is listed twice in {piece.key} (first at "
                             f"{seen[src.ref.value].ref.loc}): a slice merges each model once", src.ref.key)
            seen.setdefault(src.ref.value, src)
        slice_base = piece.base or base
        listed = seen.get(slice_base.value) if slice_base is not None else None
        if listed is not None:
            unlisted_everywhere = False
        if not wants_base or slice_base is None:
            per_slice.append(list(piece.sources))
            continue
        if listed is None:  # the base over the same layers as the slice's first source
            first = piece.sources[0]
            listed = DraftSource(slice_base, first.start, first.end, {}, slice_base.loc)
        elif takes_base and listed.parameters:
            notes.append(f"{listed.ref.loc.prefix()}the parameters given to base model '{listed.ref.value}' in "
                         f"{piece.key} are ignored, as in mergekit")
        per_slice.append([listed, *(s for s in piece.sources if s is not listed)])
    if len(problems) > before:
        return None
    has_base = wants_base and any(p.base or base for p in drafts)
    if has_base and not all(p.base or base for p in drafts):
        missing = next(p for p in drafts if not (p.base or base))
        problems.add(missing.loc, f"{missing.key} has no base_model while other slices have one", missing.key)
        return None
    if base is not None and not wants_base and unlisted_everywhere:
        notes.append(f"{base.loc.prefix()}base_model '{base.value}' is not among the slices' sources: "
                     f"'{method}' takes no base, and mergekit's slices form leaves it out; ignored")
    n = max(len(s) for s in per_slice)
    # a slice with fewer sources leaves the last positions empty: its layers merge its own sources
    padded: list[list[DraftSource | None]] = [[*s, *([None] * (n - len(s)))] for s in per_slice]
    stack_names = ([BASE_POSITION] if has_base else []) + [position_name(j) for j in range(1, n + 1 - int(has_base))]
    names: list[str] = []
    for j, stack_name in enumerate(stack_names):
        refs = {given.ref.value for sources in padded if (given := sources[j]) is not None}
        names.append(refs.pop() if len(refs) == 1 else stack_name)  # one model: the position is that model
    virtual = {name for name, stack_name in zip(names, stack_names, strict=True) if name == stack_name}
    return Positions(names, names[0] if has_base and takes_base else None, padded, virtual, notes)


def slice_first(slice_params: dict[str, Any], recipe_params: dict[str, Any]) -> dict[str, Any]:
    """A slice's parameters, both levels validated: the slice's setting of a name before the
    recipe's, as mergekit looks them up (`_before`)."""
    return {**recipe_params, **{k: _before(v, recipe_params.get(k)) for k, v in slice_params.items()}}


def _before(first: Any, then: Any) -> Any:
    """The slice's setting `first`, falling back to the recipe's `then` where `first` is rules
    and none of them matches a tensor: one rule list, `first`'s rules followed by `then`'s (a
    plain value or gradient joins as a catch-all rule), so the first match is mergekit's answer."""
    if then is None or not _is_rules(first):
        return first  # a plain value or gradient always gives a value: the recipe's is never read
    if isinstance(then, dict) and not is_rule_mapping(then):
        return first  # mlite's per-model mapping ({MODEL: value}) cannot be a rule's value
    head = list(first) if isinstance(first, list) else [first]
    tail = (list(then) if isinstance(then, list) else [then]) if _is_rules(then) else [{"value": then}]
    return head + tail


def _is_rules(value: Any) -> bool:
    return is_rule_mapping(value) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))
