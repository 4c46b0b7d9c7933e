"""`mlite patch`: port a LoRA adapter or a fine-tune delta onto a new base (PortLLM)."""

from __future__ import annotations

import json
import math

import typer
from rich.table import Table

from mergekit_lite import api
from mergekit_lite.errors import UsageError
from mergekit_lite.units import format_size

from .common import err, guarded, out, setup_logging


def register(app: typer.Typer) -> None:
    app.command("patch")(patch)


@guarded
def patch(
    base: str = typer.Option(..., "--base", help="The NEW base checkpoint to patch."),
    delta: str = typer.Option(..., "--delta", help="PEFT LoRA dir, or a full fine-tune of --old-base."),
    old_base: str = typer.Option(None, "--old-base", help="The base the delta was trained on."),
    lam: float = typer.Option(1.0, "--lambda", help="Scale of the ported patch."),
    out_path: str = typer.Option(..., "--out", "-o", help="Output directory."),
    as_adapter: bool = typer.Option(False, "--as-adapter", help="Write a PEFT adapter for NEW instead of a model."),
    rank: int = typer.Option(None, "--rank", help="With --as-adapter and a dense delta: SVD rank."),
    energy: float = typer.Option(None, "--energy", help="With --as-adapter and a dense delta: energy fraction kept."),
    budget_rank: int = typer.Option(None, "--budget-rank",
                                    help="With --as-adapter and a dense delta: rank R's parameters, shared by "
                                         "singular-value importance."),
    allow_vocab_growth: bool = typer.Option(False, "--allow-vocab-growth", help="Patch rows [:old_vocab] only."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype (default: the base's; with --as-adapter, a LoRA's stored dtype)."),
    shard_size: str = typer.Option(None, "--shard-size", help="Max bytes per output shard (e.g. 5GB)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted patch of the same inputs."),
    allow_bin: bool = typer.Option(False, "--allow-bin", help="Allow pickle .bin checkpoints (weights_only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug logging."),
) -> None:
    """Apply an old fine-tune's patch to a new base: θ_new + λ·Δ."""
    setup_logging(verbose)
    if not math.isfinite(lam):  # typer reads "nan" and "inf" as floats
        raise UsageError(f"--lambda must be a finite number, got {lam}")
    result = api.patch(base, delta, old_base=old_base, lam=lam, out=out_path, as_adapter=as_adapter, rank=rank,
                       energy=energy, budget_rank=budget_rank, allow_vocab_growth=allow_vocab_growth, device=device, dtype=dtype,
                       shard_size=shard_size, force=force, progress=not as_json and err.is_terminal,
                       allow_bin=allow_bin, resume=resume)
    if as_json:
        out.print_json(json.dumps(result.to_json()))
        return
    table = Table(title="patched tensors", title_justify="left")
    for col in ("tensor", "shape", "kind", "‖Δ‖", "‖θ_new − θ_old‖", "rank", "rel. error"):
        table.add_column(col, justify="left" if col in ("tensor", "kind") else "right")
    for r in result.tensors:
        table.add_row(r.name, "×".join(map(str, r.shape)), r.kind, _num(r.delta_norm), _num(r.base_shift),
                      str(r.rank) if r.rank else "", f"{r.rel_error:.2e}" if r.kind == "lora" else "")
    err.print(table)
    what = "adapter" if result.as_adapter else "model"
    out.print(f"wrote {what} {result.output}: {len(result.tensors)} tensors patched, "
              f"read {format_size(result.bytes_read)}, wrote {format_size(result.bytes_written)}")


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"
