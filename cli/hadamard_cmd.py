"""`mlite hadamard ...`: multiplicative (HUT) patches W' = W ⊙ M: make, apply, make additive."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from mergekit_lite import api

from .common import err, guarded, out, setup_logging

if TYPE_CHECKING:
    from mergekit_lite.workflows.hadamard import HadamardResult

hadamard_app = typer.Typer(
    help="Multiplicative (HUT) patches: W' = W ⊙ M, and the additive ΔW = W ⊙ (M − 1) it equals.",
    no_args_is_help=True,
)

_DEVICE = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto.")
_SHARD = typer.Option(None, "--shard-size", help="Max bytes per output shard (e.g. 5GB).")
_FORCE = typer.Option(False, "--force", help="Replace a non-empty output directory.")
_BIN = typer.Option(False, "--allow-bin", help="Allow pickle .bin checkpoints (weights_only).")
_UNMARKED = typer.Option(False, "--allow-unmarked", help="Accept a multiplier not marked as one (made elsewhere).")
_JSON = typer.Option(False, "--json", help="Print the report as JSON on stdout.")
_VERBOSE = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug logging.")


@hadamard_app.command("to-multiplier")
@guarded
def to_multiplier_cmd(
    base: str = typer.Option(..., "--base", help="The base the model was fine-tuned from."),
    model: str = typer.Option(..., "--model", help="The fine-tuned checkpoint W'."),
    out_path: str = typer.Option(..., "--out", "-o", help="Multiplier checkpoint directory."),
    allow_unrepresentable: bool = typer.Option(
        False, "--allow-unrepresentable", help="Where the base is 0 and the model is not, keep the base's 0 (M = 1)."),
    dtype: str = typer.Option(None, "--dtype", help="Multiplier dtype (default float32)."),
    device: str = _DEVICE, shard_size: str = _SHARD, force: bool = _FORCE, allow_bin: bool = _BIN,
    as_json: bool = _JSON, verbose: int = _VERBOSE,
) -> None:
    """Write M = W'/W for every float tensor: the fine-tune as a multiplicative patch."""
    setup_logging(verbose)
    result = api.hadamard_to_multiplier(base, model, out=out_path, allow_unrepresentable=allow_unrepresentable,
                                        device=device, dtype=dtype, shard_size=shard_size, force=force,
                                        progress=not as_json and err.is_terminal, allow_bin=allow_bin)
    _report(result, as_json, "multiplier")


@hadamard_app.command("apply")
@guarded
def apply_cmd(
    base: str = typer.Option(..., "--base", help="The base to patch: the original, or an evolved one."),
    multiplier: str = typer.Option(..., "--multiplier", help="The multiplier checkpoint M."),
    out_path: str = typer.Option(..., "--out", "-o", help="Output model directory."),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype of float tensors (default: the base's)."),
    device: str = _DEVICE, shard_size: str = _SHARD, force: bool = _FORCE, allow_bin: bool = _BIN,
    allow_unmarked: bool = _UNMARKED, as_json: bool = _JSON, verbose: int = _VERBOSE,
) -> None:
    """Write W ⊙ M: the base with the multiplicative patch applied."""
    setup_logging(verbose)
    result = api.hadamard_apply(base, multiplier, out=out_path, device=device, dtype=dtype, shard_size=shard_size,
                                force=force, progress=not as_json and err.is_terminal, allow_bin=allow_bin,
                                allow_unmarked=allow_unmarked)
    _report(result, as_json, "model")


@hadamard_app.command("to-delta")
@guarded
def to_delta_cmd(
    base: str = typer.Option(..., "--base", help="The base the multiplier applies to."),
    multiplier: str = typer.Option(..., "--multiplier", help="The multiplier checkpoint M."),
    out_path: str = typer.Option(..., "--out", "-o", help="Delta checkpoint directory."),
    dtype: str = typer.Option(None, "--dtype", help="Delta dtype (default float32)."),
    device: str = _DEVICE, shard_size: str = _SHARD, force: bool = _FORCE, allow_bin: bool = _BIN,
    allow_unmarked: bool = _UNMARKED, as_json: bool = _JSON, verbose: int = _VERBOSE,
) -> None:
    """Write ΔW = W ⊙ (M − 1): the multiplicative patch as an additive delta."""
    setup_logging(verbose)
    result = api.hadamard_to_delta(base, multiplier, out=out_path, device=device, dtype=dtype, shard_size=shard_size,
                                   force=force, progress=not as_json and err.is_terminal, allow_bin=allow_bin,
                                   allow_unmarked=allow_unmarked)
    _report(result, as_json, "delta")


def _report(result: HadamardResult, as_json: bool, what: str) -> None:
    if as_json:
        out.print_json(json.dumps(result.to_json()))
        return
    table = Table(title=f"hadamard {result.operation}", title_justify="left")
    for col in ("tensor", "shape", "kind", "‖ΔW‖", "‖ΔW‖/‖W‖", "unrepr.", "rel. error", "note"):
        table.add_column(col, justify="left" if col in ("tensor", "kind", "note") else "right")
    for r in result.tensors:
        table.add_row(r.name, "×".join(map(str, r.shape)), r.kind, f"{r.delta_norm:.4g}", _num(r.rel_change),
                      str(r.unrepresentable or ""), _num(r.rel_error), r.note)
    err.print(table)
    dropped = f" (‖ΔW‖ {result.dropped_norm:.4g} dropped)" if result.unrepresentable else ""
    out.print(f"wrote {what} {result.output}: {sum(r.kind not in ('skipped', 'copied') for r in result.tensors)} "
              f"tensors, max ‖ΔW‖/‖W‖ {result.max_rel_change:.3e}, {result.unrepresentable} unrepresentable "
              f"entries{dropped}", highlight=False)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.3e}"


def register(app: typer.Typer) -> None:
    app.add_typer(hadamard_app, name="hadamard")
