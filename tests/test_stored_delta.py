"""Additive deltas stored as checkpoints (`mlite_patch: additive`, as `mlite hadamard to-delta`
writes them) used as patches: `mlite patch --delta D`, a recipe step's `delta:`, a delta used as
a model; and marked patches refused where a model is expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_dir
from mergekit_lite.cli.main import app
from safetensors.torch import save_file
from typer.testing import CliRunner

import mergekit_lite as mlite
from mergekit_lite.errors import CheckpointError, RecipeError, UsageError
from mergekit_lite.io.patch_marks import ADDITIVE, MULTIPLICATIVE, PATCH_KEY

runner = CliRunner()
Q = "model.layers.0.self_attn.q_proj.weight"


def write_patch(path: Path, tensors: dict[str, torch.Tensor], kind: str = ADDITIVE) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt", PATCH_KEY: kind})
    return path


@pytest.fixture
def delta(model_set: Any, tmp_path: Path) -> Path:
    """ΔW for one q_proj: 0.5 everywhere but entry [0, 0] = -1.25; the other tensors unchanged."""
    shape = load_dir(model_set.base)[Q].shape
    d = torch.full(shape, 0.5)
    d[0, 0] = -1.25
    return write_patch(tmp_path / "delta", {Q: d})


def test_patch_adds_a_stored_delta_to_the_base(model_set: Any, delta: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["patch", "--base", str(model_set.finetunes[1]), "--delta", str(delta),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out, base = load_dir(tmp_path / "out"), load_dir(model_set.finetunes[1])
    want = base[Q] + 0.5
    want[0, 0] = base[Q][0, 0] - 1.25
    assert torch.equal(out[Q], want)
    assert all(torch.equal(out[k], base[k]) for k in base if k != Q)


def test_a_stored_delta_in_a_recipe_step_and_as_a_model(model_set: Any, delta: Path) -> None:
    base = load_dir(model_set.base)
    patched = mlite.run_recipe({"inputs": {"base": str(model_set.base), "d": str(delta)},
                                "steps": [{"id": "p", "method": "portllm", "base": "base", "delta": "d",
                                           "parameters": {"lambda": 2.0}}]}).state_dict
    assert torch.allclose(patched[Q], base[Q] + 2.0 * load_dir(delta)[Q], rtol=0, atol=1e-6)
    # as a model of task_arithmetic: base + Δ is the model, so its task vector is Δ
    merged = mlite.run_recipe({"inputs": {"base": str(model_set.base), "d": str(delta)},
                               "steps": [{"id": "m", "method": "task_arithmetic", "base": "base", "models": ["d"],
                                          "parameters": {"weight": 0.5}}]}).state_dict
    assert torch.allclose(merged[Q], base[Q] + 0.5 * load_dir(delta)[Q], rtol=0, atol=1e-6)


def test_a_stored_delta_takes_no_old_base(model_set: Any, delta: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is an additive delta .* it takes no old base"):
        mlite.patch(model_set.base, delta, old_base=model_set.base, out=tmp_path / "out")


def test_a_multiplier_is_not_taken_as_a_delta(model_set: Any, tmp_path: Path) -> None:
    m = write_patch(tmp_path / "m", {Q: torch.ones(load_dir(model_set.base)[Q].shape)}, MULTIPLICATIVE)
    res = runner.invoke(app, ["patch", "--base", str(model_set.base), "--delta", str(m), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "is a multiplicative patch (W' = W ⊙ M), which is not added" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_a_marked_patch_is_refused_as_a_model(model_set: Any, delta: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"step 'merge': 'delta' is a patch \(an adapter or a stored delta\): "
                                          r"used as a model \(base \+ Δ\) it needs the step's base"):
        mlite.plan_recipe({"merge_method": "linear", "models": [str(model_set.base), str(delta)]})
    m = write_patch(tmp_path / "m", {Q: torch.ones(load_dir(model_set.base)[Q].shape)}, MULTIPLICATIVE)
    with pytest.raises(CheckpointError, match=r"input 'm': .* is an mlite multiplicative patch .* not a model; apply "
                                              r"it first: mlite hadamard apply --base MODEL --multiplier it"):
        mlite.plan_recipe({"merge_method": "linear", "models": [str(model_set.base), str(m)]})


def test_to_delta_then_patch_gives_apply(model_set: Any, tmp_path: Path) -> None:
    """The route the hadamard docs give: a multiplier made additive, then patched onto a base,
    is that base ⊙ M up to one more float32 rounding (W + ΔW instead of W ⊙ M rounded once)."""
    m = mlite.hadamard_to_multiplier(model_set.base, model_set.finetunes[0], out=tmp_path / "m").output
    d = mlite.hadamard_to_delta(model_set.finetunes[1], m, out=tmp_path / "d").output
    applied = load_dir(mlite.hadamard_apply(model_set.finetunes[1], m, out=tmp_path / "a").output)
    patched = load_dir(mlite.patch(model_set.finetunes[1], d, out=tmp_path / "p").output)
    assert set(applied) == set(patched)
    for name, want in applied.items():
        torch.testing.assert_close(patched[name], want, rtol=2.4e-7, atol=1e-7)


def test_a_stored_delta_factors_into_an_adapter(model_set: Any, tmp_path: Path) -> None:
    """`patch --as-adapter` on a stored rank-1 ΔW: the adapter, applied, gives base + ΔW."""
    shape = load_dir(model_set.base)[Q].shape
    u, v = torch.linspace(-1, 1, shape[0]), torch.linspace(0.5, 2, shape[1])
    d = write_patch(tmp_path / "d", {Q: torch.outer(u, v)})
    adapter = mlite.patch(model_set.base, d, as_adapter=True, rank=1, out=tmp_path / "lora").output
    assert adapter is not None and (adapter / "adapter_config.json").is_file()
    ported = load_dir(mlite.patch(model_set.base, adapter, out=tmp_path / "p").output)
    base = load_dir(model_set.base)
    torch.testing.assert_close(ported[Q], base[Q] + torch.outer(u, v), rtol=0, atol=1e-5)
    assert all(torch.equal(ported[k], base[k]) for k in base if k != Q)


def test_a_stored_delta_factors_into_an_adapter_under_a_shared_budget(model_set: Any, tmp_path: Path) -> None:
    """Two deltas, one rank 1 and one rank 3: with the parameters of rank 2 on both, the budget
    gives the rank-3 one its three terms (its σ² per parameter wins) and the other its one."""
    base = load_dir(model_set.base)
    k = "model.layers.0.self_attn.k_proj.weight"
    q_shape, k_shape = base[Q].shape, base[k].shape
    g = torch.Generator().manual_seed(0)
    q_delta = torch.outer(torch.linspace(-0.1, 0.1, q_shape[0]), torch.linspace(0.5, 1, q_shape[1]))
    k_delta = sum(torch.outer(torch.randn(k_shape[0], generator=g), torch.randn(k_shape[1], generator=g))
                  for _ in range(3))
    assert isinstance(k_delta, torch.Tensor)
    d = write_patch(tmp_path / "d", {Q: q_delta, k: k_delta})
    res = mlite.patch(model_set.base, d, as_adapter=True, budget_rank=2, out=tmp_path / "lora")
    ranks = {r.name: r.rank for r in res.tensors if r.kind == "lora"}
    assert ranks == {Q: 1, k: 3}
    ported = load_dir(mlite.patch(model_set.base, res.output, out=tmp_path / "p").output)
    torch.testing.assert_close(ported[k], base[k] + k_delta, rtol=0, atol=1e-4)
    torch.testing.assert_close(ported[Q], base[Q] + q_delta, rtol=0, atol=1e-5)
