"""`mlite surgery`: probe-guided edit of gate rows (Model Surgery), and `--undo` of such an edit."""

from __future__ import annotations

from pathlib import Path

import typer

from mergekit_lite import api
from mergekit_lite.errors import UsageError

from .common import guarded, out


@guarded
def surgery_cmd(
    model: str | None = typer.Option(None, "--model", help="Model to edit (directory, .safetensors file or org/name@rev)."),
    probe: Path | None = typer.Option(None, "--probe", help="Probe file: safetensors with 'weight' of shape (2, d) (row 1 = behaviour) or (d,)."),
    alpha: float = typer.Option(1.0, "--alpha", help="Edit strength α: g ← g + α·w on the selected rows."),
    top_k: int | None = typer.Option(None, "--top-k", help="Rows to edit over the whole model."),
    fraction: float | None = typer.Option(None, "--fraction", help=f"Share of all target rows to edit (default {api.SURGERY_DEFAULT_FRACTION:.6g})."),
    target: str = typer.Option(api.SURGERY_DEFAULT_TARGET, "--target", help="Module whose weight rows are candidates (up_proj, fc1, ...)."),
    direction: str = typer.Option("suppress", "--direction", help="suppress (score −cos, add α·w) | promote (score +cos, add −α·w)."),
    out_path: Path | None = typer.Option(None, "--out", help="Output directory (default ./<model name>-surgery; required with --undo)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:N or auto"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    allow_pt: bool = typer.Option(False, "--allow-pt", help="Accept a pickle (.pt) probe, loaded with weights_only=True."),
    allow_bin: bool = typer.Option(False, "--allow-bin", help="Accept a pickle (.bin) model, loaded with weights_only=True."),
    undo: Path | None = typer.Option(None, "--undo", help="Restore the original rows of an edited model (needs --out)."),
) -> None:
    """Edit the gate rows most anti-aligned with a probe direction (Wang et al., NAACL 2025)."""
    if undo is not None:
        if model is not None or probe is not None:
            raise UsageError("--undo takes the edited model itself; do not combine it with --model or --probe")
        edit_options = {"--alpha": alpha != 1.0, "--top-k": top_k is not None, "--fraction": fraction is not None,
                        "--target": target != api.SURGERY_DEFAULT_TARGET, "--direction": direction != "suppress",
                        "--device": device is not None, "--allow-pt": allow_pt, "--allow-bin": allow_bin}
        given = [flag for flag, on in edit_options.items() if on]
        if given:
            raise UsageError(f"--undo restores the rows the sidecar lists; {given[0]} has no effect there")
        if out_path is None:
            raise UsageError("--undo needs --out PATH for the restored model")
        path = api.undo_surgery(undo, out_path, force=force)
        out.print(f"restored the original rows of {undo} into {path}", highlight=False)
        return
    if model is None or probe is None:
        raise UsageError("mlite surgery needs --model and --probe (or --undo EDITED --out PATH)")
    if top_k is not None and fraction is not None:
        raise UsageError("give --top-k or --fraction, not both")
    dest = out_path if out_path is not None else Path.cwd() / f"{Path(model.split('@')[0]).name}-surgery"
    res = api.surgery(model, probe, alpha=alpha, top_k=top_k, fraction=fraction, target=target, direction=direction,
                  out=dest, device=device, force=force, allow_pt=allow_pt, allow_bin=allow_bin)
    sel = res.selection
    per_layer = ", ".join(f"{layer}:{n}" for layer, n in res.rows_per_layer().items())
    out.print(
        f"edited {sel.k} of {sel.n_candidates} '{sel.target}' rows in {len(sel.rows)} tensors "
        f"(direction {sel.direction}, alpha {sel.alpha:g}); rows per layer {per_layer}",
        highlight=False,
    )
    out.print(f"wrote {res.output} (sidecar surgery.json; undo with: mlite surgery --undo {res.output} --out PATH)",
              highlight=False)


def register(app: typer.Typer) -> None:
    app.command("surgery")(surgery_cmd)
