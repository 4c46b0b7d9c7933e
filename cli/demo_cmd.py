"""`mlite demo`: build synthetic models and run every example recipe on them."""

from __future__ import annotations

from pathlib import Path

import typer

from mergekit_lite import api

from .common import guarded, out


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@guarded
def demo(
    folder: Path = typer.Option(Path("mlite-demo"), "--dir", help="Folder for the models, recipes and outputs."),
) -> None:
    """Generate a small base, two fine-tunes and a LoRA adapter, then run the example recipes."""
    runs = api.run_demo(folder, report=lambda line: out.print(line, highlight=False))
    out.print(f"demo finished: {len(runs)} recipes ran; outputs are under {folder.absolute() / 'out'}")
