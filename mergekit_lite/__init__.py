"""mergekit_lite: merge, patch and edit model checkpoints by streaming their tensors.

The Python API lives in `mergekit_lite.api` and is re-exported here lazily (so importing the
package for its version, as the CLI does, does not import torch).
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

# Tensors are read and written with positioned I/O (os.preadv/pread, os.pwrite) on raw file
# descriptors, which Windows' Python lacks (and there os.open would write in text mode). Say
# so once, here, rather than fail with an AttributeError in the middle of a run.
if os.name != "posix":
    raise ImportError("mergekit_lite needs Linux or macOS (it reads and writes tensors with "
                      "positioned POSIX file I/O); on Windows, run it under WSL2")

_API = (
    "merge", "run_recipe", "dry_run", "plan_recipe", "inspect", "vocabulary",
    "patch", "extract", "mos_merge", "bank_add", "bank_list", "bank_export", "bank_set_prototypes", "retrieve",
    "hadamard_to_multiplier", "hadamard_apply", "hadamard_to_delta",
    "surgery", "undo_surgery", "train_probe", "collect_features", "compare_predictions",
    "run_demo", "get_method", "all_methods", "method_aliases",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mergekit_lite' has no attribute {name!r}")
