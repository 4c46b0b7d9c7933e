"""`mlite methods`: every method and its parameters, read from the registry."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from mergekit_lite import api

from .common import guarded, out


def register(app: typer.Typer) -> None:
    app.command("methods")(methods)


@guarded
def methods(
    name: str = typer.Argument(None, help="Show one method in detail."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List methods and their parameters (types, defaults, ranges, help)."""
    from mergekit_lite.errors import UsageError

    specs = api.all_methods()
    if name is not None:
        spec = api.get_method(name)
        if spec is None:
            raise UsageError(f"unknown method {name!r} (known: {', '.join(s.name for s in specs)})")
        specs = [spec]
    if as_json:
        data = [
            {
                "name": s.name, "aliases": api.method_aliases(s.name), "summary": s.summary, "paper": s.paper,
                "needs_base": s.needs_base, "optional_base": s.optional_base,
                "min_models": s.min_models, "max_models": s.max_models, "ordered": s.ordered,
                "params": [
                    {"name": p.name, "aliases": list(p.aliases), "kind": p.kind, "default": p.default,
                     "per_model": p.per_model, "per_tensor": p.per_tensor, "required": p.required,
                     "range": p.describe_range(), "help": p.help}
                    for p in s.params
                ],
            }
            for s in specs
        ]
        out.print_json(json.dumps(data, default=str))
        return
    for s in specs:
        names = api.method_aliases(s.name)
        also = f" (also: {', '.join(names)})" if names else ""
        table = Table(title=f"{s.name}{also} — {s.summary}", title_justify="left", expand=False)
        for col in ("parameter", "type", "default", "range", "help"):
            table.add_column(col, overflow="fold")
        for p in s.params:
            # "global": one value for every tensor (no rules or gradients); "required": no default
            kind = p.kind + (" per model" if p.per_model else "") + ("" if p.per_tensor else ", global") + (
                ", required" if p.required else "")
            name = p.name + (f" ({', '.join(p.aliases)})" if p.aliases else "")
            table.add_row(name, kind, repr(p.default), p.describe_range(), p.help)
        out.print(table)
        if s.paper:
            out.print(f"  paper: {s.paper}")
