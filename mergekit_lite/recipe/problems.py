"""Collecting recipe problems so a user sees all of them in one run, each pointing at a line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import RecipeError
from .model import Loc


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A ", did you mean 'x'?" suffix for the closest candidate, or "" when none is close."""
    pool = [c for c in candidates if isinstance(c, str)]
    close = difflib.get_close_matches(str(word), pool, n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in pool}
        close = [lowered[str(word).lower()]] if str(word).lower() in lowered else []
    return f", did you mean '{close[0]}'?" if close else ""


def choices_hint(candidates: Iterable[str], limit: int = 12) -> str:
    """A short "(known: a, b, c)" list for when no candidate is close."""
    names = sorted({c for c in candidates if isinstance(c, str)})
    if not names:
        return ""
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f" (known: {shown})"


@dataclass(frozen=True)
class Problem:
    loc: Loc
    message: str
    key: str

    def __str__(self) -> str:
        suffix = f" ({self.key})" if self.key else ""
        return f"{self.loc}: {self.message}{suffix}"


class Problems:
    """An ordered, de-duplicated list of problems; `raise_if_any` turns them into one error."""

    def __init__(self) -> None:
        self._items: list[Problem] = []

    def add(self, loc: Loc, message: str, key: str = "") -> None:
        p = Problem(loc, message, key)
        if p not in self._items:
            self._items.append(p)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def messages(self) -> list[str]:
        # Stable sort by line so the report reads top to bottom like the file.
        ordered = sorted(self._items, key=lambda p: (p.loc.line is None, p.loc.line or 0))
        return [str(p) for p in ordered]

    def raise_if_any(self) -> None:
        if self._items:
            msgs = self.messages()
            raise RecipeError("\n".join(msgs), problems=msgs)
