"""PCB through the real engine: multi-shard checkpoints, streaming global scope == dense, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_lite.api import run_recipe
from mergekit_lite.methods.pcb import PcbStats, pcb_dense
from mergekit_lite.synthetic import LlamaShape, build_model_set

SHAPE = LlamaShape(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with safetensors directly (not mlite's reader)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def model_set(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pcb_engine")
    ms = build_model_set(root / "models", shape=SHAPE, n_finetunes=3, num_shards=3, seed=4)
    assert SHAPE.num_parameters() > 400_000
    assert len(list(ms.base.glob("*.safetensors"))) == 3
    return root, ms


def recipe(ms, out: Path, **params) -> dict:
    return {
        "inputs": {"base": str(ms.base), **{f"ft{i + 1}": str(p) for i, p in enumerate(ms.finetunes)}},
        "steps": [{"id": "merged", "method": "pcb", "base": "base", "models": ["ft1", "ft2", "ft3"],
                   "parameters": params}],
        "output": {"path": str(out)},
    }


def dense_expected(ms, ratio: float, clamp_ratio: float, lambdas: list[float]) -> dict[str, torch.Tensor]:
    """The reference's whole-model computation: sorted keys, one flattened row per model."""
    base = read_dir(ms.base)
    fts = [read_dir(p) for p in ms.finetunes]
    names = sorted(base)
    flat_base = torch.cat([base[k].float().reshape(-1) for k in names])
    T = torch.stack([torch.cat([ft[k].float().reshape(-1) for k in names]) - flat_base for ft in fts])
    merged = pcb_dense(T, ratio, clamp_ratio, lambdas)
    out_flat = torch.where(merged != 0, flat_base + merged, flat_base)
    out, start = {}, 0
    for k in names:
        out[k] = out_flat[start : start + base[k].numel()].view(base[k].shape)
        start += base[k].numel()
    return out


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        a, b = got[k].float().contiguous(), want[k].contiguous()
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), k


def test_streaming_global_engine_equals_dense(model_set, tmp_path: Path) -> None:
    _, ms = model_set
    params = {"ratio": 0.1, "clamp_ratio": 0.01, "lambda": 0.9, "weight": {"ft1": 1.0, "ft2": 0.5, "ft3": 1.5},
              "memory_budget": 0}
    result = run_recipe(recipe(ms, tmp_path / "stream", **params))
    stats = result.stats["merged"]
    assert isinstance(stats, PcbStats) and stats.passes == 4 and stats.count == SHAPE.num_parameters()
    assert [p["kind"] for p in result.passes] == ["statistics"] * 4 + ["output"]
    want = dense_expected(ms, 0.1, 0.01, [0.9 * 1.0, 0.9 * 0.5, 0.9 * 1.5])
    assert_same_bits(read_dir(tmp_path / "stream"), want)
    # the in-memory statistics path (default budget) reads the inputs once and writes the same bits
    params.pop("memory_budget")
    result = run_recipe(recipe(ms, tmp_path / "memory", **params))
    assert result.stats["merged"].passes == 1
    assert [p["kind"] for p in result.passes] == ["statistics", "output"]
    assert_same_bits(read_dir(tmp_path / "memory"), want)


def test_sample_brackets_that_miss_finish_by_radix_selection(model_set, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With the scope announced, the statistics use sample brackets (cheaper per value); a
    bracket that cannot hold its entries falls back to radix selection for two more passes per
    selection, and the result is still the dense one bit for bit."""
    from mergekit_lite.methods import pcb, stats

    _, ms = model_set
    params = {"ratio": 0.1, "clamp_ratio": 0.01, "lambda": 0.9, "memory_budget": 0}
    want = dense_expected(ms, 0.1, 0.01, [0.9] * 3)
    result = run_recipe(recipe(ms, tmp_path / "bracket", **params))
    assert result.stats["merged"].passes == 4
    assert_same_bits(read_dir(tmp_path / "bracket"), want)
    monkeypatch.setattr(stats, "GATHER_CAP", 8)  # every bracket overflows
    monkeypatch.setattr(pcb, "brackets_fit", lambda count, quantiles: True)
    result = run_recipe(recipe(ms, tmp_path / "fallback", **params))
    assert result.stats["merged"].passes == 8
    assert_same_bits(read_dir(tmp_path / "fallback"), want)


def test_a_scope_over_the_budget_is_never_cached(model_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine tells the reducer the scope's size first (`expect`): task vectors that cannot
    fit `memory_budget` are not copied at all. (The cache used to fill up to the budget and then
    give up: 256 MiB copied for nothing, which the heap kept; PCB global on the 100M benchmark
    model peaked at 0.63 GB, 0.43 GB without.)"""
    from mergekit_lite.methods import pcb

    _, ms = model_set
    cached: list[int] = []
    real = pcb.PcbReducer.observe

    def spy(self, job):  # noqa: ANN001
        real(self, job)
        cached.append(len(self._cache) if self._cache is not None else -1)

    monkeypatch.setattr(pcb.PcbReducer, "observe", spy)
    budget = SHAPE.num_parameters() * 3 * 4 - 1  # one byte short of the three task vectors
    result = run_recipe(recipe(ms, tmp_path / "over", ratio=0.1, clamp_ratio=0.01, memory_budget=budget))
    assert result.stats["merged"].passes == 4 and cached and set(cached) == {-1}
    cached.clear()
    result = run_recipe(recipe(ms, tmp_path / "fits", ratio=0.1, clamp_ratio=0.01, memory_budget=budget + 1))
    assert result.stats["merged"].passes == 1 and cached[-1] == len(cached)
    assert_same_bits(read_dir(tmp_path / "over"), read_dir(tmp_path / "fits"))
    reducer = pcb.PcbReducer({"memory_budget": 120}, 3)
    assert reducer.held_bytes(10) == 120 and reducer.held_bytes(11) == 0


def test_tensor_scope_engine_equals_dense_per_tensor(model_set, tmp_path: Path) -> None:
    _, ms = model_set
    result = run_recipe(recipe(ms, tmp_path / "tensor", ratio=0.3, clamp_ratio=0.0, scope="tensor"))
    assert [p["kind"] for p in result.passes] == ["output"]
    base = read_dir(ms.base)
    fts = [read_dir(p) for p in ms.finetunes]
    want = {}
    for k, b in base.items():
        T = torch.stack([ft[k].float().reshape(-1) - b.reshape(-1) for ft in fts])
        merged = pcb_dense(T, 0.3, 0.0)
        want[k] = torch.where(merged != 0, b.reshape(-1) + merged, b.reshape(-1)).view(b.shape)
    assert_same_bits(read_dir(tmp_path / "tensor"), want)


def test_shipped_recipes_run(tmp_path: Path) -> None:
    """recipes/pcb.yaml and recipes/pcb_chain.yaml run as shipped, on models beside them."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    for name in ("pcb.yaml", "pcb_chain.yaml"):
        shutil.copy(repo / "recipes" / name, tmp_path / name)
    build_model_set(tmp_path / "models")
    result = run_recipe(tmp_path / "pcb.yaml")
    assert result.output == tmp_path / "out" / "pcb" and result.stats["merged"].passes == 1
    result = run_recipe(tmp_path / "pcb_chain.yaml")
    assert (tmp_path / "out" / "pcb_chain_step1").is_dir() and result.output == tmp_path / "out" / "pcb_chain"
    step1 = read_dir(tmp_path / "out" / "pcb_chain_step1")
    final = read_dir(tmp_path / "out" / "pcb_chain")
    lora_module = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(step1[lora_module], final[lora_module])  # the LoRA was ported on top
    assert torch.equal(step1["model.norm.weight"], final["model.norm.weight"])  # untouched by the LoRA


@pytest.mark.parametrize(("params", "message"), [
    ({"ratio": 0}, "parameter 'ratio' of method 'pcb': must be > 0"),
    ({"clamp_ratio": 0.5}, "parameter 'clamp_ratio' of method 'pcb': must be < 0.5"),
    ({"scope": "model"}, "parameter 'scope' of method 'pcb': expected one of global, tensor"),
    ({"memory_budget": -1}, "parameter 'memory_budget' of method 'pcb': must be >= 0"),
])
def test_bad_parameters_are_recipe_errors(model_set, tmp_path: Path, params: dict, message: str) -> None:
    from mergekit_lite.errors import RecipeError

    _, ms = model_set
    with pytest.raises(RecipeError, match=message):
        run_recipe(recipe(ms, tmp_path / "never", **params))
    assert not (tmp_path / "never").exists()


def test_row_blocks_give_the_same_bits(model_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors cut into row blocks (global: elementwise; tensor: per-tensor reducer over blocks)."""
    from mergekit_lite.engine import stream

    _, ms = model_set
    for scope, params in (("global", {"ratio": 0.2, "clamp_ratio": 0.01, "memory_budget": 0}),
                          ("tensor", {"ratio": 0.2, "clamp_ratio": 0.01, "scope": "tensor"})):
        whole = run_recipe(recipe(ms, tmp_path / f"{scope}-whole", **params))
        with monkeypatch.context() as m:
            m.setattr(stream, "CHUNK_ELEMENTS", 5000)  # 64×128 and bigger tensors go in row blocks
            blocked = run_recipe(recipe(ms, tmp_path / f"{scope}-blocks", **params))
        assert whole.stats == blocked.stats
        assert_same_bits(read_dir(tmp_path / f"{scope}-blocks"), read_dir(tmp_path / f"{scope}-whole"))

