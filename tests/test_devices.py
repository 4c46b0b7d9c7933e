"""What keeps CPU and GPU outputs alike, checked on the CPU (CI has no GPU).

The CUDA-only behaviours these guard against (a division by a Python number computed as a
multiplication by its reciprocal, TF32 matrix products) cannot run here; the tests pin down
that the CPU bits did not move with the guards, that session settings are restored, and
that devices mlite cannot serve are refused in one line.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit_lite.cli.main import app
from typer.testing import CliRunner

import mergekit_lite as mlite
from mergekit_lite.engine.fingerprint import fingerprint
from mergekit_lite.methods.detmath import exact_divisor

runner = CliRunner()


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False), st.integers(0, 2**31 - 1))
def test_dividing_by_a_0d_tensor_gives_the_bits_of_dividing_by_the_number(divisor, seed):
    """On the CPU both take true division by float32(divisor): the guard changes nothing here."""
    t = torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * 100
    d = exact_divisor(divisor, t)
    assert d.dim() == 0 and d.dtype == t.dtype and d.device == t.device
    assert torch.equal(t / d, t / divisor)
    assert torch.equal(t.clone().div_(d), t.clone().div_(divisor))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_dtypes_keep_dividing_by_the_number(dtype):
    """The CPU divides float16/bfloat16 in float32 by the unrounded number; a 0-d tensor of their
    dtype would round it first (257 becomes 256 in bfloat16), so they keep the number."""
    t = (torch.arange(1, 1001, dtype=torch.float32) * 3.7).to(dtype)
    for divisor in (257, 0.3):
        assert exact_divisor(divisor, t) == divisor
        assert torch.equal(t / exact_divisor(divisor, t), t / divisor)
    assert not torch.equal(t / torch.tensor(0.3, dtype=dtype), t / 0.3)  # what the guard avoids


_SESSIONS = {  # how a notebook may have asked for TF32 / bf16 products, legacy and per-backend APIs
    "default": "",
    "legacy high": "torch.set_float32_matmul_precision('high')",
    "legacy medium": "torch.set_float32_matmul_precision('medium')",
    "allow_tf32": "torch.backends.cuda.matmul.allow_tf32 = True",
    "cuda knob": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "generic knob": "torch.backends.fp32_precision = 'tf32'",
    "mkldnn knob": "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'",
    "legacy then knob": "torch.set_float32_matmul_precision('high'); torch.backends.cuda.matmul.fp32_precision = 'ieee'",
}
_PROBE = """
import json, sys, torch
from mergekit_lite.precision import full_float32_matmul
def state():
    out = {}
    for key, read in (("legacy", torch.get_float32_matmul_precision),
                      ("allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)):
        try:
            out[key] = read()
        except RuntimeError:  # torch's own "mix of the legacy and new APIs" check, as before a cuBLAS call
            out[key] = "raises"
    for key in ("cuda", "mkldnn"):
        out[key] = getattr(torch.backends, key).matmul.fp32_precision
    return out
exec(sys.argv[1])
before = state()
with full_float32_matmul():
    inside = state()
after = state()
torch.backends.fp32_precision = "ieee"  # inherited settings must still follow the generic knob
print(json.dumps({"before": before, "inside": inside, "after": after, "later": state()}))
"""


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
@pytest.mark.parametrize("session", list(_SESSIONS))
def test_matmul_precision_is_ieee_inside_and_the_session_is_restored(session):
    """Inside: IEEE products, and the legacy and per-backend settings agree (cuBLAS raises before
    every call where they do not). After: the session's settings as they were. One process per
    session: these settings are process-wide."""
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _PROBE, _SESSIONS[session]], capture_output=True, text=True,
                         check=True)
    got = json.loads(res.stdout)
    assert got["inside"] == {"legacy": "highest", "allow_tf32": False, "cuda": "ieee", "mkldnn": "ieee"}
    assert got["after"] == got["before"]
    if session == "generic knob":  # inherited, not pinned: a later generic change reaches the backends
        assert got["later"]["cuda"] == got["later"]["mkldnn"] == "ieee"


def test_a_lora_merge_in_a_tf32_session_gives_the_bits_of_a_plain_one(tmp_path, model_set):
    recipe = {"inputs": {"base": str(model_set.base), "lora": str(model_set.adapter)},
              "steps": [{"id": "p", "method": "portllm", "base": "base", "delta": "lora"}]}
    plain = mlite.run_recipe(recipe).state_dict  # no output path: the merged tensors come back
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        session = mlite.run_recipe(recipe).state_dict
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert plain.keys() == session.keys() and all(torch.equal(plain[k], session[k]) for k in plain)


def test_mps_is_refused_in_one_line_from_the_flag_and_the_recipe(tmp_path, model_set):
    recipe = {"inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
              "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "o"), "--device", "mps"])
    assert res.exit_code == 2 and "device 'mps' is not supported" in res.output and res.output.count("\n") == 1
    path.write_text(yaml.safe_dump({**recipe, "device": "mps"}))
    res = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 3 and f"{path}:" in res.output and "device 'mps' is not supported" in res.output
    assert not (tmp_path / "o").exists()


def test_a_resume_on_another_kind_of_device_starts_afresh(model_set, tmp_path):
    """The fingerprint names the device kind: CPU and CUDA may round reductions differently."""
    plan = mlite.plan_recipe({"inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
                              "steps": [{"id": "m", "method": "linear", "models": ["a", "b"]}],
                              "output": {"path": str(tmp_path / "o")}})
    on_gpu = dataclasses.replace(plan, device=torch.device("cuda", 1))
    on_other_gpu = dataclasses.replace(plan, device=torch.device("cuda", 0))
    assert fingerprint(plan) != fingerprint(on_gpu)
    assert fingerprint(on_gpu) == fingerprint(on_other_gpu)  # the index does not change the bits


def test_patch_as_adapter_with_a_lora_checks_the_device(tmp_path, model_set):
    """Copying a LoRA's factors needs no device, but a bad --device is still a usage error."""
    res = runner.invoke(app, ["patch", "--base", str(model_set.base), "--delta", str(model_set.adapter),
                              "--as-adapter", "--device", "tpu", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown device 'tpu'" in res.output and res.output.count("\n") == 1
    assert not (tmp_path / "o").exists()



def test_a_dry_run_of_a_recipe_without_output_is_refused_like_the_run(tmp_path, model_set):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "inputs": {"a": str(model_set.finetunes[0]), "b": str(model_set.finetunes[1])},
        "steps": [{"id": "m", "method": "linear", "models": ["a", "b"], "save": str(tmp_path / "s")},
                  {"id": "n", "method": "linear", "models": ["m", "a"]}]}))
    for extra in ([], ["--dry-run"]):
        res = runner.invoke(app, ["merge", str(recipe), *extra])
        assert res.exit_code == 2 and "names no output.path; pass --out PATH" in res.output, (extra, res.output)
    assert not (tmp_path / "s").exists()
    assert mlite.dry_run(str(recipe))["saves"] == [{"step": "m", "path": str(tmp_path / "s")}]  # the API may


_OVERLAP = """
import json, sys, threading, torch
from mergekit_lite.precision import full_float32_matmul
exec(sys.argv[1])
def knobs():
    return [torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision]
before = knobs()
a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
seen = {}
def a():
    with full_float32_matmul():
        a_in.set(); b_in.wait()
    a_out.set()
def b():
    a_in.wait()
    with full_float32_matmul():
        b_in.set(); a_out.wait()
        seen["b after a left"] = knobs()  # still pinned: b's block is not over
        with full_float32_matmul():  # nested, as a decorated function calling another
            pass
        seen["b after nesting"] = knobs()
threads = [threading.Thread(target=a), threading.Thread(target=b)]
for t in threads: t.start()
for t in threads: t.join()
after = knobs()
torch.backends.fp32_precision = "ieee"
print(json.dumps({"before": before, "after": after, "seen": seen, "later": knobs()}))
"""


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
@pytest.mark.parametrize("session", ["default", "legacy high", "generic knob"])
def test_overlapping_blocks_in_two_threads_pin_until_the_last_leaves(session):
    """The engine's reader thread builds LoRA products while the main thread may factor others:
    the settings stay IEEE until the last block ends, then come back as they were."""
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _OVERLAP, _SESSIONS[session]], capture_output=True, text=True,
                         check=True)
    got = json.loads(res.stdout)
    assert got["seen"] == {"b after a left": ["ieee", "ieee"], "b after nesting": ["ieee", "ieee"]}
    assert got["after"] == got["before"]
    if session != "legacy high":  # nothing pinned by the session: the generic knob still reaches both
        assert got["later"] == ["ieee", "ieee"]
