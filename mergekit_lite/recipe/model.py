"""The validated recipe the engine consumes: plain typed dataclasses, no YAML, no pydantic.

Everything here has already been checked by `load_recipe`: methods exist, references resolve,
parameters are known and in range, steps form no cycle. The engine never has to re-validate a
`Recipe`; it only adds what needs checkpoint headers (names, shapes, dtypes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Loc:
    """Where something was written, so messages can point at the line to fix."""

    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        name = self.file if self.file is not None else "<recipe>"
        return f"{name}:{self.line}" if self.line is not None else name

    def prefix(self) -> str:
        """"file:line: " to put before a warning, or "" when the recipe is not a file."""
        return f"{self}: " if self.file is not None and self.line is not None else ""


@dataclass
class SliceParams:
    """A layer-stacking recipe's settings for one slice (see `recipe/stack.py`), in the form of
    `StepSpec.parameters` and `StepSpec.model_parameters`: the slice's own settings already
    put before the recipe's, and each model's source's own."""

    parameters: dict[str, Any] = field(default_factory=dict)
    model_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class StepSpec:
    """One step: a method applied to inputs or to earlier steps' results.

    `models`, `base`, `delta` and `old_base` are references: input names or ids of other steps.
    `parameters` holds the step-level settings under their canonical names, as written (a
    scalar, a {model_ref: setting} mapping, a list of per-tensor rules, or a layer gradient);
    `model_parameters[model_ref]` holds the mergekit-style per-model settings. Turn them into
    per-tensor values with `mergekit_lite.recipe.params.ParamResolver`.
    """

    id: str
    method: str
    base: str | None
    models: list[str]
    delta: str | None = None
    old_base: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    model_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    save: str | None = None
    loc: Loc = field(default_factory=Loc)
    # a layer stack's slices, in output order: their settings replace `parameters` and
    # `model_parameters` for the tensors of each slice's layers
    slices: list[SliceParams] = field(default_factory=list)

    def references(self) -> list[str]:
        """Every input or step this step reads, base first, in a stable order."""
        refs = [self.base] if self.base else []
        refs += self.models
        refs += [r for r in (self.delta, self.old_base) if r]
        return refs


@dataclass
class OutputSpec:
    """What to write. `dtype` is a safetensors dtype string ("BF16"), None = keep the inputs'."""

    path: str | None = None
    dtype: str | None = None
    shard_size: int | None = None
    copy_tokenizer_from: str | None = None
    chat_template: str | None = None  # auto, a built-in format's name, or a Jinja template
    step: str | None = None


@dataclass
class Recipe:
    """A whole validated recipe.

    `inputs` maps names to resolved locations (absolute local paths, or Hub references kept as
    written). `steps` are in an order where every step comes after the steps it reads.
    `options` holds `allow_bin` (bool), `vocab` ("strict" | "shared"), `allow_vocab_growth`
    (bool), `description` (str or None) and `notes` (list of one-line remarks, e.g. mergekit
    knobs that were accepted but change nothing); a mergekit recipe may add `layer_stack` (a
    `recipe.stack.LayerStack`: slices that stack, repeat or leave out layers), `promote_dtypes`
    (no dtype given: a float tensor is written in the promotion of its inputs' dtypes, as
    mergekit's arithmetic leaves it), `vocab_spec` (a `recipe.vocab.VocabSpec`: the output
    vocabulary the models' embedding rows are lined up with) and `merged_adapters` (the ids of
    its MODEL+LORA steps).
    """

    inputs: dict[str, str]
    steps: list[StepSpec]
    output: OutputSpec
    device: str | None = None
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    input_locs: dict[str, Loc] = field(default_factory=dict)  # where each input was written

    def step(self, step_id: str) -> StepSpec:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    @property
    def output_step(self) -> StepSpec:
        """The step whose result is written (`output.step`, else the last step written)."""
        return self.step(self.output.step) if self.output.step else self.steps[-1]


# "org/name" or "org/name@revision": the Hub's repo id shape, no leading "./" or "/".
_HUB_REF = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?")


def is_hub_reference(ref: str) -> bool:
    """True when `ref` has the shape of a Hub repo id (whether or not it exists locally)."""
    return _HUB_REF.fullmatch(ref) is not None


def absolute_path(path: Path) -> str:
    """`path` resolved, or only made absolute when it cannot be (a symlink loop: Python 3.11 raises
    RuntimeError there), so that opening it later reports the problem as a user error."""
    try:
        return str(path.resolve())
    except (RuntimeError, OSError):
        return os.path.abspath(path)


def resolve_input_path(ref: str, base_dir: str | Path) -> str:
    """Where an input lives: an absolute local path, or the Hub reference unchanged.

    Relative paths are relative to the recipe's directory, so a recipe runs the same from any
    working directory. A string shaped like `org/name[@rev]` is a Hub reference only when no
    such path exists next to the recipe (neither `org/name` nor the folder `org`): a local
    folder always wins.
    """
    expanded = os.path.expanduser(ref)
    path = Path(expanded)
    if path.is_absolute():
        return str(path)
    local = Path(base_dir) / path
    # `models/base` next to a recipe whose `models/` folder exists is local even before `base`
    # is written: a clear "not found" beats a Hub lookup of a repo called models/base.
    if local.exists() or not is_hub_reference(ref) or (Path(base_dir) / path.parts[0]).is_dir():
        return absolute_path(local)
    return ref


def load_recipe(source: str | Path | Mapping[str, Any]) -> Recipe:
    """Read, check and normalise a recipe file (or an already-parsed dict).

    Raises `RecipeError` (exit 3) listing every problem found, each as
    `file:line: message (key)`; a missing file raises `UsageError` (exit 2).
    """
    from .loader import load

    return load(source)
