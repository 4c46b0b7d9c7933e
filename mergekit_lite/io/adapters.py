"""PEFT LoRA adapters: read a saved adapter as per-module dense deltas, and write new adapters.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. We index the
tensor file from its header only and compute each module's ΔW = s·B·A in float32 when it is
asked for, so a patch of a 70B model never holds more than one module's factors and delta.

Key forms `save_pretrained` produces (peft 0.21), after the `base_model.model.` prefix:
- `<m>.lora_A.weight` [r, in], `<m>.lora_B.weight` [out, r], `<m>.lora_B.bias` [out]
  (`lora_bias=True`); older versions may keep the adapter name (`<m>.lora_A.default.weight`);
- `<m>.lora_embedding_A` [r, vocab], `<m>.lora_embedding_B` [dim, r];
- `<m>.lora_magnitude_vector` (DoRA; older versions add `.weight` or the adapter name);
- full trained tensors: `<m>.base_layer.<p>` (biases with `bias: all|lora_only`, embeddings
  saved with `save_embedding_layers`), `<m>.modules_to_save[.<adapter>].<p>` (older) or plain
  `<m>.<p>` (modules_to_save, biases of untargeted modules). PEFT loads these over the base's
  tensors, so they are "saved" tensors here, mapped to base tensor `<m>.<p>`.

Unlike PEFT, which only warns about keys it cannot place, every key must map to a base tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..precision import full_float32_matmul
from .checkpoint import EMBEDDING_MODULES, TIED_HEAD, Checkpoint, open_checkpoint
from .publish import beside, put_in_place
from .safetensors_format import write_file
from .writer import check_output_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# PEFT initialisations that rewrite the base weights: such an adapter is relative to a modified
# base and cannot be ported unless it was converted to plain LoRA when it was saved.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")
# Config features that change what the saved tensors mean; refused rather than mis-applied.
_UNSUPPORTED_FEATURES = ("layer_replication", "target_parameters", "trainable_token_indices", "megatron_config",
                         "alora_invocation_tokens", "arrow_config", "velora_config", "monteclora_config",
                         "kasa_config", "use_bdlora", "use_qalora")

_LORA_RE = re.compile(r"^(?P<m>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.(?P<p>weight|bias)$")
_EMB_RE = re.compile(r"^(?P<m>.+)\.lora_embedding_(?P<ab>A|B)(?:\.[^.]+)?$")
_MAG_RE = re.compile(r"^(?P<m>.+)\.lora_magnitude_vector(?:\.[^.]+)*$")
_MTS_RE = re.compile(r"^(?P<m>.+)\.modules_to_save\.(?:[^.]+\.)?(?P<p>[^.]+)$")
_BASE_LAYER_RE = re.compile(r"^(?P<m>.+)\.base_layer\.(?P<p>[^.]+)$")


def pattern_key(patterns: Sequence[str], module: str) -> str | None:
    """The first pattern that matches the END of `module` at a dot boundary (PEFT's rule).

    peft's `get_pattern_key` tries `re.match(rf"(.*\\.)?({key})$", module)` for each key in
    dict order; a bare name like `q_proj` therefore matches every `...q_proj` module.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


# LoraConfig's default lora_alpha, which PEFT uses when a config leaves it out.
PEFT_DEFAULT_ALPHA = 8


def _is_adapter_config(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class LoraSettings:
    """The fields of adapter_config.json that decide what the factors mean."""

    r: int
    alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()

    def rank_for(self, module: str) -> int:
        key = pattern_key(list(self.rank_pattern), module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = pattern_key(list(self.alpha_pattern), module)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha

    def scaling_for(self, module: str) -> float:
        """s = α/r, or α/√r with rsLoRA, using the module's pattern-resolved r and α."""
        r = self.rank_for(module)
        a = self.alpha_for(module)
        return a / math.sqrt(r) if self.use_rslora else a / r


def _pattern(config_path: str, raw: Mapping[str, Any], name: str, convert: type[int] | type[float]) -> dict[str, Any]:
    """`rank_pattern` / `alpha_pattern` vetted now ({regex: rank > 0} / {regex: finite alpha}), so a bad entry is a
    one-line error naming the file and the key instead of a failure in the middle of a merge."""
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{config_path}: {name!r} must be a mapping of module patterns to numbers, "
                              f"got {type(value).__name__}")
    out: dict[str, Any] = {}
    for key, v in value.items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as exc:
            raise CheckpointError(f"{config_path}: {name}[{key!r}] is not a valid regular expression ({exc})") from None
        try:
            number = convert(v)
            if isinstance(v, bool) or not math.isfinite(float(v)) or (convert is int and (number != float(v) or number <= 0)):
                raise ValueError
        except (TypeError, ValueError):
            kind = "a positive integer" if convert is int else "a finite number"
            raise CheckpointError(f"{config_path}: {name}[{key!r}] must be {kind}, got {v!r}") from None
        out[str(key)] = number
    return out


def read_settings(config_path: Path) -> tuple[LoraSettings, dict[str, Any]]:
    """Parse and vet adapter_config.json; returns the settings and the raw dict."""
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable adapter config ({exc.__class__.__name__})") from None
    return settings_from_config(raw, str(config_path)), raw


def settings_from_config(raw: Any, config_path: str) -> LoraSettings:
    """An adapter config (the JSON object) vetted as PEFT's LoraConfig types it; `config_path`
    names it in errors (a file, or a bank member)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: adapter config is not a JSON object")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {peft_type} is not supported (only LORA adapters)")
    for feature in _UNSUPPORTED_FEATURES:
        if raw.get(feature) not in (None, False, {}, [], ""):
            raise CheckpointError(f"{config_path}: adapter uses {feature!r}, which mlite cannot port")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise CheckpointError(
            f"{config_path}: init_lora_weights={init!r} modifies the base weights; save the adapter with "
            "path_initial_model_for_weight_conversion to convert it to plain LoRA first"
        )
    if "r" not in raw:
        raise CheckpointError(f"{config_path}: adapter config has no rank 'r'")
    r, alpha = raw["r"], raw.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    # PEFT's LoraConfig types: r an int, lora_alpha a number, the switches JSON booleans. A string
    # "false" is truthy in Python, and a NaN or infinite alpha would fill the output with NaN/inf.
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise CheckpointError(f"{config_path}: 'r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"{config_path}: 'lora_alpha' must be a finite number, got {alpha!r}")
    switches = {}
    for name in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        value = raw.get(name, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise CheckpointError(f"{config_path}: {name!r} must be true or false, got {value!r}")
        switches[name] = value
    mts = raw.get("modules_to_save") or ()
    settings = LoraSettings(
        r=r,
        alpha=float(alpha),
        use_rslora=switches["use_rslora"],
        fan_in_fan_out=switches["fan_in_fan_out"],
        rank_pattern=_pattern(config_path, raw, "rank_pattern", int),
        alpha_pattern=_pattern(config_path, raw, "alpha_pattern", float),
        use_dora=switches["use_dora"],
        bias=str(raw.get("bias", "none")),
        lora_bias=switches["lora_bias"],
        modules_to_save=tuple(mts) if isinstance(mts, (list, tuple)) else (str(mts),),
    )
    return settings


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors live and how to turn them into ΔW."""

    module: str
    a_key: str
    b_key: str
    rank: int
    scaling: float
    embedding: bool
    fan_in_fan_out: bool
    delta_shape: tuple[int, ...]  # shape of `<module>.weight` in the base
    bias_key: str | None = None  # lora_B.bias: Δb = s·bias
    magnitude_key: str | None = None  # DoRA magnitude vector

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.module}.bias"


class LoraAdapter:
    """A PEFT LoRA directory, indexed from headers; deltas are computed one module at a time."""

    def __init__(self, path: Path, settings: LoraSettings, raw_config: dict[str, Any], weights: Checkpoint,
                 modules: dict[str, LoraModule], saved: dict[str, str]) -> None:
        self.path = path
        self.settings = settings
        self.raw_config = raw_config
        self.weights = weights
        self.modules = modules  # base weight name -> module
        # peft's copy of a saved tied embedding for the head (`lm_head.weight`, not a module to
        # save): (its key, the embedding's name). Not a tensor of its own: the head is the embedding.
        self.head_copy = _tied_head_copy(raw_config, settings, saved)
        self.saved = saved  # base tensor name -> adapter key of a full trained tensor
        self.bias_modules = {m.bias_name: m for m in modules.values() if m.bias_key is not None}

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def label(self) -> str:
        return str(self.path)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.weights.info(key).shape

    def load(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.weights.load(key, device=device, dtype=torch.float32)

    @full_float32_matmul()
    def delta_weight(self, mod: LoraModule, device: torch.device | str = "cpu") -> torch.Tensor:
        """ΔW = s·B·A in float32, in the base weight's layout ((B·A)ᵀ for embeddings and Conv1D)."""
        a = self.load(mod.a_key, device)
        b = self.load(mod.b_key, device)
        delta = b @ a
        if mod.embedding or mod.fan_in_fan_out:
            delta = delta.T
        return (delta * mod.scaling).contiguous()

    def delta_bias(self, mod: LoraModule, device: torch.device | str = "cpu") -> torch.Tensor:
        """Δb = s·lora_B.bias (peft's merge scales the bias like the weight)."""
        assert mod.bias_key is not None
        return self.load(mod.bias_key, device) * mod.scaling

    def dora_weight(self, mod: LoraModule, old_weight: torch.Tensor) -> torch.Tensor:
        """W' = m / ‖W + ΔW‖ · (W + ΔW): the DoRA-merged weight on the base it was trained on.

        The norm runs over the input dimension per output feature (per row of [out, in]; per
        column of a Conv1D [in, out] weight), and for embeddings per embedding dimension over
        the vocabulary, as peft's DoRA merge computes it.
        """
        assert mod.magnitude_key is not None
        w = old_weight.float() + self.delta_weight(mod, old_weight.device)
        mag = self.load(mod.magnitude_key, old_weight.device).reshape(-1)
        if mod.embedding or mod.fan_in_fan_out:
            norm = torch.linalg.norm(w, dim=0)
            return w * (mag / norm).reshape(1, -1)
        norm = torch.linalg.norm(w, dim=1)
        return w * (mag / norm).reshape(-1, 1)

    def bytes_to_read(self) -> int:
        return self.weights.total_bytes


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a directory that looks like a PEFT adapter (it has adapter_config.json)."""
    p = Path(path).expanduser()
    return p.is_dir() and (_is_adapter_config(p) or (p / WEIGHTS_FILE).is_file())


def open_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Index a PEFT LoRA directory: config, key → module mapping, shapes. Reads no tensor data."""
    root = Path(path).expanduser()
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{root}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    settings, raw = read_settings(config_path)
    weights_path = root / WEIGHTS_FILE
    if not weights_path.is_file():
        if (root / "adapter_model.bin").is_file():
            raise CheckpointError(f"{root}: adapter weights are pickle (adapter_model.bin); convert to safetensors")
        raise CheckpointError(f"{root}: no {WEIGHTS_FILE}")
    weights = open_checkpoint(weights_path)
    modules, saved = _index_keys(weights, settings, weights_path)
    return LoraAdapter(root, settings, raw, weights, modules, saved)


def _index_keys(weights: Checkpoint, settings: LoraSettings, file: Path) -> tuple[dict[str, LoraModule], dict[str, str]]:
    parts: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    for key in weights.names():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{file}: key {key!r} does not start with {PREFIX!r}; not a PEFT LoRA adapter")
        k = key[len(PREFIX):]
        if m := _LORA_RE.match(k):
            role = f"{m['ab']}.{m['p']}"
            if role == "A.bias":
                raise CheckpointError(f"{file}: unexpected key {key!r} (lora_A has no bias)")
            parts.setdefault(m["m"], {})[role] = key
        elif m := _EMB_RE.match(k):
            parts.setdefault(m["m"], {})[f"E{m['ab']}"] = key
        elif m := _MAG_RE.match(k):
            parts.setdefault(m["m"], {})["mag"] = key
        elif m := _MTS_RE.match(k) or _BASE_LAYER_RE.match(k):
            _add_saved(saved, f"{m['m']}.{m['p']}", key, file)
        elif ".lora_" in k:
            raise CheckpointError(f"{file}: unsupported adapter key {key!r}")
        else:
            _add_saved(saved, k, key, file)
    modules: dict[str, LoraModule] = {}
    for name, p in parts.items():
        mod = _make_module(name, p, weights, settings, file)
        modules[mod.weight_name] = mod
    return modules, saved


def _tied_head_copy(raw: Mapping[str, Any], settings: LoraSettings, saved: dict[str, str]) -> tuple[str, str] | None:
    """Take peft's head copy of a saved tied embedding out of `saved`: with `ensure_weight_tying`,
    an embedding in `modules_to_save` gets an `lm_head.weight` key that peft loads into the
    head's copy, which shares the embedding's weight (what `write_adapter` and peft write). Read
    as a tensor of its own, it would untie the output and store the head twice."""
    head_module = TIED_HEAD.rsplit(".", 1)[0]
    if not raw.get("ensure_weight_tying") or TIED_HEAD not in saved or head_module in settings.modules_to_save:
        return None
    embedding = next((n for n in saved if n.endswith(".weight")
                      and n[: -len(".weight")].rsplit(".", 1)[-1] in EMBEDDING_MODULES), None)
    if embedding is None:
        return None
    return saved.pop(TIED_HEAD), embedding


def _add_saved(saved: dict[str, str], name: str, key: str, file: Path) -> None:
    if name in saved:
        raise CheckpointError(f"{file}: keys {saved[name]!r} and {key!r} both hold base tensor {name!r}")
    saved[name] = key


def _make_module(name: str, p: dict[str, str], weights: Checkpoint, settings: LoraSettings, file: Path) -> LoraModule:
    embedding = "EA" in p or "EB" in p
    a_key = p.get("EA" if embedding else "A.weight")
    b_key = p.get("EB" if embedding else "B.weight")
    if a_key is None or b_key is None:
        have = next(iter(p.values()))
        raise CheckpointError(f"{file}: {have!r} has no matching lora_{'A' if a_key is None else 'B'} factor")
    if embedding and ("A.weight" in p or "B.weight" in p):
        raise CheckpointError(f"{file}: module {name!r} has both embedding and linear LoRA factors")
    for key in (a_key, b_key):
        if not weights.info(key).is_float:
            raise CheckpointError(f"{file}: {key!r} is {weights.info(key).dtype}; LoRA factors are floating point")
    a_shape, b_shape = weights.info(a_key).shape, weights.info(b_key).shape
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise CheckpointError(
            f"{file}: {a_key!r} {list(a_shape)} and {b_key!r} {list(b_shape)} are not LoRA factors of one rank"
        )
    rank = a_shape[0]
    want = settings.rank_for(name)
    if rank != want:
        raise CheckpointError(f"{file}: {a_key!r} has rank {rank} but the adapter config gives r={want} for {name!r}")
    if embedding:
        delta_shape = (a_shape[1], b_shape[0])
    elif settings.fan_in_fan_out:
        delta_shape = (a_shape[1], b_shape[0])
    else:
        delta_shape = (b_shape[0], a_shape[1])
    bias_key = p.get("B.bias")
    if bias_key is not None and weights.info(bias_key).shape != (b_shape[0],):
        raise CheckpointError(f"{file}: {bias_key!r} has shape {list(weights.info(bias_key).shape)}, expected [{b_shape[0]}]")
    mag_key = p.get("mag")
    if mag_key is not None and not settings.use_dora:
        raise CheckpointError(f"{file}: {mag_key!r} is a DoRA magnitude but the config does not set use_dora")
    if settings.use_dora and mag_key is None:
        raise CheckpointError(f"{file}: use_dora is set but module {name!r} has no lora_magnitude_vector")
    return LoraModule(
        module=name,
        a_key=a_key,
        b_key=b_key,
        rank=rank,
        scaling=settings.scaling_for(name),
        embedding=embedding,
        fan_in_fan_out=settings.fan_in_fan_out and not embedding,
        delta_shape=delta_shape,
        bias_key=bias_key,
        magnitude_key=mag_key,
    )


# ---- writing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Factors:
    """One module's factors for a new adapter: ΔW ≈ B·A (scaling 1 is written into the config)."""

    module: str
    a: torch.Tensor  # [r, in]   (embeddings: [r, vocab])
    b: torch.Tensor  # [out, r]  (embeddings: [dim, r])
    embedding: bool = False
    fan_in_fan_out: bool = False  # a Conv1D layer: B·A is ΔWᵀ of the stored [in, out] weight

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def adapter_config(
    factors: Sequence[Factors],
    full_modules: Sequence[str],
    *,
    base_model_name_or_path: str | None,
    base: Checkpoint | None = None,
    lora_biases: bool = False,
) -> dict[str, Any]:
    """An adapter_config.json where every module has scaling 1 (α = r per module).

    The most common rank becomes `r`; other modules get exact-name `rank_pattern` and
    `alpha_pattern` entries (escaped, so peft's end-anchored regex matches only that module).
    From the base: `task_type` CAUSAL_LM for a causal LM (what AutoPeftModelForCausalLM needs),
    and `ensure_weight_tying` when the base ties its head to an embedding the adapter changes
    (peft then applies the change to the head too, as the merged model has it; releases before
    0.18 ignore the key with a warning). `lora_biases`: the adapter stores biases of adapted
    modules (`<m>.base_layer.bias`), which peft writes for `bias: lora_only`.
    """
    linear = {f.fan_in_fan_out for f in factors if not f.embedding}
    if len(linear) > 1:
        raise CheckpointError("an adapter cannot mix Conv1D ([in, out]) and Linear factors: PEFT's "
                              "fan_in_fan_out applies to every module")
    config = (base.config if base is not None else None) or {}
    architectures = config.get("architectures") or []
    causal = any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    tied = base.tied_head_source if base is not None else None
    touched = {f.module for f in factors} | set(full_modules)
    ranks = [f.rank for f in factors]
    common = max(set(ranks), key=lambda r: (ranks.count(r), -r)) if ranks else 1
    rank_pattern = {re.escape(f.module): f.rank for f in factors if f.rank != common}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(f.module for f in factors),
        "modules_to_save": sorted(full_modules) or None,
        "lora_dropout": 0.0,
        "bias": "lora_only" if lora_biases else "none",
        "fan_in_fan_out": linear == {True},
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        **({"ensure_weight_tying": True} if tied is not None and tied.rsplit(".", 1)[0] in touched else {}),
    }


def write_adapter(
    out_dir: str | os.PathLike,
    factors: Sequence[Factors],
    full_tensors: Mapping[str, torch.Tensor] | None = None,
    *,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
    base: Checkpoint | None = None,
) -> Path:
    """Write a PEFT LoRA adapter (config + safetensors), published atomically.

    `full_tensors` (base tensor name → value) are stored as `modules_to_save`: loading the
    adapter replaces those tensors with the stored values, which is how 1-D deltas (norms) or
    replaced tensors travel in a format that only knows low-rank updates. The bias of a
    LoRA-adapted module cannot go that way (a saved module replaces its LoRA): it is stored as
    `<m>.base_layer.bias`, as peft saves an adapter trained with `bias: lora_only`, and peft
    loads it over the base's bias. A saved embedding the base ties its head to is written a
    second time under the head's key, where peft's tying loads the head's copy from.
    """
    out = Path(out_dir).expanduser().absolute()
    check_output_dir(out, force)
    full_tensors = dict(full_tensors or {})
    lora_modules = {f.module for f in factors}
    tensors: dict[str, torch.Tensor] = {}
    for f in factors:
        if f.embedding:
            tensors[f"{PREFIX}{f.module}.lora_embedding_A"] = f.a
            tensors[f"{PREFIX}{f.module}.lora_embedding_B"] = f.b
        else:
            tensors[f"{PREFIX}{f.module}.lora_A.weight"] = f.a
            tensors[f"{PREFIX}{f.module}.lora_B.weight"] = f.b
    full_modules: set[str] = set()
    lora_biases = False
    for name, value in full_tensors.items():
        module, _, param = name.rpartition(".")
        if module in lora_modules:
            if param != "bias" or value.dim() != 1:
                raise CheckpointError(f"{name}: module {module!r} cannot be both LoRA-adapted and saved in full")
            tensors[f"{PREFIX}{module}.base_layer.bias"] = value
            lora_biases = True
            continue
        full_modules.add(module)
        tensors[f"{PREFIX}{name}"] = value
        if base is not None and name == base.tied_head_source and TIED_HEAD not in full_tensors:
            # peft (0.18+, ensure_weight_tying) gives the tied head a saved copy that shares the
            # embedding's and loads it from this key; it is not a module_to_save of its own
            tensors[f"{PREFIX}{TIED_HEAD}"] = value.clone()  # safetensors stores no shared tensors
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    config = adapter_config(factors, sorted(full_modules), base_model_name_or_path=base_model_name_or_path, base=base,
                            lora_biases=lora_biases)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = beside(out, "mlite-tmp")
    tmp.mkdir()
    try:
        write_file(tensors, tmp / WEIGHTS_FILE, {"format": "pt"}, target=out)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def copy_adapter(
    src: LoraAdapter,
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    config_updates: Mapping[str, Any] | None = None,
    force: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write `src`'s config (with updates) and the given key → tensor map, atomically."""
    out = Path(out_dir).expanduser().absolute()
    check_output_dir(out, force)
    config = dict(src.raw_config)
    config.update(config_updates or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = beside(out, "mlite-tmp")
    tmp.mkdir()
    try:
        write_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_FILE,
                   {"format": "pt"}, target=out)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish(tmp: Path, out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out}: output directory appeared meanwhile; not replaced")
    put_in_place(tmp, out)
