"""Open a checkpoint by reading headers only, then load one tensor at a time.

A `Checkpoint` is an index (name → shard, offsets, shape, dtype) built from the safetensors
headers of a directory, a single file, or a Hub snapshot. Nothing else is read until a
tensor is asked for; then exactly that tensor's bytes are read with one positioned read, so
the memory a merge needs is the tensors in flight, whatever the model size.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import ITEMSIZE, is_float, to_torch
from ..errors import CheckpointError, ResolveError, one_line
from .safetensors_format import pread_exact, read_header

log = logging.getLogger(__name__)

# Input-embedding modules, whose LoRA is stored as lora_embedding_A/B ([r, vocab], [dim, r]).
EMBEDDING_MODULES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
# The output projection a tied checkpoint does not store: it reads the input embedding instead.
TIED_HEAD = "lm_head.weight"
# Architectures whose linear layers are transformers' Conv1D, stored [in, out] (GPT-2's c_attn,
# c_proj, c_fc): a LoRA for them is written with PEFT's fan_in_fan_out.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# Their Conv1D layers by name (the output head, where stored, is a Linear).
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})

# Tensor names only quantized checkpoints hold (GPTQ/AWQ packed weights, bitsandbytes' 4-bit
# state and int8 scales, block-scaled float8), for files that come without a config.json.
QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".quant_map", ".SCB", ".weight_scale_inv")
QUANTIZED_PARTS = (".quant_state.",)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, as read from its shard header."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    shard: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return is_float(self.dtype)


def _lacks_nothing(_name: str) -> bool:
    return False


class Checkpoint:
    """A model's tensors, indexed from headers, loaded lazily one at a time.

    Thread-safe for concurrent `load` calls (the prefetcher reads while the engine computes):
    each read is a positioned read on a shared descriptor, which needs no seek state.
    """

    def __init__(self, path: Path, label: str, tensors: dict[str, TensorInfo], config: dict | None,
                 source_dir: Path | None, bin_state: dict[str, torch.Tensor] | None = None) -> None:
        self.path = path
        self.label = label
        self.tensors = tensors
        self.config = config
        self.source_dir = source_dir
        self._bin_state = bin_state
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads: list[tuple[str, int]] = []  # (tensor name, bytes) — lets tests prove laziness
        # a layer stack's view: the folder of the model its output head comes from, when that
        # is another model than the embeddings' (their vocabularies must then agree)
        self.head_source_dir: Path | None = None
        # a layer stack's view: whether a tensor is one the view leaves out on purpose (its
        # slice has no source at this position), so that the merge leaves the position out there
        self.lacks: Callable[[str], bool] = _lacks_nothing

    # ---- index -------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in shard order (shard by shard, by offset within a shard)."""
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[self._stored(name)]
        except KeyError:
            raise CheckpointError(f"{self.label}: tensor {name!r} not found") from None

    def __contains__(self, name: object) -> bool:
        return name in self.tensors or (name == TIED_HEAD and self.tied_head_source is not None)

    @functools.cached_property
    def tied_head_source(self) -> str | None:
        """The input embedding a tied checkpoint's `lm_head.weight` is (None: it stores its own,
        or it is not tied).

        Asking a tied checkpoint for `lm_head.weight` reads that embedding, as transformers'
        tying does, so it merges with untied models as mergekit merges it. `names()` still lists
        only the stored tensors, so an all-tied merge writes a tied output.
        """
        if TIED_HEAD in self.tensors or not self.tied_embeddings:
            return None
        return next((n for n in self.tensors
                     if n.endswith(".weight") and n[: -len(".weight")].rsplit(".", 1)[-1] in EMBEDDING_MODULES), None)

    @functools.cached_property
    def quantization(self) -> str | None:
        """What marks the checkpoint as quantized (its quant_method, or a tensor), None if it is not.

        Quantized weights are packed integers plus scales. Merged as if they were weights, the
        integers would be copied from the base (they are not float) while the scales were
        averaged: a finite, well-formed and meaningless model. So the engine refuses them.
        """
        qc = (self.config or {}).get("quantization_config")
        if qc is not None:
            method = qc.get("quant_method") if isinstance(qc, dict) else None
            return "config.json quantization_config" + (f", quant_method {method!r}" if method else "")
        return next((f"tensor {n}" for n in self.tensors
                     if n.endswith(QUANTIZED_SUFFIXES) or any(p in n for p in QUANTIZED_PARTS)), None)

    def _stored(self, name: str) -> str:
        """The stored tensor that answers for `name` (itself, or a tied head's embedding)."""
        if name in self.tensors or name != TIED_HEAD:
            return name
        return self.tied_head_source or name

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def shards(self) -> list[Path]:
        return list(dict.fromkeys(t.shard for t in self.tensors.values()))

    @property
    def tied_embeddings(self) -> bool:
        """True when the output projection reuses the input embedding (no lm_head.weight)."""
        if self.config and "tie_word_embeddings" in self.config:
            return bool(self.config["tie_word_embeddings"])
        return "lm_head.weight" not in self.tensors and any(n.endswith("embed_tokens.weight") for n in self.tensors)

    @property
    def conv1d_weights(self) -> bool:
        """True when the config's model type stores its linear layers as Conv1D ([in, out])."""
        return self.config is not None and self.config.get("model_type") in CONV1D_MODEL_TYPES

    def side_files(self) -> list[Path]:
        """config, generation config and tokenizer files that travel with the weights."""
        if self.source_dir is None:
            return []
        return [self.source_dir / f for f in SIDE_FILES if (self.source_dir / f).is_file()]

    # ---- data --------------------------------------------------------------------------
    def load(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (or its rows [a, b)) and place it on `device` as `dtype`, casting once.

        Rows are contiguous in a safetensors file, so a row block is one positioned read of just
        those bytes: big tensors can be streamed without ever being whole in memory. The
        caller owns the result: it shares memory with nothing (the engine lets methods compute
        in their inputs' buffers), so a tensor of an opted-in `.bin` checkpoint, which is held
        whole in memory, comes back as a copy.
        """
        info = self.info(name)
        shape = info.shape
        begin, nbytes = info.begin, info.nbytes
        if rows is not None:
            a, b = rows
            row_bytes = info.nbytes // shape[0] if shape and shape[0] else 0
            begin, nbytes = info.begin + a * row_bytes, (b - a) * row_bytes
            shape = (b - a, *shape[1:])
        if self._bin_state is not None:
            t = self._bin_state[self._stored(name)]
            if rows is not None:
                t = t[rows[0] : rows[1]]
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                pread_exact(self._fd(info.shard), buf.numpy().data, begin, info.shard)
            with self._lock:
                self.bytes_read += nbytes
                self.reads.append((name, nbytes))
            t = buf.view(to_torch(info.dtype)).reshape(shape)
        dev = torch.device(device)
        if dev.type != "cpu":
            t = t.to(dev, non_blocking=False)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        elif self._bin_state is not None and dev.type == "cpu":
            t = t.clone()  # nothing above copied it out of the in-memory state
        return t

    def _fd(self, shard: Path) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    try:
                        fd = os.open(shard, os.O_RDONLY)
                    except OSError as exc:
                        raise CheckpointError(f"{shard}: cannot open ({exc.strerror})") from None
                    self._fds[shard] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self.tensors)} tensors, {len(self.shards)} shards)"


# ---- opening ---------------------------------------------------------------------------
def open_checkpoint(ref: str | os.PathLike, *, allow_bin: bool = False, revision: str | None = None,
                    quantized_ok: bool = False) -> Checkpoint:
    """Open a directory, a `.safetensors` file, or a Hub reference `org/name[@revision]`.

    A quantized checkpoint is refused unless `quantized_ok` (for looking at its headers only).
    """
    ck = _open(ref, allow_bin, revision)
    if not quantized_ok and ck.quantization is not None:
        raise CheckpointError(f"{ck.label}: a quantized checkpoint ({ck.quantization}); mlite computes on "
                              "full-precision weights: use the unquantized model, or dequantize it first")
    return ck


def _open(ref: str | os.PathLike, allow_bin: bool, revision: str | None) -> Checkpoint:
    label = str(ref)
    path = Path(ref).expanduser()
    if path.exists():
        return _open_local(path, label, allow_bin)
    from .hub import looks_like_hub_ref, resolve_hub

    if looks_like_hub_ref(label):
        try:
            local = resolve_hub(label, revision=revision)
        except ResolveError as exc:
            # A mistyped local path looks like org/name too: say that both readings failed.
            raise ResolveError(f"{label}: not a local path; {str(exc.args[0]).removeprefix(label + ': ')}") from None
        return _open_local(local, label, allow_bin)
    raise ResolveError(f"{label}: no such file or directory (and not a Hub reference 'org/name[@revision]')")


def _open_local(path: Path, label: str, allow_bin: bool) -> Checkpoint:
    if path.is_file():
        if path.suffix == ".safetensors":
            return _from_shards(label, path, [path], None, path.parent)
        if path.suffix in (".bin", ".pt", ".pth"):
            return _from_bin(label, path, [path], path.parent, allow_bin)
        raise CheckpointError(f"{label}: not a .safetensors file")
    os.listdir(path)  # a directory we may not read: the system's refusal, naming it (exit 6)
    if (path / "adapter_config.json").is_file() and not (path / INDEX_FILE).is_file() and not (path / SINGLE_FILE).is_file():
        raise CheckpointError(f"{label}: is a PEFT adapter, not a full checkpoint (use it as a delta/adapter input)")
    index = path / INDEX_FILE
    if (path / SINGLE_FILE).is_file():
        # transformers loads model.safetensors before an index: read the weights it would run
        if index.is_file():
            log.warning("%s: holds both %s and %s; reading %s, as transformers loads it first",
                        label, SINGLE_FILE, INDEX_FILE, SINGLE_FILE)
        return _from_shards(label, path, [path / SINGLE_FILE], None, path)
    if index.is_file():
        return _from_index(label, path, index)
    shards = sorted(p for p in path.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if shards:
        return _from_shards(label, path, shards, None, path)
    bins = sorted(path.glob("*.bin"))
    if bins:
        return _from_bin(label, path, bins, path, allow_bin)
    raise CheckpointError(f"{label}: no .safetensors files found")


def _read_config(directory: Path) -> dict | None:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return None
    try:  # an OSError (permissions) is the system's refusal: it goes up as such (exit 6)
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{cfg}: unreadable config.json ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: config.json holds a JSON {type(data).__name__}, not an object")
    return data


def _from_index(label: str, directory: Path, index: Path) -> Checkpoint:
    try:  # an OSError (permissions) is the system's refusal: it goes up as such (exit 6)
        data = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{index}: corrupt index file, not JSON ({one_line(exc)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: corrupt index file (expected a 'weight_map' object)")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v or "/" in v or v in (".", "..")), None)
    if bad is not None:
        raise CheckpointError(f"{index}: corrupt index file (tensor {bad!r} maps to {weight_map[bad]!r}, "
                              "not a shard file name)")
    shard_names = sorted(set(weight_map.values()))  # HF shard names sort in file order
    missing = [s for s in shard_names if not (directory / s).is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard {missing[0]!r} named by the index does not exist")
    return _from_shards(label, directory, [directory / s for s in shard_names], weight_map, directory)


def _from_shards(label: str, path: Path, shards: list[Path], weight_map: dict[str, str] | None,
                 source_dir: Path) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        header = read_header(shard)
        for e in header.entries:
            if weight_map is not None and weight_map.get(e.name) != shard.name:
                continue  # present in the file but the index points elsewhere: the index wins
            if e.name in tensors:
                raise CheckpointError(f"{shard}: tensor {e.name!r} also stored in {tensors[e.name].shard.name}")
            tensors[e.name] = TensorInfo(e.name, e.shape, e.dtype, shard, e.begin, e.end)
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{path / shard_name}: tensor {name!r} named by the index is missing")
    if not tensors:
        raise CheckpointError(f"{label}: checkpoint holds no tensors")
    return Checkpoint(path, label, tensors, _read_config(source_dir), source_dir)


def _from_bin(label: str, path: Path, files: list[Path], source_dir: Path, allow_bin: bool) -> Checkpoint:
    """Pickle checkpoints: refused unless the user opts in; then loaded with weights_only=True."""
    if not allow_bin:
        raise CheckpointError(
            f"{label}: holds only pickle (.bin) weights, which can run code when loaded; "
            "convert to safetensors or opt in with --allow-bin (loads with weights_only=True)"
        )
    from ..dtypes import from_torch

    state: dict[str, torch.Tensor] = {}
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        try:
            part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise CheckpointError(f"{f}: cannot load with weights_only=True ({exc.__class__.__name__})") from None
        if not isinstance(part, dict):
            raise CheckpointError(f"{f}: holds a {type(part).__name__}, not a state dict of named tensors")
        for name, t in part.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{f}: entry {name!r} is a {type(t).__name__}, not a tensor "
                                      "(expected a flat state dict of named tensors)")
            st = from_torch(t.dtype)
            nbytes = t.numel() * ITEMSIZE[st]
            state[name] = t
            tensors[name] = TensorInfo(name, tuple(t.shape), st, f, 0, nbytes)
    return Checkpoint(path, label, tensors, _read_config(source_dir), source_dir, bin_state=state)


def load_small_file(path: Path) -> dict[str, torch.Tensor]:
    """A small safetensors file (a probe, a feature set) read whole, or a one-line error that
    says what is wrong with it (the library's own words: "file not fully covered", ...)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # the library raises SafetensorError, OSError, ValueError...
        raise CheckpointError(f"{path}: unreadable safetensors file ({one_line(exc)})") from None
