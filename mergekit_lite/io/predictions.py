"""Per-example verdicts of an evaluation (which examples a model got right), read from JSON Lines.

Flip rates (`workflows/compat.py`) compare two models example by example, so every record needs
an id both files share and a right/wrong verdict. The files evaluation harnesses already write
carry both, so we read those as they are rather than ask for a format of our own:
lm-evaluation-harness's `--log_samples` files (`doc_id`, and a 0/1 metric such as `acc` or
`exact_match`; one record per filter, so `where={"filter": ...}` picks one), or any JSONL with
`id` and `correct`, or with `prediction` and `label`.

A verdict must be right or wrong: a metric of 0.42 (an F1, a BLEU) has no flip, so it is refused
rather than thresholded behind the user's back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ResolveError, UsageError

ID_FIELDS = ("doc_id", "id", "idx", "example_id")
VERDICT_FIELDS = ("correct", "acc", "exact_match")
PREDICTION_FIELDS = ("prediction", "pred")
LABEL_FIELDS = ("label", "target", "answer")


@dataclass(frozen=True)
class Verdicts:
    """One file's verdicts, in file order. `id_field` is None when the records carry no id and
    are matched by position (their 1-based record number is the id)."""

    path: Path
    right: dict[str, bool]
    id_field: str | None
    verdict: str  # how a verdict was read, for the report: "acc", "prediction == label"


def read_verdicts(path: str | Path, *, metric: str | None = None, id_field: str | None = None,
                  where: Mapping[str, Any] | None = None) -> Verdicts:
    """Read `path` (JSON Lines). `metric` names the verdict field (else the first of
    VERDICT_FIELDS in the first record, else prediction == label); `id_field` the id (else the
    first of ID_FIELDS, else the record's position); `where` keeps only the records whose fields
    hold the given values (compared as ids are: `3` matches `"3"`)."""
    p = Path(path)
    if not p.is_file():
        raise ResolveError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    records = [(line, rec) for line, rec in _records(p) if _selected(rec, where)]
    if not records:
        kept = f" with {_describe(where)}" if where else ""
        raise UsageError(f"{p}: no records{kept}")
    first_line, first = records[0]
    ids = id_field or next((f for f in ID_FIELDS if f in first), None)
    read_one, verdict = _verdict_reader(p, first_line, first, metric)
    right: dict[str, bool] = {}
    seen_at: dict[str, int] = {}
    for n, (line, rec) in enumerate(records, 1):
        if ids is None:
            key = str(n)
        elif ids not in rec:
            raise UsageError(f"{p}:{line}: no {ids!r} field (the id of every record; pass the id field's name)")
        else:
            key = _id_text(rec[ids])
        if key in seen_at:
            hint = (" (lm-evaluation-harness writes one record per filter: keep one with where/--where "
                    "filter=NAME)" if "filter" in rec else "")
            raise UsageError(f"{p}:{line}: {ids} {key} already on line {seen_at[key]}{hint}")
        seen_at[key] = line
        right[key] = read_one(line, rec)
    return Verdicts(p, right, ids, verdict)


def _records(p: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{p}: not UTF-8 text (byte {e.start}); expected JSON Lines") from None
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UsageError(f"{p}:{line}: not JSON ({e.msg}, column {e.colno}); expected one object per line") from None
        if not isinstance(rec, dict):
            raise UsageError(f"{p}:{line}: a JSON {type(rec).__name__}, expected an object per line")
        out.append((line, rec))
    return out


def _selected(rec: Mapping[str, Any], where: Mapping[str, Any] | None) -> bool:
    return not where or all(k in rec and _id_text(rec[k]) == _id_text(v) for k, v in where.items())


def _describe(where: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (where or {}).items())


def _id_text(value: Any) -> str:
    """Ids compare as text, so `doc_id: 3` in one file matches `"3"` in another; a float id that
    is a whole number (3.0, from a pandas export) prints as 3."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _verdict_reader(p: Path, line: int, first: Mapping[str, Any], metric: str | None) -> tuple[Any, str]:
    """(function reading one record's verdict, its description), chosen from the first record."""
    field = metric or next((f for f in VERDICT_FIELDS if f in first), None)
    if field is not None:
        if field not in first:
            raise UsageError(f"{p}:{line}: no {field!r} field (fields: {', '.join(sorted(first))})")

        def from_field(ln: int, rec: Mapping[str, Any]) -> bool:
            if field not in rec:
                raise UsageError(f"{p}:{ln}: no {field!r} field")
            return _right_or_wrong(p, ln, field, rec[field])

        return from_field, field
    pred = next((f for f in PREDICTION_FIELDS if f in first), None)
    label = next((f for f in LABEL_FIELDS if f in first), None)
    if pred is None or label is None:
        raise UsageError(
            f"{p}:{line}: no verdict: expected a right/wrong field ({', '.join(VERDICT_FIELDS)}, or name one), or a "
            f"prediction ({', '.join(PREDICTION_FIELDS)}) and a label ({', '.join(LABEL_FIELDS)}); fields: "
            f"{', '.join(sorted(first))}")

    def from_pair(ln: int, rec: Mapping[str, Any]) -> bool:
        for f in (pred, label):
            if f not in rec:
                raise UsageError(f"{p}:{ln}: no {f!r} field")
        return bool(rec[pred] == rec[label])

    return from_pair, f"{pred} == {label}"


def _right_or_wrong(p: Path, line: int, field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return value == 1
    raise UsageError(f"{p}:{line}: {field} is {json.dumps(value)}; a flip needs right or wrong "
                     "(true/false or 0/1), not a graded score")
