"""Synthetic Llama-layout checkpoints and PEFT LoRA adapters, made from a seed.

`mlite demo`, the tests and the benchmarks all need models without downloading any: a base,
fine-tunes of it (base + seeded low-rank, sparse or dense deltas) and LoRA adapters. They are
written with `safetensors` directly (not with mlite's writer), so tests of the writer compare
against an independent producer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from .dtypes import torch_name

DeltaKind = Literal["lowrank", "sparse", "dense", "mixed"]


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a tiny (or not so tiny) Llama-style decoder."""

    vocab_size: int = 64
    hidden_size: int = 16
    intermediate_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name and shape, in the order transformers' LlamaForCausalLM saves them."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (h, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, h)
            shapes[p + "mlp.gate_proj.weight"] = (f, h)
            shapes[p + "mlp.up_proj.weight"] = (f, h)
            shapes[p + "mlp.down_proj.weight"] = (h, f)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes

    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    def config(self, dtype: torch.dtype = torch.float32) -> dict:
        """A config.json that transformers' LlamaConfig accepts."""
        c = asdict(self)
        c.update(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_act": "silu",
                "max_position_embeddings": 128,
                "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0,
                "torch_dtype": torch_name(dtype),
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        )
        return c


def make_base(shape: LlamaShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """A float32 base model: small random matrices, norms near one."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, s in shape.tensor_shapes().items():
        if len(s) == 1:
            state[name] = 1.0 + 0.05 * torch.randn(s, generator=g)
        else:
            state[name] = torch.randn(s, generator=g) / math.sqrt(s[-1])
    return state


def make_finetune(
    base: Mapping[str, torch.Tensor], seed: int, kind: DeltaKind = "mixed", scale: float = 0.02, rank: int = 2
) -> dict[str, torch.Tensor]:
    """base + a seeded delta: low-rank (LoRA-like), sparse (5% of entries) or dense noise.

    `mixed` cycles through the three kinds tensor by tensor so one model exercises all of them.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    kinds: tuple[DeltaKind, ...] = ("lowrank", "sparse", "dense")
    out: dict[str, torch.Tensor] = {}
    for i, (name, w) in enumerate(base.items()):
        k = kinds[i % 3] if kind == "mixed" else kind
        if not w.is_floating_point():
            out[name] = w.clone()
            continue
        if k == "lowrank" and w.dim() == 2:
            a = torch.randn(w.shape[0], rank, generator=g)
            b = torch.randn(rank, w.shape[1], generator=g)
            delta = scale * (a @ b) / math.sqrt(rank)
        elif k == "sparse":
            mask = torch.rand(w.shape, generator=g) < 0.05
            delta = scale * 4 * torch.randn(w.shape, generator=g) * mask
        else:
            delta = scale * torch.randn(w.shape, generator=g)
        out[name] = (w.float() + delta).to(w.dtype)
    return out


def save_checkpoint(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    shape: LlamaShape | None = None,
    num_shards: int = 1,
    dtype: torch.dtype | None = None,
    extra_config: Mapping | None = None,
) -> Path:
    """Write `state` as a Hugging Face checkpoint directory with `num_shards` shards."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    names = list(tensors)
    if num_shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = math.ceil(len(names) / num_shards)
        groups = [names[i * per : (i + 1) * per] for i in range(num_shards)]
        groups = [grp for grp in groups if grp]
        weight_map: dict[str, str] = {}
        total = 0
        for i, group in enumerate(groups, start=1):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file({k: tensors[k] for k in group}, str(out / fname), metadata={"format": "pt"})
            for k in group:
                weight_map[k] = fname
                total += tensors[k].numel() * tensors[k].element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if shape is not None:
        first_float = next((t for t in tensors.values() if t.is_floating_point()), None)
        config = shape.config(first_float.dtype if first_float is not None else torch.float32)
        config.update(extra_config or {})
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return out


def make_lora_adapter(
    base: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    seed: int = 0,
    r: int = 4,
    alpha: float = 8.0,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    scale: float = 0.05,
    base_model_name: str = "synthetic-base",
) -> Path:
    """A PEFT LoRA adapter directory for linear modules of `base` (B non-zero, so ΔW ≠ 0)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(20_000 + seed)
    targets = tuple(target_modules)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in base.items():
        if not name.endswith(".weight") or w.dim() != 2 or "embed_tokens" in name or name == "lm_head.weight":
            continue
        module = name[: -len(".weight")]
        if module.split(".")[-1] not in targets:
            continue
        tensors[f"base_model.model.{module}.lora_A.weight"] = scale * torch.randn(r, w.shape[1], generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = scale * torch.randn(w.shape[0], r, generator=g)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


@dataclass(frozen=True)
class ModelSet:
    """Paths of a synthetic family: a base, fine-tunes of it, and a LoRA adapter."""

    base: Path
    finetunes: tuple[Path, ...]
    adapter: Path
    shape: LlamaShape


def build_model_set(
    root: str | Path,
    *,
    shape: LlamaShape | None = None,
    n_finetunes: int = 2,
    num_shards: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ModelSet:
    """Write base + `n_finetunes` fine-tunes + one LoRA adapter under `root`."""
    shape = shape or LlamaShape()
    root = Path(root)
    base = make_base(shape, seed)
    base_dir = save_checkpoint(base, root / "base", shape=shape, num_shards=num_shards, dtype=dtype)
    fts = []
    for i in range(n_finetunes):
        ft = make_finetune(base, seed=seed * 100 + i + 1)
        fts.append(save_checkpoint(ft, root / f"ft{i + 1}", shape=shape, num_shards=num_shards, dtype=dtype))
    adapter = make_lora_adapter(base, root / "lora", seed=seed)
    return ModelSet(base=base_dir, finetunes=tuple(fts), adapter=adapter, shape=shape)
