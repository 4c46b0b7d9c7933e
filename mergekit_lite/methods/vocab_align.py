"""Embedding rows moved to another tokenizer's ids: mergekit's `tokenizer_source` maths.

Models fine-tuned with added tokens (chat markers, padding) have embeddings of different
lengths, or the same token at different ids. Merged row by row, token 32000 of one model would
be averaged with whatever another model keeps there. mergekit instead builds one output
tokenizer and gives every model a tensor with one row per output token (`PermutedVocabulary`):
the model's own row where it has the token, else a fallback row shared by all the models that
lack it. The fallback is, unless a recipe names one: the only model that has the token; the
base model, when it has it; the average of the models that have it; zeros when none has it.
A recipe's `tokenizer.tokens` can name a model, another token's row, or zeros, and `force` it
on every model. Rows past the tokenizer's length (`pad_to_multiple_of`) are the mean of the
model's token rows.

Pure functions: id maps in, plans out; tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

ABSENT = -1


@dataclass(frozen=True)
class Fallback:
    """Where a token's row comes from for the models that lack it (or all, when forced).

    kind: "average" (the models that have it, summed in the models' order then divided, as
    mergekit does), "model" (model `model`'s row for the token), "row" (model `model`'s row
    `row`, another token's), "zero".
    """

    kind: str
    model: int = -1
    row: int = -1
    force: bool = False


def permutation(out_vocab: Mapping[str, int], model_vocab: Mapping[str, int] | None, rows: int,
                size: int) -> list[int]:
    """For each output id below `size`, the row the model holds its token in; ABSENT where the
    model lacks the token or its id is past the model's `rows` (a padding id). A model without a
    vocabulary (`None`) is taken to share the output's ids, as mergekit assumes for a model
    whose tokenizer it cannot load."""
    perm = [ABSENT] * size
    for tok, new in out_vocab.items():
        old = new if model_vocab is None else model_vocab.get(tok, ABSENT)
        if 0 <= old < rows:
            perm[new] = old
    return perm


def fallbacks(perms: Sequence[Sequence[int]], base: int | None,
              configured: Mapping[int, Fallback]) -> dict[int, Fallback]:
    """output id → fallback for every id some model lacks, and every forced one.

    `configured` holds the recipe's choices by output id; the rest follow mergekit's defaults
    (the only holder; the base when it holds it; the average of the holders; zeros).
    Configured fallbacks are checked here: a model named for a token it lacks is an error.
    """
    out: dict[int, Fallback] = {}
    size = len(perms[0]) if perms else 0
    for i in range(size):
        holders = [k for k, p in enumerate(perms) if p[i] != ABSENT]
        chosen = configured.get(i)
        if chosen is not None:
            if not chosen.force and len(holders) == len(perms):
                continue
            if chosen.kind == "model" and perms[chosen.model][i] == ABSENT:
                raise ValueError(f"id {i}: the model named as its source does not have the token")
            out[i] = chosen
            continue
        if len(holders) == len(perms):
            continue
        if len(holders) == 1:
            out[i] = Fallback("model", holders[0])
        elif not holders:
            out[i] = Fallback("zero")
        elif base is not None and perms[base][i] != ABSENT:
            out[i] = Fallback("model", base)
        else:
            out[i] = Fallback("average")
    return out


def average_rows(rows: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The mean of `rows` as mergekit takes it: summed one by one in `dtype`, then divided."""
    acc = torch.zeros(rows[0].shape, dtype=dtype)
    for r in rows:
        acc = acc + r.to(dtype)
    acc /= len(rows)
    return acc


def realign(source: torch.Tensor, offset: int, perm: torch.Tensor, forced: torch.Tensor,
            defaults: torch.Tensor, default_index: torch.Tensor) -> torch.Tensor:
    """Rows for a run of output ids: the model's own row (`source` holds its rows from
    `offset` on; `perm` gives each id's row, ABSENT where it has none) unless the id is
    `forced`, else the id's fallback row (`defaults[default_index[i]]`); an id with neither
    stays zero. `perm`, `forced` and `default_index` cover the run, one entry per id."""
    out = torch.zeros((perm.shape[0], *source.shape[1:]), dtype=source.dtype)
    own = (perm != ABSENT) & ~forced
    if bool(own.any()):
        out[own] = source[perm[own] - offset]
    fall = ~own & (default_index >= 0)
    if bool(fall.any()):
        out[fall] = defaults[default_index[fall]].to(source.dtype)
    return out


def padding_row(rows: torch.Tensor) -> torch.Tensor:
    """The row mergekit gives the ids past the tokenizer's length (`pad_to_multiple_of`): the
    mean of the token rows, which keeps a never-trained id harmless."""
    return torch.mean(rows, dim=0)
