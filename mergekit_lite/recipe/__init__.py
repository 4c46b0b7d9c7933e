"""Recipes: YAML (mlite's multi-step shape or mergekit's single-step shape) → validated objects.

`load_recipe` parses and checks a recipe (all problems at once, each with file:line and key);
`ParamResolver` turns a step's parameter settings into per-tensor values for the engine.
"""

from __future__ import annotations

from .model import Loc, OutputSpec, Recipe, StepSpec, is_hub_reference, load_recipe, resolve_input_path
from .params import ParamResolver
from .settings import count_layers, layer_index, layer_position

__all__ = [
    "Loc",
    "OutputSpec",
    "ParamResolver",
    "Recipe",
    "StepSpec",
    "count_layers",
    "is_hub_reference",
    "layer_index",
    "layer_position",
    "load_recipe",
    "resolve_input_path",
]
