"""Imports every method module so that each registers itself.

Adding a method = adding its module name here; the registry, CLI and recipes pick it up.
"""

from __future__ import annotations

import importlib

METHOD_MODULES: tuple[str, ...] = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare",
    "slerp",
    "nuslerp",
    "multislerp",
    "model_stock",
    "breadcrumbs",
    "della",
    "pcb",
    "portllm",
    "mos",
    "surgery",
    "sce",
    "nearswap",
    "karcher",
    "arcee_fusion",
    "passthrough",
    "ram",
)

for _module in METHOD_MODULES:
    importlib.import_module(f"{__package__}.{_module}")
