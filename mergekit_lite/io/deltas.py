"""Delta sources: what a patch adds to (or replaces in) a base, one tensor at a time.

A delta is either a PEFT LoRA adapter (ΔW = s·B·A per module, plus the full tensors PEFT saved)
or a full fine-tune with the base it was trained from (Δ = θ_ft − θ_old). Both answer the same
questions for the engine: which base tensors they touch (from headers only), whether they fit
a base, and the dense float32 patch for one tensor when it is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

from ..dtypes import is_float
from ..errors import CheckpointError, UsageError
from .adapters import LoraAdapter, LoraModule, is_adapter_dir, open_adapter
from .checkpoint import EMBEDDING_MODULES, Checkpoint, open_checkpoint
from .patch_marks import ADDITIVE, MULTIPLICATIVE, PATCH_KEY, patch_kind, stored_patch_kind

__all__ = ["Patch", "DeltaSource", "LoraDelta", "FullDelta", "StoredDelta", "open_delta", "takes_old_base", "needs_old_base", "is_adapter_dir",
           "vocab_growth", "is_vocab_tensor", "EMBEDDING_MODULES"]


@dataclass(frozen=True)
class Patch:
    """One tensor's patch. `add`: θ = base + λ·tensor. `replace`: θ = tensor + λ·on_top.

    `on_top` is the LoRA (or LoRA bias) delta of a module whose full tensor PEFT also saved
    (an embedding or lm_head with its `base_layer.weight`, a bias with `bias: all`): PEFT loads
    saved + s·B·A, and it is that delta, not the saved tensor, that λ scales.
    """

    kind: Literal["add", "replace"]
    tensor: torch.Tensor  # float32, full base shape
    on_top: torch.Tensor | None = None  # replace only: float32, the tensor's shape

    def to(self, device: torch.device | str) -> Patch:
        """The same patch, float32 on `device`."""
        on_top = None if self.on_top is None else self.on_top.to(device, torch.float32)
        return Patch(self.kind, self.tensor.to(device, torch.float32), on_top)

    def value(self, base: torch.Tensor | None, lam: float = 1.0) -> torch.Tensor:
        """The patched tensor: base + λ·tensor, or tensor + λ·on_top (λ = 1 is what PEFT loads)."""
        if self.kind == "add":
            assert base is not None
            return base + lam * self.tensor
        return self.tensor if self.on_top is None else self.tensor + lam * self.on_top


@runtime_checkable
class DeltaSource(Protocol):
    label: str

    def targets(self) -> dict[str, tuple[int, ...]]: ...

    def check(self, base_shapes: Mapping[str, tuple[int, ...]], *, allow_vocab_growth: bool = False) -> list[str]: ...

    def patch(self, name: str, base_shape: tuple[int, ...], device: torch.device | str) -> Patch | None: ...

    def bytes_to_read(self, names: Collection[str] | None = None) -> int:
        """Bytes that patching every target (or only those in `names`) reads."""
        ...

    def files(self) -> list[Path]:
        """Every file the source reads (an output must never replace them)."""
        ...


# Modules with one row per vocabulary entry: the embeddings and the output heads.
VOCAB_MODULES = (*EMBEDDING_MODULES, "lm_head", "embed_out")


def is_vocab_tensor(name: str) -> bool:
    """Whether `name` is a weight with one row per token (an embedding or an output head)."""
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and module.rsplit(".", 1)[-1] in VOCAB_MODULES


def vocab_growth(name: str, delta_shape: tuple[int, ...], base_shape: tuple[int, ...]) -> bool:
    """True when `name` is a vocabulary tensor and the base only has more rows than the delta.

    Any other tensor with more rows (more KV heads, a wider MLP) is another architecture, which
    no flag makes patchable.
    """
    return (
        is_vocab_tensor(name)
        and len(delta_shape) == len(base_shape) == 2
        and delta_shape[0] < base_shape[0]
        and delta_shape[1:] == base_shape[1:]
    )


def pad_rows(t: torch.Tensor, base_shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) == tuple(base_shape):
        return t
    out = torch.zeros(base_shape, dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def _shape_problem(where: str, name: str, shape: tuple[int, ...], base_shapes: Mapping[str, tuple[int, ...]],
                   allow_vocab_growth: bool) -> str | None:
    base_shape = base_shapes.get(name)
    if base_shape is None:
        return f"{where} maps to base tensor {name!r}, which the base does not have"
    base_shape = tuple(base_shape)
    if base_shape == shape:
        return None
    subject = where if where.endswith(repr(name)) else f"{where}: {name!r}"  # name the tensor once
    if vocab_growth(name, shape, base_shape):
        if allow_vocab_growth:
            return None
        return (f"{subject} has {shape[0]} rows but the base has {base_shape[0]} "
                "(vocabulary grew; pass --allow-vocab-growth to patch the old rows only)")
    return f"{subject} has shape {list(shape)} but the base's is {list(base_shape)}"


class LoraDelta:
    """A PEFT LoRA adapter as a delta source.

    Saved full tensors (modules_to_save, trained biases, saved embeddings) replace the base's
    tensors, exactly as PEFT loads them, unless the old base is known: then they are ported as
    deltas (saved − old). DoRA is not additive, so it needs the old base: the patch is then the
    dense W_dora(θ_old) − W_old.
    """

    def __init__(self, adapter: LoraAdapter, old_base: Checkpoint | None = None) -> None:
        if adapter.settings.use_dora and old_base is None:
            raise CheckpointError(
                f"{adapter.path / 'adapter_config.json'}: DoRA adapters are not additive; "
                "give the old base (--old-base) to port them as a dense delta"
            )
        self.adapter = adapter
        self.old_base = old_base
        self.label = adapter.label
        shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, str] = {}
        for name, mod in adapter.modules.items():
            shapes[name] = mod.delta_shape
            self._where[name] = f"{adapter.weights_file}: {mod.a_key!r}"
        for name, mod in adapter.bias_modules.items():
            assert mod.bias_key is not None
            shapes[name] = adapter.shape(mod.bias_key)
            self._where[name] = f"{adapter.weights_file}: {mod.bias_key!r}"
        for name, key in adapter.saved.items():
            saved_shape = adapter.shape(key)
            if name in shapes and shapes[name] != saved_shape:
                raise CheckpointError(
                    f"{adapter.weights_file}: {key!r} {list(saved_shape)} does not match the LoRA delta "
                    f"{list(shapes[name])} for {name!r}"
                )
            shapes[name] = saved_shape
            self._where[name] = f"{adapter.weights_file}: {key!r}"
        self._targets = shapes

    def targets(self) -> dict[str, tuple[int, ...]]:
        return dict(self._targets)

    def kind(self, name: str) -> Literal["add", "replace"]:
        """`replace` for saved full tensors when the old base is unknown, else `add`."""
        return "replace" if name in self.adapter.saved and self.old_base is None else "add"

    def check(self, base_shapes: Mapping[str, tuple[int, ...]], *, allow_vocab_growth: bool = False) -> list[str]:
        problems = []
        for name, shape in self._targets.items():
            where = self._where[name]
            problem = _shape_problem(where, name, shape, base_shapes, allow_vocab_growth)
            if problem is None and self.kind(name) == "replace" and tuple(base_shapes[name]) != shape:
                problem = (f"{where}: saved full tensor {name!r} has shape {list(shape)} but the base's is "
                           f"{list(base_shapes[name])}; give --old-base to port it as a delta")
            if problem is not None:
                problems.append(problem)
        if self.old_base is not None:
            for name in self._old_base_needs():
                shape = self._targets[name]
                if name not in self.old_base:
                    problems.append(f"{self._where[name]} needs {name!r} from the old base {self.old_base.label}, "
                                    "which does not have it")
                elif self.old_base.info(name).shape != shape:
                    problems.append(f"{self._where[name]}: {name!r} has shape {list(shape)} but the old base's is "
                                    f"{list(self.old_base.info(name).shape)}")
        return problems

    def _old_base_needs(self) -> list[str]:
        needs = list(self.adapter.saved)
        if self.adapter.settings.use_dora:
            needs += [n for n in self.adapter.modules if n not in self.adapter.saved]
        return needs

    def patch(self, name: str, base_shape: tuple[int, ...], device: torch.device | str) -> Patch | None:
        if name not in self._targets:
            return None
        mod = self.adapter.modules.get(name)
        bias_mod = self.adapter.bias_modules.get(name)
        saved_key = self.adapter.saved.get(name)
        kind = self.kind(name)
        if mod is not None and mod.magnitude_key is not None:
            t = self._dora_delta(mod, name, device)
        else:
            t = None
            if mod is not None:
                t = self.adapter.delta_weight(mod, device)
            if bias_mod is not None:
                t = self.adapter.delta_bias(bias_mod, device)
            if saved_key is not None:
                saved = self.adapter.load(saved_key, device)
                if kind == "replace":
                    return Patch("replace", saved, on_top=t)
                assert self.old_base is not None
                saved = saved - self.old_base.load(name, device=device, dtype=torch.float32)
                t = saved if t is None else saved + t
        assert t is not None
        return Patch(kind, pad_rows(t, tuple(base_shape)))

    def _dora_delta(self, mod: LoraModule, name: str, device: torch.device | str) -> torch.Tensor:
        assert self.old_base is not None
        old = self.old_base.load(name, device=device, dtype=torch.float32)
        saved_key = self.adapter.saved.get(name)
        trained_base = self.adapter.load(saved_key, device) if saved_key is not None else old
        return self.adapter.dora_weight(mod, trained_base) - old

    @property
    def bytes_read(self) -> int:
        """Bytes read from the adapter file (old-base reads count on the old base's Checkpoint)."""
        return self.adapter.weights.bytes_read

    def files(self) -> list[Path]:
        own = [self.adapter.weights_file, self.adapter.path / "adapter_config.json"]
        return own + (self.old_base.shards if self.old_base is not None else [])

    def bytes_to_read(self, names: Collection[str] | None = None) -> int:
        if names is None:
            n = self.adapter.bytes_to_read()
            if self.old_base is not None:
                n += sum(self.old_base.info(x).nbytes for x in self._old_base_needs() if x in self.old_base)
            return n
        # what `patch` loads for each of these tensors: its factors (and DoRA magnitude), a
        # lora_B bias, a saved copy, and from the old base what `_old_base_needs` lists
        keys: set[str] = set()
        needs = set(self._old_base_needs())
        wanted = set(names) & set(self._targets)
        for name in wanted:
            mod = self.adapter.modules.get(name)
            if mod is not None:
                keys.update(k for k in (mod.a_key, mod.b_key, mod.magnitude_key) if k)
            bias_mod = self.adapter.bias_modules.get(name)
            dora = mod is not None and mod.magnitude_key is not None  # patch reads no bias then
            if bias_mod is not None and bias_mod.bias_key and not dora:
                keys.add(bias_mod.bias_key)
            if name in self.adapter.saved:
                keys.add(self.adapter.saved[name])
        old = wanted & needs
        n = sum(self.adapter.weights.info(k).nbytes for k in keys)
        if self.old_base is not None:
            n += sum(self.old_base.info(x).nbytes for x in old if x in self.old_base)
        return n


class FullDelta:
    """A full fine-tune minus the base it was trained from: Δ = θ_ft − θ_old, float tensors only."""

    def __init__(self, finetuned: Checkpoint, old_base: Checkpoint) -> None:
        self.finetuned = finetuned
        self.old_base = old_base
        self.label = f"{finetuned.label} − {old_base.label}"
        self._targets = {n: i.shape for n, i in finetuned.tensors.items() if is_float(i.dtype)}

    def targets(self) -> dict[str, tuple[int, ...]]:
        return dict(self._targets)

    def check(self, base_shapes: Mapping[str, tuple[int, ...]], *, allow_vocab_growth: bool = False) -> list[str]:
        problems = []
        for name, info in self.finetuned.tensors.items():
            # a float tensor on one side only has no delta: it would be dropped without a word
            if name in self.old_base and is_float(info.dtype) != is_float(self.old_base.info(name).dtype):
                problems.append(f"{info.shard}: {name!r} is {info.dtype} but {self.old_base.info(name).dtype} in "
                                f"{self.old_base.label}, the base it is taken from")
        for name, shape in self._targets.items():
            where = f"{self.finetuned.info(name).shard}: {name!r}"
            if name not in self.old_base:
                problems.append(f"{where} is not in the old base {self.old_base.label}")
                continue
            old_shape = self.old_base.info(name).shape
            if old_shape != shape:
                problems.append(f"{where} has shape {list(shape)} but in {self.old_base.label}, the base it is "
                                f"taken from, it has {list(old_shape)}")
                continue
            problem = _shape_problem(where, name, shape, base_shapes, allow_vocab_growth)
            if problem is not None:
                problems.append(problem)
        return problems

    def patch(self, name: str, base_shape: tuple[int, ...], device: torch.device | str) -> Patch | None:
        if name not in self._targets:
            return None
        ft = self.finetuned.load(name, device=device, dtype=torch.float32)
        old = self.old_base.load(name, device=device, dtype=torch.float32)
        return Patch("add", pad_rows(ft - old, tuple(base_shape)))

    @property
    def bytes_read(self) -> int:
        """Bytes read from the fine-tune (old-base reads count on the old base's Checkpoint)."""
        return self.finetuned.bytes_read

    def files(self) -> list[Path]:
        return self.finetuned.shards + self.old_base.shards

    def bytes_to_read(self, names: Collection[str] | None = None) -> int:
        wanted = self._targets if names is None else set(names) & set(self._targets)
        return sum(self.finetuned.info(n).nbytes + self.old_base.info(n).nbytes
                   for n in wanted if n in self.old_base)


class StoredDelta:
    """A checkpoint that holds ΔW itself (marked `mlite_patch: additive`, as `mlite hadamard
    to-delta` writes it): every float tensor is added to the base's tensor of that name."""

    def __init__(self, deltas: Checkpoint) -> None:
        self.deltas = deltas
        self.label = deltas.label
        self._targets = {n: i.shape for n, i in deltas.tensors.items() if is_float(i.dtype)}

    def targets(self) -> dict[str, tuple[int, ...]]:
        return dict(self._targets)

    def check(self, base_shapes: Mapping[str, tuple[int, ...]], *, allow_vocab_growth: bool = False) -> list[str]:
        problems = [f"{info.shard}: {name!r} is {info.dtype}: an additive delta holds float tensors only"
                    for name, info in self.deltas.tensors.items() if not is_float(info.dtype)]
        for name, shape in self._targets.items():
            problem = _shape_problem(f"{self.deltas.info(name).shard}: {name!r}", name, shape, base_shapes,
                                     allow_vocab_growth)
            if problem is not None:
                problems.append(problem)
        return problems

    def patch(self, name: str, base_shape: tuple[int, ...], device: torch.device | str) -> Patch | None:
        if name not in self._targets:
            return None
        return Patch("add", pad_rows(self.deltas.load(name, device=device, dtype=torch.float32), tuple(base_shape)))

    @property
    def bytes_read(self) -> int:
        return self.deltas.bytes_read

    def files(self) -> list[Path]:
        return self.deltas.shards

    def bytes_to_read(self, names: Collection[str] | None = None) -> int:
        wanted = self._targets if names is None else set(names) & set(self._targets)
        return sum(self.deltas.info(n).nbytes for n in wanted)


def open_delta(ref: str | os.PathLike, *, old_base: Checkpoint | None = None, allow_bin: bool = False) -> DeltaSource:
    """A PEFT adapter directory → LoraDelta; a checkpoint marked as an additive delta →
    StoredDelta; any other full checkpoint → FullDelta (needs the old base)."""
    path = Path(ref).expanduser()
    if is_adapter_dir(path):
        return LoraDelta(open_adapter(path), old_base)
    kind = stored_patch_kind(path)
    if kind == MULTIPLICATIVE:
        raise UsageError(f"{ref}: is a multiplicative patch (W' = W ⊙ M), which is not added: apply it with "
                         "'mlite hadamard apply', or make it additive against its base with 'mlite hadamard to-delta'")
    if kind == ADDITIVE:
        if old_base is not None:
            raise UsageError(f"{ref}: is an additive delta (ΔW itself, {PATCH_KEY}={ADDITIVE}); it takes no old base")
        deltas = open_checkpoint(ref, allow_bin=allow_bin)
        patch_kind(deltas)  # every shard carries the same mark
        return StoredDelta(deltas)
    if old_base is None:
        if not path.exists():  # a missing path (exit 5) or a Hub reference says so first
            open_checkpoint(ref, allow_bin=allow_bin)
        raise UsageError(needs_old_base(ref))
    return FullDelta(open_checkpoint(ref, allow_bin=allow_bin), old_base)


def takes_old_base(ref: str | os.PathLike) -> bool:
    """True when `ref` is a delta that needs its old base to mean anything: a full checkpoint on
    disk that is neither an adapter directory nor a marked patch."""
    path = Path(ref).expanduser()
    return path.exists() and not is_adapter_dir(path) and stored_patch_kind(path) is None


def needs_old_base(ref: str | os.PathLike) -> str:
    """Why a delta that is not an adapter directory cannot be used alone, with what to pass
    instead when it looks like an adapter given the wrong way (its weights file, or the folder
    above the one peft saved it in under a non-default adapter name)."""
    path = Path(ref).expanduser()
    if path.is_file() and is_adapter_dir(path.parent):
        return f"{ref}: is an adapter's weights file; pass its directory, {path.parent}"
    nested = sorted(p.parent.name for p in path.glob("*/adapter_config.json")) if path.is_dir() else []
    if nested:
        return (f"{ref}: has no adapter_config.json, but {', '.join(nested)} inside it do (peft saves an adapter "
                f"with a name other than 'default' in a folder of that name); pass {path / nested[0]}")
    return f"{ref}: a full fine-tuned checkpoint as delta needs its old base (--old-base)"
