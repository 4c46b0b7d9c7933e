"""`mlite extract`: a full fine-tune's delta as a PEFT LoRA adapter, by truncated SVD."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from mergekit_lite import api

from .common import err, guarded, out, setup_logging


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)


@guarded
def extract(
    model: str = typer.Option(..., "--model", help="The fine-tuned checkpoint."),
    base: str = typer.Option(..., "--base", help="The base it was fine-tuned from."),
    rank: int = typer.Option(None, "--rank", help="Rank of every module's factors."),
    energy: float = typer.Option(None, "--energy", help="Per module, the smallest rank holding this fraction of ‖Δ‖²."),
    budget_rank: int = typer.Option(None, "--budget-rank",
                                    help="The parameters of this rank on every module, shared among them by "
                                         "singular-value importance."),
    out_path: str = typer.Option(None, "--out", "-o", help="Adapter directory (omit to only report)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the randomized SVD (large matrices)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N."),
    dtype: str = typer.Option(None, "--dtype", help="Adapter dtype (default float32)."),
    no_full: bool = typer.Option(False, "--no-full-tensors", help="Skip 1-D deltas instead of saving them whole."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    allow_bin: bool = typer.Option(False, "--allow-bin", help="Allow pickle .bin checkpoints (weights_only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug logging."),
) -> None:
    """Factor θ_model − θ_base per module into a PEFT LoRA adapter and report each error."""
    setup_logging(verbose)
    result = api.extract(model, base, rank=rank, energy=energy, budget_rank=budget_rank, out=out_path, seed=seed, device=device, dtype=dtype,
                         full_tensors=not no_full, force=force, allow_bin=allow_bin)
    if as_json:
        out.print_json(json.dumps(result.to_json()))
        return
    table = Table(title="extracted tensors", title_justify="left")
    for col in ("tensor", "shape", "kind", "‖Δ‖", "rank", "rel. error", "note"):
        table.add_column(col, justify="left" if col in ("tensor", "kind", "note") else "right")
    for r in result.tensors:
        table.add_row(r.name, "×".join(map(str, r.shape)), r.kind, f"{r.delta_norm:.4g}", str(r.rank or ""),
                      f"{r.rel_error:.2e}" if r.kind == "lora" else "", r.note)
    err.print(table)
    where = f"wrote {result.output}" if result.output else "nothing written (no --out)"
    out.print(f"{where}: {sum(r.kind == 'lora' for r in result.tensors)} LoRA modules, "
              f"max relative error {result.max_rel_error:.3e}")
