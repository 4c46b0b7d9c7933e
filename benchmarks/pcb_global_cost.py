"""What PCB's global scope costs: passes, wall time and peak RSS against tensor scope and TIES.

Builds one synthetic Llama-layout family (base + n fine-tunes, several shards) and merges it
with each configuration below, each in its own child process so that its peak RSS
(`ru_maxrss` from `os.wait4`) is its own. A bare child that only imports mlite and torch gives
the baseline RSS. Prints a Markdown table; `--json` also writes the raw records.

    python benchmarks/pcb_global_cost.py --hidden 256 --layers 4        # ~3.4M params, seconds
    python benchmarks/pcb_global_cost.py --hidden 1024 --layers 8 --json pcb_cost.json

Configurations:
  pcb-global-stream   scope global, memory_budget 0: 4 statistics passes + output pass
  pcb-global-memory   scope global, task vectors held in memory: 1 statistics pass + output
  pcb-tensor          scope tensor: output pass only
  ties-tensor         TIES (density 0.1), per tensor: output pass only
  ties-global         TIES with the paper's global top-k: its statistics passes + output
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "pcb-global-stream": ("pcb", {"ratio": 0.1, "clamp_ratio": 0.01, "scope": "global", "memory_budget": 0}),
    "pcb-global-memory": ("pcb", {"ratio": 0.1, "clamp_ratio": 0.01, "scope": "global", "memory_budget": 1 << 40}),
    "pcb-tensor": ("pcb", {"ratio": 0.1, "clamp_ratio": 0.01, "scope": "tensor"}),
    "ties-tensor": ("ties", {"density": 0.1, "scope": "tensor"}),
    "ties-global": ("ties", {"density": 0.1, "scope": "global"}),
}


def child(recipe_path: str) -> int:
    """Run one recipe in this process and print what the engine reports, as one JSON line."""
    if recipe_path == "-":  # baseline: imports only
        import mergekit_lite.api  # noqa: F401

        print(json.dumps({}))
        return 0
    import torch

    from mergekit_lite.api import run_recipe

    torch.set_num_threads(int(os.environ.get("PCB_BENCH_THREADS", "1")))
    recipe = json.loads(Path(recipe_path).read_text())
    result = run_recipe(recipe)
    print(json.dumps({
        "passes": len(result.passes),
        "statistics_passes": sum(p["kind"] == "statistics" for p in result.passes),
        "bytes_read": result.bytes_read,
        "engine_seconds": result.seconds,
    }))
    return 0


def measure(recipe_path: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", recipe_path], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed for {recipe_path}")
    record = json.loads(out.decode().strip().splitlines()[-1])
    record.update({"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024})
    return record


def build(root: Path, args: argparse.Namespace) -> tuple[Any, int]:
    import torch

    from mergekit_lite.synthetic import LlamaShape, build_model_set

    shape = LlamaShape(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4)
    ms = build_model_set(root / "models", shape=shape, n_finetunes=args.models, num_shards=args.shards,
                         dtype=torch.bfloat16)
    return ms, shape.num_parameters()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)

    with tempfile.TemporaryDirectory(prefix="pcb_cost_") as tmp:
        root = Path(tmp)
        ms, n_params = build(root, args)
        inputs = {"base": str(ms.base), **{f"ft{i + 1}": str(p) for i, p in enumerate(ms.finetunes)}}
        records: list[dict[str, Any]] = [{"config": "baseline (imports only)", **measure("-")}]
        for name in args.configs.split(","):
            method, params = CONFIGS[name]
            recipe = {"inputs": inputs,
                      "steps": [{"id": "m", "method": method, "base": "base",
                                 "models": [k for k in inputs if k != "base"], "parameters": params}],
                      "output": {"path": str(root / "out" / name)}}
            path = root / f"{name}.json"
            path.write_text(json.dumps(recipe))
            records.append({"config": name, **measure(str(path))})

    size_mb = n_params * 2 / 1e6
    print(f"{n_params:,} parameters per model (bf16, {size_mb:.1f} MB), {args.models} fine-tunes + base, "
          f"{args.shards} shards, 1 torch thread\n")
    print("| config | passes (stats + output) | bytes read | engine s | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in records:
        if "passes" not in r:
            print(f"| {r['config']} | – | – | – | {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} |")
            continue
        print(f"| {r['config']} | {r['statistics_passes']} + 1 | {r['bytes_read'] / 1e6:.1f} MB | "
              f"{r['engine_seconds']:.2f} | {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"params": n_params, "records": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
