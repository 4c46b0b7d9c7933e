"""Thread policy of a merge: light CPU plans leave a core to I/O; explicit counts win; restored after."""

from __future__ import annotations

import pytest
import torch

import mergekit_lite as mlite
from mergekit_lite.api import plan_recipe
from mergekit_lite.engine.threads import compute_threads, is_light
from mergekit_lite.methods.registry import get_method


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def _recipe(ms, *steps):
    return {"inputs": {"base": str(ms.base), "a": str(ms.finetunes[0]), "b": str(ms.finetunes[1])},
            "steps": list(steps)}


LINEAR = {"id": "avg", "method": "linear", "models": ["a", "b"]}
TA = {"id": "ta", "method": "task_arithmetic", "base": "base", "models": ["avg"], "parameters": {"lambda": 1.5}}
TIES = {"id": "ties", "method": "ties", "base": "base", "models": ["a", "b"], "parameters": {"density": 0.5}}


def test_light_methods_are_the_cheap_elementwise_ones():
    assert get_method("linear").light and get_method("task_arithmetic").light and get_method("nearswap").light
    assert get_method("ram").light
    assert not any(get_method(m).light
                   for m in ("dare_linear", "dare_ties", "ties", "breadcrumbs", "della", "pcb", "slerp", "portllm",
                             "sce", "ramplus_tl"))


def test_compute_threads_rule(model_set):
    light = plan_recipe(_recipe(model_set, LINEAR, TA))
    heavy = plan_recipe(_recipe(model_set, LINEAR, TIES))
    assert is_light(light) and not is_light(heavy)
    assert compute_threads(light, None, 4) == 3
    assert compute_threads(light, None, 1) == 1
    assert compute_threads(heavy, None, 4) == 4
    assert compute_threads(light, 4, 4) == 4  # an explicit count always wins
    assert compute_threads(heavy, 2, 4) == 2


def _threads_seen(recipe, **kw) -> set[int]:
    seen: set[int] = set()
    mlite.run_recipe(recipe, tensor_hook=lambda name, job, out: seen.add(torch.get_num_threads()), **kw)
    return seen


def test_run_uses_and_restores_thread_count(model_set, four_threads):
    assert _threads_seen(_recipe(model_set, LINEAR, TA)) == {3}
    assert torch.get_num_threads() == 4
    assert _threads_seen(_recipe(model_set, LINEAR, TIES)) == {4}
    assert _threads_seen(_recipe(model_set, LINEAR, TA), threads=2) == {2}
    assert torch.get_num_threads() == 4


def test_thread_count_restored_after_a_failed_run(model_set, four_threads):
    def boom(name, job, out):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        mlite.run_recipe(_recipe(model_set, LINEAR, TA), tensor_hook=boom, threads=1)
    assert torch.get_num_threads() == 4


def test_results_do_not_depend_on_threads(model_set):
    recipe = _recipe(model_set, LINEAR, TA)
    one = mlite.run_recipe(recipe, threads=1).state_dict
    two = mlite.run_recipe(recipe, threads=2).state_dict
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k


def test_cli_threads_reaches_the_engine(tmp_path, model_set, four_threads, monkeypatch):
    import yaml
    from mergekit_lite.cli.main import app
    from typer.testing import CliRunner

    from mergekit_lite import api

    seen: list[int | None] = []
    real = api.run_recipe
    monkeypatch.setattr(api, "run_recipe", lambda *a, **kw: (seen.append(kw.get("threads")), real(*a, **kw))[1])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**_recipe(model_set, LINEAR), "output": {"path": str(tmp_path / "o")}}))
    res = CliRunner().invoke(app, ["merge", str(recipe), "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert seen == [2]
    assert torch.get_num_threads() == 4  # the CLI no longer changes the process-wide count itself


@pytest.mark.parametrize(("method", "params"), [
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("dare_linear", {"density": 0.5, "rescale": "l1", "weight": 0.7}),
    ("della", {"density": 0.5, "epsilon": 0.1, "rescale": "l1", "weight": 0.3}),
    ("slerp", {"t": 0.3}),
    ("sce", {"select_topk": 0.5}),
    ("ramplus_tl", {"r": 0.5, "alpha": 1.0}),  # per-model counts over the tensor
])
def test_whole_tensor_reductions_do_not_depend_on_threads(method, params):
    """Model Stock's cosines, the L1 rescale and slerp's dot products sum whole tensors: torch's
    own whole-tensor sum splits by thread count (1M entries: 1.05M outputs differed at 1 vs 2
    threads for model_stock); the fixed-order float64 sums make the bits thread-independent."""
    from mergekit_lite.methods.registry import TensorJob

    g = torch.Generator().manual_seed(9)
    base = torch.randn(1024, 1024, generator=g)
    models = [base + 0.01 * torch.randn(1024, 1024, generator=g) for _ in range(3 if method != "slerp" else 2)]
    spec = get_method(method)
    resolved = spec.defaults()
    resolved.update(params)
    for p in spec.params:
        if p.per_model and not isinstance(resolved[p.name], tuple):
            resolved[p.name] = (resolved[p.name],) * len(models)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            job = TensorJob(name="model.layers.0.mlp.up_proj.weight", base=base,
                            models=[m.clone() for m in models], params=resolved, seed=0)
            outs.append(spec.merge(job))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
