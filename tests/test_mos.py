"""MOS merging: golden values, laws, the CLI against a hand merge, delta space, and retrieval."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_lite.errors import UsageError
from mergekit_lite.io.bank import load_bank
from mergekit_lite.methods.mos import (
    lora_scaling,
    mos_merge_sequential,
    mos_merge_stored,
    mos_sequential_tensors,
    mos_stored_tensors,
    refactor_lowrank,
)
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.synthetic import LlamaShape, make_base, make_lora_adapter
from mergekit_lite.workflows.mos import bank_add, bank_export, bank_set_prototypes, mos_merge, retrieve


def _cli_app():
    # Imported lazily so that the pure-maths tests still run when another command module breaks.
    return importlib.import_module("mergekit_lite.cli.main").app


def mlite(*args: object):
    return CliRunner().invoke(_cli_app(), [str(a) for a in args])


T = torch.tensor
A0 = {"w": T([[1.0, 2.0]]), "b": T([0.0])}
A1 = {"w": T([[3.0, 4.0]]), "b": T([2.0])}
A2 = {"w": T([[5.0, 8.0]]), "b": T([4.0])}


# ---------------------------------------------------------------------------------------------
# golden values


def test_stored_golden() -> None:
    out = mos_merge_stored([A0, A1, A2], momentum=0.5)
    assert torch.equal(out[0]["w"], A0["w"])
    # A'1 = .5·A1 + .5·A0;  A'2 = .5·A2 + .5·mean(A0, A1)
    assert torch.allclose(out[1]["w"], T([[2.0, 3.0]]))
    assert torch.allclose(out[2]["w"], T([[3.5, 5.5]]))
    assert torch.allclose(out[1]["b"], T([1.0])) and torch.allclose(out[2]["b"], T([2.5]))


def test_sequential_golden() -> None:
    out = mos_merge_sequential([A0, A1, A2], momentum=0.5)
    # A'2 = .5·A2 + .5·mean(A'0, A'1) = [2.5, 4] + .5·[1.5, 2.5]
    assert torch.allclose(out[1]["w"], T([[2.0, 3.0]]))
    assert torch.allclose(out[2]["w"], T([[3.25, 5.25]]))
    assert torch.allclose(out[2]["b"], T([2.0 + 0.5 * 0.5]))


def test_momentum_extremes() -> None:
    ts = [T([1.0, -1.0]), T([3.0, 5.0]), T([8.0, 0.0]), T([-4.0, 4.0])]
    for fn in (mos_stored_tensors, mos_sequential_tensors):
        assert all(torch.equal(a, b) for a, b in zip(fn(ts, 0.0), ts, strict=True))
    stored = mos_stored_tensors(ts, 1.0)
    for t in range(1, 4):  # the mean of the earlier given adapters
        assert torch.allclose(stored[t], torch.stack(ts[:t]).mean(0))
    seq = mos_sequential_tensors(ts, 1.0)
    for t in range(1, 4):  # the running mean of merged adapters, which all equal A0
        assert torch.allclose(seq[t], torch.stack(seq[:t]).mean(0)) and torch.allclose(seq[t], ts[0])


def test_order_matters() -> None:
    ts = [T([1.0]), T([3.0]), T([8.0])]
    forward = mos_stored_tensors(ts, 0.5)
    backward = mos_stored_tensors(ts[::-1], 0.5)[::-1]
    # task "8" merged last: .5·8 + .5·2 = 5; merged first it stays 8.
    assert forward[2].item() == pytest.approx(5.0) and backward[2].item() == pytest.approx(8.0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="momentum"):
        mos_stored_tensors([T([1.0])], 1.5)
    with pytest.raises(ValueError, match="same parameters"):
        mos_merge_stored([{"a": T([1.0])}, {"b": T([1.0])}], 0.1)
    assert mos_merge_stored([], 0.1) == []


# ---------------------------------------------------------------------------------------------
# laws

vectors = st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=3)


@settings(max_examples=40, deadline=None)
@given(st.lists(vectors, min_size=1, max_size=5), st.floats(0.0, 1.0), st.sampled_from(["stored", "sequential"]))
def test_laws(rows: list[list[float]], m: float, mode: str) -> None:
    ts = [torch.tensor(r, dtype=torch.float64) for r in rows]
    fn = mos_stored_tensors if mode == "stored" else mos_sequential_tensors
    out = fn(ts, m)
    assert torch.equal(out[0], ts[0])
    scaled = fn([3.0 * t for t in ts], m)  # linear
    assert all(torch.allclose(3.0 * a, b, atol=1e-9) for a, b in zip(out, scaled, strict=True))
    same = fn([ts[0]] * len(ts), m)  # identical adapters are a fixed point
    assert all(torch.allclose(s, ts[0], atol=1e-9) for s in same)
    for t in range(1, len(ts)):  # the formula, written out
        earlier = torch.stack((ts if mode == "stored" else out)[:t]).mean(0)
        assert torch.allclose(out[t], (1 - m) * ts[t] + m * earlier, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# registered method


def test_registered_method_gives_the_last_task() -> None:
    spec = get_method("mos")
    assert spec is not None and spec.ordered and not spec.needs_base
    assert spec.defaults() == {"momentum": 0.1, "mode": "stored"}
    assert spec.param("momentum").check(1.5) is not None
    models = [A0["w"], A1["w"], A2["w"]]
    job = TensorJob(name="w", base=None, models=models, params={"momentum": 0.5, "mode": "sequential"})
    assert torch.allclose(spec.merge(job), T([[3.25, 5.25]]))
    job = TensorJob(name="w", base=None, models=models[:1], params={"momentum": 0.5, "mode": "stored"})
    assert torch.equal(spec.merge(job), A0["w"])


# ---------------------------------------------------------------------------------------------
# the CLI against a merge by hand


def _raw_bank(tmp_path: Path, order: tuple[int, ...] = (0, 1, 2)) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)
    adapters = [
        {"down.weight": torch.randn(3, 5, generator=g), "down.bias": torch.randn(3, generator=g), "up.weight": torch.randn(5, 3, generator=g)}
        for _ in range(3)
    ]
    bank = tmp_path / f"bank{''.join(map(str, order))}.safetensors"
    for i in order:
        save_file(adapters[i], str(tmp_path / f"raw{i}.safetensors"))
        assert mlite("bank", "add", bank, "--task", f"t{i}", tmp_path / f"raw{i}.safetensors").exit_code == 0
    return bank, adapters


@pytest.mark.parametrize("mode", ["stored", "sequential"])
def test_cli_merge_equals_hand_merge(tmp_path: Path, mode: str) -> None:
    bank, (a0, a1, a2) = _raw_bank(tmp_path)
    out = tmp_path / "merged.safetensors"
    r = mlite("mos", "merge", bank, "--momentum", "0.3", "--mode", mode, "--out", out)
    assert r.exit_code == 0, r.output
    merged = load_bank(out)
    assert merged.tasks == ["t0", "t1", "t2"] and merged.merge == {"momentum": 0.3, "mode": mode, "space": "factors", "rank": None,
                                                         "tasks": ["t0", "t1", "t2"]}
    m = 0.3
    for name in a0:
        h1 = (1 - m) * a1[name] + m * a0[name]
        earlier = (a0[name] + a1[name]) / 2 if mode == "stored" else (a0[name] + h1) / 2
        h2 = (1 - m) * a2[name] + m * earlier
        assert torch.equal(merged.members["t0"].tensors[name], a0[name])  # task 0 unchanged
        assert torch.allclose(merged.members["t1"].tensors[name], h1, atol=1e-6)
        assert torch.allclose(merged.members["t2"].tensors[name], h2, atol=1e-6)
    exported = tmp_path / "t2.safetensors"
    assert mlite("bank", "export", out, "--task", "t2", "--out", exported).exit_code == 0
    assert torch.allclose(load_file(str(exported))["up.weight"], merged.members["t2"].tensors["up.weight"])


def test_cli_momentum_zero_and_one(tmp_path: Path) -> None:
    bank, adapters = _raw_bank(tmp_path)
    assert mlite("mos", "merge", bank, "--momentum", "0", "--out", tmp_path / "m0.safetensors").exit_code == 0
    m0 = load_bank(tmp_path / "m0.safetensors")
    for t, a in enumerate(adapters):
        assert all(torch.equal(m0.members[f"t{t}"].tensors[k], v) for k, v in a.items())
    assert mlite("mos", "merge", bank, "--momentum", "1", "--out", tmp_path / "m1.safetensors").exit_code == 0
    m1 = load_bank(tmp_path / "m1.safetensors")
    for k in adapters[0]:
        assert torch.allclose(m1.members["t2"].tensors[k], (adapters[0][k] + adapters[1][k]) / 2)
        assert torch.allclose(m1.members["t1"].tensors[k], adapters[0][k])


def test_task_order_changes_the_result(tmp_path: Path) -> None:
    bank, _ = _raw_bank(tmp_path)
    rev, _ = _raw_bank(tmp_path, order=(2, 1, 0))
    a = mos_merge(bank, momentum=0.5)
    b = mos_merge(rev, momentum=0.5)
    assert b.tasks == ["t2", "t1", "t0"]
    assert torch.equal(b.members["t2"].tensors["up.weight"], load_file(str(tmp_path / "raw2.safetensors"))["up.weight"])
    assert not torch.allclose(a.members["t2"].tensors["up.weight"], b.members["t2"].tensors["up.weight"])


def test_cli_merge_refusals(tmp_path: Path) -> None:
    bank, _ = _raw_bank(tmp_path)
    out = tmp_path / "m.safetensors"
    for args, msg in (
        (("--momentum", "1.5"), "momentum"),
        (("--mode", "greedy"), "mode"),
        (("--space", "weights"), "space"),
        (("--rank", "2"), "rank only applies"),
        (("--space", "delta"), "needs LoRA members"),
    ):
        r = mlite("mos", "merge", bank, *args, "--out", out)
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
        assert not out.exists()
    r = mlite("mos", "merge", tmp_path / "missing.safetensors", "--out", out)
    assert r.exit_code == 2 and not out.exists()
    out.write_bytes(b"old")
    r = mlite("mos", "merge", bank, "--out", out)
    assert r.exit_code == 2 and "already exists" in r.output and out.read_bytes() == b"old"
    assert mlite("mos", "merge", bank, "--out", out, "--force").exit_code == 0
    assert load_bank(out).tasks == ["t0", "t1", "t2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# LoRA banks: factors and delta space


@pytest.fixture
def lora_bank(tmp_path: Path) -> Path:
    base = make_base(LlamaShape())
    bank = tmp_path / "lora.safetensors"
    for i in range(3):
        bank_add(bank, f"t{i}", make_lora_adapter(base, tmp_path / f"l{i}", seed=i))
    return bank


def _dense(member, module: str, scaling: float) -> torch.Tensor:
    t = member.tensors
    return scaling * t[f"{module}.lora_B.weight"].double() @ t[f"{module}.lora_A.weight"].double()


def test_delta_space_full_rank_is_exact(lora_bank: Path) -> None:
    b = load_bank(lora_bank)
    s = lora_scaling(8.0, 4)
    merged = mos_merge(lora_bank, momentum=0.4, space="delta", rank=16)
    assert merged.members["t1"].adapter_config["r"] == 16
    s16 = lora_scaling(8.0, 16)
    for mod in b.members["t0"].modules():
        d = [_dense(b.members[f"t{i}"], mod, s) for i in range(3)]
        want = [d[0], 0.6 * d[1] + 0.4 * d[0], 0.6 * d[2] + 0.4 * (d[0] + d[1]) / 2]
        for i in range(3):
            assert torch.allclose(_dense(merged.members[f"t{i}"], mod, s16), want[i], atol=1e-6)


def test_delta_space_keeps_the_factors_of_unchanged_tasks(lora_bank: Path) -> None:
    """A'₀ = A₀, and every A'ₜ = Aₜ at momentum 0: the stored factors, bit for bit, not an SVD of them."""
    b = load_bank(lora_bank)
    for momentum, unchanged in ((0.0, ("t0", "t1", "t2")), (0.5, ("t0",))):
        merged = mos_merge(lora_bank, momentum=momentum, space="delta")
        for task in b.members:
            same = all(torch.equal(merged.members[task].tensors[k], v) for k, v in b.members[task].tensors.items())
            assert same == (task in unchanged), (momentum, task)
    # At another rank the factors must change shape, so they are re-factored even when unchanged.
    merged = mos_merge(lora_bank, momentum=0.0, space="delta", rank=2)
    assert all(v.shape[0] == 2 for k, v in merged.members["t0"].tensors.items() if "lora_A" in k)


def test_delta_space_default_rank_is_the_best_truncation(lora_bank: Path) -> None:
    b = load_bank(lora_bank)
    s = lora_scaling(8.0, 4)
    m0 = mos_merge(lora_bank, momentum=0.0, space="delta")  # rank-4 ΔW re-factored at rank 4: exact
    merged = mos_merge(lora_bank, momentum=0.5, space="delta")
    mod = b.members["t0"].modules()[0]
    assert torch.allclose(_dense(m0.members["t2"], mod, s), _dense(b.members["t2"], mod, s), atol=1e-6)
    d = [_dense(b.members[f"t{i}"], mod, s) for i in range(3)]
    want = 0.5 * d[2] + 0.5 * (d[0] + d[1]) / 2
    u, sv, vh = torch.linalg.svd(want)
    best = (u[:, :4] * sv[:4]) @ vh[:4]
    assert torch.allclose(_dense(merged.members["t2"], mod, s), best, atol=1e-6)


def test_outputs_never_replace_the_input_bank(lora_bank: Path, tmp_path: Path) -> None:
    before = lora_bank.read_bytes()
    with pytest.raises(UsageError, match="is input file"):
        mos_merge(lora_bank, momentum=0.5, out=lora_bank, force=True)
    with pytest.raises(UsageError, match="is input file"):
        bank_export(lora_bank, "t0", lora_bank, force=True)
    assert lora_bank.read_bytes() == before


def test_in_memory_merge_exports_like_a_bank_file(lora_bank: Path, tmp_path: Path) -> None:
    merged = mos_merge(lora_bank, momentum=0.5)  # out=None: a Bank in memory
    path = mos_merge(lora_bank, momentum=0.5, out=tmp_path / "merged.safetensors")
    a = bank_export(merged, "t2", tmp_path / "from_memory")
    b = bank_export(path, "t2", tmp_path / "from_file")
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_factors_space_on_lora(lora_bank: Path, tmp_path: Path) -> None:
    b = load_bank(lora_bank)
    merged = mos_merge(lora_bank, momentum=0.2)
    name = next(iter(b.members["t0"].tensors))
    want = 0.8 * b.members["t1"].tensors[name] + 0.2 * b.members["t0"].tensors[name]
    assert torch.allclose(merged.members["t1"].tensors[name], want)
    # members with another LoRA scale cannot be merged factor by factor
    odd = make_lora_adapter(make_base(LlamaShape()), tmp_path / "odd", seed=9, alpha=16.0)
    bank_add(lora_bank, "odd", odd)
    with pytest.raises(UsageError, match="task 'odd'.*space 'delta'"):
        mos_merge(lora_bank)
    assert set(mos_merge(lora_bank, space="delta").tasks) == {"t0", "t1", "t2", "odd"}


def test_refactor_lowrank() -> None:
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(6, 3, generator=g)
    b, a = refactor_lowrank(delta, 5, scaling=2.0)  # rank above min(shape): zero-padded, exact
    assert b.shape == (6, 5) and a.shape == (5, 3)
    assert torch.allclose(2.0 * b @ a, delta, atol=1e-5)
    b1, a1 = refactor_lowrank(delta, 1, scaling=0.5)
    u, s, vh = torch.linalg.svd(delta)
    assert torch.allclose(0.5 * b1 @ a1, s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5)
    assert torch.equal(refactor_lowrank(torch.zeros(4, 3), 2, 1.0)[0], torch.zeros(4, 2))
    with pytest.raises(ValueError):
        refactor_lowrank(delta, 0, 1.0)


# ---------------------------------------------------------------------------------------------
# retrieval


PROTOS = torch.eye(4)  # classes 0,1 → task 0; classes 2,3 → task 1
C2T = [0, 0, 1, 1]


def _features(shifts: list[torch.Tensor], calls: list[object]):
    def fn(x: torch.Tensor, adapter):
        calls.append(None if adapter is None else int(adapter["id"]))
        return x if adapter is None else x + shifts[int(adapter["id"])]

    return fn


def test_retrieval_refines_then_ensembles() -> None:
    adapters = [{"id": torch.tensor(0)}, {"id": torch.tensor(1)}]
    # sample 0: bare → class 0 (task 0); adapter 0 → class 2 (task 1); adapter 1 → class 3 (task 1): stable.
    # sample 1: bare → class 3 (task 1); adapter 1 keeps class 3: stable at once.
    x = T([[1.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.1, 1.0]])
    shifts = [T([0.0, 0.0, 3.0, 0.0]), T([0.0, 0.0, 0.0, 5.0])]
    calls: list[object] = []
    r = retrieve(x, _features(shifts, calls), PROTOS, C2T, adapters, first_adapter=None)
    assert r.first_predictions.tolist() == [0, 3]
    assert r.tasks.tolist() == [1, 1] and r.rounds.tolist() == [2, 1]
    assert sorted(calls, key=str) == [0, 1, None]  # each adapter's features computed once
    cos = torch.nn.functional.normalize
    final0 = cos(x[0] + shifts[1], dim=0)
    want = final0.softmax(0) + (2 * cos(x[0], dim=0)).softmax(0)
    assert torch.allclose(r.scores[0], want, atol=1e-6)
    assert r.predictions.tolist() == r.scores.argmax(1).tolist()
    plain = retrieve(x, _features(shifts, []), PROTOS, C2T, adapters, ensemble=False, first_adapter=None)
    assert torch.allclose(plain.scores[0], final0, atol=1e-6)


def test_retrieval_stops_after_max_rounds() -> None:
    adapters = [{"id": torch.tensor(0)}, {"id": torch.tensor(1)}]
    # adapter 0 points to task 1 and adapter 1 back to task 0: it never settles
    shifts = [T([0.0, 0.0, 5.0, 0.0]), T([5.0, 0.0, 0.0, 0.0])]
    x = T([[1.0, 0.0, 0.0, 0.0]])
    r = retrieve(x, _features(shifts, []), PROTOS, C2T, adapters, first_adapter=None)
    assert r.rounds.tolist() == [4] and r.tasks.tolist() == [1]  # tasks visited: 0, 1, 0, 1
    r = retrieve(x, _features(shifts, []), PROTOS, C2T, adapters, max_rounds=1, first_adapter=None)
    assert r.rounds.tolist() == [1] and r.tasks.tolist() == [0]
    with pytest.raises(UsageError, match="max_rounds"):
        retrieve(x, _features(shifts, []), PROTOS, C2T, adapters, max_rounds=0)
    with pytest.raises(UsageError, match="outside"):
        retrieve(x, _features(shifts, []), PROTOS, [0, 0, 1, 2], adapters)
    with pytest.raises(UsageError, match="do not match"):
        retrieve(x, _features(shifts, []), PROTOS[:3], C2T, adapters)
    with pytest.raises(UsageError, match="features have width 3 but the prototypes"):
        retrieve(x[:, :3], lambda inp, adapter: inp, PROTOS, C2T, adapters)


def test_retrieval_from_a_bank(tmp_path: Path) -> None:
    bank = tmp_path / "bank.safetensors"
    for i, shift in enumerate([T([0.0, 0.0, 3.0, 0.0]), T([0.0, 0.0, 0.0, 5.0])]):
        save_file({"shift": shift}, str(tmp_path / f"a{i}.safetensors"))
        bank_add(bank, f"task{i}", tmp_path / f"a{i}.safetensors")
    bank_set_prototypes(bank, PROTOS, ["task0", "task0", "task1", "task1"])

    def fn(x: torch.Tensor, adapter):
        return x if adapter is None else x + adapter["shift"]

    r = retrieve(T([[1.0, 0.2, 0.0, 0.0]]), fn, bank=bank, ensemble=False, first_adapter=None)
    assert r.tasks.tolist() == [1] and r.rounds.tolist() == [2] and r.predictions.tolist() == [3]
    # the ensemble sharpens the first prediction by T = 2, which wins here (as in the reference)
    assert retrieve(T([[1.0, 0.2, 0.0, 0.0]]), fn, bank=bank, first_adapter=None).predictions.tolist() == [0]


def test_retrieval_follows_the_reference_evaluation() -> None:
    """As MOS's `_eval_cnn`: the first logits are the prototype classifier on the FIRST TASK's
    adapter features (`forward_orig`), every refinement round uses the trained head, and the
    ensemble adds softmax(T · first logits)."""
    g = torch.Generator().manual_seed(3)
    n, d, classes = 32, 6, 4
    x = torch.randn(n, d, generator=g)
    shifts = [torch.randn(d, generator=g) for _ in range(2)]
    adapters = [{"id": torch.tensor(i)} for i in range(2)]
    protos = torch.randn(classes, d, generator=g)
    head_w, head_b = torch.randn(classes, d, generator=g), torch.randn(classes, generator=g)

    def head(f: torch.Tensor) -> torch.Tensor:
        return f @ head_w.T + head_b

    feats = [x + shifts[i] for i in range(2)]
    # the reference, re-stated sample by sample
    cos = torch.nn.functional.normalize
    orig = cos(feats[0], dim=-1) @ cos(protos, dim=-1).T
    want_final, want_tasks = [], []
    for i in range(n):
        task = C2T[int(orig[i].argmax())]
        for loop in range(1, 5):
            logits = head(feats[task][i : i + 1])
            new = C2T[int(logits.argmax())]
            if loop >= 4 or new == task:
                break
            task = new
        want_final.append(logits)
        want_tasks.append(task)
    want = torch.cat(want_final).softmax(1) + (orig / (1 / 2)).softmax(1)

    calls: list[object] = []
    r = retrieve(x, _features(shifts, calls), protos, C2T, adapters, classifier=head)
    assert r.first_predictions.tolist() == orig.argmax(1).tolist()
    assert r.tasks.tolist() == want_tasks
    torch.testing.assert_close(r.scores, want, rtol=1e-6, atol=1e-6)
    assert None not in calls  # the bare backbone is never asked for
    # without a head, the prototypes score the rounds too; with only a head, it scores everything
    r2 = retrieve(x, _features(shifts, []), protos, C2T, adapters)
    assert r2.first_predictions.tolist() == orig.argmax(1).tolist()
    r3 = retrieve(x, _features(shifts, []), None, C2T, adapters, classifier=head)
    assert r3.first_predictions.tolist() == head(feats[0]).argmax(1).tolist()
    with pytest.raises(UsageError, match="first_adapter"):
        retrieve(x, _features(shifts, []), protos, C2T, adapters, first_adapter=2)


def test_recipe_step_merges_the_last_task(tmp_path: Path) -> None:
    """`method: mos` in a recipe: models are the tasks in order, the output is the last task merged."""
    g = torch.Generator().manual_seed(5)
    tasks = [{"down.weight": torch.randn(2, 4, generator=g), "down.bias": torch.randn(2, generator=g)} for _ in range(3)]
    for i, t in enumerate(tasks):
        (tmp_path / f"t{i}").mkdir()
        save_file(t, str(tmp_path / f"t{i}" / "model.safetensors"))
    (tmp_path / "mos.yaml").write_text(
        "inputs: {t0: t0, t1: t1, t2: t2}\n"
        "steps:\n"
        "  - {id: last, method: mos, models: [t0, t1, t2], parameters: {momentum: 0.5, mode: sequential}}\n"
        "output: {path: out, dtype: float32}\n"
    )
    r = mlite("merge", tmp_path / "mos.yaml")
    assert r.exit_code == 0, r.output
    out = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    for k, v in out.items():
        assert torch.allclose(v, mos_sequential_tensors([t[k] for t in tasks], 0.5)[-1], atol=1e-6)


def test_lora_scaling_follows_peft_patterns() -> None:
    from mergekit_lite.workflows.mos import _module_scaling

    cfg = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": 16}, "rank_pattern": {"layers.0.self_attn.v_proj": 2}}
    p = "base_model.model.model.layers."
    assert _module_scaling(cfg, p + "0.self_attn.q_proj") == 4.0
    assert _module_scaling(cfg, p + "0.self_attn.v_proj") == 4.0
    assert _module_scaling(cfg, p + "1.self_attn.v_proj") == 2.0
    assert _module_scaling({**cfg, "use_rslora": True}, p + "1.self_attn.v_proj") == 4.0
    # a key is one regex group, as in PEFT: an alternation covers both modules
    alt = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj|v_proj": 2}}
    assert _module_scaling(alt, p + "0.self_attn.q_proj") == 0.5
    assert _module_scaling(alt, p + "0.self_attn.v_proj") == 0.5
    assert _module_scaling(alt, p + "0.self_attn.k_proj") == 2.0


def test_delta_space_refuses_non_lora_tensors(tmp_path: Path) -> None:
    base = make_base(LlamaShape())
    bank = tmp_path / "bank.safetensors"
    for i in range(2):
        d = make_lora_adapter(base, tmp_path / f"l{i}", seed=i)
        tensors = load_file(str(d / "adapter_model.safetensors"))
        tensors["base_model.model.lm_head.weight"] = torch.zeros(64, 16)  # modules_to_save-like
        save_file(tensors, str(d / "adapter_model.safetensors"))
        bank_add(bank, f"t{i}", d)
    with pytest.raises(UsageError, match="lm_head.weight.*use space 'factors'"):
        mos_merge(bank, space="delta")
    assert torch.equal(mos_merge(bank).members["t1"].tensors["base_model.model.lm_head.weight"], torch.zeros(64, 16))
