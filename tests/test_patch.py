"""`mlite patch` end to end: the engine's portllm step against peft's merge_and_unload."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_dir
from mergekit_lite.cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_lite import api
from mergekit_lite.errors import UsageError
from mergekit_lite.io.checkpoint import open_checkpoint
from mergekit_lite.methods.portllm import port

pytest.importorskip("peft")
from test_adapters import assert_state_close, peft_merged, save_llama, save_lora  # noqa: E402

runner = CliRunner()


def read_model(path: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(path)
    return {n: ck.load(n) for n in ck.names()}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pbases")
    return save_llama(root / "old", 1), save_llama(root / "new", 2)


def test_port_golden() -> None:
    base = torch.tensor([1.0, 2.0])
    assert torch.equal(port(base, torch.tensor([0.5, -1.0]), 2.0), torch.tensor([2.0, 0.0]))
    assert port(base, None, 3.0) is base


@pytest.mark.parametrize("variant", ["plain", "rslora_patterns_mts", "embedding"])
def test_cli_patch_matches_peft(variant: str, bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    kw = {
        "plain": dict(target_modules=["q_proj", "v_proj"]),
        "rslora_patterns_mts": dict(target_modules=["q_proj", "up_proj"], use_rslora=True, r=8, lora_alpha=4,
                                    rank_pattern={"up_proj": 2}, modules_to_save=["lm_head"]),
        "embedding": dict(target_modules=["embed_tokens", "o_proj"]),
    }[variant]
    adapter = save_lora(old, tmp_path / "lora", seed=11, **kw)
    out = tmp_path / "out"
    res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(adapter), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["patched"] == len(report["tensors"]) > 0
    assert_state_close(read_model(out), peft_merged(new, adapter))
    assert (out / "config.json").is_file() and (out / "mlite_patch_report.json").is_file()


def test_bf16_patch_within_one_ulp(tmp_path: Path) -> None:
    old = save_llama(tmp_path / "old", 1, dtype=torch.bfloat16)
    new = save_llama(tmp_path / "new", 2, dtype=torch.bfloat16)
    adapter = save_lora(old, tmp_path / "lora", seed=12, dtype=torch.bfloat16, target_modules=["q_proj", "down_proj"])
    res = api.patch(new, adapter, out=tmp_path / "out")
    assert_state_close(read_model(res.output), peft_merged(new, adapter, torch.bfloat16))


def test_lambda_old_base_report_and_in_memory(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    adapter = save_lora(old, tmp_path / "lora", seed=13, target_modules=["q_proj"], modules_to_save=["lm_head"])
    res = api.patch(new, adapter, old_base=old, lam=0.5)
    assert res.state_dict is not None and res.output is None
    o, n = open_checkpoint(old), open_checkpoint(new)
    saved = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    want = n.load("lm_head.weight") + 0.5 * (saved - o.load("lm_head.weight"))
    torch.testing.assert_close(res.state_dict["lm_head.weight"], want, rtol=1e-6, atol=1e-6)
    rows = {r.name: r for r in res.tensors}
    assert set(rows) == {"lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    shift = torch.linalg.norm(n.load(q.name) - o.load(q.name)).item()
    assert q.kind == "add" and q.base_shift == pytest.approx(shift, rel=1e-5) and q.delta_norm > 0


def test_lambda_scales_the_lora_on_top_of_a_saved_embedding(bases: tuple[Path, Path], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # Targeting embed_tokens makes PEFT save the old embedding too (base_layer.weight): without the
    # old base it replaces θ_new's, and λ must still scale the LoRA delta on top of it.
    old, new = bases
    adapter = save_lora(old, tmp_path / "lora", seed=21, target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8)
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    pre = "base_model.model.model.embed_tokens."
    saved = sd[pre + "base_layer.weight"]
    delta_e = 2.0 * (sd[pre + "lora_embedding_B"] @ sd[pre + "lora_embedding_A"]).T  # s = 8/4
    with caplog.at_level(logging.WARNING, logger="mergekit_lite"):
        res = api.patch(new, adapter, lam=0.5)  # the API says it too (it was a CLI-only note)
    assert ("1 tensor(s) replaced by the adapter's saved copies, trained from the old base "
            "(model.embed_tokens.weight); give the old base (--old-base, old_base=)") in caplog.text
    assert res.state_dict is not None
    torch.testing.assert_close(res.state_dict["model.embed_tokens.weight"], saved + 0.5 * delta_e, rtol=1e-6, atol=1e-6)
    row = {r.name: r for r in res.tensors}["model.embed_tokens.weight"]
    assert row.kind == "replace" and row.delta_norm == pytest.approx(torch.linalg.norm(delta_e).item(), rel=1e-5)
    # the adapter output of the same command loads to the same model
    as_adapter = api.patch(new, adapter, lam=0.5, as_adapter=True, out=tmp_path / "ad")
    assert_state_close(peft_merged(new, as_adapter.output), res.state_dict)
    # the command says that the new base's embedding was replaced, and how not to
    cli = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(adapter), "--out", str(tmp_path / "o")])
    assert cli.exit_code == 0 and "warning: 1 tensor(s) replaced by the adapter's saved copies" in cli.output
    assert cli.output.count("replaced by the adapter's saved copies") == 1
    # ... and so does a recipe's portllm step (it said nothing), naming the step's line
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs:\n  new: {new}\n  lora: {adapter}\nsteps:\n  - id: port\n    method: portllm\n"
                      "    base: new\n    delta: lora\n")
    cli = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "o2")])
    assert cli.exit_code == 0, cli.output
    assert (f"warning: {recipe}:5: step 'port': 1 tensor(s) replaced by the adapter's saved copies, trained from "
            "the old base (model.embed_tokens.weight)") in " ".join(cli.output.split())
    # ... but not a mergekit MODEL+LORA: MODEL is the base the adapter was trained on, and its
    # saved modules replace MODEL's by design (peft's merge_and_unload); nothing to give there
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {old}+{adapter}\n  - model: {new}\n")
    cli = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "o3")])
    assert cli.exit_code == 0 and "replaced by the adapter" not in cli.output, cli.output


def test_a_delta_to_a_tensor_the_new_base_stores_as_integers_is_refused(bases: tuple[Path, Path], tmp_path: Path) -> None:
    """The new base's model.norm.weight as int32: the output copied it from the base and dropped
    the fine-tune's change to it without a word (exit 0, "20 tensors patched"). A dtype mismatch
    is a checkpoint problem (exit 4), as `mlite merge` already says."""
    from safetensors.torch import save_file

    old, new = bases
    ft = save_llama(tmp_path / "ft", 3)
    ints = tmp_path / "ints"
    shutil.copytree(new, ints)
    state = read_model(ints)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    for f in ints.glob("*.safetensors*"):
        f.unlink()
    save_file(state, str(ints / "model.safetensors"))
    res = runner.invoke(app, ["patch", "--base", str(ints), "--delta", str(ft), "--old-base", str(old),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 4 and res.output.count("error:") == 1 and "Traceback" not in res.output
    assert f"changes 'model.norm.weight', which the base {ints} stores as I32 (not a float tensor" in res.output
    assert not (tmp_path / "out").exists()


def test_full_finetune_delta(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    ft = save_llama(tmp_path / "ft", 3)
    res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(ft), "--old-base", str(old),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    got = read_model(tmp_path / "out")
    o, n, f = open_checkpoint(old), open_checkpoint(new), open_checkpoint(ft)
    for name in n.names():
        torch.testing.assert_close(got[name], n.load(name) + (f.load(name) - o.load(name)), rtol=1e-6, atol=1e-6)
    res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(ft), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "--old-base" in res.output and not (tmp_path / "o2").exists()


def test_vocab_growth_flag(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, _ = bases
    new = save_llama(tmp_path / "new96", 2, vocab_size=96)
    adapter = save_lora(old, tmp_path / "lora", seed=14, target_modules=["embed_tokens", "q_proj"])
    args = ["patch", "--base", str(new), "--delta", str(adapter), "--old-base", str(old), "--out", str(tmp_path / "o")]
    res = runner.invoke(app, args)
    assert res.exit_code == 4 and "allow-vocab-growth" in res.output and not (tmp_path / "o").exists()
    res = runner.invoke(app, [*args, "--allow-vocab-growth"])
    assert res.exit_code == 0, res.output
    got = read_model(tmp_path / "o")["model.embed_tokens.weight"]
    base = open_checkpoint(new).load("model.embed_tokens.weight")
    assert torch.equal(got[64:], base[64:]) and not torch.equal(got[:64], base[:64])


def test_vocab_growth_flag_does_not_grow_other_tensors(bases: tuple[Path, Path], tmp_path: Path) -> None:
    # More KV heads (k_proj 8 → 16 rows) is another architecture, not a grown vocabulary.
    old, _ = bases
    new = save_llama(tmp_path / "new_kv", 2, num_key_value_heads=4)
    adapter = save_lora(old, tmp_path / "lora", seed=15, target_modules=["k_proj"])
    for flag in ([], ["--allow-vocab-growth"]):
        res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(adapter), "--out", str(tmp_path / "o"), *flag])
        assert res.exit_code == 4, res.output
        assert "k_proj.weight' has shape [8, 16] but the base's is [16, 16]" in res.output, res.output
        assert "vocabulary" not in res.output and not (tmp_path / "o").exists()


def test_unopenable_old_base_says_why(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    ft = save_llama(tmp_path / "ft", 3)
    adapter = save_lora(old, tmp_path / "lora", seed=16, target_modules=["q_proj"])
    for old_base, code, needle in ((tmp_path / "missing", 5, "no such file or directory"),
                                   (adapter, 4, "is a PEFT adapter, not a full checkpoint")):
        res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(ft), "--old-base", str(old_base),
                                  "--out", str(tmp_path / "o")])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == code and len(lines) == 1, res.output
        assert str(old_base) in lines[0] and needle in lines[0], res.output


def _fail(args: list[str], tmp_path: Path, needle: str) -> None:
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "never")])
    assert res.exit_code == 4, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    # one line per problem (all problems are reported at once), each naming its file and tensor
    assert lines and all(ln.startswith("error: ") for ln in lines) and needle in lines[0], res.output
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if "mlite-tmp" in p.name]


def test_errors_exit_4_nothing_written(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    adapter = save_lora(old, tmp_path / "lora", seed=15, target_modules=["q_proj"])
    wide = save_llama(tmp_path / "wide", 4, hidden_size=32)
    _fail(["patch", "--base", str(wide), "--delta", str(adapter)], tmp_path, "has shape")
    dora = save_lora(old, tmp_path / "dora", seed=16, target_modules=["q_proj"], use_dora=True)
    _fail(["patch", "--base", str(new), "--delta", str(dora)], tmp_path, "DoRA")
    stray = tmp_path / "stray"
    stray.mkdir()
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    sd["base_model.model.model.layers.0.mlp.nonexistent.lora_A.weight"] = torch.ones(4, 16)
    sd["base_model.model.model.layers.0.mlp.nonexistent.lora_B.weight"] = torch.ones(16, 4)
    from safetensors.torch import save_file

    save_file(sd, str(stray / "adapter_model.safetensors"))
    (stray / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    _fail(["patch", "--base", str(new), "--delta", str(stray)], tmp_path, "does not have")
    (stray / "adapter_config.json").unlink()
    _fail(["patch", "--base", str(new), "--delta", str(stray)], tmp_path, "adapter_config.json")


def test_as_adapter_lora_loads_in_peft(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    adapter = save_lora(old, tmp_path / "lora", seed=17, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    res = api.patch(new, adapter, old_base=old, lam=0.7, as_adapter=True, out=tmp_path / "ad")
    dense = api.patch(new, adapter, old_base=old, lam=0.7)
    assert_state_close(peft_merged(new, res.output), dense.state_dict)


def test_as_adapter_lora_takes_dtype_and_refuses_rank(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    adapter = save_lora(old, tmp_path / "lora", seed=18, target_modules=["q_proj"])
    res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(adapter), "--as-adapter", "--rank", "2",
                              "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "keeps its own factors" in res.output and not (tmp_path / "r").exists()
    res = api.patch(new, adapter, lam=0.5, as_adapter=True, dtype="bfloat16", out=tmp_path / "bf16")
    assert res.bytes_written == sum(f.stat().st_size for f in res.output.iterdir())
    written = load_file(str(res.output / "adapter_model.safetensors"))
    assert written and all(t.dtype == torch.bfloat16 for t in written.values())
    src = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(written[key], (src[key] * 0.5).to(torch.bfloat16))


def test_outputs_never_replace_inputs(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    adapter = save_lora(old, tmp_path / "lora", seed=19, target_modules=["q_proj"])
    before = sorted((p.name, p.stat().st_size) for p in new.iterdir())
    for extra, out in (([], new), (["--as-adapter"], new), (["--as-adapter"], adapter)):
        res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(adapter), "--out", str(out), "--force", *extra])
        assert res.exit_code == 2 and "holds input file" in res.output, res.output
    assert sorted((p.name, p.stat().st_size) for p in new.iterdir()) == before and (adapter / "adapter_config.json").is_file()


def test_as_adapter_full_delta_within_reported_error(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    ft = save_llama(tmp_path / "ft", 5)
    res = api.patch(new, ft, old_base=old, as_adapter=True, rank=4, out=tmp_path / "ad")
    merged = peft_merged(new, res.output)
    dense = api.patch(new, ft, old_base=old).state_dict
    n = open_checkpoint(new)
    for r in res.tensors:
        want = dense[r.name] - n.load(r.name)
        got = merged[r.name] - n.load(r.name)
        err = (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item()
        if r.kind == "lora":
            assert r.rank == 4 and err <= r.rel_error * (1 + 1e-4) + 1e-6, r.name
        else:
            assert r.kind == "full" and err < 1e-5, r.name


def test_patch_usage_mistakes_are_one_line_exit_2(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    ft = save_llama(tmp_path / "ft", 3)
    adapter = save_lora(old, tmp_path / "lora", seed=16, target_modules=["q_proj"])
    for args, needle in (
        (["--delta", str(ft)], "a full fine-tuned checkpoint as delta needs its old base (--old-base)"),
        (["--delta", str(adapter), "--lambda", "nan"], "--lambda must be a finite number, got nan"),
        (["--delta", str(adapter), "--lambda", "inf"], "--lambda must be a finite number, got inf"),
        (["--delta", str(adapter), "--rank", "4"],
         "--rank, --energy and --budget-rank (rank=, energy=, budget_rank=) compress the patch into an adapter"),
        (["--delta", str(adapter), "--budget-rank", "4"], "--budget-rank (rank=, energy=, budget_rank=) compress"),
    ):
        res = runner.invoke(app, ["patch", "--base", str(new), *args, "--out", str(tmp_path / "o")])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args, res.output)
        assert not (tmp_path / "o").exists()


def test_as_adapter_refuses_a_shard_size(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    adapter = save_lora(old, tmp_path / "lora", seed=16, target_modules=["q_proj"])
    res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(adapter), "--as-adapter",
                              "--shard-size", "1k", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--shard-size (shard_size=) does not apply to --as-adapter" in res.output


def test_a_full_fine_tune_patches_a_tied_base_and_unties_it(bases: tuple[Path, Path], tmp_path: Path) -> None:
    """The fine-tune's lm_head delta lands on the tied base's head, which is its embedding: the
    output stores lm_head = E_new + (head_ft − head_old) and says it is untied."""
    old, _ = bases
    tied = save_llama(tmp_path / "tied", 21, tie_word_embeddings=True)
    ft = save_llama(tmp_path / "ft", 22)
    res = api.patch(tied, ft, old_base=old, out=tmp_path / "out")
    out = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    new, f, o = (load_file(str(next(p.glob("*.safetensors")))) for p in (tied, ft, old))
    want = new["model.embed_tokens.weight"] + (f["lm_head.weight"] - o["lm_head.weight"])
    torch.testing.assert_close(out["lm_head.weight"], want, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert res.output == tmp_path / "out"


def _as_bin(model_dir: Path, dest: Path) -> Path:
    """The same weights as an old-style pickle checkpoint (pytorch_model.bin)."""
    dest.mkdir()
    torch.save(read_model(model_dir), dest / "pytorch_model.bin")
    (dest / "config.json").write_text((model_dir / "config.json").read_text())
    return dest


def test_pickle_checkpoints_need_allow_bin_in_patch_extract_and_surgery(bases: tuple[Path, Path], tmp_path: Path) -> None:
    """The .bin refusal points at --allow-bin, which patch, extract and surgery now have."""
    old, new = bases
    ft = _as_bin(save_llama(tmp_path / "ft", 3), tmp_path / "ft_bin")
    patch = ["patch", "--base", str(new), "--delta", str(ft), "--old-base", str(old)]
    res = runner.invoke(app, [*patch, "--out", str(tmp_path / "p1")])
    assert res.exit_code == 4 and "--allow-bin" in res.output and not (tmp_path / "p1").exists()
    res = runner.invoke(app, [*patch, "--out", str(tmp_path / "p2"), "--allow-bin"])
    assert res.exit_code == 0, res.output
    want = read_model(new)
    ft_state, old_state = read_model(tmp_path / "ft"), read_model(old)
    got = read_model(tmp_path / "p2")
    for name, value in want.items():
        torch.testing.assert_close(got[name], value + (ft_state[name] - old_state[name]), rtol=1e-6, atol=1e-6)
    extract = ["extract", "--model", str(ft), "--base", str(old), "--rank", "2", "--out", str(tmp_path / "e")]
    assert runner.invoke(app, extract).exit_code == 4
    assert runner.invoke(app, [*extract, "--allow-bin"]).exit_code == 0
    from safetensors.torch import save_file

    save_file({"weight": torch.randn(16)}, str(tmp_path / "probe.safetensors"))
    surgery = ["surgery", "--model", str(ft), "--probe", str(tmp_path / "probe.safetensors"), "--top-k", "2",
               "--out", str(tmp_path / "s")]
    res = runner.invoke(app, surgery)
    assert res.exit_code == 4 and "--allow-bin" in res.output
    assert runner.invoke(app, [*surgery, "--allow-bin"]).exit_code == 0


def test_an_adapter_given_the_wrong_way_names_the_directory_to_pass(bases: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = bases
    adapter = save_lora(old, tmp_path / "holder" / "mine")
    res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(adapter / "adapter_model.safetensors"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and f"is an adapter's weights file; pass its directory, {adapter}" in res.output
    res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(tmp_path / "holder"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "but mine inside it do" in res.output and f"pass {adapter}" in res.output
    # a delta that does not exist is a reference that cannot be resolved (exit 5), not a missing --old-base
    res = runner.invoke(app, ["patch", "--base", str(new), "--delta", str(tmp_path / "nothere"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 5 and f"{tmp_path / 'nothere'}: no such file or directory" in res.output


def test_an_interrupted_patch_resumes_to_the_same_bits(bases: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    """patch kept its partial output on Ctrl-C but had no --resume, so it lay there unused."""
    from mergekit_lite.io import writer

    old, new = bases
    adapter = save_lora(old, tmp_path / "lora", seed=5, target_modules=["q_proj", "v_proj"])
    clean = api.patch(new, adapter, out=tmp_path / "clean")
    real = writer.CheckpointWriter.write
    calls = {"n": 0}

    def write_then_stop(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer.CheckpointWriter, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt) as stopped:
        api.patch(new, adapter, out=tmp_path / "out")
    assert stopped.value.resumable == tmp_path / ".out.mlite-partial" and not (tmp_path / "out").exists()
    monkeypatch.setattr(writer.CheckpointWriter, "write", real)
    resumed = api.patch(new, adapter, out=tmp_path / "out", resume=True)
    got, want = load_dir(resumed.output), load_dir(clean.output)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(UsageError, match="an adapter \\(--as-adapter\\) is written at once"):
        api.patch(new, adapter, out=tmp_path / "ad", as_adapter=True, resume=True)
