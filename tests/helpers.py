"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mergekit_lite.io import shard_file
from mergekit_lite.io.shard_file import DirectShardFile
from mergekit_lite.methods.registry import TensorJob, get_method


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


def assert_disposable_gives_the_same_bits(method: str, base: torch.Tensor | None, models: Sequence[torch.Tensor],
                                          params: Mapping[str, Any]) -> None:
    """The method leaves its inputs alone when they are not disposable, and given disposable
    copies (the engine's `models_disposable`) returns the same bits, signed zeros included."""
    spec = get_method(method)
    assert spec is not None
    job = TensorJob("w", base, list(models), {**spec.defaults(), **params})
    originals = [m.clone() for m in models]
    want = spec.merge(job)
    assert all(torch.equal(a, b) for a, b in zip(job.models, originals, strict=True))
    got = spec.merge(dataclasses.replace(job, models=[m.clone() for m in originals], models_disposable=True))
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
