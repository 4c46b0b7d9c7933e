"""PEFT LoRA adapters read as dense deltas, checked against peft's own merge_and_unload.

Tiny Llama models are built with transformers and adapters with peft (dev extra). LoRA B is
initialised to zero by peft, so every adapter parameter is set to seeded random values before
saving. The reference for each variant is `PeftModel.from_pretrained(new_base, adapter)
.merge_and_unload().state_dict()`; ours is new_base + Δ (or the saved tensor) from LoraDelta.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from mergekit_lite.errors import CheckpointError
from mergekit_lite.io.adapters import (
    Factors,
    LoraSettings,
    open_adapter,
    pattern_key,
    read_settings,
    write_adapter,
)
from mergekit_lite.io.checkpoint import open_checkpoint
from mergekit_lite.io.deltas import FullDelta, LoraDelta, Patch, open_delta

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


# ---- fixtures shared with test_patch.py / test_extract.py ----------------------------------
def tiny_config(**kw: Any) -> Any:
    args = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    args.update(kw)
    return transformers.LlamaConfig(**args)


def save_llama(path: Path, seed: int, dtype: torch.dtype = torch.float32, **cfg: Any) -> Path:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_config(**cfg)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # norms start at exactly 1: perturb so every tensor is distinct
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def load_llama(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype)


def save_lora(old_base: Path, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **lora: Any) -> Path:
    """A trained-looking PEFT adapter: every adapter (and modules_to_save) parameter randomised."""
    model = load_llama(old_base, dtype)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g).to(p.dtype)
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * noise)
                elif "lora_" in name:
                    p.copy_(0.2 * noise)
                else:
                    p.add_(0.05 * noise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(path)
    return path


def peft_merged(new_base: Path, adapter: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(load_llama(new_base, dtype), adapter)
        merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def apply_delta(base_dir: Path, delta: Any, lam: float = 1.0, *, allow_vocab_growth: bool = False) -> dict[str, torch.Tensor]:
    """Reference application of a delta source: θ = base + λΔ (or the replaced tensor + λ·on_top), cast once."""
    base = open_checkpoint(base_dir)
    shapes = {n: base.info(n).shape for n in base.names()}
    problems = delta.check(shapes, allow_vocab_growth=allow_vocab_growth)
    if problems:
        raise CheckpointError(problems[0], problems=problems)
    out = {}
    for name in base.names():
        w = base.load(name)
        p: Patch | None = delta.patch(name, shapes[name], "cpu")
        if p is None:
            out[name] = w
        elif p.kind == "replace":  # the saved tensor, plus λ times any LoRA delta on top of it
            out[name] = (p.tensor if p.on_top is None else p.tensor + lam * p.on_top).to(w.dtype)
        else:
            out[name] = (w.float() + lam * p.tensor).to(w.dtype)
    return out


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    _, exp = torch.frexp(x.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp - 8)


def assert_state_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(ref)
    for name, want in ref.items():
        got = ours[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.dtype == torch.bfloat16:
            # peft adds the delta in bf16; we add in fp32 and round once: at most one bf16 ulp apart.
            assert ((got.float() - want.float()).abs() <= torch.maximum(bf16_ulp(got), bf16_ulp(want))).all(), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bases")
    return save_llama(root / "old", 1), save_llama(root / "new", 2)


VARIANTS: dict[str, dict[str, Any]] = {
    "plain": dict(target_modules=["q_proj", "v_proj"]),
    "rslora": dict(target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True, r=8, lora_alpha=4),
    "patterns": dict(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"layers.1.self_attn.v_proj": 2, "up_proj": 6},
                     alpha_pattern={r"model\.layers\.0\.self_attn\.q_proj": 3.0}),
    "embedding": dict(target_modules=["embed_tokens", "q_proj"]),
    "mts": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "lora_bias": dict(target_modules=["o_proj"], lora_bias=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_peft_merge(variant: str, bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    kw = dict(VARIANTS[variant])
    if variant == "lora_bias":  # needs a base with biases
        old, new = save_llama(tmp_path / "old", 1, attention_bias=True), save_llama(tmp_path / "new", 2, attention_bias=True)
    adapter = save_lora(old, tmp_path / "lora", seed=3, **kw)
    ours = apply_delta(new, open_delta(adapter))
    assert_state_close(ours, peft_merged(new, adapter))


@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_bias_modes_match_peft(mode: str, tmp_path: Path) -> None:
    old, new = save_llama(tmp_path / "old", 1, attention_bias=True), save_llama(tmp_path / "new", 2, attention_bias=True)
    adapter = save_lora(old, tmp_path / "lora", seed=4, target_modules=["q_proj"], bias=mode)
    delta = open_delta(adapter)
    touched = set(delta.targets())
    assert "model.layers.0.self_attn.q_proj.bias" in touched
    assert ("model.layers.0.self_attn.k_proj.bias" in touched) == (mode == "all")
    assert_state_close(apply_delta(new, delta), peft_merged(new, adapter))


def test_bf16_within_one_ulp(tmp_path: Path) -> None:
    old = save_llama(tmp_path / "old", 1, dtype=torch.bfloat16)
    new = save_llama(tmp_path / "new", 2, dtype=torch.bfloat16)
    adapter = save_lora(old, tmp_path / "lora", seed=5, dtype=torch.bfloat16, target_modules=["q_proj", "gate_proj"])
    assert_state_close(apply_delta(new, open_delta(adapter)), peft_merged(new, adapter, torch.bfloat16))


def test_delta_is_scaled_product_golden(tmp_path: Path) -> None:
    """Hand-checkable: A = [[1, 2]], B = [[1], [3]], α = 4, r = 1 → ΔW = 4·[[1, 2], [3, 6]]."""
    from safetensors.torch import save_file

    d = tmp_path / "hand"
    d.mkdir()
    save_file({"base_model.model.lin.lora_A.weight": torch.tensor([[1.0, 2.0]]),
               "base_model.model.lin.lora_B.weight": torch.tensor([[1.0], [3.0]])}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 4}))
    p = open_delta(d).patch("lin.weight", (2, 2), "cpu")
    assert p is not None and p.kind == "add"
    assert torch.equal(p.tensor, torch.tensor([[4.0, 8.0], [12.0, 24.0]]))
    assert open_delta(d).patch("other.weight", (2, 2), "cpu") is None
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 4, "use_rslora": True,
                                                       "fan_in_fan_out": True}))
    p = open_delta(d).patch("lin.weight", (2, 2), "cpu")
    assert p is not None and torch.equal(p.tensor, torch.tensor([[4.0, 12.0], [8.0, 24.0]]))


def test_pattern_key_matches_end_at_dot_boundary() -> None:
    assert pattern_key(["q_proj"], "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(["proj"], "model.layers.0.self_attn.q_proj") is None
    assert pattern_key(["layers.1.self_attn.v_proj"], "model.layers.11.self_attn.v_proj") is None
    assert pattern_key(["a", "q_proj"], "x.q_proj") == "q_proj"
    s = LoraSettings(r=8, alpha=16, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 1.0})
    assert s.scaling_for("m.v_proj") == 0.5 and s.scaling_for("m.q_proj") == 2.0


def test_dora_refused_without_old_base_then_ported(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    adapter = save_lora(old, tmp_path / "dora", seed=6, target_modules=["q_proj", "down_proj"], use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        open_delta(adapter)
    delta = open_delta(adapter, old_base=open_checkpoint(old))
    # Ported onto the OLD base, the dense DoRA delta reproduces peft's DoRA merge exactly.
    assert_state_close(apply_delta(old, delta), peft_merged(old, adapter))
    ported = apply_delta(new, delta)
    new_state = open_checkpoint(new)
    name = "model.layers.0.self_attn.q_proj.weight"
    want = new_state.load(name) + peft_merged(old, adapter)[name] - open_checkpoint(old).load(name)
    torch.testing.assert_close(ported[name], want, rtol=1e-5, atol=1e-6)


def test_modules_to_save_ported_as_delta_with_old_base(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    adapter = save_lora(old, tmp_path / "mts", seed=7, target_modules=["q_proj"], modules_to_save=["lm_head"])
    delta = open_delta(adapter, old_base=open_checkpoint(old))
    p = delta.patch("lm_head.weight", (64, 16), "cpu")
    assert p is not None and p.kind == "add"
    saved = open_adapter(adapter).load("base_model.model.lm_head.weight")
    torch.testing.assert_close(p.tensor, saved - open_checkpoint(old).load("lm_head.weight"))


def test_vocab_growth_needs_flag_and_patches_old_rows(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, _ = bases
    new = save_llama(tmp_path / "new96", 2, vocab_size=96)
    adapter = save_lora(old, tmp_path / "emb", seed=8, target_modules=["embed_tokens", "q_proj"])
    base = open_checkpoint(new)
    shapes = {n: base.info(n).shape for n in base.names()}
    delta = open_delta(adapter, old_base=open_checkpoint(old))
    problems = delta.check(shapes)
    assert len(problems) == 1 and "allow-vocab-growth" in problems[0] and "embed_tokens" in problems[0]
    assert delta.check(shapes, allow_vocab_growth=True) == []
    p = delta.patch("model.embed_tokens.weight", (96, 16), "cpu")
    assert p is not None and p.tensor.shape == (96, 16)
    assert torch.count_nonzero(p.tensor[64:]) == 0 and torch.count_nonzero(p.tensor[:64]) > 0
    # Without the old base the saved embedding would replace the grown one: refused.
    assert any("--old-base" in x for x in open_delta(adapter).check(shapes, allow_vocab_growth=True))


def test_errors_name_file_and_tensor(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, _ = bases
    adapter = save_lora(old, tmp_path / "a", seed=9, target_modules=["q_proj"])
    other = save_llama(tmp_path / "wide", 3, hidden_size=32)
    base = open_checkpoint(other)
    problems = open_delta(adapter).check({n: base.info(n).shape for n in base.names()})
    assert problems and all("adapter_model.safetensors" in p and "q_proj" in p for p in problems)
    problems = open_delta(adapter).check({"model.norm.weight": (16,)})
    assert problems and "does not have" in problems[0]
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        open_delta(adapter)


def test_rank_mismatch_with_config_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "bad"
    d.mkdir()
    save_file({"base_model.model.lin.lora_A.weight": torch.ones(2, 3),
               "base_model.model.lin.lora_B.weight": torch.ones(4, 2)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    with pytest.raises(CheckpointError, match="rank 2"):
        open_delta(d)
    save_file({"base_model.model.lin.lora_A.weight": torch.ones(2, 3, dtype=torch.int32),
               "base_model.model.lin.lora_B.weight": torch.ones(4, 2)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    with pytest.raises(CheckpointError, match="lora_A.weight' is I32; LoRA factors are floating point"):
        open_delta(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="IA3"):
        open_delta(d)


@pytest.mark.parametrize("field, value, needle", [
    ("rank_pattern", ["q_proj"], "'rank_pattern' must be a mapping"),
    ("rank_pattern", {"q_proj": 2.5}, "rank_pattern['q_proj'] must be a positive integer"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern['q_proj'] must be a positive integer"),
    ("alpha_pattern", {"q_proj": "big"}, "alpha_pattern['q_proj'] must be a finite number"),
    ("alpha_pattern", {"q_proj(": 4}, "alpha_pattern['q_proj('] is not a valid regular expression"),
    # PEFT's LoraConfig types: a NaN/inf alpha filled the output with NaN/inf, the string "false"
    # switched rsLoRA on (2x the delta), r 4.7 became 4, alpha true became 1.
    ("lora_alpha", float("nan"), "'lora_alpha' must be a finite number, got nan"),
    ("lora_alpha", float("inf"), "'lora_alpha' must be a finite number, got inf"),
    ("lora_alpha", "inf", "'lora_alpha' must be a finite number, got 'inf'"),
    ("lora_alpha", True, "'lora_alpha' must be a finite number, got True"),
    ("r", 4.7, "'r' must be a positive integer, got 4.7"),
    ("r", "4", "'r' must be a positive integer, got '4'"),
    ("use_rslora", "false", "'use_rslora' must be true or false, got 'false'"),
    ("fan_in_fan_out", 0, "'fan_in_fan_out' must be true or false, got 0"),
])
def test_bad_patterns_are_one_line_errors(field: str, value: Any, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, field: value}))  # NaN → JSON NaN
    with pytest.raises(CheckpointError) as e:
        read_settings(path)
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value) and "\n" not in str(e.value)


def test_missing_lora_alpha_is_peft_default(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    settings, _ = read_settings(path)
    assert settings.alpha == peft.LoraConfig().lora_alpha == 8 and settings.scaling_for("q_proj") == 2.0


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b'{"peft_type": "LORA", "r": 4, "x": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match="unreadable adapter config"):
        read_settings(path)


def test_full_delta(bases: tuple[Path, Path]) -> None:
    old, new = bases
    delta = open_delta(new, old_base=open_checkpoint(old))
    assert isinstance(delta, FullDelta)
    base = open_checkpoint(old)
    out = apply_delta(old, delta)
    for name in base.names():  # old + (new − old) = new, to fp32 rounding
        torch.testing.assert_close(out[name], open_checkpoint(new).load(name), rtol=1e-6, atol=1e-6)
    assert delta.bytes_to_read() == 2 * base.total_bytes


def test_written_adapter_loads_in_peft(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, _ = bases
    g = torch.Generator().manual_seed(0)
    factors = [
        Factors("model.layers.0.self_attn.q_proj", torch.randn(3, 16, generator=g), torch.randn(16, 3, generator=g)),
        Factors("model.layers.1.self_attn.q_proj", torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g)),
        Factors("model.layers.1.mlp.up_proj", torch.randn(2, 16, generator=g), torch.randn(32, 2, generator=g)),
        Factors("model.embed_tokens", torch.randn(2, 64, generator=g), torch.randn(16, 2, generator=g), embedding=True),
    ]
    norm = torch.randn(16, generator=g)
    out = write_adapter(tmp_path / "w", factors, {"model.layers.0.input_layernorm.weight": norm})
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 3}
    merged = peft_merged(old, out)
    base = open_checkpoint(old)
    for f in factors:
        want = (f.b @ f.a).T if f.embedding else f.b @ f.a
        torch.testing.assert_close(merged[f"{f.module}.weight"] - base.load(f"{f.module}.weight"), want,
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged["model.layers.0.input_layernorm.weight"], norm)
    assert isinstance(open_delta(out), LoraDelta)
