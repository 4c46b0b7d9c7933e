"""Synthetic benchmark model sets: a Llama-layout bf16 base and fine-tunes of it, sharded.

Why a generator of its own (beside `mergekit_lite.synthetic`): a 1.5B-parameter set is four
3 GB models, which must not sit in RAM together. This script streams: it lays out every shard's
safetensors header from shapes alone, then produces the models tensor by tensor (the base
tensor, then each fine-tune's `base + delta` via `synthetic.make_finetune`) and appends each
to its place in the four open shard files. Memory is a few copies of the largest tensor.

The set is written to a temporary directory and renamed into place with a `bench_set.json`
manifest, so a half-written set is never taken for a finished one.

    python benchmarks/generate.py --size 500M --root /work/bench-data
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from mergekit_lite.synthetic import DeltaKind, LlamaShape, make_finetune

# Dimensions chosen so the parameter counts land near the names (Llama-style GQA, vocab 32000).
SIZES: dict[str, LlamaShape] = {
    "1M": LlamaShape(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
    ),  # 0.85M
    "10M": LlamaShape(
        vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2,
    ),  # 9.9M
    "100M": LlamaShape(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=4,
    ),  # 99.5M
    "500M": LlamaShape(
        vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
        num_attention_heads=12, num_key_value_heads=4,
    ),  # 501.0M
    "1.5B": LlamaShape(
        vocab_size=32000, hidden_size=2048, intermediate_size=5760, num_hidden_layers=30,
        num_attention_heads=16, num_key_value_heads=4,
    ),  # 1507.5M
}

MODEL_NAMES_BASE = "base"
MANIFEST = "bench_set.json"
_BF16_BYTES = 2
_DELTA_KINDS: tuple[DeltaKind, ...] = ("lowrank", "sparse", "dense")


@dataclass(frozen=True)
class BenchSet:
    """Where a generated set lives and what it is; `models[0]` is the base."""

    root: Path
    size: str
    shape: LlamaShape
    models: tuple[Path, ...]
    num_parameters: int
    bytes_per_model: int
    seed: int

    @property
    def base(self) -> Path:
        return self.models[0]

    @property
    def finetunes(self) -> tuple[Path, ...]:
        return self.models[1:]

    def input_files(self) -> list[Path]:
        """Every file a merge of the whole set reads (shards of all models)."""
        return sorted(p for m in self.models for p in m.glob("*.safetensors"))


def split_shards(shapes: dict[str, tuple[int, ...]], num_shards: int) -> list[list[str]]:
    """Contiguous groups of tensor names with roughly equal bytes, in save order.

    Splitting by bytes rather than by count keeps the shards even although the embedding and
    lm_head dwarf a layer norm.
    """
    names = list(shapes)
    sizes = [math.prod(shapes[n]) for n in names]
    total = sum(sizes)
    groups: list[list[str]] = [[]]
    acc = 0
    for name, size in zip(names, sizes, strict=True):
        boundary = total * len(groups) / num_shards
        if groups[-1] and acc + size / 2 > boundary and len(groups) < num_shards:
            groups.append([])
        groups[-1].append(name)
        acc += size
    return groups


def shard_file_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"


class ShardStream:
    """One safetensors file written front to back: header from shapes, then tensors in order."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        self.path = path
        self._entries = list(entries)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in self._entries:
            nbytes = math.prod(shape) * _BF16_BYTES
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.data_bytes = offset
        self._next = 0
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, expected_shape = self._entries[self._next]
        if name != expected_name or tuple(tensor.shape) != expected_shape:
            raise RuntimeError(f"{self.path}: expected {expected_name} {expected_shape}, got {name} {tuple(tensor.shape)}")
        data = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        self._file.write(memoryview(data).cast("B"))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._entries):
            raise RuntimeError(f"{self.path}: {self._next} of {len(self._entries)} tensors written")


def base_tensor(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Same distribution as `synthetic.make_base`: matrices ~ N(0, 1/fan_in), norms near one."""
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(shape[-1])


def finetune_tensor(name: str, base: torch.Tensor, index: int, model: int, seed: int) -> torch.Tensor:
    """`base + delta`, the delta kind rotating per tensor and per model so all kinds occur.

    The delta is about a tenth of the base's scale: a plausible fine-tune, and enough spread in
    |τ| that top-k thresholds are not degenerate.
    """
    kind = _DELTA_KINDS[(index + model) % 3]
    scale = 0.1 / math.sqrt(base.shape[-1]) if base.dim() == 2 else 0.005
    tensor_seed = (seed * 1_000_003 + index * 101 + model) % (2**62)
    return make_finetune({name: base}, seed=tensor_seed, kind=kind, scale=scale, rank=4)[name]


def model_dir_names(n_finetunes: int) -> list[str]:
    return [MODEL_NAMES_BASE] + [f"ft{i}" for i in range(1, n_finetunes + 1)]


def _write_side_files(model_dir: Path, shape: LlamaShape, shards: list[list[str]], shapes: dict) -> None:
    weight_map = {name: shard_file_name(i, len(shards)) for i, grp in enumerate(shards, 1) for name in grp}
    total = sum(math.prod(s) * _BF16_BYTES for s in shapes.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (model_dir / "config.json").write_text(json.dumps(shape.config(torch.bfloat16), indent=2))
    (model_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def generate_set(
    root: str | Path,
    size: str,
    *,
    n_finetunes: int = 3,
    num_shards: int = 3,
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
) -> BenchSet:
    """Write `<root>/<size>/{base,ft1..ftN}` and return it; reuse a finished set unless `force`."""
    if size not in SIZES:
        raise SystemExit(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    target = Path(root) / size
    if (target / MANIFEST).exists() and not force:
        existing = load_set(target)
        if existing.seed == seed and len(existing.finetunes) == n_finetunes:
            return existing
    shape = SIZES[size]
    shapes = shape.tensor_shapes()
    shards = split_shards(shapes, num_shards)
    names = model_dir_names(n_finetunes)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for n in names:
        (tmp / n).mkdir(parents=True)
    started = time.perf_counter()
    index = 0
    for s, group in enumerate(shards, 1):
        entries = [(name, shapes[name]) for name in group]
        streams = [ShardStream(tmp / n / shard_file_name(s, len(shards)), entries) for n in names]
        for name in group:
            g = torch.Generator().manual_seed((seed * 7919 + index) % (2**62))
            base = base_tensor(shapes[name], g)
            streams[0].write(name, base)
            for m in range(1, len(names)):
                streams[m].write(name, finetune_tensor(name, base, index, m, seed))
            index += 1
        for st in streams:
            st.close()
        if not quiet:
            print(f"  shard {s}/{len(shards)} written ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    for n in names:
        _write_side_files(tmp / n, shape, shards, shapes)
    manifest = {
        "size": size,
        "shape": asdict(shape),
        "models": names,
        "num_parameters": shape.num_parameters(),
        "bytes_per_model": sum(p.stat().st_size for p in (tmp / names[0]).glob("*.safetensors")),
        "num_shards": len(shards),
        "seed": seed,
        "generated_seconds": round(time.perf_counter() - started, 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return load_set(target)


def load_set(path: str | Path) -> BenchSet:
    """Read a finished set's manifest (raises SystemExit with a clear line if absent)."""
    path = Path(path)
    try:
        m = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: no {MANIFEST}; generate the set first (benchmarks/generate.py)") from None
    return BenchSet(
        root=path,
        size=m["size"],
        shape=LlamaShape(**m["shape"]),
        models=tuple(path / n for n in m["models"]),
        num_parameters=m["num_parameters"],
        bytes_per_model=m["bytes_per_model"],
        seed=m["seed"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", required=True, choices=list(SIZES), help="parameter count of each model")
    p.add_argument("--root", default="/work/bench-data", help="the set goes to ROOT/SIZE (default: %(default)s)")
    p.add_argument("--finetunes", type=int, default=3, help="number of fine-tunes (default: %(default)s)")
    p.add_argument("--shards", type=int, default=3, help="shards per model (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate even if a finished set exists")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    bs = generate_set(args.root, args.size, n_finetunes=args.finetunes, num_shards=args.shards,
                      seed=args.seed, force=args.force)
    print(f"{bs.root}: {len(bs.models)} models x {bs.num_parameters / 1e6:.1f}M params "
          f"({bs.bytes_per_model / 1e6:.1f} MB each), {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
