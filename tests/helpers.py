"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergekit_lite.io import shard_file
from mergekit_lite.io.shard_file import DirectShardFile


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the safetensors library itself."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporary directories the writer left behind (there must never be any)."""
    return [p.name for p in Path(parent).iterdir() if ".mlite-tmp-" in p.name or ".mlite-old-" in p.name]


def direct_file_on_plain_fd(path: Path, size: int) -> DirectShardFile:
    """A direct shard file's logic on an ordinary descriptor, so it is tested on any file system."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    return DirectShardFile(path, fd, size)


def force_direct_io(monkeypatch) -> None:
    """Every output shard written the direct way: with O_DIRECT where the file system has it,
    else with the same block logic on a plain descriptor."""
    monkeypatch.setattr(shard_file, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setenv(shard_file.ENV_DIRECT, "1")
    real = DirectShardFile.open.__func__

    def open_or_emulate(cls, path: Path, size: int) -> DirectShardFile:
        return real(cls, path, size) or direct_file_on_plain_fd(path, size)

    monkeypatch.setattr(DirectShardFile, "open", classmethod(open_or_emulate))
