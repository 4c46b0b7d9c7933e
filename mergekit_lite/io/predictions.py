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
from collections.abc import Iterator, Mapping
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
    hold the given values (compared as ids are: `3` matches `"3"`, and `"1.0"` a number 1).

    Records are read one line at a time and only their id and verdict are kept: an
    lm-evaluation-harness samples file carries each prompt and response, hundreds of MB."""
    p = Path(path)
    if not p.is_file():
        raise ResolveError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    ids: str | None = None
    read_one: Any = None
    verdict = ""
    right: dict[str, bool] = {}
    seen_at: dict[str, int] = {}
    for line, rec in _records(p):
        if not _selected(rec, where):
            continue
        if read_one is None:  # the first record kept decides the id and the verdict fields
            ids = id_field or next((f for f in ID_FIELDS if f in rec), None)
            read_one, verdict = _verdict_reader(p, line, rec, metric)
        if ids is None:
            key = str(len(right) + 1)
        elif ids not in rec:
            raise UsageError(f"{p}:{line}: no {ids!r} field (the id of every record; pass the id field's name)")
        else:
            key = _id_text(rec[ids])
        if key in seen_at:
            hint = (" (lm-evaluation-harness writes one record per filter: pick one with --where filter=NAME)"
                    if ids == "doc_id" and "filter" in rec and not (where and "filter" in where) else "")
            raise UsageError(f"{p}:{line}: {ids} {key} already on line {seen_at[key]}{hint}")
        seen_at[key] = line
        right[key] = read_one(line, rec)
    if read_one is None:
        kept = f" with {_describe(where)}" if where else ""
        raise UsageError(f"{p}: no records{kept}")
    return Verdicts(p, right, ids, verdict)


def _records(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line. Lines end at \n alone (a \r before it is
    dropped): harnesses write JSON with ensure_ascii=False, so U+2028 and U+0085 appear raw
    inside strings, where `str.splitlines` would cut a record in two. A UTF-8 byte-order mark
    is skipped."""
    try:
        with p.open(encoding="utf-8-sig", newline="\n") as fh:
            for line, raw in enumerate(fh, 1):
                text = raw.rstrip("\n").rstrip("\r")
                if not text.strip():
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{p}:{line}: not JSON ({e.msg}, column {e.colno}); expected one object per "
                                     "line") from None
                if not isinstance(rec, dict):
                    raise UsageError(f"{p}:{line}: a JSON {type(rec).__name__}, expected an object per line")
                yield line, rec
    except UnicodeDecodeError as e:
        raise UsageError(f"{p}: not UTF-8 text (byte {e.start} of a chunk); expected JSON Lines") from None


def _selected(rec: Mapping[str, Any], where: Mapping[str, Any] | None) -> bool:
    return not where or all(k in rec and _same_value(rec[k], v) for k, v in where.items())


def _same_value(value: Any, wanted: Any) -> bool:
    """`--where` values come as text: "1.0" matches a number 1 as well as the text "1.0"."""
    if _id_text(value) == _id_text(wanted):
        return True
    if isinstance(wanted, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(wanted) == float(value)
        except ValueError:
            return False
    return False


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
