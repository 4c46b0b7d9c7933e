"""mergekit's `slices:` form, read where it means the same as `models:`.

mergekit turns a `models:` recipe into one slice whose sources cover layers [0, N) of every
model, and spreads layer gradients over that slice's layers (its plan.py). So a recipe with a
single slice, every source over the same range [0, N), is a `models:` recipe: the sources are
the models (with their own `parameters`), and the slice's `parameters` come before the recipe's
for the names both give, as mergekit's lookup order has it: a slice's per-tensor rules that
match no tensor fall through to the recipe's setting (mergekit's `parameter()` goes source →
slice → recipe, moving on whenever a level's rules give no value). This is the shape of
mergekit's best-known SLERP example. The plan checks that N is the models' layer count.
Several slices, or ranges that leave layers out (frankenmerges, layer stacking), build another
architecture and stay refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import Loc
from .problems import Problems
from .settings import is_rule_mapping
from .yaml_lines import LineDict, LineList, line_of

SLICE_KEYS = frozenset({"sources", "parameters"})
SOURCE_KEYS = frozenset({"model", "layer_range", "parameters"})


@dataclass(frozen=True)
class FullSlice:
    """The one slice's layer range [0, layers), and where it was written (for the plan's check);
    its own `parameters` (a mapping, or None), validated apart from the recipe's and then put
    before them (`slice_first`)."""

    layers: int
    loc: Loc
    parameters: Any = None


def slices_as_models(raw: dict[str, Any], file: str | None,
                     problems: Problems) -> tuple[dict[str, Any], FullSlice] | None:
    """`raw` with its single full-range slice rewritten as `models:` (the recipe's own
    `parameters` kept; the slice's travel in the FullSlice), or None after adding a problem
    that says why this slices recipe is not supported."""
    refusal = _why_not(raw)
    if refusal is not None:
        line, why = refusal
        problems.add(Loc(file, line), f"mergekit 'slices' not supported here ({why}): only a single slice over "
                                      "every layer of every model is read (the same merge as 'models:')", "slices")
        return None
    piece = raw["slices"][0]
    sources = piece["sources"]
    models = _like(sources, [_like(s, {k: v for k, v in s.items() if k != "layer_range"}) for s in sources])
    if isinstance(models, LineList):
        models.item_lines = [line_of(sources, i) or 0 for i in range(len(sources))]
    out = _like(raw, {k: v for k, v in raw.items() if k != "slices"})
    out["models"] = models
    _set_line(out, "models", line_of(raw, "slices"))
    own = piece.get("parameters")
    if own is not None and not isinstance(own, dict):
        out["parameters"] = own  # not a mapping: the schema says what is wrong with it
        _set_line(out, "parameters", line_of(piece, "parameters"))
        own = None
    return out, FullSlice(sources[0]["layer_range"][1], Loc(file, line_of(sources[0], "layer_range")), own)


def _why_not(raw: dict[str, Any]) -> tuple[int | None, str] | None:
    """(line, reason) when `raw`'s slices are not one slice over layers [0, N) of every source."""
    slices = raw["slices"]
    if "models" in raw:
        return line_of(raw, "slices"), "given together with 'models'"
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        return line_of(raw, "slices"), f"{len(slices)} slices" if isinstance(slices, list) else "not a list of slices"
    piece = slices[0]
    unknown = sorted(set(piece) - SLICE_KEYS)
    if unknown:
        return line_of(piece, unknown[0]), f"a slice has {unknown[0]!r}"
    sources = piece.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, dict) for s in sources):
        return line_of(piece, "sources"), "a slice needs a list of 'sources'"
    ranges: set[tuple[int, int]] = set()
    for source in sources:
        unknown = sorted(set(source) - SOURCE_KEYS)
        if unknown:
            return line_of(source, unknown[0]), f"a source has {unknown[0]!r}"
        span = source.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            return line_of(source, "layer_range"), "each source needs 'layer_range: [0, N]'"
        ranges.add((span[0], span[1]))
    if len(ranges) != 1 or min(ranges)[0] != 0 or min(ranges)[1] < 1:
        return (line_of(piece, "sources"),
                f"the sources' layer ranges {[list(r) for r in sorted(ranges)]} differ or do not start at 0")
    return None


def slice_first(slice_params: dict[str, Any], recipe_params: dict[str, Any]) -> dict[str, Any]:
    """The step's parameters of a one-slice recipe, both levels validated: the slice's setting
    of a name before the recipe's, as mergekit looks them up (`_before`)."""
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


def _set_line(container: Any, key: str, line: int | None) -> None:
    if isinstance(container, LineDict) and line is not None:
        container.key_lines[key] = line


def _like(template: Any, value: Any) -> Any:
    """`value` (a dict or list) carrying `template`'s line bookkeeping when it has one."""
    if isinstance(template, LineDict):
        copy = LineDict(value)
        copy.line = template.line
        copy.key_lines = {k: n for k, n in template.key_lines.items() if k in copy}
        return copy
    if isinstance(template, LineList):
        items = LineList(value)
        items.line = template.line
        return items
    return value
