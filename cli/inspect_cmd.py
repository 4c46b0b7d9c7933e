"""`mlite inspect PATH`: what a checkpoint holds, from its headers alone."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from mergekit_lite import api
from mergekit_lite.units import format_size

from .common import guarded, out


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)


@guarded
def inspect(
    path: str = typer.Argument(..., help="Checkpoint directory, .safetensors file or org/name[@rev]."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    allow_bin: bool = typer.Option(False, "--allow-bin", help="Allow pickle .bin weights (weights_only)."),
) -> None:
    """List tensors with shape, dtype and shard; totals of parameters and bytes."""
    ckpt = api.inspect(path, allow_bin=allow_bin)
    rows: list[dict[str, Any]] = [
        {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "shard": t.shard.name, "bytes": t.nbytes}
        for t in ckpt.tensors.values()
    ]
    summary: dict[str, Any] = {
        "path": str(ckpt.path),
        "tensors": len(rows),
        "parameters": ckpt.num_parameters,
        "bytes": ckpt.total_bytes,
        "shards": [s.name for s in ckpt.shards],
        "tied_embeddings": ckpt.tied_embeddings,
        "model_type": (ckpt.config or {}).get("model_type"),
        "quantized": ckpt.quantization,
        "tokenizer": api.vocabulary(ckpt),
    }
    if as_json:
        out.print_json(json.dumps({**summary, "tensor_list": rows}))
        return
    table = Table(title=str(ckpt.label), show_lines=False)
    for col in ("tensor", "shape", "dtype", "shard"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], "×".join(map(str, r["shape"])) or "scalar", r["dtype"], r["shard"])
    out.print(table)
    out.print(
        f"{summary['tensors']} tensors, {summary['parameters']:,} parameters, {format_size(summary['bytes'])} "
        f"in {len(summary['shards'])} shard(s); tied embeddings: {'yes' if summary['tied_embeddings'] else 'no'}"
        + (f"; quantized ({summary['quantized']})" if summary["quantized"] else "")
    )
    tok = summary["tokenizer"]
    if tok is not None:
        added = f", {tok['added_tokens']} added (last: {', '.join(tok['last_added'])})" if tok["added_tokens"] else ""
        rows = tok["embedding_rows"]
        note = "" if rows in (None, tok["tokens"]) else f"; the embedding has {rows} rows"
        out.print(f"tokenizer.json: {tok['tokens']} tokens{added}{note}", highlight=False)
