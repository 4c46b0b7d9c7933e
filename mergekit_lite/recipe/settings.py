"""The forms a parameter value can take in a recipe, parsed once into fast evaluators.

A *setting* is what a recipe writes for one parameter (of one model, or of the whole step):

- a scalar: `0.5`, `true`, `"l1"`;
- a layer gradient: a list of numbers, interpolated over the layer index exactly as mergekit
  does (a list of strings/booleans picks an entry instead of interpolating);
- per-tensor rules: a list of `{match: PATTERN, value: V}` or mergekit's `{filter: SUBSTRING,
  value: V}`; the first rule that matches the tensor name wins, an entry with neither key (or
  `filter: "*"`, or mergekit's `filter: null`) matches everything. `match` is a glob over the
  whole name (fnmatch), or a regular expression searched anywhere in the name when written
  `re:PATTERN`. A rule's value is
  a scalar or a gradient. A single rule may be written without the list.

Evaluation returns None when no rule matches, so the caller can fall back (per-model setting →
step setting → default), as mergekit does.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .problems import did_you_mean

RULE_KEYS = ("match", "filter", "value")

# Layer index in the usual naming schemes: model.layers.12., transformer.h.3., encoder.layer.0.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_span(name: str) -> tuple[int, int] | None:
    """Where the layer index is written in `name` (start, end), None outside the layers."""
    m = _LAYER_RE.search(name)
    return m.span(1) if m else None


def count_layers(names: Sequence[str]) -> int | None:
    """The number of layers implied by tensor names (max index + 1), None when there are none."""
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else None


def layer_position(name: str, num_layers: int | None) -> float:
    """mergekit's gradient position t in [0, 1] for a tensor.

    Layer i of L: t = i / (L − 1) (t = 1 when L = 1). Every tensor outside the layers takes
    t = 0: mergekit's planner reads its "pre weights" (embeddings) and its "post weights" (final
    norm, lm_head) alike with t = 0 (mergekit 0.1.5, `MergePlanner.plan_module`), so a list's
    first value applies to them. Raises ValueError when t cannot be known.
    """
    idx = layer_index(name)
    if idx is None:
        return 0.0
    if num_layers is None:
        raise ValueError("the number of layers is unknown")
    if idx >= num_layers:
        raise ValueError(f"layer index {idx} is outside the model's {num_layers} layers")
    return idx / (num_layers - 1) if num_layers > 1 else 1.0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool))


@dataclass(frozen=True)
class Const:
    value: Any

    def evaluate(self, name: str, t: Callable[[], float]) -> Any:
        return self.value


@dataclass(frozen=True)
class Gradient:
    """A list over the layers. Numbers interpolate; other values are picked, as in mergekit."""

    values: tuple[Any, ...]

    @property
    def numeric(self) -> bool:
        return all(_is_number(v) for v in self.values)

    def at(self, t: float) -> Any:
        n = len(self.values)
        if not self.numeric:
            return self.values[int(t * (n - 1))]
        scaled = t * (n - 1)
        i0 = int(scaled)
        i1 = min(n - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * self.values[i0] + frac * self.values[i1]

    def evaluate(self, name: str, t: Callable[[], float]) -> Any:
        return self.at(t())


Leaf = Const | Gradient


@dataclass(frozen=True)
class Rule:
    kind: str  # "glob" | "regex" | "filter" | "any"
    pattern: str
    value: Leaf
    regex: re.Pattern[str] | None = None

    def matches(self, name: str) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "filter":
            return self.pattern in name
        assert self.regex is not None
        if self.kind == "glob":
            return self.regex.match(name) is not None
        return self.regex.search(name) is not None


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...]

    def evaluate(self, name: str, t: Callable[[], float]) -> Any:
        for rule in self.rules:
            if rule.matches(name):
                return rule.value.evaluate(name, t)
        return None


Setting = Const | Gradient | Rules


def varies(setting: Setting) -> bool:
    """Whether the setting can give different values for different tensors."""
    return not isinstance(setting, Const)


def leaves(setting: Setting) -> list[Any]:
    """Every literal value a setting can produce (for range checks)."""
    if isinstance(setting, Const):
        return [setting.value]
    if isinstance(setting, Gradient):
        return list(setting.values)
    out: list[Any] = []
    for r in setting.rules:
        out += leaves(r.value)
    return out


def has_gradient(setting: Setting) -> bool:
    if isinstance(setting, Gradient):
        return True
    if isinstance(setting, Rules):
        return any(isinstance(r.value, Gradient) for r in setting.rules)
    return False


def is_rule_mapping(value: Any) -> bool:
    """A mapping that is one rule ({match|filter, value}) rather than a per-model mapping."""
    return isinstance(value, dict) and "value" in value and set(value) <= set(RULE_KEYS)


class SettingError(ValueError):
    """A malformed setting; `path` is the key path inside the setting (e.g. "[1].match")."""

    def __init__(self, message: str, path: str = "", index: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.index = index


def _parse_leaf(value: Any, path: str) -> Leaf:
    if _is_scalar(value):
        return Const(value)
    if isinstance(value, list):
        if not value:
            raise SettingError("an empty list is not a value", path)
        if all(_is_number(v) for v in value) or all(isinstance(v, (str, bool)) for v in value):
            return Gradient(tuple(value))
        raise SettingError("a layer gradient must be a list of numbers", path)
    raise SettingError(f"expected a value (number, string, boolean or list of numbers), got {value!r}", path)


def _parse_rule(entry: Any, index: int | None) -> Rule:
    path = f"[{index}]" if index is not None else ""
    if not isinstance(entry, dict):
        raise SettingError(f"a rule must be a mapping {{match: PATTERN, value: V}}, got {entry!r}", path, index)
    for key in entry:
        if key not in RULE_KEYS:
            raise SettingError(f"unknown rule key {key!r}{did_you_mean(str(key), RULE_KEYS)}",
                               f"{path}.{key}", index)
    if "value" not in entry:
        raise SettingError("a rule needs a 'value'", path, index)
    if "match" in entry and "filter" in entry:
        raise SettingError("a rule takes 'match' or 'filter', not both", path, index)
    leaf = _parse_leaf(entry["value"], f"{path}.value")
    if "filter" in entry:
        pattern = entry["filter"]
        if pattern is None:  # mergekit's `filter: null` (or an empty `filter:`): every tensor
            return Rule("any", "*", leaf)
        if not isinstance(pattern, str):
            raise SettingError(f"'filter' must be a string, got {pattern!r}", f"{path}.filter", index)
        return Rule("any" if pattern == "*" else "filter", pattern, leaf)
    if "match" in entry:
        pattern = entry["match"]
        if not isinstance(pattern, str):
            raise SettingError(f"'match' must be a string, got {pattern!r}", f"{path}.match", index)
        if pattern.startswith("re:"):
            try:
                return Rule("regex", pattern, leaf, re.compile(pattern[3:]))
            except re.error as exc:
                raise SettingError(f"bad regular expression {pattern[3:]!r}: {exc}", f"{path}.match", index) from None
        return Rule("glob", pattern, leaf, re.compile(fnmatch.translate(pattern)))
    return Rule("any", "", leaf)


def parse_setting(value: Any) -> Setting:
    """Parse one written setting; raises SettingError. Per-model mappings are not handled here."""
    if isinstance(value, dict):
        if not is_rule_mapping(value):
            raise SettingError(
                "expected a value, a list of rules {match|filter, value} or a layer gradient, "
                f"got a mapping with keys {sorted(map(str, value))}")
        return Rules((_parse_rule(value, None),))
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        return Rules(tuple(_parse_rule(v, i) for i, v in enumerate(value)))
    return _parse_leaf(value, "")
