"""mergekit's `slices:` as a layer stack: which source layer becomes which output layer.

A slice takes the same number of consecutive layers from each of its sources, merges them,
and places the result after the previous slice's layers; the embeddings come from the first
slice's sources and the final norm and head from the last slice's (mergekit's `pre_weights`
and `post_weights`). That covers frankenmerges (layers of several models stacked), depth
up-scaling (a model's layers repeated) and pruning (layers left out).

mlite runs such a recipe as one merge over *positions*: the base (for a method that takes
one), then each other source in the order written. A position is a view of checkpoints whose
output layer i is the layer of the source that the slice holding layer i gives that position
(`engine/stack.py` builds it: renamed tensors, read lazily like any checkpoint). Parameters
are looked up per slice, with mergekit's layer gradients spread over each slice's own layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .model import Loc
from .settings import layer_index, layer_span

# Tensors outside the layers that mergekit counts as `pre_weights` (taken from the first slice's
# sources): the input embeddings, token and position. Every other tensor outside the layers
# (final norm, lm_head; GPT-NeoX's `embed_out` head) is a `post_weight`, taken from the last slice.
_PRE_WEIGHT = re.compile(r"(?:^|\.)(?!embed_out(?:\.|$))(?:\w*embed\w*|wte|wpe)(?:\.|$)")


def is_pre_weight(name: str) -> bool:
    """True for a tensor outside the layers that belongs before them (an embedding)."""
    return layer_index(name) is None and _PRE_WEIGHT.search(name) is not None


def renumbered(name: str, index: int) -> str:
    """`name` with its layer index replaced by `index` (`model.layers.7.x` → `model.layers.2.x`)."""
    span = layer_span(name)
    if span is None:
        raise ValueError(f"{name!r} is not a layer tensor")
    return f"{name[: span[0]]}{index}{name[span[1]:]}"


@dataclass(frozen=True)
class StackSource:
    """One position's source in a slice: an input checkpoint and the first layer taken from it."""

    input: str
    first_layer: int
    loc: Loc


@dataclass(frozen=True)
class StackSlice:
    """Output layers [start, start + length), one source per position (the step's order); None
    where the slice has fewer sources than the stack has positions."""

    start: int
    length: int
    sources: tuple[StackSource | None, ...]
    loc: Loc


@dataclass(frozen=True)
class LayerStack:
    """The whole layout: the step's input names (the positions) and the slices in output order.

    A position that one model fills in every slice is that model's input (its view replaces it
    unless the slices give its layers unchanged)."""

    positions: tuple[str, ...]
    slices: tuple[StackSlice, ...]
    virtual: frozenset[str] = frozenset()  # positions that are no input of their own (built, not opened)

    @property
    def num_layers(self) -> int:
        last = self.slices[-1]
        return last.start + last.length

    def slice_index(self, name: str) -> int:
        """The slice whose parameters a tensor takes: the one holding its layer; the first for an
        embedding, the last for every other tensor outside the layers (as mergekit plans them)."""
        idx = layer_index(name)
        if idx is None:
            return 0 if is_pre_weight(name) else len(self.slices) - 1
        for k, piece in enumerate(self.slices):
            if piece.start <= idx < piece.start + piece.length:
                return k
        raise ValueError(f"layer index {idx} is outside the stack's {self.num_layers} layers")

    def position(self, name: str) -> float:
        """mergekit's gradient position t: layer i of a slice of L layers has t = i / (L − 1)
        (t = 1 when L = 1); tensors outside the layers have t = 0."""
        idx = layer_index(name)
        if idx is None:
            return 0.0
        piece = self.slices[self.slice_index(name)]
        return (idx - piece.start) / (piece.length - 1) if piece.length > 1 else 1.0

    @property
    def uneven(self) -> bool:
        """Whether some slice leaves a position empty (it has fewer sources than another)."""
        return any(src is None for piece in self.slices for src in piece.sources)

    def describe(self) -> list[Any]:
        """A plain form for fingerprints and messages."""
        return [[s.start, s.length, [(src.input, src.first_layer) if src is not None else None for src in s.sources]]
                for s in self.slices]
