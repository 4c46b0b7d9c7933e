"""A layer stack's positions as checkpoints: renamed views of the slices' sources.

Position j's view holds, for every slice, the layers its j-th source gives, renumbered to the
slice's output layers; the first slice's source gives the embeddings, the last slice's the
final norm and head (`recipe/stack.py`). A view is an ordinary `Checkpoint` whose index points
into the sources' shard files, so it is read lazily, tensor by tensor, like any input: the
engine merges views exactly as it merges models, and never knows about slices.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, MliteError, RecipeError
from ..io.checkpoint import TIED_HEAD, Checkpoint
from ..recipe.settings import count_layers, layer_index
from ..recipe.stack import LayerStack, StackSlice, StackSource, is_pre_weight, renumbered

log = logging.getLogger(__name__)

# config.json keys that hold the number of layers (Llama and most: num_hidden_layers; GPT-2: n_layer)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def stacked_checkpoints(stack: LayerStack,
                        inputs: Mapping[str, Checkpoint]) -> tuple[dict[str, Checkpoint], list[MliteError]]:
    """One checkpoint per position, and the problems found (a range past a model's layers, a
    mix of pickle and safetensors sources). Positions with a source that is no opened checkpoint
    are left out: one that failed to open is reported where the inputs are opened, and a
    MODEL+LORA place is a step, used whole (the plan checks its layer count)."""
    views: dict[str, Checkpoint] = {}
    problems: list[MliteError] = []
    for j, name in enumerate(stack.positions):
        given = [(piece, piece.sources[j]) for piece in stack.slices if piece.sources[j] is not None]
        opened = [(piece, ck) for piece, src in given if src is not None and (ck := inputs.get(src.input)) is not None]
        if len(opened) < len(given):
            continue
        errors = [e for piece, ck in opened if (e := _range_problem(piece, j, ck)) is not None]
        if errors:
            problems += errors
            continue
        whole = _whole_model(j, opened) if len(opened) == len(stack.slices) else None
        if whole is not None:  # the slices give this model's layers in order: the model itself
            views[name] = whole
            continue
        try:
            views[name] = _view(name, j, opened, stack)
        except MliteError as exc:
            problems.append(exc)
    return views, problems


def _source(piece: StackSlice, j: int) -> StackSource:
    src = piece.sources[j]
    assert src is not None, "only the slices that give position j are passed on"
    return src


def _layers(ck: Checkpoint) -> int:
    return count_layers(ck.names()) or 0


def _range_problem(piece: StackSlice, j: int, ck: Checkpoint) -> MliteError | None:
    src = _source(piece, j)
    end = src.first_layer + piece.length
    held = _layers(ck)
    if end <= held:
        return None
    return RecipeError(f"{src.loc}: layer_range [{src.first_layer}, {end}] but {ck.label} has {held} layers "
                       f"(0 to {held - 1})")


def _whole_model(j: int, opened: list[tuple[StackSlice, Checkpoint]]) -> Checkpoint | None:
    first = opened[0][1]
    if any(ck is not first for _, ck in opened):
        return None
    at = 0
    for piece, _ in opened:
        if _source(piece, j).first_layer != at:
            return None
        at += piece.length
    return first if at == _layers(first) else None


def _view(name: str, j: int, opened: list[tuple[StackSlice, Checkpoint]], stack: LayerStack) -> Checkpoint:
    """The position's checkpoint. Where a slice has no source at this position (it has fewer
    sources than another), the view has none of that slice's tensors, and says so (`lacks`):
    the merge of those tensors leaves the position out, as mergekit merges a slice's own
    sources. The embeddings come from the first slice, the head from the last, when they give
    this position a source."""
    first_piece, last_piece = stack.slices[0], stack.slices[-1]
    pre = opened[0][1] if opened[0][0] is first_piece else None
    post = opened[-1][1] if opened[-1][0] is last_piece else None
    bins = {ck._bin_state is not None for _, ck in opened}
    if len(bins) > 1:
        raise CheckpointError(f"{name}: its slices mix .bin and safetensors checkpoints "
                              f"({', '.join(dict.fromkeys(ck.label for _, ck in opened))}); convert the .bin ones")
    routes: dict[str, tuple[Checkpoint, str]] = {}
    if pre is not None:
        for n in pre.names():
            if is_pre_weight(n):
                routes[n] = (pre, n)
    for piece, ck in opened:
        first = _source(piece, j).first_layer
        for n in ck.names():
            idx = layer_index(n)
            if idx is not None and first <= idx < first + piece.length:
                routes[renumbered(n, piece.start + idx - first)] = (ck, n)
    if post is not None:
        for n in post.names():
            if layer_index(n) is None and not is_pre_weight(n):
                routes[n] = (post, n)
    donor = pre or opened[0][1]
    config = _config(donor, opened, j, stack.num_layers)
    untied = config is not None and config.get("tie_word_embeddings") is False
    if post is not None and untied and TIED_HEAD not in routes and post.tied_head_source is not None:
        # the last slice's model ties its head to its embedding, which is then its head
        routes[TIED_HEAD] = (post, post.tied_head_source)
    tensors = {out: replace(src.info(n), name=out) for out, (src, n) in routes.items()}
    bin_state = ({out: src._bin_state[src._stored(n)] for out, (src, n) in routes.items()}  # type: ignore[index]
                 if donor._bin_state is not None else None)
    label = f"{name} ({' + '.join(_part(piece, j, ck) for piece, ck in opened)})"
    view = Checkpoint(Path(f"{donor.path}#{name}"), label, tensors, config, donor.source_dir, bin_state)
    if post is not None and post.source_dir != donor.source_dir:
        view.head_source_dir = post.source_dir
    if len(opened) < len(stack.slices):
        empty = frozenset(k for k, piece in enumerate(stack.slices) if piece.sources[j] is None)
        view.lacks = lambda tensor: stack.slice_index(tensor) in empty
    return view


def _part(piece: StackSlice, j: int, ck: Checkpoint) -> str:
    first = _source(piece, j).first_layer
    return f"{ck.label} layers {first}-{first + piece.length - 1}"


def _config(pre: Checkpoint, opened: list[tuple[StackSlice, Checkpoint]], j: int, num_layers: int) -> dict[str, Any] | None:
    """The embeddings' model's config with the stack's layer count, and its per-layer lists
    (`layer_types`, …) rebuilt from each slice's model, so the config describes the tensors."""
    if pre.config is None:
        return None
    config = copy.deepcopy(pre.config)
    held = next((config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            config[key] = num_layers
    if held is None or sum(piece.length for piece, _ in opened) != num_layers:
        return config  # a position some slices leave empty: not the output's config (position 0 never is)
    for key, value in pre.config.items():
        if not (isinstance(value, list) and len(value) == held):
            continue
        rebuilt: list[Any] = []
        for piece, ck in opened:
            theirs = (ck.config or {}).get(key)
            first = _source(piece, j).first_layer
            if not isinstance(theirs, list) or len(theirs) < first + piece.length:
                break
            rebuilt += theirs[first: first + piece.length]
        else:
            config[key] = rebuilt
            continue
        log.warning("%s: config.json's per-layer list %r could not be rebuilt for the stack (a slice's model "
                    "lacks it); it is copied as it is", pre.label, key)
    return config

