"""`mlite probe train|collect`: the linear probe that Model Surgery edits along."""

from __future__ import annotations

from pathlib import Path

import typer

from mergekit_lite import api

from .common import guarded, out

probe_app = typer.Typer(help="Linear probes on hidden states (for mlite surgery).", no_args_is_help=True)


@probe_app.command("train")
@guarded
def train_cmd(
    features: Path = typer.Option(..., "--features", help="safetensors with 'features' (N, d) and 'labels' (N,), label 1 = behaviour."),
    out_path: Path = typer.Option(..., "--out", help="Probe file to write (safetensors: weight [2, d], bias [2])."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split (and of Adam's shuffling)."),
    holdout: float = typer.Option(0.1, "--holdout", help="Share of each class held out to measure accuracy, in [0, 1)."),
    optimizer: str = typer.Option("lbfgs", "--optimizer", help="lbfgs (full batch) | adam (lr 1e-4, 10 epochs, batch 64)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing probe file."),
) -> None:
    """Train a deterministic 2-class linear probe (cross-entropy) and report held-out accuracy."""
    res = api.train_probe(features, out_path, seed=seed, holdout=holdout, optimizer=optimizer, force=force)
    fit = res.fit
    held = "n/a (no held-out samples)" if fit.heldout_accuracy is None else f"{fit.heldout_accuracy:.4f}"
    out.print(
        f"wrote {res.path}: train accuracy {fit.train_accuracy:.4f} on {fit.n_train}, "
        f"held-out accuracy {held} on {fit.n_heldout}; ‖w‖ = {float(fit.weight[1].double().norm()):.4g} "
        "(a surgery edit is α·w)",
        highlight=False,
    )


@probe_app.command("collect")
@guarded
def collect_cmd(
    model: Path = typer.Option(..., "--model", help="Local causal LM directory (weights, config, tokenizer)."),
    positive: Path = typer.Option(..., "--positive", help="Text file, one example per line, showing the behaviour (label 1)."),
    negative: Path = typer.Option(..., "--negative", help="Text file, one example per line, without it (label 0)."),
    out_path: Path = typer.Option(..., "--out", help="Features file to write (safetensors: features, labels)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_length: int = typer.Option(256, "--max-length", min=1, help="Tokens kept per example."),
    device: str = typer.Option("cpu", "--device"),
    force: bool = typer.Option(False, "--force", help="Replace an existing features file."),
) -> None:
    """Mean-pooled final hidden states of a local model over two text files (needs transformers)."""
    path = api.collect_features(model, positive, negative, out_path, batch_size=batch_size, max_length=max_length,
                            device=device, force=force)
    out.print(f"wrote {path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(probe_app, name="probe")
