"""Truncated SVD (exact and randomized) and `mlite extract` adapters checked with peft."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import load_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit_lite.cli.main import app
from typer.testing import CliRunner

from mergekit_lite.io.checkpoint import open_checkpoint
from mergekit_lite.methods.lowrank import rank_for_energy, relative_error, truncated_svd

runner = CliRunner()


def test_golden_diagonal() -> None:
    """σ = (4, 2, 1): rank 1 keeps 16/21 of the energy, error √5/√21."""
    d = torch.diag(torch.tensor([4.0, 2.0, 1.0]))
    lr = truncated_svd(d, rank=1)
    assert lr.rank == 1 and lr.exact
    torch.testing.assert_close(lr.b @ lr.a, torch.diag(torch.tensor([4.0, 0.0, 0.0])))
    assert lr.rel_error == pytest.approx(math.sqrt(5 / 21), rel=1e-6)
    assert lr.energy == pytest.approx(16 / 21, rel=1e-6)
    assert truncated_svd(d, energy=0.9).rank == 2  # 16/21 = 0.76 < 0.9 <= 20/21
    assert truncated_svd(d, energy=1.0).rank == 3 and truncated_svd(d, energy=1.0).rel_error < 1e-6
    assert truncated_svd(d, rank=10).rank == 3
    assert rank_for_energy(torch.tensor([4.0, 2.0, 1.0]), 21.0, 16 / 21) == 1
    # No tolerance: energy 1 keeps a component holding 1e-8 of the energy, and a fraction a hair
    # under the target is not enough (both were decided by a 1e-6 slack).
    tiny = truncated_svd(torch.diag(torch.tensor([1.0, 1e-4])), energy=1.0)
    assert tiny.rank == 2 and tiny.rel_error < 1e-7
    s0 = math.sqrt(0.8999995)
    near = torch.diag(torch.tensor([s0, math.sqrt(1 - 0.8999995)]))
    assert truncated_svd(near, energy=0.9).rank == 2 and truncated_svd(near, energy=0.8999).rank == 1
    assert rank_for_energy(torch.tensor([3.0, 1.0]), None, 0.9) == 1 and rank_for_energy(torch.tensor([3.0, 1.0]), None, 0.91) == 2
    zero = truncated_svd(torch.zeros(3, 2), rank=2)
    assert zero.rank == 0 and zero.a.shape == (0, 2) and zero.b.shape == (3, 0)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 12), cols=st.integers(2, 12), k=st.integers(1, 12), seed=st.integers(0, 1000))
def test_error_is_eckart_young_tail(rows: int, cols: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(rows, cols, generator=g, dtype=torch.float64).float()
    lr = truncated_svd(d, rank=k)
    s = torch.linalg.svdvals(d.double())
    tail = math.sqrt(float((s[lr.rank:] ** 2).sum()) / float((s**2).sum()))
    assert lr.rel_error == pytest.approx(tail, abs=1e-5)
    assert lr.rel_error == pytest.approx(relative_error(d, lr.b, lr.a), abs=1e-9)


def test_randomized_is_seeded_and_accurate() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(300, 6, generator=g) @ torch.randn(6, 200, generator=g)
    d = low + 1e-3 * torch.randn(300, 200, generator=g)
    a = truncated_svd(d, rank=6, exact_max_dim=50, seed=7)
    b = truncated_svd(d, rank=6, exact_max_dim=50, seed=7)
    exact = truncated_svd(d, rank=6)
    assert not a.exact and exact.exact
    assert torch.equal(a.a, b.a) and torch.equal(a.b, b.b)
    assert a.rel_error == pytest.approx(exact.rel_error, rel=1e-3)
    e = truncated_svd(d, energy=0.999, exact_max_dim=50, seed=7)
    assert e.rank == truncated_svd(d, energy=0.999).rank == 6


pytest.importorskip("peft")
from test_adapters import peft_merged, save_llama  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("extract")
    return save_llama(root / "base", 1), save_llama(root / "ft", 2)


def _check_reproduces(base: Path, ft: Path, adapter: Path, report: dict) -> None:
    merged = peft_merged(base, adapter)
    b, f = open_checkpoint(base), open_checkpoint(ft)
    for t in report["tensors"]:
        want = f.load(t["name"]) - b.load(t["name"])
        got = merged[t["name"]] - b.load(t["name"])
        err = (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item()
        bound = t["rel_error"] if t["kind"] == "lora" else 0.0
        assert err <= bound * (1 + 1e-4) + 1e-5, (t["name"], err, bound)


def test_cli_extract_rank(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    out = tmp_path / "ad"
    res = runner.invoke(app, ["extract", "--model", str(ft), "--base", str(base), "--rank", "4", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    kinds = {t["kind"] for t in report["tensors"]}
    assert kinds == {"lora", "full"}
    assert all(t["rank"] == 4 for t in report["tensors"] if t["kind"] == "lora")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {}
    assert "model.embed_tokens" in cfg["target_modules"] and "model.norm" in cfg["modules_to_save"]
    _check_reproduces(base, ft, out, report)


def test_cli_extract_energy_rank_pattern(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    out = tmp_path / "ad"
    res = runner.invoke(app, ["extract", "--model", str(ft), "--base", str(base), "--energy", "0.6", "--out", str(out),
                              "--json", "--no-full-tensors"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    ranks = {t["rank"] for t in report["tensors"] if t["kind"] == "lora"}
    assert len(ranks) > 1
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"] and cfg["modules_to_save"] is None
    report["tensors"] = [t for t in report["tensors"] if t["kind"] == "lora"]
    _check_reproduces(base, ft, out, report)


def test_cli_extract_usage_errors(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    res = runner.invoke(app, ["extract", "--model", str(ft), "--base", str(base), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--rank" in res.output and not (tmp_path / "x").exists()
    other = save_llama(tmp_path / "wide", 3, hidden_size=32)
    res = runner.invoke(app, ["extract", "--model", str(other), "--base", str(base), "--rank", "2", "--out", str(tmp_path / "x")])
    assert res.exit_code == 4 and not (tmp_path / "x").exists()


def test_extract_reports_the_error_of_the_factors_as_written(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """With --dtype bfloat16 the reported error is that of the bf16 factors PEFT will load."""
    base, ft = pair
    out = tmp_path / "ad"
    res = runner.invoke(app, ["extract", "--model", str(ft), "--base", str(base), "--rank", "16", "--dtype", "bfloat16",
                              "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert all(t["rel_error"] > 1e-4 for t in report["tensors"])  # bf16 rounding, not float32's ~1e-7
    report["tensors"] = [t for t in report["tensors"] if t["kind"] == "lora"]
    _check_reproduces(base, ft, out, report)


def test_extract_refuses_what_it_cannot_write(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from mergekit_lite import api
    from mergekit_lite.errors import CheckpointError, UsageError

    base, ft = pair
    res = runner.invoke(app, ["extract", "--model", str(base), "--base", str(base), "--rank", "2", "--out", str(tmp_path / "x")])
    assert res.exit_code == 4 and "no weight matrix differs" in res.output and not (tmp_path / "x").exists()
    res = runner.invoke(app, ["extract", "--model", str(ft), "--base", str(base), "--rank", "2", "--device", "tpu",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown device 'tpu'" in res.output
    for kwargs in ({"rank": "4"}, {"rank": 2.5}, {"rank": True}, {"energy": "0.9"}):
        with pytest.raises(UsageError):
            api.extract(ft, base, **kwargs)
    with pytest.raises(CheckpointError):
        api.extract(base, base, rank=2, out=tmp_path / "y")


def test_extract_refuses_a_fine_tune_missing_a_tensor(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base, ft = pair
    part = tmp_path / "part"
    part.mkdir()
    tensors = {}
    for f in ft.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    del tensors["model.norm.weight"]
    save_file(tensors, str(part / "model.safetensors"))
    res = runner.invoke(app, ["extract", "--model", str(part), "--base", str(base), "--rank", "2", "--out", str(tmp_path / "x")])
    assert res.exit_code == 4 and "tensor 'model.norm.weight' of the base is missing" in res.output, res.output


def _perturbed(model: object, seed: int) -> object:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _unmerged_logits(base_dir: Path, adapter: Path, auto_class: type) -> torch.Tensor:
    """What peft computes with the adapter on top (not merged), for a fixed input."""
    import peft

    model = peft.PeftModel.from_pretrained(auto_class.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        return model(torch.arange(12).reshape(1, 12)).logits


def test_extract_carries_the_biases_of_lora_adapted_modules(tmp_path: Path) -> None:
    """Qwen2's q/k/v projections have biases: a fine-tune that changes them kept only its LoRA,
    the bias changes were reported `skipped`, and peft's logits missed them. They are now written
    as `<m>.base_layer.bias` (what peft saves for `bias: lora_only`): peft and mlite both load
    the fine-tune back."""
    import transformers
    from safetensors.torch import load_file

    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = _perturbed(transformers.Qwen2ForCausalLM(cfg), 1)
    model.save_pretrained(tmp_path / "base")
    ft = _perturbed(model, 2)  # every weight and bias moves, but one weight: its bias goes with its module
    frozen = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "base").model.layers[0].self_attn.k_proj
    with torch.no_grad():
        ft.model.layers[0].self_attn.k_proj.weight.copy_(frozen.weight)
    ft.save_pretrained(tmp_path / "ft")
    res = runner.invoke(app, ["extract", "--model", str(tmp_path / "ft"), "--base", str(tmp_path / "base"),
                              "--rank", "16", "--out", str(tmp_path / "ad"), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)["tensors"]}
    q_bias = "model.layers.0.self_attn.q_proj.bias"
    assert rows[q_bias]["kind"] == "full" and "base_layer.bias" in rows[q_bias]["note"]
    k_bias = "model.layers.0.self_attn.k_proj.bias"
    assert rows[k_bias]["kind"] == "full" and rows[k_bias]["note"] == ""
    assert [n for n, r in rows.items() if r["kind"] == "skipped"] == ["model.layers.0.self_attn.k_proj.weight"]
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only" and "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert "model.layers.0.self_attn.k_proj" in config["modules_to_save"]
    stored = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert {f"base_model.model.{k_bias}", f"base_model.model.{k_bias[:-4]}weight"} <= stored.keys()
    want_bias = load_file(next((tmp_path / "ft").glob("*.safetensors")))[q_bias]
    assert torch.equal(stored[f"base_model.model.{q_bias.replace('.bias', '.base_layer.bias')}"], want_bias)
    got = _unmerged_logits(tmp_path / "base", tmp_path / "ad", transformers.AutoModelForCausalLM)
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()(
            torch.arange(12).reshape(1, 12)).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # mlite reads it back the same way: patching the base gives the fine-tune's biases
    res = runner.invoke(app, ["patch", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "ad"),
                              "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    back = load_dir(tmp_path / "back")
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.1.self_attn.{name}.bias"
        torch.testing.assert_close(back[key], ft.state_dict()[key], rtol=0, atol=1e-6)


def test_extract_of_gpt2_conv1d_loads_in_peft(tmp_path: Path) -> None:
    """GPT-2's Conv1D weights are [in, out]: factored as ΔWᵀ with fan_in_fan_out (and wpe as an
    embedding); they were factored as [out, in] and peft refused the shapes. The LayerNorms go
    whole with their unchanged biases (peft's modules_to_save loads every parameter). (The
    fine-tune keeps the base's token embedding: peft 0.21 does not tie GPT-2's head to an
    adapted wte unless merged; see docs/adapters.md.)"""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                  tie_word_embeddings=False)  # an untied head is a Linear: it goes whole
    model = _perturbed(transformers.GPT2LMHeadModel(cfg), 1)
    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "wte" not in name:  # weights and biases (a Conv1D layer's bias goes beside its LoRA)
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ft")
    res = runner.invoke(app, ["extract", "--model", str(tmp_path / "ft"), "--base", str(tmp_path / "base"),
                              "--rank", "16", "--out", str(tmp_path / "ad")])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    assert "lm_head" in config["modules_to_save"] and "lm_head" not in config["target_modules"]
    got = _unmerged_logits(tmp_path / "base", tmp_path / "ad", transformers.AutoModelForCausalLM)
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()(
            torch.arange(12).reshape(1, 12)).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_extract_with_tied_embeddings_ties_the_head_in_peft(tmp_path: Path) -> None:
    """A tied base's embedding delta reaches the head in peft too (ensure_weight_tying), as in
    the fine-tune; without it peft left the head at the base's embedding (logits off by 0.2).

    Merged too: written as a LoRA, peft 0.21 shares its factors with the head and
    merge_and_unload() adds the delta twice to the one tied weight (2·Δ: logits 2.8 from the
    fine-tune). The embedding is now saved whole, with the head's copy peft loads."""
    import peft
    import transformers
    from safetensors.torch import load_file

    for seed, name in ((1, "base"), (2, "ft")):
        save_llama(tmp_path / name, seed, tie_word_embeddings=True)
    res = runner.invoke(app, ["extract", "--model", str(tmp_path / "ft"), "--base", str(tmp_path / "base"),
                              "--rank", "16", "--out", str(tmp_path / "ad")])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and "model.embed_tokens" in config["modules_to_save"]
    assert "model.embed_tokens" not in config["target_modules"]
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    emb = saved["base_model.model.model.embed_tokens.weight"]
    assert torch.equal(saved["base_model.model.lm_head.weight"], emb)
    # base + (ft − base): the fine-tune's embedding to float32 rounding
    torch.testing.assert_close(emb, open_checkpoint(tmp_path / "ft").load("model.embed_tokens.weight"),
                               rtol=0, atol=1e-7)
    x = torch.arange(12).reshape(1, 12)
    got = _unmerged_logits(tmp_path / "base", tmp_path / "ad", transformers.AutoModelForCausalLM)
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()(x).logits
        merged = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "ad").merge_and_unload()
        merged_logits = merged.eval()(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_logits, want, rtol=1e-4, atol=1e-4)
    # mlite reads it back: the tied embedding patched once
    res = runner.invoke(app, ["patch", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "ad"),
                              "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        patched = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()(x).logits
    torch.testing.assert_close(patched, want, rtol=1e-4, atol=1e-4)
    # The head's key is peft's copy of the tied embedding, not a tensor of its own: patch
    # --as-adapter refused the adapter ("the base does not have lm_head.weight"), and a patched
    # model stored the head again and came out untied.
    base, ad = str(tmp_path / "base"), str(tmp_path / "ad")
    res = runner.invoke(app, ["patch", "--base", base, "--delta", ad, "--old-base", base, "--as-adapter",
                              "--out", str(tmp_path / "ad2")])
    assert res.exit_code == 0, res.output
    ported = load_file(str(tmp_path / "ad2" / "adapter_model.safetensors"))
    assert torch.equal(ported["base_model.model.lm_head.weight"], ported["base_model.model.model.embed_tokens.weight"])
    with torch.no_grad():
        merged = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "ad2").merge_and_unload()
        torch.testing.assert_close(merged.eval()(x).logits, want, rtol=1e-4, atol=1e-4)
    res = runner.invoke(app, ["patch", "--base", base, "--delta", ad, "--old-base", base, "--out", str(tmp_path / "p2")])
    assert res.exit_code == 0, res.output
    assert "lm_head.weight" not in load_dir(tmp_path / "p2")
    assert json.loads((tmp_path / "p2" / "config.json").read_text())["tie_word_embeddings"] is True


def test_extract_refuses_a_tensor_whose_dtype_kind_differs(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """An integer tensor where the base has a float one has no delta; it was dropped silently."""
    from safetensors.torch import save_file

    base, ft = pair
    state = {n: open_checkpoint(ft).load(n) for n in open_checkpoint(ft).names()}
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, str(bad / "model.safetensors"))
    res = runner.invoke(app, ["extract", "--model", str(bad), "--base", str(base), "--rank", "2",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 4 and "'model.norm.weight' is I32 but F32 in" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_report_norms_by_row_blocks_equal_the_whole_float64_ones(monkeypatch):
    """‖Δ‖ and ‖Δ − B·A‖/‖Δ‖ were computed on float64 copies of whole tensors (2 GB apiece for a
    262144×1024 embedding); by blocks of rows they are the same numbers to float64 rounding."""
    from mergekit_lite.methods import lowrank

    g = torch.Generator().manual_seed(0)
    d = torch.randn(37, 11, generator=g)
    b, a = torch.randn(37, 3, generator=g), torch.randn(3, 11, generator=g)
    want_norm = float(torch.linalg.norm(d.double()))
    want_rel = float(torch.linalg.norm(d.double() - b.double() @ a.double())) / want_norm
    for chunk in (1, 11, 50, 1 << 20):  # a row, one row exactly, a few rows, all
        monkeypatch.setattr(lowrank, "_CHUNK", chunk)
        assert lowrank.norm64(d) == pytest.approx(want_norm, rel=1e-14)
        assert lowrank.relative_error(d, b, a) == pytest.approx(want_rel, rel=1e-13)
    assert lowrank.norm64(torch.tensor([3.0, 4.0])) == 5.0 and lowrank.norm64(torch.tensor(-2.0)) == 2.0
    assert lowrank.relative_error(torch.zeros(2, 2), torch.zeros(2, 1), torch.zeros(1, 2)) == 0.0


# ---- a rank budget shared across modules ----------------------------------------------------


def test_allocate_ranks_golden() -> None:
    """Two modules: A (cost 10) with σ = 4, 1; B (cost 5) with σ = 3, 2, 0.5. Ratios σ²/cost:
    A 1.6, 0.1; B 1.8, 0.8, 0.05. Budget 20: B₁ (5), A₁ (10), B₂ (5) = 20; nothing else fits."""
    from mergekit_lite.methods.lowrank import allocate_ranks

    spectra = {"A": torch.tensor([4.0, 1.0]), "B": torch.tensor([3.0, 2.0, 0.5])}
    assert allocate_ranks(spectra, {"A": 10, "B": 5}, 20) == {"A": 1, "B": 2}
    assert allocate_ranks(spectra, {"A": 10, "B": 5}, 14) == {"A": 0, "B": 2}  # A₁ no longer fits: B₂ does
    assert allocate_ranks(spectra, {"A": 10, "B": 5}, 1000) == {"A": 2, "B": 3}
    assert allocate_ranks(spectra, {"A": 10, "B": 5}, 4) == {"A": 0, "B": 0}


def test_allocate_ranks_falls_back_to_the_baseline_where_greedy_loses() -> None:
    """Ten cheap terms whose ratio just beats A's first take the budget A's one big term needs:
    greedy keeps about 10.25 of the energy, rank 1 everywhere about 11.03; the baseline is returned."""
    from mergekit_lite.methods.lowrank import allocate_ranks

    spectra = {"A": torch.tensor([10.0]).sqrt(), "B": torch.tensor([1.02] + [1.03 - 0.001 * i for i in range(1, 10)]).sqrt()}
    spectra["B"] = spectra["B"].sort(descending=True).values
    costs = {"A": 10, "B": 1}
    assert allocate_ranks(spectra, costs, 11) == {"A": 0, "B": 10}
    assert allocate_ranks(spectra, costs, 11, baseline={"A": 1, "B": 1}) == {"A": 1, "B": 1}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.floats(0.01, 10), min_size=1, max_size=6), min_size=1, max_size=5),
       st.lists(st.integers(1, 9), min_size=5, max_size=5), st.integers(0, 80))
def test_allocate_ranks_fits_the_budget_and_takes_the_best_terms(sigmas: list[list[float]], costs: list[int],
                                                                 budget: int) -> None:
    from mergekit_lite.methods.lowrank import allocate_ranks

    spectra = {f"m{i}": torch.tensor(sorted(s, reverse=True)) for i, s in enumerate(sigmas)}
    cost = {f"m{i}": costs[i] for i in range(len(sigmas))}
    ranks = allocate_ranks(spectra, cost, budget)
    assert sum(r * cost[m] for m, r in ranks.items()) <= budget
    # with the same rank everywhere as the baseline (when it fits), never less energy than it
    uniform = {m: min(1, len(s)) for m, s in spectra.items()}
    if sum(uniform[m] * cost[m] for m in spectra) <= budget:
        best = allocate_ranks(spectra, cost, budget, baseline=uniform)

        def kept(alloc: dict[str, int]) -> float:
            return sum(float((s[: alloc[m]].double() ** 2).sum()) for m, s in spectra.items())
        assert kept(best) >= kept(uniform) - 1e-12
    assert all(0 <= ranks[m] <= len(s) for m, s in spectra.items())
    # greedy: a module's next term was passed over only because it did not fit the budget left
    # when its turn came (what is left now, plus what the terms of a lower ratio took after it)
    left = budget - sum(r * cost[m] for m, r in ranks.items())
    taken = [(float(s[i]) ** 2 / cost[m], cost[m]) for m, s in spectra.items() for i in range(ranks[m])]
    for m, s in spectra.items():
        if ranks[m] < len(s):
            ratio = float(s[ranks[m]]) ** 2 / cost[m]
            after = sum(c for r, c in taken if r < ratio * (1 - 1e-9))
            assert cost[m] > left + after, (m, ratio, left, after)


def test_cli_extract_budget_rank_spends_the_budget_where_the_delta_is(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The adapter has at most the parameters of rank 2 everywhere, its ranks differ by module,
    it keeps at least as much of ‖Δ‖² as rank 2 everywhere, and peft reproduces it."""
    base, ft = pair
    runs = {}
    for flag, value in (("--budget-rank", "2"), ("--rank", "2")):
        out = tmp_path / flag.strip("-")
        res = runner.invoke(app, ["extract", "--model", str(ft), "--base", str(base), flag, value, "--out", str(out),
                                  "--json", "--no-full-tensors"])
        assert res.exit_code == 0, res.output
        runs[flag] = (out, json.loads(res.stdout))
    out, report = runs["--budget-rank"]
    loras = [t for t in report["tensors"] if t["kind"] == "lora"]
    params = sum(t["rank"] * (t["shape"][0] + t["shape"][1]) for t in loras)
    budget = sum(2 * (t["shape"][0] + t["shape"][1]) for t in runs["--rank"][1]["tensors"] if t["kind"] == "lora")
    assert 0 < params <= budget and len({t["rank"] for t in loras}) > 1

    def lost(rep: dict) -> float:  # Σ ‖Δ − B·A‖² over the factored and the left-out modules
        return sum((t["rel_error"] * t["delta_norm"]) ** 2 for t in rep["tensors"]
                   if t["kind"] == "lora" or t["note"].startswith("rank 0"))
    assert lost(report) <= lost(runs["--rank"][1]) * (1 + 1e-6)
    _check_reproduces(base, ft, out, {"tensors": loras})


def test_budget_rank_is_exclusive_with_rank_and_energy(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    res = runner.invoke(app, ["extract", "--model", str(ft), "--base", str(base), "--rank", "2", "--budget-rank", "2",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "give exactly one of --rank, --energy or --budget-rank" in res.output
