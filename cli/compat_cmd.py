"""`mlite compat OLD NEW`: negative and positive flip rates between two models' evaluation results."""

from __future__ import annotations

import json

import typer

from mergekit_lite import api

from .common import guarded, out


def register(app: typer.Typer) -> None:
    app.command("compat")(compat)


@guarded
def compat(
    old: str = typer.Argument(..., help="The old model's per-example results (JSON Lines)."),
    new: str = typer.Argument(..., help="The new model's per-example results on the same examples (JSON Lines)."),
    metric: str = typer.Option(None, "--metric", help="The right/wrong field (default: correct, acc or "
                                                      "exact_match, else prediction == label)."),
    id_field: str = typer.Option(None, "--id", help="The example id field (default: doc_id, id, idx or example_id, "
                                                    "else the record's position)."),
    where: list[str] = typer.Option(None, "--where", help="Keep only records with FIELD=VALUE (repeatable), e.g. "
                                                         "filter=strict-match for lm-evaluation-harness."),
    show: int = typer.Option(10, "--show", min=0, help="How many negative-flip ids to print."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON, with every flip id."),
) -> None:
    """Negative flip rate (old right, new wrong) and positive flip rate of NEW against OLD (MUSCLE)."""
    from mergekit_lite.errors import UsageError

    pairs = {}
    for item in where or []:
        field, eq, value = item.partition("=")
        if not eq or not field:
            raise UsageError(f"--where {item!r}: expected FIELD=VALUE")
        pairs[field] = value
    report = api.compare_predictions(old, new, metric=metric, id_field=id_field, where=pairs or None)
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    n = report.examples
    gain = 100 * (report.new_accuracy - report.old_accuracy)
    out.print(f"{n} examples, matched by {report.matched_by}; verdict: {report.verdict}", markup=False)
    out.print(f"accuracy: old {100 * report.old_accuracy:.2f}%, new {100 * report.new_accuracy:.2f}% "
              f"({gain:+.2f} points)")
    out.print(f"negative flips (old right, new wrong): {len(report.negative_flips)}, NFR {100 * report.nfr:.2f}%")
    out.print(f"positive flips (old wrong, new right): {len(report.positive_flips)}, PFR {100 * report.pfr:.2f}%")
    if report.negative_flips and show:
        shown = report.negative_flips[:show]
        more = len(report.negative_flips) - len(shown)
        out.print("negative flips: " + ", ".join(shown) + (f" … (+{more}; --json lists all)" if more else ""),
                  markup=False)
