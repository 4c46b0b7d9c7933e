"""Flip rates between an old and a new model's verdicts (MUSCLE, Echterhoff et al., arXiv 2407.09435).

An update (a merge, a patch carried onto a new base) can raise accuracy and still break what
users relied on: the examples the old model got right and the new one gets wrong. MUSCLE calls
their share the negative flip rate, NFR = #{old right ∧ new wrong} / N, and the acceptance
metric for a port or a merge; the positive flip rate PFR = #{old wrong ∧ new right} / N is its
counterpart, and accuracy(new) − accuracy(old) = PFR − NFR. Both are taken over the N examples
the two files share, which must be all of each file's examples: rates over a silently different
set of examples would not mean what they say.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io.predictions import read_verdicts


@dataclass(frozen=True)
class FlipReport:
    """Counts over the shared examples; the flip lists hold example ids in the old file's order."""

    examples: int
    old_right: int
    new_right: int
    negative_flips: tuple[str, ...]  # old right, new wrong
    positive_flips: tuple[str, ...]  # old wrong, new right
    matched_by: str = "id"
    verdict: str = ""

    @property
    def old_accuracy(self) -> float:
        return self.old_right / self.examples

    @property
    def new_accuracy(self) -> float:
        return self.new_right / self.examples

    @property
    def nfr(self) -> float:
        return len(self.negative_flips) / self.examples

    @property
    def pfr(self) -> float:
        return len(self.positive_flips) / self.examples

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples, "matched_by": self.matched_by, "verdict": self.verdict,
            "old_accuracy": self.old_accuracy, "new_accuracy": self.new_accuracy,
            "nfr": self.nfr, "pfr": self.pfr,
            "negative_flips": list(self.negative_flips), "positive_flips": list(self.positive_flips),
        }


def flip_rates(old: Mapping[str, bool], new: Mapping[str, bool], *, old_name: str = "old",
               new_name: str = "new") -> FlipReport:
    """NFR and PFR of `new` against `old` (example id → right). Both must hold the same ids."""
    only_old = [k for k in old if k not in new]
    only_new = [k for k in new if k not in old]
    if only_old or only_new:
        parts = [f"{len(ids)} only in {name} (first: {ids[0]})"
                 for ids, name in ((only_old, old_name), (only_new, new_name)) if ids]
        raise UsageError(f"{old_name} and {new_name} hold different examples: {'; '.join(parts)}")
    if not old:
        raise UsageError(f"{old_name} and {new_name} hold no examples")
    return FlipReport(
        examples=len(old),
        old_right=sum(old.values()),
        new_right=sum(new.values()),
        negative_flips=tuple(k for k, right in old.items() if right and not new[k]),
        positive_flips=tuple(k for k, right in old.items() if not right and new[k]),
    )


def compare_predictions(old: str | Path, new: str | Path, *, metric: str | None = None, id_field: str | None = None,
                        where: Mapping[str, Any] | None = None) -> FlipReport:
    """Flip rates between two evaluation files (JSON Lines; see `io/predictions.py` for what a
    record may hold). `metric`, `id_field` and `where` apply to both files."""
    a = read_verdicts(old, metric=metric, id_field=id_field, where=where)
    b = read_verdicts(new, metric=metric, id_field=id_field, where=where)
    if (a.id_field is None) != (b.id_field is None):
        with_ids, without = (a, b) if a.id_field is not None else (b, a)
        raise UsageError(f"{with_ids.path} has ids ({with_ids.id_field}) and {without.path} has none: "
                         "examples cannot be matched (pass the id field's name)")
    if a.id_field != b.id_field:
        raise UsageError(f"{a.path} is keyed by {a.id_field} and {b.path} by {b.id_field}: pass --id (id_field) to "
                         "match both files by one field")
    if _measure(a.verdict) != _measure(b.verdict):
        raise UsageError(f"{a.path}'s verdict is {a.verdict} and {b.path}'s {b.verdict}: flips compare one "
                         "measure; pass --metric (metric) to read the same field in both")
    if a.id_field is None and len(a.right) != len(b.right):
        raise UsageError(f"{a.path} has {len(a.right)} records and {b.path} {len(b.right)}, and neither has ids "
                         "to match them by")
    report = flip_rates(a.right, b.right, old_name=str(a.path), new_name=str(b.path))
    verdict = a.verdict if a.verdict == b.verdict else f"{a.verdict} / {b.verdict}"
    return replace(report, matched_by=a.id_field or "position", verdict=verdict)


def _measure(verdict: str) -> str:
    """What a verdict measures: its field, or an exact match of prediction and label whatever
    the two files call them (`prediction == label` against `pred == target`)."""
    return "prediction == label" if " == " in verdict else verdict
