"""`mlite merge RECIPE`: run a recipe, or show its plan with --dry-run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from mergekit_lite import api
from mergekit_lite.units import format_size, parse_size

from .common import err, guarded, out, setup_logging


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)


@guarded
def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mlite steps, or mergekit's single-step shape)."),
    out_path: str = typer.Option(None, "--out", "-o", help="Output directory (overrides output.path)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype: float32, float16, bfloat16."),
    shard_size: str = typer.Option(None, "--shard-size", help="Max bytes per output shard (e.g. 5GB, 500M)."),
    seed: int = typer.Option(None, "--seed", help="Seed for random methods (DARE, DELLA)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; read no tensor, write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan or the result as JSON."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of the same recipe."),
    allow_bin: bool = typer.Option(False, "--allow-bin", help="Allow pickle .bin inputs (weights_only)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all cores; one fewer for linear and task arithmetic)."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug logging."),
) -> None:
    """Run a merge recipe and write the output checkpoint."""
    setup_logging(verbose)
    size = parse_size(shard_size) if shard_size is not None else None
    overrides: dict[str, Any] = dict(out=out_path, device=device, dtype=dtype, shard_size=size, seed=seed,
                                     allow_bin=allow_bin)
    if dry_run:
        plan = api.dry_run(recipe, force=force, require_output=True, **overrides)
        if as_json:
            out.print_json(json.dumps(plan))
        else:
            _print_plan(plan)
        return
    result = api.run_recipe(recipe, force=force, resume=resume, progress=not as_json and err.is_terminal,
                            require_output=True, threads=threads, **overrides)
    summary = {
        "output": str(result.output) if result.output else None,
        "saved": {k: str(v) for k, v in result.saved.items()},
        "tensors": result.tensors,
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "cpu_seconds": {k: round(v, 3) for k, v in result.cpu_seconds.items()},
        "resumed_tensors": result.resumed,
        "passes": result.passes,
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    if result.resumed:
        out.print(f"resumed: {result.resumed} tensors were already written by the interrupted run")
    out.print(
        f"wrote {summary['output']}: {result.tensors} tensors, read {format_size(result.bytes_read)}, "
        f"wrote {format_size(result.bytes_written)} in {result.seconds:.1f} s"
    )
    out.print(_cpu_line(result.cpu_seconds))
    for sid, path in result.saved.items():
        out.print(f"saved step {sid!r} to {path}")


def _cpu_line(cpu: dict[str, float]) -> str:
    """Where the CPU time went: tells a user whether the disk or the arithmetic is the limit.

    Reading and writing are the I/O threads (page-cache copies, direct writes); computing is
    every other thread. Sums above the wall time mean the threads ran in parallel.
    """
    parts = " · ".join(f"{role} {cpu[role]:.1f} s" for role in ("reading", "computing", "writing") if role in cpu)
    return f"CPU time: {parts}"


def _print_plan(plan: dict) -> None:
    table = Table(title="plan", title_justify="left")
    for col in ("step", "method", "scope", "models"):
        table.add_column(col)
    for s in plan["steps"]:
        table.add_row(s["id"], s["method"], s["scope"], str(s["models"]))
    out.print(table)
    for p in plan["passes"]:
        out.print(f"  {p['kind']} pass ×{p['passes']} for step {p['step']!r}: reads {format_size(p['bytes_read'])}")
    out.print(f"  tensors: {plan['tensors']}; total read {format_size(plan['bytes_read'])}; "
              f"written {format_size(plan['bytes_written'])}")
    for s in plan["output_shards"]:
        out.print(f"  {s['file']}: {s['tensors']} tensors, {format_size(s['bytes'])}")
    out.print(f"  output: {plan['output']}; device: {plan['device']}; "
              f"peak memory estimate: {format_size(plan['peak_memory_estimate'])}")
    for s in plan["saves"]:
        out.print(f"  step {s['step']!r} saved to {s['path']} (the same shards)")
    vocab = plan.get("vocabulary")
    if vocab:
        held = ", ".join(f"{label} {rows}" for label, rows in vocab["model_rows"].items())
        how = "rows lined up by token" if vocab["lined_up"] else "every model already in its order"
        out.print(f"  vocabulary ({vocab['setting']}): {vocab['tokens']} tokens, {vocab['rows']} rows; {how} "
                  f"(rows held: {held})", highlight=False)
        if vocab["tokenizer_files"]:
            out.print(f"  tokenizer files written: {', '.join(vocab['tokenizer_files'])}", highlight=False)
    if plan.get("layer_stack"):
        pieces = plan["layer_stack"]
        out.print(f"  layer stack: {pieces[-1]['layers'][1] + 1} layers")
        for piece in pieces:
            sources = ", ".join(f"{s['input']} {_layers(s['layers'])}" for s in piece["sources"])
            out.print(f"    {_layers(piece['layers'])} ← {sources}", highlight=False)


def _layers(span: list[int]) -> str:
    return f"layer {span[0]}" if span[0] == span[1] else f"layers {span[0]}-{span[1]}"
