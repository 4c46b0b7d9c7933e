"""`mlite bank ...`: build, inspect and export adapter banks (MOS)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mergekit_lite import api

from .common import guarded, out

bank_app = typer.Typer(
    help="Adapter banks: many tasks' adapters over one backbone, in one safetensors file (MOS).",
    no_args_is_help=True,
)


@bank_app.command("add")
@guarded
def add_cmd(
    bank: Path = typer.Argument(..., help="Bank file (.safetensors); created when missing."),
    source: Path = typer.Argument(..., help="A PEFT LoRA directory or a safetensors file of adapter parameters."),
    task: str = typer.Option(..., "--task", help="Name of the new task (letters, digits, '_', '-')."),
    scale: float | None = typer.Option(None, "--scale", help="Record the adapters' output scale (e.g. 0.1)."),
) -> None:
    """Append an adapter to a bank as a new task (tasks keep the order they were added in)."""
    b = api.bank_add(bank, task, source, scale=scale)
    m = b.members[task]
    out.print(f"added task {task!r} ({m.kind}, {len(m.tensors)} tensors) to {bank}: {len(b.tasks)} tasks")


@bank_app.command("list")
@guarded
def list_cmd(
    bank: Path = typer.Argument(..., help="Bank file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the tasks of a bank, in order, and how it was merged."""
    info = api.bank_list(bank)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    out.print(f"bank {info['path']}: {len(info['tasks'])} tasks", highlight=False)
    for i, row in enumerate(info["tasks"]):
        extra = f"  r={row['r']} alpha={row['lora_alpha']} modules={row['modules']}" if row["kind"] == "lora" else ""
        out.print(
            f"  {i:>3}  {row['task']:<20} {row['kind']:<4} {row['tensors']:>5} tensors "
            f"{row['parameters']:>12,} params  {row['dtype']}{extra}",
            highlight=False,
        )
    record, label = info["merge"], "merged"
    while isinstance(record, dict):
        covered = record.get("tasks")
        scope = "" if covered is None else f" (tasks {', '.join(covered)})"
        out.print(f"{label}: momentum={record.get('momentum')} mode={record.get('mode')} space={record.get('space')} "
                  f"rank={record.get('rank')}{scope}", highlight=False)
        if covered is not None and [row["task"] for row in info["tasks"]][: len(covered)] == covered:
            later = [row["task"] for row in info["tasks"]][len(covered) :]
            if later and label == "merged":
                out.print(f"  not merged: {', '.join(later)} (added after the merge)", highlight=False)
        record, label = record.get("previous"), "  from an earlier merge"
    if info["scale"] is not None:
        out.print(f"adapter scale: {info['scale']}", highlight=False)
    if info["classes"] is not None:
        out.print(f"classes: {info['classes']} (prototypes {info['prototypes']})", highlight=False)


@bank_app.command("export")
@guarded
def export_cmd(
    bank: Path = typer.Argument(..., help="Bank file."),
    task: str = typer.Option(..., "--task", help="Task to export."),
    out_path: Path = typer.Option(..., "--out", help="PEFT dir (LoRA members) or .safetensors file (raw members)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Write one task's adapter back out: a PEFT adapter dir, or a safetensors file."""
    path = api.bank_export(bank, task, out_path, force=force)
    out.print(f"exported task {task!r} to {path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(bank_app, name="bank")
