"""Multiplicative (HUT) patches: the maths on hand-checked tensors, round trips, refusals, and
`mlite hadamard` through the real entry point on tiny sharded Llama-style checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import leftovers, load_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite import api
from mergekit_lite.errors import CheckpointError, UsageError
from mergekit_lite.io.checkpoint import open_checkpoint
from mergekit_lite.io.safetensors_format import read_header
from mergekit_lite.methods.hadamard import apply_multiplier, delta_from_multiplier, multiplier_from_delta
from mergekit_lite.synthetic import LlamaShape, make_base, make_finetune, save_checkpoint
from mergekit_lite.workflows import hadamard as hw

ENTRY = "import sys; from mergekit_lite.cli.main import main; sys.argv[0] = 'mlite'; main()"


def _mlite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True, timeout=120)


def read(path: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(path)
    return {n: ck.load(n) for n in ck.names()}


# ---- the maths ----------------------------------------------------------------------------------
def test_golden_values() -> None:
    w = torch.tensor([2.0, -4.0, 0.0, 0.0, 0.5, 8.0])
    d = torch.tensor([1.0, 2.0, 0.0, 3.0, -0.5, 0.0])
    split = multiplier_from_delta(w, d)
    assert split.multiplier.dtype == torch.float32
    assert split.multiplier.tolist() == [1.5, 0.5, 1.0, 1.0, 0.0, 1.0]
    assert split.unrepresentable.tolist() == [False, False, False, True, False, False]
    assert split.count == 1 and split.dropped_norm == 3.0
    m = torch.tensor([1.5, 0.5, 7.0, 1.0, 0.0, 1.25])
    assert apply_multiplier(w, m).tolist() == [3.0, -2.0, 0.0, 0.0, 0.0, 10.0]
    assert delta_from_multiplier(w, m).tolist() == [1.0, 2.0, 0.0, 0.0, -0.5, 2.0]
    assert apply_multiplier(w.bfloat16(), m).dtype == torch.bfloat16
    assert delta_from_multiplier(w, m, dtype=torch.float64).dtype == torch.float64


def test_a_quotient_that_overflows_the_stored_dtype_is_unrepresentable() -> None:
    w, d = torch.tensor([1e-4, 1.0]), torch.tensor([10.0, 1.0])
    assert multiplier_from_delta(w, d).count == 0  # 1e5 fits float32
    half = multiplier_from_delta(w, d, dtype=torch.float16)  # ... not float16 (max 65504)
    assert half.unrepresentable.tolist() == [True, False] and half.multiplier.tolist() == [1.0, 2.0]
    assert half.dropped_norm == pytest.approx(10.0, rel=1e-6)


def test_zero_delta_gives_exactly_one() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    w[::3] = 0.0
    w[1, 1] = -0.0
    split = multiplier_from_delta(w, torch.zeros_like(w))
    assert split.count == 0 and torch.equal(split.multiplier, torch.ones_like(w))
    assert torch.equal(apply_multiplier(w, split.multiplier), w)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 0.1, 3.0]))
def test_round_trip_is_within_float_rounding(seed: int, scale: float) -> None:
    """W ⊙ (W'/W) is W' within 1 ulp in float32, and bit-exact for bfloat16 weights (M in float32)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 24, generator=g)
    ft = w + scale * torch.randn(40, 24, generator=g)
    m = multiplier_from_delta(w, ft.double() - w.double()).multiplier
    back = apply_multiplier(w, m)
    assert torch.all((back - ft).abs() <= torch.finfo(torch.float32).eps * ft.abs())
    delta = delta_from_multiplier(w, m, dtype=torch.float64)
    torch.testing.assert_close(w.double() + delta, ft.double(), rtol=2**-23, atol=0)
    wb, fb = w.bfloat16(), ft.bfloat16()
    mb = multiplier_from_delta(wb, fb.double() - wb.double()).multiplier
    assert torch.equal(apply_multiplier(wb, mb), fb)


# ---- checkpoints --------------------------------------------------------------------------------
SHAPE = LlamaShape()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, its fine-tune, an evolved base, a base with zeros the fine-tune moves, and a bf16 pair."""
    root = tmp_path_factory.mktemp("hadamard")
    base = make_base(SHAPE, seed=1)
    ft = make_finetune(base, seed=2)
    new = {n: w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) for n, w in base.items()}
    zeroed = {n: w.clone() for n, w in base.items()}
    zeroed["model.layers.1.mlp.up_proj.weight"][0, :3] = 0.0  # the fine-tune moves these (dense delta)
    kw = dict(shape=SHAPE, num_shards=3)
    return {
        "base": save_checkpoint(base, root / "base", **kw),
        "ft": save_checkpoint(ft, root / "ft", **kw),
        "new": save_checkpoint(new, root / "new", **kw),
        "zeroed": save_checkpoint(zeroed, root / "zeroed", **kw),
        "base_bf16": save_checkpoint(base, root / "base_bf16", dtype=torch.bfloat16, **kw),
        "ft_bf16": save_checkpoint(ft, root / "ft_bf16", dtype=torch.bfloat16, **kw),
    }


@pytest.fixture(scope="module")
def multiplier(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mult") / "M"
    api.hadamard_to_multiplier(family["base"], family["ft"], out=out)
    return out


def test_multiplier_checkpoint_is_marked_and_reported(family: dict[str, Path], multiplier: Path) -> None:
    shards = sorted(multiplier.glob("*.safetensors"))
    assert shards and all(read_header(s).metadata.get("mlite_patch") == "multiplicative" for s in shards)
    assert not (multiplier / "config.json").exists()  # a multiplier must not load as a model
    report = json.loads((multiplier / hw.REPORT_FILE).read_text())
    assert report["operation"] == "to-multiplier" and report["unrepresentable"] == 0
    rows = {r["name"]: r for r in report["tensors"]}
    assert set(rows) == set(open_checkpoint(family["base"]).names())
    # a float32 M reproduces W' to ~1 ulp of W', which is ~1e-6 of a small ΔW (norms: W ≈ 1, ΔW ≈ 0.02)
    assert all(r["kind"] == "multiplier" and r["rel_error"] < 1e-5 and r["rel_change"] > 0 for r in rows.values())
    m = read(multiplier)
    assert {t.dtype for t in m.values()} == {torch.float32}


def test_apply_on_the_same_base_gives_the_fine_tune_back(family: dict[str, Path], multiplier: Path,
                                                         tmp_path: Path) -> None:
    res = api.hadamard_apply(family["base"], multiplier, out=tmp_path / "out")
    got, want = read(tmp_path / "out"), read(family["ft"])
    assert got.keys() == want.keys()
    for n in want:
        assert torch.all((got[n] - want[n]).abs() <= torch.finfo(torch.float32).eps * want[n].abs()), n
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert res.unrepresentable == 0 and all(r.kind == "multiplied" for r in res.tensors)
    assert leftovers(tmp_path) == []


def test_bf16_round_trip_is_bit_exact(family: dict[str, Path], tmp_path: Path) -> None:
    api.hadamard_to_multiplier(family["base_bf16"], family["ft_bf16"], out=tmp_path / "M")
    api.hadamard_apply(family["base_bf16"], tmp_path / "M", out=tmp_path / "out")
    got, want = load_dir(tmp_path / "out"), load_dir(family["ft_bf16"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_zero_delta_gives_m_one_and_the_base_back(family: dict[str, Path], tmp_path: Path) -> None:
    res = api.hadamard_to_multiplier(family["base"], family["base"])
    assert res.state_dict is not None and res.output is None
    assert all(torch.equal(t, torch.ones_like(t)) for t in res.state_dict.values())
    assert res.max_rel_change == 0.0 and all(r.rel_error == 0.0 for r in res.tensors)


def test_apply_onto_an_evolved_base_multiplies_it(family: dict[str, Path], multiplier: Path) -> None:
    res = api.hadamard_apply(family["new"], multiplier)
    new, m = read(family["new"]), read(multiplier)
    assert res.state_dict is not None
    for n, w in new.items():
        assert torch.equal(res.state_dict[n], apply_multiplier(w, m[n])), n
        want = (w.double() * (m[n].double() - 1)).norm() / w.double().norm()
        assert next(r for r in res.tensors if r.name == n).rel_change == pytest.approx(float(want), rel=1e-9)


def test_to_delta_is_w_times_m_minus_one(family: dict[str, Path], multiplier: Path, tmp_path: Path) -> None:
    api.hadamard_to_delta(family["base"], multiplier, out=tmp_path / "D")
    shards = sorted((tmp_path / "D").glob("*.safetensors"))
    assert all(read_header(s).metadata.get("mlite_patch") == "additive" for s in shards)
    d, base, ft = read(tmp_path / "D"), read(family["base"]), read(family["ft"])
    assert d.keys() == base.keys() and {t.dtype for t in d.values()} == {torch.float32}
    for n in d:
        torch.testing.assert_close(base[n].double() + d[n].double(), ft[n].double(), rtol=0, atol=1e-6)
    # the additive full fine-tune (apply) is what `patch`/`extract` take with the base
    lora = api.extract(model=api.hadamard_apply(family["base"], multiplier, out=tmp_path / "A").output,
                       base=family["base"], energy=1.0)
    assert lora.max_rel_error < 1e-5


def test_w_zero_is_refused_naming_tensor_and_count(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "M"
    with pytest.raises(CheckpointError) as info:
        api.hadamard_to_multiplier(family["zeroed"], family["ft"], out=out)
    msg = str(info.value)
    assert "'model.layers.1.mlp.up_proj.weight' has 3 entries where the base is 0" in msg
    assert "--allow-unrepresentable" in msg and "\n" not in msg
    assert not out.exists() and leftovers(tmp_path) == []  # tensors written before the refusal: gone


def test_w_zero_opt_in_keeps_the_base_and_reports_the_loss(family: dict[str, Path], tmp_path: Path) -> None:
    res = api.hadamard_to_multiplier(family["zeroed"], family["ft"], out=tmp_path / "M", allow_unrepresentable=True)
    name = "model.layers.1.mlp.up_proj.weight"
    row = next(r for r in res.tensors if r.name == name)
    ft = read(family["ft"])
    want_dropped = float(ft[name][0, :3].double().norm())
    assert res.unrepresentable == row.unrepresentable == 3
    assert row.dropped_norm == pytest.approx(want_dropped, rel=1e-12) and "M = 1" in row.note
    assert row.rel_error == pytest.approx(want_dropped / row.delta_norm, rel=1e-5)
    assert json.loads((tmp_path / "M" / hw.REPORT_FILE).read_text())["unrepresentable"] == 3
    back = read(api.hadamard_apply(family["zeroed"], tmp_path / "M", out=tmp_path / "out").output)
    assert torch.equal(back[name][0, :3], torch.zeros(3))
    torch.testing.assert_close(back[name][1:], ft[name][1:], rtol=2e-7, atol=0)


def test_non_float_tensors_are_left_out_of_m_and_copied_on_apply(tmp_path: Path) -> None:
    base = make_base(SHAPE, seed=1)
    base["model.position_ids"] = torch.arange(8)
    ft = make_finetune(base, seed=2)
    b, f = save_checkpoint(base, tmp_path / "b", shape=SHAPE), save_checkpoint(ft, tmp_path / "f", shape=SHAPE)
    res = api.hadamard_to_multiplier(b, f, out=tmp_path / "M")
    assert "model.position_ids" not in read(tmp_path / "M")
    assert next(r for r in res.tensors if r.name == "model.position_ids").kind == "skipped"
    applied = api.hadamard_apply(b, tmp_path / "M", dtype="bfloat16")
    assert applied.state_dict is not None
    assert torch.equal(applied.state_dict["model.position_ids"], torch.arange(8))
    assert applied.state_dict["model.norm.weight"].dtype == torch.bfloat16


def test_a_multiplier_covering_some_tensors_leaves_the_rest(family: dict[str, Path], multiplier: Path,
                                                           tmp_path: Path) -> None:
    from safetensors.torch import save_file

    part = tmp_path / "part"
    part.mkdir()
    m = read(multiplier)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    save_file({n: m[n] for n in names}, str(part / "model.safetensors"), metadata={"mlite_patch": "multiplicative"})
    res = api.hadamard_apply(family["new"], part, out=tmp_path / "out", dtype="bfloat16")
    got, new = read(tmp_path / "out"), read(family["new"])
    assert all(torch.equal(got[n], new[n].bfloat16()) for n in new if n not in names)
    assert {r.name for r in res.tensors if r.kind == "multiplied"} == set(names)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    delta = api.hadamard_to_delta(family["new"], part)
    assert delta.state_dict is not None and set(delta.state_dict) == set(names)


def test_blocks_of_rows_give_the_same_bits(family: dict[str, Path], multiplier: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    whole = api.hadamard_apply(family["new"], multiplier).state_dict
    monkeypatch.setattr(hw, "BLOCK_ELEMENTS", 40)  # 2-3 rows of a 16-wide tensor per block
    assert list(hw.row_blocks((5, 16))) == [(0, 2), (2, 4), (4, 5)] and list(hw.row_blocks(())) == [None]
    api.hadamard_to_multiplier(family["base"], family["ft"], out=tmp_path / "M")
    assert all(torch.equal(a, b) for a, b in zip(read(tmp_path / "M").values(), read(multiplier).values(),
                                                     strict=True))
    blocked = api.hadamard_apply(family["new"], multiplier, out=tmp_path / "out", shard_size="4kB")
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 3
    got = read(tmp_path / "out")  # through model.safetensors.index.json
    assert whole is not None and all(torch.equal(got[n], whole[n]) for n in whole)
    again = api.hadamard_apply(family["new"], multiplier).state_dict
    assert again is not None and all(torch.equal(again[n], whole[n]) for n in whole)
    assert blocked.tensors[0].delta_norm == pytest.approx(
        api.hadamard_apply(family["new"], multiplier).tensors[0].delta_norm, rel=1e-12)


def test_wrong_inputs_are_refused_before_anything_is_written(family: dict[str, Path], multiplier: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="not marked as a multiplier.*--allow-unmarked"):
        api.hadamard_apply(family["base"], family["ft"], out=out)
    with pytest.raises(UsageError, match="is an mlite multiplicative patch.*cannot be the base"):
        api.hadamard_apply(multiplier, multiplier, out=out)
    with pytest.raises(UsageError, match="cannot be the model"):
        api.hadamard_to_multiplier(family["base"], multiplier, out=out)
    # a different architecture: shapes differ, named with the file and tensor
    other = LlamaShape(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    small = save_checkpoint(make_base(other), tmp_path / "small", shape=other)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.embed_tokens\.weight' has "
                                              r"shape \[64, 16\] but the base's is \[64, 8\]"):
        api.hadamard_apply(small, multiplier, out=out)
    partial = read(family["ft"])
    del partial["model.norm.weight"]
    with pytest.raises(CheckpointError, match="'model.norm.weight' of the base is missing"):
        api.hadamard_to_multiplier(family["base"], save_checkpoint(partial, tmp_path / "partial"), out=out)
    unmarked = api.hadamard_apply(family["base"], family["ft"], allow_unmarked=True)  # W ⊙ W' (asked for)
    assert unmarked.state_dict is not None
    assert not out.exists() and leftovers(tmp_path) == []


# ---- the command line, as a real process ------------------------------------------------------
def test_cli_round_trip_through_the_entry_point(family: dict[str, Path], tmp_path: Path) -> None:
    res = _mlite("hadamard", "to-multiplier", "--base", str(family["base"]), "--model", str(family["ft"]),
                 "--out", str(tmp_path / "M"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"wrote multiplier {tmp_path / 'M'}: 21 tensors") and "0 unrepresentable" in res.stdout
    res = _mlite("hadamard", "apply", "--base", str(family["base"]), "--multiplier", str(tmp_path / "M"),
                 "--out", str(tmp_path / "A"), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["operation"] == "apply"
    got, want = read(tmp_path / "A"), read(family["ft"])
    assert all(torch.allclose(got[n], want[n], rtol=2e-7, atol=0) for n in want)
    res = _mlite("hadamard", "to-delta", "--base", str(family["base"]), "--multiplier", str(tmp_path / "M"),
                 "--out", str(tmp_path / "D"), "--dtype", "bf16")
    assert res.returncode == 0 and {t.dtype for t in read(tmp_path / "D").values()} == {torch.bfloat16}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("case", "code", "message"), [
    ("unmarked", 2, "is not marked as a multiplier"),
    ("zero", 4, "'model.layers.1.mlp.up_proj.weight' has 3 entries where the base is 0"),
    ("exists", 2, "output directory exists and is not empty"),
    ("dtype", 2, "unknown dtype 'int8'"),
])
def test_cli_bad_input_is_one_line_and_nonzero(family: dict[str, Path], tmp_path: Path, case: str, code: int,
                                              message: str) -> None:
    out = tmp_path / "out"
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    args = {
        "unmarked": ["apply", "--base", str(family["base"]), "--multiplier", str(family["ft"])],
        "zero": ["to-multiplier", "--base", str(family["zeroed"]), "--model", str(family["ft"])],
        "exists": ["to-multiplier", "--base", str(family["base"]), "--model", str(family["ft"])],
        "dtype": ["to-multiplier", "--base", str(family["base"]), "--model", str(family["ft"]), "--dtype", "int8"],
    }[case]
    res = _mlite("hadamard", *args, "--out", str(out))
    assert res.returncode == code and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert (out / "keep.txt").read_text() == "x" if case == "exists" else not out.exists()
    assert leftovers(tmp_path) == []


def test_cli_group_alone_prints_its_help() -> None:
    res = _mlite("hadamard")
    assert res.returncode == 2 and "to-multiplier" in res.stdout and "to-delta" in res.stdout


def test_an_output_that_overflows_its_dtype_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mergekit_lite.errors import RecipeError

    b, m = tmp_path / "b", tmp_path / "m"
    b.mkdir()
    m.mkdir()
    save_file({"w": torch.tensor([60000.0, 1.0], dtype=torch.float16)}, str(b / "model.safetensors"))
    save_file({"w": torch.tensor([2.0, 1.0])}, str(m / "model.safetensors"), metadata={"mlite_patch": "multiplicative"})
    with pytest.raises(RecipeError, match=r"output tensor 'w': 1 of 2 values are inf or NaN in float16"):
        api.hadamard_apply(b, m, out=tmp_path / "out")
    wide = api.hadamard_apply(b, m, dtype="float32").state_dict
    assert wide is not None and wide["w"].tolist() == [120000.0, 1.0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_bits(family: dict[str, Path], multiplier: Path) -> None:
    """float64 products and quotients are correctly rounded on both, so the bits agree."""
    for fn, args in ((api.hadamard_to_multiplier, (family["base"], family["ft"])),
                     (api.hadamard_apply, (family["new"], multiplier)),
                     (api.hadamard_to_delta, (family["new"], multiplier))):
        cpu, gpu = fn(*args).state_dict, fn(*args, device="cuda").state_dict
        assert cpu is not None and gpu is not None
        assert all(torch.equal(cpu[n], gpu[n]) for n in cpu), fn.__name__
