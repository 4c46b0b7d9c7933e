"""A shape-independent view of a recipe whose structure is valid but whose meaning is unchecked.

Both accepted shapes (mlite's and mergekit's) are turned into this form, every value paired
with where it was written, so one validator (`validate.py`) serves both and its messages point
at the right line and key whichever shape the user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .model import Loc


@dataclass
class Item:
    """A written value, its location, its key path, and the raw YAML node (for inner lines)."""

    value: Any
    loc: Loc
    key: str
    raw: Any = None


@dataclass
class RawModel:
    ref: Item
    parameters: dict[str, Item] = field(default_factory=dict)


@dataclass
class RawSlice:
    """One slice of a layer-stacking mergekit recipe: its own `parameters`, and per position
    (`models`, named by position) the parameters its source gives."""

    parameters: dict[str, Item]
    models: list[RawModel]
    loc: Loc
    key: str


@dataclass
class RawStep:
    id: Item
    method: Item
    base: Item | None
    models: list[RawModel]
    delta: Item | None
    old_base: Item | None
    parameters: dict[str, Item]
    save: Item | None
    loc: Loc
    key: str
    # a layer-stacking mergekit recipe's slices, in output order (parameters looked up per slice)
    slices: list[RawSlice] = field(default_factory=list)


@dataclass
class RawRecipe:
    shape: str  # "mlite" | "mergekit"
    inputs: dict[str, Item]
    steps: list[RawStep]
    output: dict[str, Item]
    device: Item | None
    seed: int | None
    options: dict[str, Any]
    file: str | None
    notes: list[str] = field(default_factory=list)
