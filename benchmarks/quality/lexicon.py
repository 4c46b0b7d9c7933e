"""A small VADER-style lexicon scorer for generated text.

It reads `vader_lexicon.txt` (token, mean valence in [-4, 4], ...) and scores a text as the sum
of its tokens' valences, flipping and damping a token's valence when one of the three tokens
before it is a negation (VADER's factor -0.74), then squashing the sum to [-1, 1] with VADER's
normalisation x / sqrt(x^2 + 15). A text is *negative* when that compound score is <= -0.05,
VADER's usual threshold. It deliberately omits VADER's other heuristics (capitals, boosters,
"but" weighting, punctuation emphasis): the benchmark needs a stable, transparent scorer, not
a faithful reimplementation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

NEGATIONS = frozenset(
    "not no never none nobody nothing neither nor nowhere cannot without isnt arent wasnt werent "
    "dont doesnt didnt wont wouldnt shouldnt couldnt cant aint hasnt havent hadnt".split()
)
NEGATION_FACTOR = -0.74
ALPHA = 15.0
NEGATIVE_AT = -0.05
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?")


def parse_lexicon(text: str) -> dict[str, float]:
    """Token → mean valence from the lexicon file's tab-separated lines."""
    lex: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            try:
                lex[parts[0].strip().lower()] = float(parts[1])
            except ValueError:
                continue
    return lex


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def compound(text: str, lexicon: Mapping[str, float]) -> float:
    """VADER-style compound score in (-1, 1)."""
    toks = tokens(text)
    total = 0.0
    for i, tok in enumerate(toks):
        v = lexicon.get(tok)
        if v is None:
            continue
        window = toks[max(0, i - 3) : i]
        if any(w.replace("'", "") in NEGATIONS or w.endswith("n't") for w in window):
            v *= NEGATION_FACTOR
        total += v
    return total / math.sqrt(total * total + ALPHA)


def is_negative(text: str, lexicon: Mapping[str, float]) -> bool:
    return compound(text, lexicon) <= NEGATIVE_AT
