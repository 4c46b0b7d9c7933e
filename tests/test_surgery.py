"""Model Surgery: scoring, global top-K with the specified tie-break, the row edit, the
sidecar and exact undo, on hand-checkable tensors and on a synthetic Llama checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite.errors import RecipeError
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.methods.surgery import (
    DEFAULT_FRACTION,
    SurgerySelection,
    probe_direction,
    row_scores,
    surgery_merge,
    target_layer,
)

GATE = "model.layers.{}.mlp.gate_proj.weight"


def _job(name: str, base: torch.Tensor, params: dict, stats=None) -> TensorJob:
    return TensorJob(name=name, base=base, models=(), params=params, stats=stats)


def _params(probe, **kw) -> dict:
    p = {"probe": probe, "alpha": 1.0, "top_k": None, "fraction": DEFAULT_FRACTION,
         "target": "mlp.gate_proj", "direction": "suppress"}
    p.update(kw)
    return p


def _run(state: dict[str, torch.Tensor], params: dict, order=None) -> SurgerySelection:
    red = get_method("surgery").reducer(params, 0)
    for name in order or list(state):
        red.observe(_job(name, state[name].float(), params))
    assert red.end_pass() is True
    return red.result()


# ---------------------------------------------------------------------------------------------
# Golden values
# ---------------------------------------------------------------------------------------------
W = torch.tensor([1.0, 0.0, 0.0, 0.0])


def _hand_model() -> dict[str, torch.Tensor]:
    # Exact ties: scaling a row by a power of two leaves its float32 cosine bit-identical.
    g0 = torch.tensor([[-1.0, 0.0, 0.0, 0.0],   # cos −1  → score 1
                       [0.0, 1.0, 0.0, 0.0],    # cos 0   → score 0
                       [-1.0, 1.0, 0.0, 0.0],   # cos −√½ → score √½
                       [1.0, 0.0, 0.0, 0.0]])   # cos 1   → score −1
    g1 = torch.tensor([[0.0, 0.0, 3.0, 0.0],    # score 0
                       [-2.0, 0.0, 0.0, 0.0],   # score 1 (tie with layer 0 row 0)
                       [-4.0, 0.0, 0.0, 0.0],   # score 1 (tie)
                       [-2.0, 2.0, 0.0, 0.0]])  # score √½ (tie with layer 0 row 2)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4),
        GATE.format(1): g1,  # visited before layer 0: the order of visits must not matter
        "model.layers.1.mlp.up_proj.weight": torch.randn(4, 4),
        GATE.format(0): g0,
        "model.norm.weight": torch.ones(4),
    }


def test_golden_selection_and_tie_break() -> None:
    state = _hand_model()
    sel = _run(state, _params({"weight": torch.stack([torch.zeros(4), W])}, top_k=5))
    got = [(e.tensor, e.layer, e.row) for e in sel.entries]
    assert got == [
        (GATE.format(0), 0, 0),
        (GATE.format(1), 1, 1),
        (GATE.format(1), 1, 2),
        (GATE.format(0), 0, 2),
        (GATE.format(1), 1, 3),
    ]
    assert [e.score for e in sel.entries][:3] == [1.0, 1.0, 1.0]
    assert sel.entries[3].score == pytest.approx(math.sqrt(0.5), abs=1e-7)
    assert sel.entries[3].score == sel.entries[4].score
    assert sel.rows[GATE.format(0)].tolist() == [0, 2]
    assert sel.rows[GATE.format(1)].tolist() == [1, 2, 3]
    assert sel.n_candidates == 8 and sel.k == 5


def test_golden_edit_values() -> None:
    state = _hand_model()
    params = _params({"weight": torch.stack([torch.zeros(4), W])}, top_k=3, alpha=1.5)
    sel = _run(state, params)
    out0 = surgery_merge(_job(GATE.format(0), state[GATE.format(0)], params, sel))
    out1 = surgery_merge(_job(GATE.format(1), state[GATE.format(1)], params, sel))
    exp0 = state[GATE.format(0)].clone()
    exp0[0] += 1.5 * W
    exp1 = state[GATE.format(1)].clone()
    exp1[1] += 1.5 * W
    exp1[2] += 1.5 * W
    assert torch.equal(out0, exp0) and torch.equal(out1, exp1)
    assert out0[0].tolist() == [0.5, 0.0, 0.0, 0.0]
    # Every non-target tensor comes back as the very same tensor.
    up = state["model.layers.1.mlp.up_proj.weight"]
    assert surgery_merge(_job("model.layers.1.mlp.up_proj.weight", up, params, sel)) is up


def test_promote_is_suppress_of_the_opposite_direction() -> None:
    state = _hand_model()
    sel = _run(state, _params(W.clone(), top_k=2, direction="promote"))
    # +cos(g, w): rows aligned with w rank first; the edit subtracts α·w.
    assert [(e.layer, e.row) for e in sel.entries] == [(0, 3), (0, 1)]  # then the score-0 tie: layer 0 first
    assert sel.entries[0].score == 1.0
    out = surgery_merge(_job(GATE.format(0), state[GATE.format(0)], _params(W), sel))
    assert out[3].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_scores_are_minus_cosine() -> None:
    g = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    w = torch.randn(5, generator=torch.Generator().manual_seed(1))
    expected = -torch.nn.functional.cosine_similarity(g, w.unsqueeze(0), dim=1)
    assert torch.allclose(row_scores(g, w), expected, atol=1e-6)
    zero_row = row_scores(torch.zeros(1, 5), w)
    assert zero_row.tolist() == [0.0]
    nan_row = row_scores(torch.full((1, 5), float("nan")), w)
    assert nan_row.tolist() == [-math.inf]


def test_fraction_gives_k() -> None:
    state = _hand_model()
    sel = _run(state, _params(W, fraction=0.25))  # 8 rows · 0.25 = 2
    assert [(e.layer, e.row) for e in sel.entries] == [(0, 0), (1, 1)]


def test_default_fraction_is_reference_k() -> None:
    assert math.floor(DEFAULT_FRACTION * 32 * 11008 + 0.5) == 16384


def test_row_blocks_give_the_same_selection_and_edit() -> None:
    """The engine may stream big tensors in row blocks (job.rows = (start, stop))."""
    state = _hand_model()
    params = _params(W, top_k=5, alpha=2.0)
    whole = _run(state, params)
    red = get_method("surgery").reducer(params, 0)
    for name, t in state.items():
        for start in range(0, t.shape[0], 3):
            block = t[start : start + 3]
            red.observe(TensorJob(name=name, base=block, models=(), params=params,
                                  rows=(start, start + block.shape[0])))
    blocked = red.result()
    assert blocked.entries == whole.entries and blocked.n_candidates == 8 and blocked.n_tensors == 2
    for name in (GATE.format(0), GATE.format(1)):
        t = state[name]
        full = surgery_merge(_job(name, t, params, whole))
        parts = [surgery_merge(TensorJob(name=name, base=t[s : s + 3], models=(), params=params, stats=blocked,
                                         rows=(s, min(s + 3, t.shape[0])))) for s in range(0, t.shape[0], 3)]
        assert torch.equal(torch.cat(parts), full)
    assert get_method("surgery").row_local({}) is True


# ---------------------------------------------------------------------------------------------
# Probe, parsing and errors
# ---------------------------------------------------------------------------------------------
def test_probe_direction_forms() -> None:
    weight = torch.arange(8.0).reshape(2, 4)
    assert probe_direction({"weight": weight, "bias": torch.zeros(2)}).tolist() == [4.0, 5.0, 6.0, 7.0]
    assert probe_direction({"mlp.weight": weight}).tolist() == [4.0, 5.0, 6.0, 7.0]  # reference file
    assert probe_direction({"direction": torch.ones(3)}).tolist() == [1.0, 1.0, 1.0]
    assert probe_direction(torch.ones(3, dtype=torch.bfloat16)).dtype == torch.float32
    for bad in ({"weight": torch.ones(3, 4)}, {"weight": torch.zeros(4)}, {"a": torch.ones(2), "b": torch.ones(2)},
                {"weight": torch.ones(4, dtype=torch.int64)}):
        with pytest.raises(RecipeError):
            probe_direction(bad)


@pytest.mark.parametrize(
    ("name", "target", "layer"),
    [
        ("model.layers.7.mlp.gate_proj.weight", "mlp.gate_proj", 7),
        ("model.layers.7.mlp.gate_proj.weight", "gate_proj", 7),
        ("model.layers.7.mlp.up_proj.weight", "mlp.gate_proj", None),
        ("model.layers.7.mlp.xgate_proj.weight", "gate_proj", None),
        ("model.layers.7.mlp.gate_proj.bias", "mlp.gate_proj", None),
        ("model.decoder.layers.3.fc1.weight", "fc1", 3),
        ("model.layers.2.mlp.experts.5.gate_proj.weight", "gate_proj", 2),
        ("mlp.gate_proj.weight", "mlp.gate_proj", None),
    ],
)
def test_target_layer(name: str, target: str, layer: int | None) -> None:
    assert target_layer(name, target) == layer


def test_errors_are_clear() -> None:
    state = _hand_model()
    with pytest.raises(RecipeError, match="larger than the number of candidate rows"):
        _run(state, _params(W, top_k=9))
    with pytest.raises(RecipeError, match="no target modules matching 'mlp.w1'"):
        _run(state, _params(W, target="mlp.w1"))
    with pytest.raises(RecipeError, match="probe has hidden size 5"):
        _run(state, _params(torch.ones(5)))
    with pytest.raises(RecipeError, match="direction"):
        get_method("surgery").reducer(_params(W, direction="sideways"), 0)
    red = get_method("surgery").reducer(_params("probe.safetensors"), 0)
    with pytest.raises(RecipeError, match="probe"):
        red.observe(_job(GATE.format(0), state[GATE.format(0)], _params("probe.safetensors")))


def test_probe_file_name_is_replaced_by_the_jobs_tensors() -> None:
    """The engine may build the reducer from scalar params (probe = file name) and hand the
    loaded tensors only to jobs: the first target job then supplies the direction."""
    state = _hand_model()
    red = get_method("surgery").reducer(_params("probe.safetensors", top_k=1), 0)
    for name, t in state.items():
        red.observe(_job(name, t, _params({"weight": W}, top_k=1)))
    assert [(e.layer, e.row) for e in red.result().entries] == [(0, 0)]


def test_registered_spec() -> None:
    spec = get_method("surgery")
    assert spec is not None and spec.needs_base and spec.min_models == 0 and spec.max_models == 0
    assert spec.scope({}) == "global"
    assert {p.name for p in spec.params} == {"probe", "alpha", "top_k", "fraction", "target", "direction"}
    assert spec.param("probe").kind == "tensor_file"


# ---------------------------------------------------------------------------------------------
# Property: the streaming, bounded selection equals a brute-force sort of every row
# ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    n_layers=st.integers(1, 5),
    rows=st.integers(1, 7),
    k=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    direction=st.sampled_from(["suppress", "promote"]),
    use_fraction=st.booleans(),
)
def test_matches_brute_force(n_layers: int, rows: int, k: int, seed: int, direction: str, use_fraction: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    d = 3
    # Small integer entries make many exactly tied scores (shared rows repeat across layers).
    pool = torch.randint(-2, 3, (4, d), generator=g).float()
    state = {GATE.format(i): pool[torch.randint(0, 4, (rows,), generator=g)] for i in range(n_layers)}
    w = torch.randint(-2, 3, (d,), generator=g).float()
    if not w.any():
        w[0] = 1.0
    n = n_layers * rows
    k = min(k, n)
    params = _params(w, direction=direction, **({"fraction": k / n} if use_fraction else {"top_k": k}))
    order = list(state)[::-1] if seed % 2 else list(state)
    sel = _run(state, params, order)
    v = w if direction == "suppress" else -w
    brute = []
    for name, m in state.items():
        s = row_scores(m, v)
        brute += [(-float(s[r]), target_layer(name, "mlp.gate_proj"), name, r) for r in range(m.shape[0])]
    brute.sort()
    assert [(e.layer, e.row) for e in sel.entries] == [(b[1], b[3]) for b in brute[:k]]
    assert [e.score for e in sel.entries] == [-b[0] for b in brute[:k]]


# ---------------------------------------------------------------------------------------------
# End to end: a synthetic Llama checkpoint through the engine, the sidecar, undo and the CLI
# ---------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mergekit_lite.errors import CheckpointError, UsageError  # noqa: E402
from mergekit_lite.io.checkpoint import open_checkpoint  # noqa: E402
from mergekit_lite.synthetic import LlamaShape, make_base, save_checkpoint  # noqa: E402
from mergekit_lite.workflows.surgery import (  # noqa: E402
    SIDECAR_JSON,
    SIDECAR_ROWS,
    surgery,
    undo_surgery,
)

SHAPE = LlamaShape()  # hidden 16, 32 gate rows per layer, 2 layers


def _model(tmp_path: Path, *, tie: bool = False, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, dict]:
    state = make_base(SHAPE, seed=3)
    if tie:  # layer 1's rows = 2 × layer 0's rows: every score tied exactly across the layers
        state[GATE.format(1)] = state[GATE.format(0)].to(dtype).float() * 2
    path = save_checkpoint(state, tmp_path / "model", shape=SHAPE, num_shards=2, dtype=dtype)
    return path, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _probe(tmp_path: Path, w: torch.Tensor, name: str = "probe.safetensors") -> Path:
    path = tmp_path / name
    save_file({"weight": torch.stack([torch.zeros_like(w), w]), "bias": torch.zeros(2)}, str(path))
    return path


def _w(seed: int = 5, d: int = 16) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(path)
    return {n: ck.load(n) for n in ck.names()}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _expected_selection(state: dict, w: torch.Tensor, k: int, sign: float = 1.0) -> list[tuple[int, int]]:
    rows = []
    for layer in range(SHAPE.num_hidden_layers):
        g = state[GATE.format(layer)].double()
        cos = (g @ w.double()) / (g.norm(dim=1) * w.double().norm())
        rows += [(-sign * float(cos[i]), layer, i) for i in range(g.shape[0])]
    return [(layer, i) for _, layer, i in sorted(rows, key=lambda r: (-r[0], r[1], r[2]))[:k]]


def test_e2e_golden_edit_and_untouched_bytes(tmp_path: Path) -> None:
    model, state = _model(tmp_path)
    w = _w()
    res = surgery(model, _probe(tmp_path, w), alpha=1.25, top_k=10, out=tmp_path / "edited")
    expected = _expected_selection(state, w, 10)
    assert [(e.layer, e.row) for e in res.selection.entries] == expected
    edited = _tensors(res.output)
    assert set(edited) == set(state)
    for name, t in state.items():
        layer = target_layer(name, "mlp.gate_proj")
        if layer is None:
            assert _bits(edited[name]) == _bits(t), name  # byte-identical
            continue
        sel = [r for (lay, r) in expected if lay == layer]
        want = t.clone()
        want[sel] = (t[sel].float() + 1.25 * w).to(t.dtype)  # fp32 edit, cast once
        assert edited[name].dtype == torch.bfloat16
        assert _bits(edited[name]) == _bits(want), name
    record = __import__("json").loads((res.output / SIDECAR_JSON).read_text())
    assert [(r[1], r[2]) for r in record["selected"]] == expected
    assert record["alpha"] == 1.25 and record["direction"] == "suppress" and record["top_k"] == 10
    originals = load_file(str(res.output / SIDECAR_ROWS))
    for layer in range(2):
        name = GATE.format(layer)
        rows = sorted(r for (lay, r) in expected if lay == layer)
        if rows:
            assert originals[name + "::rows"].tolist() == rows
            assert _bits(originals[name]) == _bits(state[name][rows])


def test_e2e_undo_restores_bit_exactly(tmp_path: Path) -> None:
    model, state = _model(tmp_path)
    res = surgery(model, _probe(tmp_path, _w(7)), alpha=3.0, top_k=12, out=tmp_path / "edited")
    restored = undo_surgery(res.output, tmp_path / "restored")
    got = _tensors(restored)
    assert set(got) == set(state)
    for name, t in state.items():
        assert got[name].dtype == t.dtype and _bits(got[name]) == _bits(t), name
    assert not (restored / SIDECAR_JSON).exists() and not (restored / SIDECAR_ROWS).exists()
    assert (restored / "config.json").is_file()


def test_e2e_ties_through_the_engine(tmp_path: Path) -> None:
    model, state = _model(tmp_path, tie=True, dtype=torch.float32)
    w = _w(9)
    res = surgery(model, _probe(tmp_path, w), top_k=7, out=tmp_path / "edited")
    # Layer 1 row i ties exactly with layer 0 row i, so the order alternates layer 0, layer 1.
    s0 = row_scores(state[GATE.format(0)], w)
    order0 = torch.sort(s0, descending=True, stable=True).indices.tolist()
    expected = [(layer, r) for r in order0[:4] for layer in (0, 1)][:7]
    assert [(e.layer, e.row) for e in res.selection.entries] == expected
    assert res.selection.entries[0].score == res.selection.entries[1].score


def test_e2e_fraction_promote_and_state_dict(tmp_path: Path) -> None:
    model, state = _model(tmp_path, dtype=torch.float32)
    w = _w(11)
    res = surgery(model, _probe(tmp_path, w), direction="promote", fraction=0.1)  # round(0.1 · 64) = 6
    assert res.output is None and res.state_dict is not None and res.k == 6
    expected = _expected_selection(state, w, 6, sign=-1.0)
    assert [(e.layer, e.row) for e in res.selection.entries] == expected
    layer, row = expected[0]
    name = GATE.format(layer)
    assert torch.equal(res.state_dict[name][row], state[name][row] - w)
    assert res.record["selected"][0][:3] == [name, layer, row]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"top_k": 65}, UsageError, "larger than the number of candidate rows"),
        ({"target": "mlp.w1"}, CheckpointError, "no tensors match target 'mlp.w1'"),
        ({"top_k": 3, "fraction": 0.1}, UsageError, "not both"),
        ({"fraction": 1.5}, UsageError, "fraction"),
        ({"direction": "up"}, UsageError, "direction"),
    ],
)
def test_e2e_errors(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    model, _ = _model(tmp_path)
    with pytest.raises(error, match=match):
        surgery(model, _probe(tmp_path, _w()), out=tmp_path / "edited", **kwargs)
    assert not (tmp_path / "edited").exists()


def test_e2e_probe_of_wrong_size(tmp_path: Path) -> None:
    model, _ = _model(tmp_path)
    probe = _probe(tmp_path, _w(d=12), "small.safetensors")
    with pytest.raises(UsageError, match=r"small\.safetensors has hidden size 12 but model .* has 16"):
        surgery(model, probe, out=tmp_path / "edited")


def test_e2e_pt_probe_needs_opt_in(tmp_path: Path) -> None:
    model, state = _model(tmp_path)
    w = _w()
    torch.save({"mlp.weight": torch.stack([-w, w]), "mlp.bias": torch.zeros(2)}, tmp_path / "ref_probe.pt")
    with pytest.raises(UsageError, match="allow-pt"):
        surgery(model, tmp_path / "ref_probe.pt", top_k=4)
    res = surgery(model, tmp_path / "ref_probe.pt", top_k=4, allow_pt=True)
    assert [(e.layer, e.row) for e in res.selection.entries] == _expected_selection(state, w, 4)


def test_undo_without_sidecar_fails_clearly(tmp_path: Path) -> None:
    model, _ = _model(tmp_path)
    with pytest.raises(CheckpointError, match="no surgery.json"):
        undo_surgery(model, tmp_path / "restored")


def _cli_app():
    from mergekit_lite.cli.main import app

    return app


def test_cli_surgery_and_undo(tmp_path: Path) -> None:
    app = _cli_app()
    model, state = _model(tmp_path)
    probe = _probe(tmp_path, _w())
    runner = CliRunner()
    edited = tmp_path / "edited"
    r = runner.invoke(app, ["surgery", "--model", str(model), "--probe", str(probe), "--top-k", "5",
                            "--alpha", "2", "--out", str(edited)])
    assert r.exit_code == 0, r.output
    assert "edited 5 of 64" in r.output and (edited / SIDECAR_JSON).is_file()
    r = runner.invoke(app, ["surgery", "--undo", str(edited), "--out", str(tmp_path / "restored")])
    assert r.exit_code == 0, r.output
    got = _tensors(tmp_path / "restored")
    assert all(_bits(got[n]) == _bits(t) for n, t in state.items())
    # User mistakes: one line, the promised exit code, no traceback.
    r = runner.invoke(app, ["surgery", "--model", str(model), "--probe", str(probe), "--top-k", "100",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "larger than the number of candidate rows" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["surgery", "--model", str(model), "--probe", str(probe), "--target", "fc9",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 4 and "no tensors match target 'fc9'" in r.output
    small = _probe(tmp_path, _w(d=12), "small.safetensors")
    r = runner.invoke(app, ["surgery", "--model", str(model), "--probe", str(small), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "small.safetensors has hidden size 12 but model" in r.output and "has 16" in r.output
    r = runner.invoke(app, ["surgery", "--undo", str(edited)])
    assert r.exit_code == 2 and "--out" in r.output
    # an output over an input is refused, even with --force
    for args in (["--model", str(model), "--probe", str(probe), "--top-k", "5", "--out", str(model)],
                 ["--model", str(model), "--probe", str(probe), "--top-k", "5", "--out", str(tmp_path)],
                 ["--undo", str(edited), "--out", str(edited)]):
        r = runner.invoke(app, ["surgery", *args, "--force"])
        assert r.exit_code == 2 and "holds input file" in r.output, r.output
    assert all(_bits(t) == _bits(state[n]) for n, t in _tensors(model).items())


def test_recipe_step_after_a_merge(tmp_path: Path) -> None:
    """`surgery` as a recipe step edits the previous step's tensors in memory (probe path
    relative to the recipe)."""
    from mergekit_lite.api import run_recipe
    from mergekit_lite.synthetic import make_finetune

    base = make_base(SHAPE, seed=2)
    save_checkpoint(base, tmp_path / "base", shape=SHAPE)
    save_checkpoint(make_finetune(base, seed=1), tmp_path / "ft1", shape=SHAPE)
    w = _w(13)
    _probe(tmp_path, w)
    merge_only = {"inputs": {"base": str(tmp_path / "base"), "ft1": str(tmp_path / "ft1")},
                  "steps": [{"id": "merged", "method": "task_arithmetic", "base": "base", "models": ["ft1"],
                             "parameters": {"lambda": 0.5}}]}
    merged = run_recipe(merge_only).state_dict
    (tmp_path / "recipe.yaml").write_text(
        "inputs: {base: base, ft1: ft1}\n"
        "steps:\n"
        "  - {id: merged, method: task_arithmetic, base: base, models: [ft1], parameters: {lambda: 0.5}}\n"
        "  - {id: detox, method: surgery, base: merged, parameters: {probe: probe.safetensors, top_k: 6, alpha: 0.5}}\n"
    )
    res = run_recipe(tmp_path / "recipe.yaml")
    sel = res.stats["detox"]
    assert [(e.layer, e.row) for e in sel.entries] == _expected_selection(merged, w, 6)
    for name, t in merged.items():
        want = t.clone()
        if name in sel.rows:
            want[sel.rows[name]] += 0.5 * w
        assert torch.equal(res.state_dict[name], want), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path: Path) -> None:
    model, _ = _model(tmp_path)
    probe = _probe(tmp_path, _w(17))
    cpu = surgery(model, probe, top_k=9)
    gpu = surgery(model, probe, top_k=9, device="cuda")
    assert [(e.layer, e.row) for e in gpu.selection.entries] == [(e.layer, e.row) for e in cpu.selection.entries]
    for name, t in cpu.state_dict.items():
        assert torch.equal(gpu.state_dict[name].cpu(), t), name


def test_e2e_row_blocked_run_is_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the engine streaming every big tensor in small row blocks the result is the same."""
    from mergekit_lite.engine import stream

    model, _ = _model(tmp_path)
    probe = _probe(tmp_path, _w(19))
    whole = surgery(model, probe, top_k=11, alpha=0.75)
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100, raising=False)  # 32×16 gates → 6-row blocks
    blocked = surgery(model, probe, top_k=11, alpha=0.75, out=tmp_path / "edited")
    assert blocked.selection.entries == whole.selection.entries
    got = _tensors(blocked.output)
    assert all(_bits(got[n]) == _bits(t) for n, t in whole.state_dict.items())


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
def test_scoring_reads_the_targets_and_untouched_tensors_keep_their_values(tmp_path: Path, out_dtype: str) -> None:
    """The scoring pass reads the target tensors only (and the dry run says so); every other
    tensor is written as stored (bf16 output) or as its exact float32 value (float32 output)."""
    from mergekit_lite.api import dry_run, run_recipe
    from mergekit_lite.io.checkpoint import open_checkpoint

    model, state = _model(tmp_path)
    w = _w(23)
    _probe(tmp_path, w)
    recipe = {"inputs": {"model": str(model)},
              "steps": [{"id": "s", "method": "surgery", "base": "model",
                         "parameters": {"probe": str(tmp_path / "probe.safetensors"), "top_k": 7}}],
              "output": {"path": str(tmp_path / "out"), "dtype": out_dtype}}
    planned = dry_run(recipe)["passes"]
    res = run_recipe(recipe)
    ck = open_checkpoint(model)
    targets = [n for n in ck.names() if target_layer(n, "mlp.gate_proj") is not None]
    target_bytes = sum(ck.info(n).nbytes for n in targets)
    assert [p["bytes_read"] for p in res.passes if p["kind"] == "statistics"] == [target_bytes]
    assert [p["bytes_read"] for p in planned if p["kind"] == "statistics"] == [target_bytes]
    sel = res.stats["s"]
    got = _tensors(tmp_path / "out")
    for name, t in state.items():
        want = t.float()
        if name in sel.rows:
            want[sel.rows[name]] += w
        want = want.to(getattr(torch, out_dtype))
        assert got[name].dtype == want.dtype and _bits(got[name]) == _bits(want), name


@pytest.mark.parametrize(("params", "needle"), [
    ("{probe: probe.safetensors, alpha: .inf}", "recipe.yaml:3: parameter 'alpha' of method 'surgery': must be a finite number"),
    ("{probe: probe.safetensors, top_k: 5, fraction: 0.5}", "recipe.yaml:3: method 'surgery' takes 'top_k' or 'fraction', not both"),
])
def test_recipe_refuses_what_the_api_refuses(params: str, needle: str, tmp_path: Path) -> None:
    """A recipe step is held to the API's rules: alpha finite, top_k or fraction (not both)."""
    from mergekit_lite.api import run_recipe

    save_checkpoint(make_base(SHAPE, seed=2), tmp_path / "base", shape=SHAPE)
    _probe(tmp_path, _w(13))
    (tmp_path / "recipe.yaml").write_text(
        f"inputs: {{base: base}}\nsteps:\n  - {{id: detox, method: surgery, base: base, parameters: {params}}}\n")
    with pytest.raises(RecipeError) as e:
        run_recipe(tmp_path / "recipe.yaml")
    assert needle in str(e.value), str(e.value)


def test_recipe_probe_size_error_names_the_probe_file(tmp_path: Path) -> None:
    from mergekit_lite.api import run_recipe

    save_checkpoint(make_base(SHAPE, seed=2), tmp_path / "base", shape=SHAPE)
    save_file({"weight": torch.ones(2, SHAPE.hidden_size + 1)}, str(tmp_path / "wide.safetensors"))
    (tmp_path / "recipe.yaml").write_text(
        "inputs: {base: base}\nsteps:\n  - {id: detox, method: surgery, base: base, "
        "parameters: {probe: wide.safetensors, top_k: 2}}\n")
    with pytest.raises(RecipeError, match=rf"probe {tmp_path / 'wide.safetensors'} has hidden size {SHAPE.hidden_size + 1}"):
        run_recipe(tmp_path / "recipe.yaml")


def test_undo_refuses_a_damaged_sidecar_and_edit_options(tmp_path: Path) -> None:
    from safetensors.torch import load_file as load_st
    from safetensors.torch import save_file as save_st

    model, _ = _model(tmp_path)
    res = surgery(model, _probe(tmp_path, _w(7)), alpha=3.0, top_k=4, out=tmp_path / "edited")
    runner = CliRunner()
    r = runner.invoke(_cli_app(), ["surgery", "--undo", str(res.output), "--out", str(tmp_path / "r"), "--alpha", "3"])
    assert r.exit_code == 2 and "--alpha has no effect" in r.output
    rows_file = res.output / SIDECAR_ROWS
    rows = load_st(str(rows_file))
    key = next(k for k in rows if k.endswith("::rows"))
    rows[key] = rows[key].float()
    save_st(rows, str(rows_file))
    r = runner.invoke(_cli_app(), ["surgery", "--undo", str(res.output), "--out", str(tmp_path / "r")])
    assert r.exit_code == 4 and "must be int64" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "r").exists()


def test_undo_refuses_rows_the_record_does_not_list_or_negative_indices(tmp_path: Path) -> None:
    """Undo restores every tensor of the rows file: one the record never selected (or a row
    -1, which torch reads as the last row) wrote a model that was not the original, exit 0."""
    import json

    from safetensors.torch import load_file as load_st
    from safetensors.torch import save_file as save_st

    model, state = _model(tmp_path)
    res = surgery(model, _probe(tmp_path, _w(7)), alpha=3.0, top_k=4, out=tmp_path / "edited")
    rows_file, meta = res.output / SIDECAR_ROWS, res.output / SIDECAR_JSON
    original_rows, original_meta = load_st(str(rows_file)), meta.read_text()
    extra = dict(original_rows)
    up = "model.layers.0.mlp.up_proj.weight"
    extra[up], extra[up + "::rows"] = state[up][:1].clone(), torch.tensor([0])
    save_st(extra, str(rows_file))
    with pytest.raises(CheckpointError, match=f"holds rows of '{up}', which surgery.json does not list"):
        undo_surgery(res.output, tmp_path / "r1")
    save_st(original_rows, str(rows_file))
    record = json.loads(original_meta)
    name, _, row = record["selected"][0][:3]
    record["selected"][0][2] = -1
    negative = dict(original_rows)
    negative[name + "::rows"] = torch.tensor(sorted([-1 if r == row else r for r in original_rows[name + "::rows"].tolist()]))
    meta.write_text(json.dumps(record))
    save_st(negative, str(rows_file))
    with pytest.raises(CheckpointError, match="row index out of range"):
        undo_surgery(res.output, tmp_path / "r2")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_editing_an_edited_model_warns_that_undo_goes_back_one_edit(tmp_path: Path, caplog) -> None:
    model, _ = _model(tmp_path)
    once = surgery(model, _probe(tmp_path, _w(7)), alpha=3.0, top_k=4, out=tmp_path / "once").output
    with caplog.at_level("WARNING"):
        surgery(once, _probe(tmp_path, _w(8), "p2.safetensors"), alpha=1.0, top_k=4, out=tmp_path / "twice")
    assert "edited by mlite surgery already" in caplog.text


def test_cli_surgery_on_a_full_disk_keeps_nothing_and_offers_no_resume(tmp_path: Path, monkeypatch) -> None:
    """A surgery that filled the disk kept a hidden partial output and said "`mlite surgery_cmd
    --resume` continues it": there is no such command, and surgery has no --resume (its sidecar
    is written from the run's own selection). It now says what failed and keeps nothing."""
    import errno
    import os

    from mergekit_lite.io import writer

    app = _cli_app()
    model, _ = _model(tmp_path)
    probe = _probe(tmp_path, _w())
    real_write = writer.CheckpointWriter.write

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "s" / "model.safetensors"))

    monkeypatch.setattr(writer.CheckpointWriter, "write", full_disk)
    r = CliRunner().invoke(app, ["surgery", "--model", str(model), "--probe", str(probe), "--top-k", "5",
                                 "--out", str(tmp_path / "s")])
    monkeypatch.setattr(writer.CheckpointWriter, "write", real_write)
    assert r.exit_code == 6
    assert " ".join(r.output.split()) == f"error: {tmp_path / 's' / 'model.safetensors'}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", "probe.safetensors"])


def test_a_recipe_step_asking_too_many_rows_names_its_line_and_step(tmp_path: Path) -> None:
    """Found by the statistics pass, the error named the method only ("surgery: top_k = ..."),
    not the recipe line or the step, as every other recipe problem does."""
    import yaml

    app = _cli_app()
    model, _ = _model(tmp_path)
    probe = _probe(tmp_path, _w())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "inputs": {"model": str(model)},
        "steps": [{"id": "detox", "method": "surgery", "base": "model",
                   "parameters": {"probe": str(probe), "top_k": 100}}],
    }, sort_keys=False))
    r = CliRunner().invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "o")])
    assert r.exit_code == 3 and "Traceback" not in r.output
    assert " ".join(r.output.split()).startswith(
        f"error: {recipe}:4: step 'detox': surgery: top_k = 100 is larger than the number of candidate rows"), r.output
    assert not (tmp_path / "o").exists()
