"""What a mergekit recipe asks of the output's vocabulary: `tokenizer_source`, or its
`tokenizer:` block (a source, per-token embedding choices, padding).

The plan builds the output tokenizer from it and lines every model's embedding rows up with
that tokenizer's ids (`engine/vocab.py`); this is only the recipe's side, with the models named
as recipe inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Loc

UNION = "union"
# mlite's shape: the output's reference model (the base its chain starts from), which only the
# plan knows; it fills `source`, `base` and `merge_base` where they hold this or None
REFERENCE = ""


@dataclass(frozen=True)
class TokenChoice:
    """`tokenizer.tokens.<token>`: where the token's row comes from for the models that lack it
    (every model, when `force`d). kind: "model" (that model's row for the token), "zero",
    "model_token" (that model's row of another token: `token`, or the id `token_id`), or
    "default" (mergekit's choice: only `force` or the token's addition was asked for)."""

    kind: str
    loc: Loc
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class VocabSpec:
    """source: UNION or the input whose tokenizer the output takes (the base for `base`);
    base: the input whose tokenizer is stripped of ids past its embedding and starts the union
    (mergekit's base_model; without one, the first model); merge_base: base_model itself, whose
    row a token gets when the base has it and another model lacks it; written: the setting as
    the recipe wrote it, for messages."""

    source: str
    base: str | None
    merge_base: str | None  # None in mlite's shape: the plan puts in the reference model
    loc: Loc
    written: str
    tokens: dict[str, TokenChoice] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
