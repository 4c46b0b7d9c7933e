"""Flip rates (MUSCLE): golden counts, the laws that tie them to accuracy, and every refusal."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import mergekit_lite as mlite
from mergekit_lite.errors import ResolveError, UsageError
from mergekit_lite.workflows.compat import flip_rates

runner = CliRunner()


def cli(*args: Any) -> Any:
    return runner.invoke(importlib.import_module("mergekit_lite.cli.main").app, [str(a) for a in args])


def jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Ten examples. old right on 1 2 4 5 7 8 (i % 3 != 0), new right on 0 2 4 6 8 (even i).
# negative flips (old right, new wrong): 1 5 7 -> NFR 3/10; positive (old wrong, new right): 0 6 -> PFR 2/10.
OLD = [{"doc_id": i, "acc": float(i % 3 != 0)} for i in range(10)]
NEW = [{"doc_id": i, "acc": float(i % 2 == 0)} for i in range(10)]


def test_golden_flip_counts(tmp_path: Path) -> None:
    r = mlite.compare_predictions(jsonl(tmp_path / "old.jsonl", OLD), jsonl(tmp_path / "new.jsonl", NEW[::-1]))
    assert r.examples == 10 and r.old_right == 6 and r.new_right == 5
    assert r.negative_flips == ("1", "5", "7") and r.positive_flips == ("0", "6")
    assert r.nfr == 0.3 and r.pfr == 0.2 and r.old_accuracy == 0.6 and r.new_accuracy == 0.5
    assert r.matched_by == "doc_id" and r.verdict == "acc"


def test_prediction_and_label_fields_without_ids_match_by_position(tmp_path: Path) -> None:
    # old: right, wrong, right; new: wrong, wrong, right -> one negative flip (record 1), none positive.
    old = jsonl(tmp_path / "o.jsonl", [{"prediction": "a", "label": "a"}, {"prediction": 1, "label": 2},
                                        {"prediction": [1], "label": [1]}])
    new = jsonl(tmp_path / "n.jsonl", [{"pred": "b", "target": "a"}, {"pred": 3, "target": 2},
                                        {"pred": [1], "target": [1]}])
    r = mlite.compare_predictions(old, new)
    assert (r.negative_flips, r.positive_flips, r.matched_by) == (("1",), (), "position")
    assert r.verdict == "prediction == label / pred == target"


def test_where_keeps_one_filter_and_ids_match_across_spellings(tmp_path: Path) -> None:
    # lm-evaluation-harness: one record per doc and filter; ids written 3 in one file and "3" in the other.
    old = [{"doc_id": i, "filter": f, "exact_match": int(f == "strict")} for i in range(3) for f in ("strict", "flex")]
    new = [{"doc_id": str(i), "filter": f, "exact_match": int(i == 0)} for i in range(3) for f in ("strict", "flex")]
    o, n = jsonl(tmp_path / "o.jsonl", old), jsonl(tmp_path / "n.jsonl", new)
    with pytest.raises(UsageError, match=r"o\.jsonl:2: doc_id 0 already on line 1 .*--where filter=NAME"):
        mlite.compare_predictions(o, n)
    r = mlite.compare_predictions(o, n, where={"filter": "strict"})
    assert (r.negative_flips, r.positive_flips) == (("1", "2"), ())
    r = mlite.compare_predictions(o, n, where={"filter": "flex"}, metric="exact_match")
    assert (r.negative_flips, r.positive_flips) == ((), ("0",))


def test_named_id_and_metric_fields(tmp_path: Path) -> None:
    o = jsonl(tmp_path / "o.jsonl", [{"q": "x", "ok": True, "acc": 0}, {"q": "y", "ok": False, "acc": 0}])
    n = jsonl(tmp_path / "n.jsonl", [{"q": "y", "ok": True, "acc": 0}, {"q": "x", "ok": False, "acc": 0}])
    r = mlite.compare_predictions(o, n, metric="ok", id_field="q")
    assert (r.negative_flips, r.positive_flips, r.matched_by, r.verdict) == (("x",), ("y",), "q", "ok")


@pytest.mark.parametrize(("records", "message"), [
    ([{"doc_id": 0, "acc": 0.42}], r"o\.jsonl:1: acc is 0.42; a flip needs right or wrong"),
    ([{"doc_id": 0, "acc": 1}, {"doc_id": 1}], r"o\.jsonl:2: no 'acc' field"),
    ([{"doc_id": 0, "acc": 1}, {"acc": 1}], r"o\.jsonl:2: no 'doc_id' field"),
    ([{"doc_id": 0, "score": 1}], r"o\.jsonl:1: no verdict: expected a right/wrong field .* fields: doc_id, score"),
    ([[1, 2]], r"o\.jsonl:1: a JSON list, expected an object per line"),
    ([], r"o\.jsonl: no records"),
])
def test_bad_records_name_file_and_line(tmp_path: Path, records: list[Any], message: str) -> None:
    o = jsonl(tmp_path / "o.jsonl", records)
    n = jsonl(tmp_path / "n.jsonl", [{"doc_id": 0, "acc": 1}])
    with pytest.raises(UsageError, match=message):
        mlite.compare_predictions(o, n)


def test_malformed_json_and_missing_files(tmp_path: Path) -> None:
    o = tmp_path / "o.jsonl"
    o.write_text('{"doc_id": 0, "acc": 1}\n\n{"doc_id": 1, acc: 1}\n')
    with pytest.raises(UsageError, match=r"o\.jsonl:3: not JSON \(Expecting property name"):
        mlite.compare_predictions(o, o)
    with pytest.raises(ResolveError, match="nope.jsonl: no such file"):
        mlite.compare_predictions(tmp_path / "nope.jsonl", o)


def test_different_examples_are_refused(tmp_path: Path) -> None:
    o = jsonl(tmp_path / "o.jsonl", OLD)
    with pytest.raises(UsageError, match=r"hold different examples: 2 only in .*o\.jsonl \(first: 8\); 1 only in"):
        mlite.compare_predictions(o, jsonl(tmp_path / "n.jsonl", [*NEW[:8], {"doc_id": 99, "acc": 1}]))
    with pytest.raises(UsageError, match="has ids .doc_id. and .* has none"):
        mlite.compare_predictions(o, jsonl(tmp_path / "p.jsonl", [{"acc": 1}] * 10))
    with pytest.raises(UsageError, match="has 2 records and .* 1, and neither has ids"):
        mlite.compare_predictions(jsonl(tmp_path / "a.jsonl", [{"acc": 1}] * 2), jsonl(tmp_path / "b.jsonl", [{"acc": 1}]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
def test_laws(pairs: list[tuple[bool, bool]]) -> None:
    old = {str(i): a for i, (a, _) in enumerate(pairs)}
    new = {str(i): b for i, (_, b) in enumerate(pairs)}
    r, back = flip_rates(old, new), flip_rates(new, old)
    # accuracy(new) - accuracy(old) = PFR - NFR, in counts
    assert r.new_right - r.old_right == len(r.positive_flips) - len(r.negative_flips)
    # swapping the models swaps the flips; a model against itself flips nothing
    assert (back.negative_flips, back.positive_flips) == (r.positive_flips, r.negative_flips)
    assert flip_rates(old, dict(old)).negative_flips == () == flip_rates(old, dict(old)).positive_flips
    # the order of the examples does not matter
    shuffled = dict(reversed(list(new.items())))
    assert set(flip_rates(old, shuffled).negative_flips) == set(r.negative_flips)


def test_cli_table_json_and_errors(tmp_path: Path) -> None:
    o, n = jsonl(tmp_path / "old.jsonl", OLD), jsonl(tmp_path / "new.jsonl", NEW)
    res = cli("compat", o, n, "--show", 2)
    assert res.exit_code == 0, res.output
    assert "10 examples, matched by doc_id; verdict: acc" in res.output
    assert "accuracy: old 60.00%, new 50.00% (-10.00 points)" in res.output
    assert "negative flips (old right, new wrong): 3, NFR 30.00%" in res.output
    assert "negative flips: 1, 5 … (+1; --json lists all)" in res.output
    res = cli("compat", o, n, "--json")
    assert json.loads(res.output)["negative_flips"] == ["1", "5", "7"]
    res = cli("compat", o, n, "--where", "filter")
    assert res.exit_code == 2 and "--where 'filter': expected FIELD=VALUE" in res.output
    res = cli("compat", o, tmp_path / "missing.jsonl")
    assert res.exit_code == 5 and "missing.jsonl: no such file" in res.output


def test_harness_text_bom_and_crlf(tmp_path: Path) -> None:
    """lm-evaluation-harness writes JSON with ensure_ascii=False: U+2028, U+2029 and U+0085 come
    raw inside strings and must not split a record (str.splitlines would). A UTF-8 byte-order
    mark and CRLF line ends are read too."""
    recs = [{"doc_id": i, "resps": f"a\u2028b\u2029c\u0085d {i}", "acc": 1} for i in range(3)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in recs)
    o = tmp_path / "o.jsonl"
    o.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    n = jsonl(tmp_path / "n.jsonl", [{"doc_id": i, "acc": int(i != 1)} for i in range(3)])
    r = mlite.compare_predictions(o, n)
    assert (r.examples, r.negative_flips) == (3, ("1",))


def test_different_measures_or_keys_are_refused(tmp_path: Path) -> None:
    em = jsonl(tmp_path / "em.jsonl", [{"doc_id": 0, "exact_match": 1}])
    corr = jsonl(tmp_path / "corr.jsonl", [{"doc_id": 0, "correct": True}])
    with pytest.raises(UsageError, match="verdict is exact_match and .*correct: flips compare one measure"):
        mlite.compare_predictions(em, corr)
    other_id = jsonl(tmp_path / "id.jsonl", [{"id": 0, "exact_match": 1}])
    with pytest.raises(UsageError, match="keyed by doc_id and .* by id: pass --id"):
        mlite.compare_predictions(em, other_id)


def test_where_numbers_match_as_numbers(tmp_path: Path) -> None:
    # --where gives text: "1.0" and "1" both select the records whose field is the number 1.0
    recs = [{"doc_id": i, "acc": 1.0, "shots": float(i % 2)} for i in range(4)]
    o, n = jsonl(tmp_path / "o.jsonl", recs), jsonl(tmp_path / "n.jsonl", recs)
    for value in ("1.0", "1", 1):
        assert mlite.compare_predictions(o, n, where={"shots": value}).examples == 2
    assert mlite.compare_predictions(o, n, where={"shots": "0"}).examples == 2
