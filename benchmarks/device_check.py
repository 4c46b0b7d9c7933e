"""Does a device give the CPU's bits? Every merge method, once on the CPU and once on DEVICE.

    python benchmarks/device_check.py --device cuda [--json out.json]

The CUDA path is built to reproduce the CPU's bits wherever the operations allow (docs/cli.md,
"CPU and GPU"): this script checks that claim on a real GPU. It writes a small synthetic
Llama-style family (base, three fine-tunes, a LoRA adapter; float32, tensors big enough to
be streamed in row blocks) to a temporary folder, merges it with each method on both devices
(outputs kept in memory, nothing else written), and prints per method how many output values
differ and by how much. Exit status 1 when a method that docs/cli.md says should match does
not. For the methods that sum over a whole tensor, it also compares the device's row blocks
with its whole tensors (on the CPU they must match). `--device cpu` compares the CPU with
itself, a check of the script. Needs no download.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mergekit_lite as mlite
from mergekit_lite.synthetic import LlamaShape, build_model_set

# Big enough that the MLP matrices (1.2M entries) exceed the engine's 512K-element row block.
SHAPE = LlamaShape(vocab_size=1024, hidden_size=512, intermediate_size=2304, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=4)


@dataclass(frozen=True)
class Case:
    name: str
    step: dict[str, Any]
    same_bits: bool  # docs/cli.md: expected to give the CPU's bits on CUDA


def cases() -> list[Case]:
    three = ["ft1", "ft2", "ft3"]
    weighted = [{"model": m, "parameters": {"weight": w}} for m, w in zip(three, (0.3, 0.5, 0.9), strict=True)]

    def step(method: str, models: list[Any], base: str | None = "base", **parameters: Any) -> dict[str, Any]:
        s: dict[str, Any] = {"id": "m", "method": method, "models": models, "parameters": parameters}
        if base:
            s["base"] = base
        return s

    return [
        Case("linear (normalize)", step("linear", weighted, None), True),
        Case("task_arithmetic", step("task_arithmetic", three, weight=0.3), True),
        Case("task_arithmetic (normalize)", step("task_arithmetic", weighted, normalize=True), True),
        Case("ties", step("ties", three, density=0.5, weight=0.3), True),
        Case("ties (global)", step("ties", three, density=0.5, weight=0.3, scope="global"), True),
        Case("breadcrumbs", step("breadcrumbs", three, density=0.9, gamma=0.01, weight=0.3), True),
        Case("breadcrumbs_ties", step("breadcrumbs_ties", three, density=0.9, gamma=0.01, weight=0.3), True),
        Case("dare_ties", step("dare_ties", three, density=0.3, weight=0.3), True),
        Case("dare_linear", step("dare_linear", three, density=0.3, weight=0.3), True),
        Case("della", step("della", three, density=0.5, epsilon=0.1, weight=0.3), True),
        Case("pcb (tensor)", step("pcb", three, ratio=0.1, clamp_ratio=0.01, scope="tensor"), True),
        Case("pcb (global)", step("pcb", three, ratio=0.1, clamp_ratio=0.01, scope="global"), True),
        Case("nearswap", step("nearswap", ["ft1"], t=0.01), True),
        Case("ram", step("ram", three, epsilon=1e-3), True),
        Case("ramplus_tl", step("ramplus_tl", three, epsilon=1e-4, r=0.5, alpha=1.0), True),  # integer counts
        Case("dare_ties (rescale l1)", step("dare_ties", three, density=0.3, weight=0.3, rescale="l1"), False),
        Case("slerp", step("slerp", ["ft1", "ft2"], None, t=0.3), False),
        Case("model_stock", step("model_stock", three), False),
        Case("model_stock (filter_wise)", step("model_stock", three, filter_wise=True), False),
        Case("sce", step("sce", three, select_topk=0.5), False),  # whole-tensor mean squares
        Case("passthrough", step("passthrough", ["ft1"], None, scale=0.7), True),
        Case("nuslerp", step("nuslerp", ["ft1", "ft2"], weight=0.4), False),  # float64 sums
        Case("multislerp", step("multislerp", weighted), False),
        Case("karcher", step("karcher", three, None), False),
        Case("arcee_fusion", step("arcee_fusion", ["ft1"]), False),  # softmax and row sums
        # the engine builds a LoRA's ΔW = B·A on the CPU (reader thread), whatever the device
        Case("portllm (LoRA)", {"id": "m", "method": "portllm", "base": "base", "delta": "lora"}, True),
    ]


def inputs_of(step: dict[str, Any]) -> set[str]:
    models = {m["model"] if isinstance(m, dict) else m for m in step.get("models", [])}
    return models | {step[k] for k in ("base", "delta") if step.get(k)}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Values whose bits differ (−0 against +0 counts; NaN against NaN does not), over all
    tensors, and the largest gap. Another tensor list, shape or dtype is a difference in itself."""
    if a.keys() != b.keys():
        raise ValueError(f"tensor lists differ: {sorted(a.keys() ^ b.keys())[:3]}")
    differing = total = 0
    worst = 0.0
    for name, x in a.items():
        y = b[name].to(x.device)
        if (x.shape, x.dtype) != (y.shape, y.dtype):
            raise ValueError(f"{name}: {tuple(x.shape)} {x.dtype} against {tuple(y.shape)} {y.dtype}")
        total += x.numel()
        if x.is_floating_point():
            both_nan = x.isnan() & y.isnan()
            diff = ((x != y) | (x.signbit() != y.signbit())) & ~both_nan
            if bool(diff.any()):
                worst = max(worst, float((x.double() - y.double()).abs()[diff].max()))
        else:
            diff = x != y
        differing += int(diff.sum())
    return {"differing": differing, "values": total, "max_abs_diff": worst}


# Methods whose big tensors stream in row blocks after a pass that sums (or counts) over them, or whose rows
# are summed block by block: on the CPU the blocks give the whole tensor's bits (tests pin it);
# on CUDA they may not (docs/cli.md), and this measures by how much.
BLOCK_CASES = ("ties", "dare_ties (rescale l1)", "slerp", "model_stock", "model_stock (filter_wise)", "nuslerp",
               "multislerp", "karcher", "ramplus_tl")
SMALL_BLOCK = 1 << 14  # entries per row block in the blocked run: every matrix here streams


def blocks_against_whole(recipe: dict[str, Any], device: str) -> dict[str, Any]:
    """The same merge on `device` with the engine's usual blocks and with blocks of SMALL_BLOCK entries."""
    from mergekit_lite.engine import stream

    whole = mlite.run_recipe(recipe, device=device).state_dict
    usual = stream.CHUNK_ELEMENTS
    stream.CHUNK_ELEMENTS = SMALL_BLOCK
    try:
        blocked = mlite.run_recipe(recipe, device=device).state_dict
    finally:
        stream.CHUNK_ELEMENTS = usual
    return compare(whole, blocked)


def main(argv: list[str] | None = None, shape: LlamaShape = SHAPE) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (default: cuda)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ms = build_model_set(Path(tmp) / "models", shape=shape, n_finetunes=3, num_shards=2)
        inputs = {"base": str(ms.base), "lora": str(ms.adapter),
                  **{f"ft{i + 1}": str(p) for i, p in enumerate(ms.finetunes)}}
        for case in cases():
            recipe = {"inputs": {k: inputs[k] for k in sorted(inputs_of(case.step))}, "steps": [case.step],
                      "seed": 7}
            timings: dict[str, float] = {}
            try:
                outputs = {}
                for device in ("cpu", args.device):
                    t0 = time.perf_counter()
                    outputs[device] = mlite.run_recipe(recipe, device=device).state_dict
                    timings[device] = time.perf_counter() - t0
                result = compare(outputs["cpu"], outputs[args.device])
            except Exception as exc:  # one method's failure is a row of the report, not the end of it
                rows.append({"method": case.name, "expected_same_bits": case.same_bits, "ok": False,
                             "error": f"{type(exc).__name__}: {exc}", "seconds": timings})
                print(f"{case.name:28s} FAILED     {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            ok = result["differing"] == 0 or not case.same_bits
            row: dict[str, Any] = {"method": case.name, "expected_same_bits": case.same_bits, "ok": ok, **result,
                                   "seconds": timings}
            print(f"{case.name:28s} {'same bits' if result['differing'] == 0 else 'differs':10s} "
                  f"{result['differing']:>9,d} of {result['values']:,d} values, max |Δ| {result['max_abs_diff']:.3g}"
                  f"{'' if ok else '   UNEXPECTED: docs say it should match'}", flush=True)
            if case.name in BLOCK_CASES:
                blocks = blocks_against_whole(recipe, args.device)
                row["blocks_vs_whole"] = blocks
                if args.device == "cpu" and blocks["differing"]:
                    row["ok"] = False  # the CPU's blocks must give the whole tensor's bits
                label = f"  {case.name}, blocks"
                print(f"{label:28s} {'same bits' if blocks['differing'] == 0 else 'differs':10s} "
                      f"{blocks['differing']:>9,d} values against whole tensors on {args.device}, "
                      f"max |Δ| {blocks['max_abs_diff']:.3g}", flush=True)
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
