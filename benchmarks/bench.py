"""Speed and memory of `mlite merge` against mergekit and against the I/O floor.

For each method: write the recipe, warm the page cache with the inputs, run `mlite merge` as a
separate process (and `mergekit-yaml` with the same merge when --mergekit-venv is given), and
measure each whole process: wall time and peak RSS. Then print the table and write RESULTS.md
(and the raw records, RESULTS.json beside it). See benchmarks/README.md.

    python benchmarks/bench.py --size 500M --methods linear,ties --mergekit-venv /work/mk-venv
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench_report
import generate
import torch
from bench_measure import dir_bytes, measure_floor, run_measured, warm_page_cache
from bench_recipes import METHODS, SEED, BenchMethod, mergekit_recipe, mlite_recipe, write_yaml
from bench_vocab import vocab_set
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
ENV_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def mlite_command(explicit: str | None) -> list[str]:
    """The `mlite` beside this interpreter (the repo's venv), else the one on PATH."""
    if explicit:
        return [explicit]
    beside = Path(sys.executable).parent / "mlite"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mlite")
    if not found:
        raise SystemExit("mlite not found: install the package (pip install -e .) or pass --mlite PATH")
    return [found]


def max_abs_diff(a_dir: Path, b_dir: Path) -> float | None:
    """Largest elementwise difference between two outputs (None if their tensors differ)."""
    def index(d: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    ia, ib = index(a_dir), index(b_dir)
    if set(ia) != set(ib):
        return None
    worst = 0.0
    for name in ia:
        with safe_open(str(ia[name]), "pt") as ha, safe_open(str(ib[name]), "pt") as hb:
            ta, tb = ha.get_tensor(name).float(), hb.get_tensor(name).float()
        if ta.shape != tb.shape:
            return None
        worst = max(worst, float((ta - tb).abs().max()) if ta.numel() else 0.0)
    return worst


def run_tool(
    tool: str,
    method: BenchMethod,
    bench_set: generate.BenchSet,
    args: argparse.Namespace,
    work: Path,
) -> tuple[dict[str, Any], Path]:
    """Run one tool on one method `args.repeat` times; the record keeps the fastest wall time."""
    out_dir = work / "out" / f"{bench_set.size}-{method.key}-{tool}"
    recipe_dir = work / "recipes" / bench_set.size
    if method.tokenizer_source:
        bench_set = vocab_set(bench_set)
    fts = list(bench_set.finetunes)
    env = {**os.environ, **ENV_OFFLINE}
    if tool == "mlite":
        recipe = write_yaml(mlite_recipe(method, bench_set.base, fts, out_dir), recipe_dir / f"{method.key}.mlite.yaml")
        cmd = [*mlite_command(args.mlite), "merge", str(recipe), "--out", str(out_dir), "--force", "--device", args.device]
    else:
        recipe = write_yaml(mergekit_recipe(method, bench_set.base, fts), recipe_dir / f"{method.key}.mergekit.yaml")
        cmd = [str(Path(args.mergekit_venv) / "bin" / "mergekit-yaml"), str(recipe), str(out_dir),
               "--random-seed", str(SEED), "--no-copy-tokenizer", *args.mergekit_arg]
        if args.device.startswith("cuda"):
            cmd += ["--cuda"]
    walls, measures, logs = [], [], []
    load_before = None
    for i in range(args.repeat):
        shutil.rmtree(out_dir, ignore_errors=True)
        warm_page_cache(bench_set.input_files())
        load_before = [round(x, 2) for x in os.getloadavg()]
        log = work / "logs" / f"{bench_set.size}-{method.key}-{tool}-{i}.log"
        m = run_measured(cmd, log_path=log, env=env, timeout_s=args.timeout)
        measures.append(m)
        logs.append(log)
        walls.append(round(m.wall_s, 3))
        status = "ok" if m.returncode == 0 else f"FAILED exit {m.returncode}, see {log}"
        print(f"  {tool:8s} {method.key:16s} {m.wall_s:8.2f} s  peak RSS {m.peak_rss_bytes / 1e9:5.2f} GB  {status}",
              file=sys.stderr)
        if m.returncode != 0:
            break
    best_i = min(range(len(measures)), key=lambda i: (measures[i].returncode != 0, measures[i].wall_s))
    best = measures[best_i]
    record: dict[str, Any] = {
        "size": bench_set.size,
        "method": method.key,
        "tool": tool,
        "device": args.device,
        "wall_s": round(best.wall_s, 3),
        "walls": walls,
        "peak_rss_bytes": max(m.peak_rss_bytes for m in measures),
        "maxrss_bytes": max(m.maxrss_bytes for m in measures),
        "sampled_rss_bytes": max(m.sampled_rss_bytes for m in measures),
        "sampled_anon_bytes": max(m.sampled_anon_bytes for m in measures),
        "user_s": round(best.user_s, 2),
        "sys_s": round(best.sys_s, 2),
        "returncode": best.returncode,
        "output_bytes": dir_bytes(out_dir) if out_dir.exists() else None,
        "load_avg_before": load_before,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(cmd),
        "mlite_git": bench_report.git_revision(HERE.parent) if tool == "mlite" else None,
        "parameters": method.parameters,
        "inputs": method.inputs,
    }
    if tool == "mlite":
        record["cpu_split"] = bench_report.parse_cpu_line(logs[best_i].read_text(errors="replace"))
    return record, out_dir


def render_only(out_md: Path, notes: str | None) -> int:
    """Rewrite the Markdown from the raw records, e.g. after changing the notes."""
    raw_path = out_md.with_suffix(".json")
    if not raw_path.exists():
        raise SystemExit(f"{raw_path} not found: nothing to render")
    raw = bench_report.load_raw(raw_path)
    if notes is not None:
        raw["notes"] = notes
        raw_path.write_text(json.dumps(raw, indent=1))
    out_md.write_text(bench_report.markdown(raw, raw.get("notes", "")))
    print(bench_report.text_table(bench_report.rows(raw["records"])))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(generate.SIZES), help="model size of the synthetic set (required)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all): " + ", ".join(METHODS))
    p.add_argument("--mergekit-venv", help="a virtual environment with mergekit installed: also run mergekit-yaml")
    p.add_argument("--device", default="cpu", help="cpu or cuda (mlite --device; mergekit --cuda)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="Markdown report (raw records go to .json beside it)")
    p.add_argument("--data-dir", default="/work/bench-data", help="where sets are generated/found (default: %(default)s)")
    p.add_argument("--work-dir", help="recipes, outputs and logs (default: DATA_DIR/runs)")
    p.add_argument("--tools", default="mlite,mergekit", help="which tools to run (default: %(default)s)")
    p.add_argument("--no-floor", action="store_true", help="do not (re)measure the I/O floor")
    p.add_argument("--no-compare", action="store_true", help="skip comparing mlite's output with mergekit's")
    p.add_argument("--keep-outputs", action="store_true", help="keep merged checkpoints (default: deleted)")
    p.add_argument("--repeat", type=int, default=1, help="runs per tool and method; the fastest is kept")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    p.add_argument("--mlite", help="path of the mlite executable (default: beside this Python)")
    p.add_argument("--mergekit-arg", action="append", default=[], help="extra argument for mergekit-yaml (repeatable)")
    p.add_argument("--notes", help="text for the Notes section of RESULTS.md (kept until replaced)")
    p.add_argument("--dry-run", action="store_true", help="write the recipes and print the commands only")
    p.add_argument("--render-only", action="store_true", help="re-render --out from its JSON (and --notes); run nothing")
    args = p.parse_args(argv)
    if args.render_only:
        return render_only(Path(args.out), args.notes)
    if not args.size:
        p.error("--size is required")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if "mergekit" in tools and not args.mergekit_venv:
        tools.remove("mergekit")
    if args.mergekit_venv and not (Path(args.mergekit_venv) / "bin" / "mergekit-yaml").exists():
        p.error(f"{args.mergekit_venv}/bin/mergekit-yaml not found")
    data_dir = Path(args.data_dir)
    work = Path(args.work_dir) if args.work_dir else data_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)

    print(f"set {args.size} under {data_dir} …", file=sys.stderr)
    bench_set = generate.generate_set(data_dir, args.size)
    if args.dry_run:
        for method in (METHODS[m] for m in methods):
            models = vocab_set(bench_set) if method.tokenizer_source else bench_set
            fts = list(models.finetunes)
            out_dir = work / "out" / f"{args.size}-{method.key}"
            path = write_yaml(mlite_recipe(method, models.base, fts, out_dir), work / "recipes" / args.size / f"{method.key}.mlite.yaml")
            print(f"mlite merge {path} --out {out_dir} --force --device {args.device}")
            if method.mergekit_method and "mergekit" in tools:
                mk = write_yaml(mergekit_recipe(method, models.base, fts), work / "recipes" / args.size / f"{method.key}.mergekit.yaml")
                print(f"mergekit-yaml {mk} {out_dir}-mk --random-seed {SEED} --no-copy-tokenizer")
        return 0

    out_md = Path(args.out)
    raw_path = out_md.with_suffix(".json")
    raw = bench_report.load_raw(raw_path)
    mk_python = Path(args.mergekit_venv) / "bin" / "python" if args.mergekit_venv else None
    raw["machine"] = bench_report.machine_info(data_dir, mk_python, args.device)
    torch.set_num_threads(1)  # the harness itself only copies bytes and compares
    new: list[dict[str, Any]] = []
    if not args.no_floor:
        f = measure_floor(bench_set.input_files(), bench_set.bytes_per_model, work / "out")
        direct = "unsupported" if f.direct_s is None else f"{f.direct_s:.2f} s"
        print(f"  floor: read {f.read_bytes / 1e9:.2f} GB in {f.read_s:.2f} s, write {f.write_bytes / 1e9:.2f} GB "
              f"in {f.buffered_s:.2f} s buffered (+ fsync {f.fsync_s:.2f} s), {direct} with O_DIRECT", file=sys.stderr)
        startup = {}
        for tool in tools:
            cmd = [*mlite_command(args.mlite), "--version"] if tool == "mlite" else \
                [str(Path(args.mergekit_venv) / "bin" / "mergekit-yaml"), "--help"]
            sm = run_measured(cmd, log_path=work / "logs" / f"startup-{tool}.log", env={**os.environ, **ENV_OFFLINE})
            startup[tool] = round(sm.wall_s, 3)
        print(f"  start-up: {startup}", file=sys.stderr)
        new.append({"size": args.size, "method": "io", "tool": "floor", "device": "cpu", "startup_s": startup,
                    "read_bytes": f.read_bytes, "read_s": round(f.read_s, 3), "write_bytes": f.write_bytes,
                    "write_s": round(f.write_s, 3), "buffered_s": round(f.buffered_s, 3), "fsync_s": round(f.fsync_s, 3),
                    "direct_s": None if f.direct_s is None else round(f.direct_s, 3), "floor_s": round(f.floor_s, 3),
                    "when": time.strftime("%Y-%m-%d %H:%M")})
    for key in methods:
        method = METHODS[key]
        outputs: dict[str, Path] = {}
        for tool in tools:
            if tool == "mergekit" and method.mergekit_method is None:
                continue
            record, out_dir = run_tool(tool, method, bench_set, args, work)
            new.append(record)
            if record["returncode"] == 0:
                outputs[tool] = out_dir
        if not args.no_compare and not method.random and {"mlite", "mergekit"} <= set(outputs):
            diff = max_abs_diff(outputs["mlite"], outputs["mergekit"])
            for r in new:
                if r["tool"] == "mlite" and r["method"] == key:
                    r["max_abs_diff_vs_mergekit"] = diff
            print(f"  {key}: max |mlite − mergekit| = {diff}", file=sys.stderr)
        if not args.keep_outputs:
            for d in outputs.values():
                shutil.rmtree(d, ignore_errors=True)
        # Save after every method, so a long run interrupted later keeps what it measured.
        bench_report.merge_records(raw, new)
        new.clear()
        raw_path.write_text(json.dumps(raw, indent=1))
        out_md.write_text(bench_report.markdown(raw, raw.get("notes", "")))
    bench_report.merge_records(raw, new)
    if args.notes is not None:
        raw["notes"] = args.notes
    raw["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    raw_path.write_text(json.dumps(raw, indent=1))
    out_md.write_text(bench_report.markdown(raw, raw.get("notes", "")))
    print(bench_report.text_table([r for r in bench_report.rows(raw["records"]) if r["size"] == args.size]))
    print(f"\nwrote {out_md} and {raw_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
