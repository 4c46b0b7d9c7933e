"""Machine description, the comparison table, the issue's targets, and RESULTS.md.

Raw records live in a JSON file beside the Markdown (RESULTS.json next to RESULTS.md), keyed by
(size, method, tool, device), so runs of different sizes or methods made at different times add
up into one report; the Markdown is re-rendered from all records each time.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

GB = 1_000_000_000
RSS_LIMIT_PER_TENSOR = 1 * GB
RSS_LIMIT_GLOBAL = 1.5 * GB
FAST_METHODS = ("linear", "task_arithmetic")
SPARSE_METHODS = ("ties", "dare_ties", "breadcrumbs", "della")
SIZE_ORDER = ("1M", "10M", "100M", "500M", "1.5B")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision(repo: Path) -> str:
    """The commit the measured mlite was built from, '+dirty' when the tree has changes.

    The results files do not count: the benchmark itself rewrites them after every method.
    """
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)benchmarks/RESULTS*"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def machine_info(data_dir: Path, mergekit_python: Path | None, device: str) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, RAM, disk, library versions, load, niceness."""
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch_mlite": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "nice": os.nice(0),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    info["mlite_git"] = git_revision(Path(__file__).resolve().parent.parent)
    usage = shutil.disk_usage(data_dir)
    info["disk_free_gb"] = round(usage.free / GB, 1)
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if mergekit_python is not None:
        code = "import importlib.metadata as m, torch; print(m.version('mergekit'), torch.__version__)"
        try:
            res = subprocess.run([str(mergekit_python), "-c", code], capture_output=True, text=True, timeout=120)
            mk_version, mk_torch = res.stdout.split()
            info["mergekit"] = mk_version
            info["torch_mergekit"] = mk_torch
        except (OSError, ValueError, subprocess.TimeoutExpired):
            info["mergekit"] = "unknown"
    return info


_CPU_LINE = re.compile(r"^CPU time: (.*)$", re.MULTILINE)
_CPU_PART = re.compile(r"(reading|computing|writing) ([0-9.]+) s")


def parse_cpu_line(log: str) -> dict[str, float] | None:
    """`mlite merge`'s "CPU time: reading … · computing … · writing …" line, as seconds by role."""
    found = _CPU_LINE.findall(log)
    if not found:
        return None
    return {role: float(sec) for role, sec in _CPU_PART.findall(found[-1])}


def record_key(r: dict[str, Any]) -> tuple[str, str, str, str]:
    return (r["size"], r["method"], r["tool"], r.get("device", "cpu"))


def load_raw(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"machine": {}, "records": []}


def merge_records(raw: dict[str, Any], new: Iterable[dict[str, Any]]) -> None:
    """Replace records with the same key, keep the rest."""
    by_key = {record_key(r): r for r in raw["records"]}
    for r in new:
        by_key[record_key(r)] = r
    raw["records"] = list(by_key.values())


def _gb(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _cpu(r: dict | None) -> str:
    return "—" if not _ok(r) else f"{r['user_s'] + r['sys_s']:.1f} s"


def _s(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"


def _net(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("returncode") == 0


def rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, device, method): both tools, the floor, ratios and the targets."""
    index = {record_key(r): r for r in records}
    combos = sorted(
        {(r["size"], r.get("device", "cpu"), r["method"]) for r in records if r["tool"] != "floor"},
        key=lambda c: (SIZE_ORDER.index(c[0]) if c[0] in SIZE_ORDER else 99, c[1], _method_order(c[2])),
    )
    out = []
    for size, device, method in combos:
        ours = index.get((size, method, "mlite", device))
        mk = index.get((size, method, "mergekit", device))
        floor = index.get((size, "io", "floor", "cpu"))
        ours_wall = ours["wall_s"] if _ok(ours) else None
        mk_wall = mk["wall_s"] if _ok(mk) else None
        # The floor reads a base and three fine-tunes: it is no floor for a merge of fewer inputs.
        full = all((r or {}).get("inputs", FLOOR_INPUTS) == FLOOR_INPUTS for r in (ours, mk))
        floor_s = floor["floor_s"] if floor and full else None
        startup = (floor or {}).get("startup_s", {}).get("mlite")
        row = {
            "size": size,
            "device": device,
            "method": method,
            "ours": ours,
            "mk": mk,
            "ours_wall": ours_wall,
            "ours_rss": ours["peak_rss_bytes"] if _ok(ours) else None,
            "mk_wall": mk_wall,
            "mk_rss": mk["peak_rss_bytes"] if _ok(mk) else None,
            "floor_s": floor_s,
            "vs_mk": None if ours_wall is None or not mk_wall else ours_wall / mk_wall,
            "vs_floor": None if ours_wall is None or not floor_s else ours_wall / floor_s,
            # The same without the fixed start-up (interpreter, torch import): the merge's own work.
            "vs_floor_net": None if ours_wall is None or not floor_s or startup is None
            else (ours_wall - startup) / floor_s,
            "max_abs_diff": ours.get("max_abs_diff_vs_mergekit") if ours else None,
        }
        tensor_scope = index.get((size, "pcb_tensor", "mlite", device))
        row["targets"] = targets(row, tensor_scope["wall_s"] if _ok(tensor_scope) else None)
        out.append(row)
    return out


FLOOR_INPUTS = 4  # the I/O floor reads a base and three fine-tunes


def _method_order(m: str) -> int:
    order = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "pcb_tensor", "pcb_global",
             "sce", "multislerp", "karcher", "nuslerp", "ram", "ramplus_tl", "nearswap", "arcee_fusion",
             "passthrough", "frankenmerge")
    return order.index(m) if m in order else 99


def targets(row: dict[str, Any], pcb_tensor_wall: float | None) -> str:
    """The issue's targets for this row: 'met', 'MISSED: …', or what is still unmeasured."""
    if row["ours"] is None:
        return "mlite not run"
    if row["ours_wall"] is None:
        return f"mlite FAILED (exit {row['ours'].get('returncode')})"
    missed, pending = [], []
    m = row["method"]
    limit = RSS_LIMIT_GLOBAL if m == "pcb_global" else RSS_LIMIT_PER_TENSOR
    if row["ours_rss"] >= limit:
        missed.append(f"RSS {row['ours_rss'] / GB:.2f} GB ≥ {limit / GB:g} GB")
    if m in FAST_METHODS + SPARSE_METHODS:
        want = 0.5 if m in FAST_METHODS else 0.25
        if row["vs_mk"] is None:
            pending.append("mergekit")
        elif row["vs_mk"] > want:
            missed.append(f"{row['vs_mk']:.2f}× mergekit > {want}")
    if m in FAST_METHODS:
        if row["vs_floor"] is None:
            pending.append("floor")
        elif row["vs_floor"] > 1.5:
            missed.append(f"{row['vs_floor']:.2f}× floor > 1.5")
    if m == "pcb_global":
        if pcb_tensor_wall is None:
            pending.append("pcb_tensor")
        elif row["ours_wall"] > 4 * pcb_tensor_wall:
            missed.append(f"{row['ours_wall'] / pcb_tensor_wall:.2f}× pcb_tensor > 4")
    if missed:
        return "MISSED: " + "; ".join(missed)
    if pending:
        return "met so far (no " + ", ".join(pending) + ")"
    return "met"


def text_table(table_rows: list[dict[str, Any]]) -> str:
    """The table printed at the end of a run."""
    head = ("size", "device", "method", "mlite wall", "mlite RSS", "mergekit wall", "mergekit RSS",
            "floor", "ours/mk", "ours/floor", "targets")
    lines = [head]
    for r in table_rows:
        mk_wall = _s(r["mk_wall"]) if r["mk"] is None or _ok(r["mk"]) else f"FAILED ({r['mk'].get('returncode')})"
        lines.append((r["size"], r["device"], r["method"], _s(r["ours_wall"]), _gb(r["ours_rss"]), mk_wall,
                      _gb(r["mk_rss"]), _s(r["floor_s"]), _ratio(r["ours_wall"], r["mk_wall"]),
                      _ratio(r["ours_wall"], r["floor_s"]), r["targets"]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def markdown(raw: dict[str, Any], notes: str = "") -> str:
    """RESULTS.md: machine, method, the table with ratios, the floors and every raw number."""
    mach = raw.get("machine", {})
    table_rows = rows(raw["records"])
    out = ["# Benchmark results", "",
           "Generated by `benchmarks/bench.py` (see benchmarks/README.md); raw records in the JSON file beside "
           "this one. Wall time and peak RSS are of the whole process (Python start-up included).", ""]
    out += ["## Machine", ""]
    for k, v in mach.items():
        out.append(f"- {k}: {v}")
    if notes:
        out += ["", "## Notes", "", notes.strip()]
    out += ["", "## Results", "",
            "| size | device | method | mlite wall | mlite peak RSS | mergekit wall | mergekit peak RSS | I/O floor "
            "| ours / mergekit | ours / floor | (ours − start-up) / floor | mlite CPU | mergekit CPU "
            "| max abs diff vs mergekit | targets |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table_rows:
        mk_wall = _s(r["mk_wall"]) if r["mk"] is None or _ok(r["mk"]) else f"FAILED ({r['mk'].get('returncode')})"
        diff = "—" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
        out.append(f"| {r['size']} | {r['device']} | {r['method']} | {_s(r['ours_wall'])} | {_gb(r['ours_rss'])} "
                   f"| {mk_wall} | {_gb(r['mk_rss'])} | {_s(r['floor_s'])} | {_ratio(r['ours_wall'], r['mk_wall'])} "
                   f"| {_ratio(r['ours_wall'], r['floor_s'])} | {_net(r['vs_floor_net'])} | {_cpu(r['ours'])} "
                   f"| {_cpu(r['mk'])} | {diff} | {r['targets']} |")
    floors = sorted((r for r in raw["records"] if r["tool"] == "floor"),
                    key=lambda r: SIZE_ORDER.index(r["size"]) if r["size"] in SIZE_ORDER else 99)
    if floors:
        out += ["", "## I/O floor", "",
                "Read: every input shard (base + fine-tunes), warm page cache, 64 MiB sequential reads. "
                "Write: the output's byte count in 64 MiB writes to the outputs' file system, two ways: buffered "
                "until close() (no fsync, as mergekit does not fsync; the fsync that follows is shown apart), and "
                "with O_DIRECT (as mlite writes shards of 64 MiB and more; on disk when done). The floor takes "
                "the faster write. Best of 3.", "",
                "Start-up: wall time of `mlite --version` and `mergekit-yaml --help` (interpreter and imports), "
                "a fixed cost every merge pays on top of the floor.", "",
                "| size | read | read time | write | buffered write | then fsync | O_DIRECT write "
                "| floor (read + faster write) | mlite start-up | mergekit start-up |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for f in floors:
            start = f.get("startup_s", {})
            out.append(f"| {f['size']} | {_gb(f['read_bytes'])} | {_s(f['read_s'])} | {_gb(f['write_bytes'])} "
                       f"| {_s(f.get('buffered_s', f['write_s']))} | {_s(f['fsync_s'])} | {_s(f.get('direct_s'))} "
                       f"| {_s(f['floor_s'])} "
                       f"| {_s(start.get('mlite'))} | {_s(start.get('mergekit'))} |")
    split = [r for r in table_rows if r["ours"] is not None and r["ours"].get("cpu_split")]
    if split:
        out += ["", "## Where mlite's CPU time went", "",
                "From `mlite merge`'s own report (its fastest run): CPU seconds of the reader thread "
                "(page-cache copies), of the writer thread (output shards), and of everything else (the "
                "merging thread and torch's workers), over the merge itself (start-up excluded). With 2 "
                "cores, the merge cannot take less wall time than half their sum, nor than the largest part "
                "that runs on one thread.", "",
                "| size | device | method | reading | computing | writing | sum | wall − start-up |",
                "|---|---|---|---|---|---|---|---|"]
        def tenths(x: float | None) -> str:  # mlite prints tenths of a second
            return "—" if x is None else f"{x:.1f} s"

        for r in split:
            c = r["ours"]["cpu_split"]
            net = None if r["vs_floor_net"] is None or not r["floor_s"] else r["vs_floor_net"] * r["floor_s"]
            out.append(f"| {r['size']} | {r['device']} | {r['method']} | {tenths(c.get('reading'))} "
                       f"| {tenths(c.get('computing'))} | {tenths(c.get('writing'))} | {tenths(sum(c.values()))} "
                       f"| {_s(net)} |")
    runs = [r for r in raw["records"] if r["tool"] != "floor"]
    runs.sort(key=lambda r: (SIZE_ORDER.index(r["size"]) if r["size"] in SIZE_ORDER else 99,
                             r.get("device", "cpu"), _method_order(r["method"]), r["tool"]))
    if runs:
        out += ["", "## Raw runs", "",
                "peak RSS = max(ru_maxrss, sampled sum of VmRSS over the process tree); anon = sampled RssAnon "
                "(RSS without mmapped file pages); walls = every repeat (the table shows the fastest).", "",
                "| size | device | method | tool | exit | walls (s) | peak RSS | ru_maxrss | anon | user s | sys s "
                "| output | load avg before | when |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            walls = ", ".join(f"{w:.2f}" for w in r.get("walls", [r["wall_s"]]))
            out.append(f"| {r['size']} | {r.get('device', 'cpu')} | {r['method']} | {r['tool']} | {r['returncode']} "
                       f"| {walls} | {_gb(r['peak_rss_bytes'])} | {_gb(r['maxrss_bytes'])} "
                       f"| {_gb(r['sampled_anon_bytes'])} | {r['user_s']:.1f} | {r['sys_s']:.1f} "
                       f"| {_gb(r.get('output_bytes'))} | {r.get('load_avg_before', '')} | {r.get('when', '')} |")
    return "\n".join(out) + "\n"
