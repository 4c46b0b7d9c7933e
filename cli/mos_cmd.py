"""`mlite mos merge`: the MOS merge of a whole adapter bank."""

from __future__ import annotations

from pathlib import Path

import typer

from mergekit_lite import api

from .common import guarded, out

mos_app = typer.Typer(help="MOS adapter merging (Sun et al., AAAI 2025).", no_args_is_help=True)


@mos_app.command("merge")
@guarded
def merge_cmd(
    bank: Path = typer.Argument(..., help="Bank file to merge."),
    momentum: float = typer.Option(0.1, "--momentum", help="Weight m of the earlier tasks' mean, in [0, 1]."),
    mode: str = typer.Option("stored", "--mode", help="stored (mean of the given adapters) | sequential (of merged ones)."),
    space: str = typer.Option("factors", "--space", help="factors (every parameter) | delta (LoRA ΔW, re-factored by SVD)."),
    rank: int | None = typer.Option(None, "--rank", help="Rank of the re-factored LoRA (space delta; default: own rank)."),
    out_path: Path = typer.Option(..., "--out", help="The merged bank to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Merge every task's adapter with the earlier tasks' (A'ₜ = (1 − m)·Aₜ + m·mean(earlier))."""
    path = api.mos_merge(bank, momentum=momentum, mode=mode, space=space, rank=rank, out=out_path, force=force)
    out.print(f"wrote {path}: momentum={momentum} mode={mode} space={space}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(mos_app, name="mos")
