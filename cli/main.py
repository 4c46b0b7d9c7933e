"""The `mlite` typer application; each command group lives in its own module.

Every module in COMMAND_MODULES exposes `register(app)`, which adds its commands. The modules
only parse arguments and print; the work is done by `mergekit_lite.api`.
"""

from __future__ import annotations

import importlib

import typer

from mergekit_lite import __version__

app = typer.Typer(
    name="mlite",
    help="Merge, patch and edit model checkpoints, tensor by tensor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES: tuple[str, ...] = (
    "inspect_cmd",
    "methods_cmd",
    "merge_cmd",
    "demo_cmd",
    "patch_cmd",
    "extract_cmd",
    "bank_cmd",
    "mos_cmd",
    "surgery_cmd",
    "probe_cmd",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlite {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """mergekit_lite: streaming, exact model merging."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"{__package__}.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
