"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the safetensors library itself."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporary directories the writer left behind (there must never be any)."""
    return [p.name for p in Path(parent).iterdir() if ".mlite-tmp-" in p.name or ".mlite-old-" in p.name]
