"""The output's vocabulary (mergekit's `tokenizer_source` / `tokenizer:`), and each merged
model's embedding rows moved to it.

The plan builds the output tokenizer from the recipe's `VocabSpec` and the models'
`tokenizer.json` files, then replaces each merged checkpoint by a view whose vocabulary tensors
(embeddings, output heads) have one row per output token, in the output's order
(`methods/vocab_align.py` holds the maths). The views are ordinary checkpoints read tensor by
tensor, in row blocks too, so the engine merges them as it merges any model; a row block reads
only the span of the model's rows it needs. Fallback rows (tokens a model lacks) are read once
per tensor, row by row, and kept: they are as many as the tokens some model lacks.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..dtypes import to_torch
from ..errors import CheckpointError, RecipeError
from ..io.checkpoint import Checkpoint
from ..io.deltas import is_vocab_tensor
from ..io.tokenizer_vocab import (
    TOKENIZER_JSON,
    Tokenizer,
    added_entry,
    read_tokenizer,
    stripped,
    union,
    with_added,
)
from ..methods.vocab_align import ABSENT, Fallback, average_rows, fallbacks, padding_row, permutation, realign
from ..recipe.vocab import UNION, TokenChoice, VocabSpec

log = logging.getLogger(__name__)


class Alignment:
    """How every merged model's vocabulary rows map to the output's: shared by the models'
    views, because a fallback row can come from any model."""

    def __init__(self, perms: Sequence[Sequence[int]], chosen: dict[int, Fallback], size: int, rows: int) -> None:
        self.size = size  # output tokens
        self.rows = rows  # output rows (padded)
        self.perms = [torch.tensor(p, dtype=torch.long) for p in perms]
        self.chosen = chosen
        self.ids = sorted(chosen)
        self.default_index = torch.full((size,), -1, dtype=torch.long)
        if self.ids:
            self.default_index[torch.tensor(self.ids)] = torch.arange(len(self.ids))
        self.forced = torch.zeros(size, dtype=torch.bool)
        for i, f in chosen.items():
            self.forced[i] = f.force
        self.views: list[AlignedCheckpoint] = []
        self._defaults: dict[str, torch.Tensor] = {}
        self._pads: dict[tuple[int, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    def defaults(self, name: str) -> torch.Tensor:
        """Tensor `name`'s fallback rows, one per id of `self.ids`, in the models' promoted dtype."""
        with self._lock:
            got = self._defaults.get(name)
            if got is not None:
                return got
            infos = [v.inner.info(name) for v in self.views]
            dtype = to_torch(infos[0].dtype)
            for info in infos[1:]:
                dtype = torch.promote_types(dtype, to_torch(info.dtype))
            rest = infos[0].shape[1:]

            def row(k: int, r: int) -> torch.Tensor:
                return self.views[k].read_inner(name, (r, r + 1))[0]

            out = []
            for i in self.ids:
                f = self.chosen[i]
                if f.kind == "zero":
                    out.append(torch.zeros(rest, dtype=dtype))
                elif f.kind == "model":
                    out.append(row(f.model, int(self.perms[f.model][i])).to(dtype))
                elif f.kind == "row":
                    out.append(row(f.model, f.row).to(dtype))
                else:
                    held = [row(k, int(p[i])) for k, p in enumerate(self.perms) if int(p[i]) != ABSENT]
                    out.append(average_rows(held, dtype))
            got = torch.stack(out) if out else torch.zeros((0, *rest), dtype=dtype)
            self._defaults[name] = got
            return got

    def take(self, k: int, name: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of model `k`'s tensor `name` in the output's vocabulary."""
        parts = []
        if a < self.size:
            hi = min(b, self.size)
            perm, forced, di = self.perms[k][a:hi], self.forced[a:hi], self.default_index[a:hi]
            need = perm[(perm != ABSENT) & ~forced]
            view = self.views[k]
            if need.numel():
                lo = int(need.min())
                source = view.read_inner(name, (lo, int(need.max()) + 1))
            else:
                lo = 0
                info = view.inner.info(name)
                source = torch.zeros((0, *info.shape[1:]), dtype=to_torch(info.dtype))
            defaults = self.defaults(name) if bool((di >= 0).any()) else source[:0]
            parts.append(realign(source, lo, perm, forced, defaults, di))
        if b > self.size:  # a copy: the caller owns what it gets, and may compute in it
            pad = self._pad(k, name)
            parts.append(pad.expand(b - max(a, self.size), *pad.shape).clone())
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _pad(self, k: int, name: str) -> torch.Tensor:
        with self._lock:
            got = self._pads.get((k, name))
        if got is None:
            got = padding_row(self.take(k, name, 0, self.size))
            with self._lock:
                self._pads[(k, name)] = got
        return got


class AlignedCheckpoint(Checkpoint):
    """A merged model whose vocabulary tensors have the output's rows (`Alignment.take`)."""

    def __init__(self, inner: Checkpoint, alignment: Alignment, k: int) -> None:
        tensors = {}
        for n, info in inner.tensors.items():
            if is_vocab_tensor(n) and info.shape:
                row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
                info = replace(info, shape=(alignment.rows, *info.shape[1:]), end=info.begin + alignment.rows * row_bytes)
            tensors[n] = info
        super().__init__(inner.path, inner.label, tensors, inner.config, inner.source_dir, inner._bin_state)
        self.head_source_dir = inner.head_source_dir
        self.lacks = inner.lacks
        self.inner = inner
        self.alignment = alignment
        self.k = k

    def read_inner(self, name: str, rows: tuple[int, int]) -> torch.Tensor:
        """Rows of the model's own tensor (as stored), counted as this view's reads."""
        t = self.inner.load(name, rows=rows)
        self._count(name, t.numel() * t.element_size())
        return t

    def _count(self, name: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.reads.append((name, nbytes))

    def load(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             rows: tuple[int, int] | None = None) -> torch.Tensor:
        if not is_vocab_tensor(self._stored(name)):
            info = self.inner.info(name)
            stored = info.nbytes if rows is None or not info.shape else info.nbytes // info.shape[0] * (rows[1] - rows[0])
            t = self.inner.load(name, device=device, dtype=dtype, rows=rows)
            self._count(name, stored)
            return t
        a, b = rows if rows is not None else (0, self.alignment.rows)
        t = self.alignment.take(self.k, name, a, b).contiguous()
        dev = torch.device(device)
        if dev.type != "cpu":
            t = t.to(dev)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def close(self) -> None:
        super().close()
        self.inner.close()


@dataclass(frozen=True)
class VocabOutcome:
    """What the plan reports of the output vocabulary (the dry run shows it): the setting, the
    output's tokens and rows, each merged model's rows, whether rows had to move, and the
    tokenizer files the output gets instead of the copied ones (a union, stripped ids, added
    tokens)."""

    setting: str
    tokens: int
    rows: int
    lined_up: bool
    model_rows: dict[str, int]
    files: dict[str, bytes]

    def describe(self) -> dict[str, Any]:
        return {"setting": self.setting, "tokens": self.tokens, "rows": self.rows, "lined_up": self.lined_up,
                "model_rows": self.model_rows, "tokenizer_files": sorted(self.files)}


def align_vocabularies(spec: VocabSpec, keys: list[str], checkpoints: dict[str, Checkpoint]) -> VocabOutcome | None:
    """Build the output tokenizer and replace the merged checkpoints `keys` (mergekit's order)
    in `checkpoints` by views in its vocabulary (when any model's rows must move). None when
    there is no vocabulary to follow (no tokenizer.json): rows then merge by id."""
    merged = {k: checkpoints[k] for k in keys if k in checkpoints}
    toks = {k: read_tokenizer(ck.source_dir) for k, ck in merged.items()}
    _check_stack_heads(spec, merged, toks)
    built = _output_tokenizer(spec, merged, toks, checkpoints)
    if built is None:
        return None
    out_tok, base_key, base_tok = built
    vocab = out_tok.vocab()
    size = len(vocab)
    if sorted(vocab.values()) != list(range(size)):
        raise CheckpointError(f"{out_tok.directory / TOKENIZER_JSON}: its ids are not 0 to {size - 1} without gaps, "
                              "so the output's embedding rows cannot follow them")
    pad = spec.pad_to_multiple_of
    rows = math.ceil(size / pad) * pad if pad else size
    for k, t in toks.items():
        if t is None and k != base_key:
            log.warning("%s: %s has no tokenizer.json; its ids are taken to be the base's (%s), as mergekit does",
                        spec.loc.prefix() + spec.written, merged[k].label, checkpoints[base_key].label)
    order = list(merged)
    perms = []
    for k in order:
        t = base_tok if k == base_key else (toks[k] or base_tok)
        perms.append(permutation(vocab, t.vocab(), _rows(merged[k], t), size))
    chosen = _choices(spec, vocab, perms, order, toks, base_tok, base_key, merged)
    identity = (not chosen and rows == size and all(
        p == list(range(size)) and _embedding_rows(merged[k]) in (None, size) for k, p in zip(order, perms, strict=True)))
    model_rows = {merged[k].label: r for k in order if (r := _embedding_rows(merged[k])) is not None}
    if not identity:
        alignment = Alignment(perms, chosen, size, rows)
        for n, k in enumerate(order):
            view = AlignedCheckpoint(merged[k], alignment, n)
            alignment.views.append(view)
            checkpoints[k] = view
        log.info("%s: output vocabulary of %d tokens (%d rows); the models' embeddings (%s rows) are lined up by token",
                 spec.written, size, rows, ", ".join(map(str, sorted(set(model_rows.values())))))
    return VocabOutcome(spec.written, size, rows, not identity, model_rows, out_tok.files())


def _check_stack_heads(spec: VocabSpec, merged: dict[str, Checkpoint], toks: dict[str, Tokenizer | None]) -> None:
    """A layer stack's place whose embeddings and head come from models with other tokenizers
    has two vocabularies, and one that the first or last slice leaves empty merges its
    vocabulary tensors over fewer models than the others: both refused (one vocabulary is lined
    up over all the merged models)."""
    vocab_names = {n for ck in merged.values() for n in ck.names() if is_vocab_tensor(n)}
    for ck in merged.values():
        empty = sorted(n for n in vocab_names if ck.lacks(n))
        if empty:
            raise RecipeError(f"{spec.loc.prefix()}{spec.written}: {ck.label} has no source in the slice that gives "
                              f"{empty[0]}; to line vocabularies up, give the first and last slices every model")
    for k, ck in merged.items():
        if ck.head_source_dir is None:
            continue
        head, mine = read_tokenizer(ck.head_source_dir), toks[k]
        if (head.vocab() if head else None) != (mine.vocab() if mine else None):
            raise RecipeError(f"{spec.loc.prefix()}{spec.written}: {ck.label} takes its embeddings and its "
                              f"output head from models whose tokenizers differ ({ck.source_dir} and "
                              f"{ck.head_source_dir}); mlite lines up one vocabulary per merged model: "
                              "give the first and last slices models with the same tokenizer")


def _output_tokenizer(spec: VocabSpec, merged: dict[str, Checkpoint], toks: dict[str, Tokenizer | None],
                      checkpoints: dict[str, Checkpoint]) -> tuple[Tokenizer, str, Tokenizer] | None:
    """The output tokenizer (the tokens the recipe names added), the key of the base whose
    tokenizer starts it and that tokenizer stripped to its embedding; None, with a warning,
    when the base (or the named model) has no tokenizer.json."""
    base_key = spec.base if spec.base in checkpoints else next(iter(merged), None)
    if base_key is None:
        return None
    base_ck = checkpoints[base_key]
    base_tok = toks.get(base_key) if base_key in toks else read_tokenizer(base_ck.source_dir)
    if base_tok is None:
        _unaligned(base_ck, spec)
        return None
    base_tok = stripped(base_tok, _rows(base_ck, base_tok))
    if spec.source == UNION:
        others = [(base_tok, _rows(base_ck, base_tok))]
        others += [(t, _rows(merged[k], t)) for k, t in toks.items() if t is not None and k != base_key]
        out_tok = union(base_tok, others)
    elif spec.source == base_key:
        out_tok = base_tok
    else:
        src_ck = checkpoints[spec.source]
        got = read_tokenizer(src_ck.source_dir)
        if got is None:
            _unaligned(src_ck, spec)
            return None
        out_tok = got
    have = out_tok.vocab()
    return with_added(out_tok, [added_entry(t) for t in spec.tokens if t not in have]), base_key, base_tok


def _choices(spec: VocabSpec, vocab: dict[str, int], perms: list[list[int]], order: list[str],
             toks: dict[str, Tokenizer | None], base_tok: Tokenizer, base_key: str,
             merged: dict[str, Checkpoint]) -> dict[int, Fallback]:
    """The fallback of every output id that needs one: the recipe's `tokens:` choices, then
    mergekit's defaults (`methods.vocab_align.fallbacks`)."""
    configured = {vocab[text]: _fallback(text, choice, order, toks, base_tok, base_key, merged)
                  for text, choice in spec.tokens.items() if choice.kind != "default"}
    merge_base = order.index(spec.merge_base) if spec.merge_base in order else None
    try:
        chosen = fallbacks(perms, merge_base, configured)
    except ValueError as exc:
        text = next(t for t in spec.tokens if str(exc).startswith(f"id {vocab[t]}:"))
        raise RecipeError(f"{spec.tokens[text].loc.prefix()}tokenizer.tokens {text!r}: the model named as its "
                          "source does not have this token; give another model, or a model_token source") from None
    for text, choice in spec.tokens.items():
        if choice.kind == "default" and choice.force:  # no source given: the default row, on every model
            i = vocab[text]
            chosen[i] = replace(chosen.get(i) or _default_for(merge_base), force=True)
    missing = [text for text, i in vocab.items() if i in chosen and chosen[i].kind == "zero" and text not in spec.tokens]
    if missing:
        log.warning("%s: %d output token(s) are in no merged model (%s): their rows are zeros",
                    spec.loc.prefix() + spec.written, len(missing), ", ".join(map(repr, missing[:3])))
    return chosen


def _default_for(merge_base: int | None) -> Fallback:
    """The row a forced token without a source gets when every model has it (mergekit 0.1.5
    stops with an error there): the base's when there is a base, else the models' average."""
    if merge_base is not None:
        return Fallback("model", merge_base)
    return Fallback("average")


def _fallback(text: str, choice: TokenChoice, order: list[str], toks: dict[str, Tokenizer | None],
              base_tok: Tokenizer, base_key: str, merged: dict[str, Checkpoint]) -> Fallback:
    if choice.kind == "zero":
        return Fallback("zero", force=choice.force)
    assert choice.model is not None
    if choice.model not in order:
        raise RecipeError(f"{choice.loc.prefix()}tokenizer.tokens {text!r}: {choice.model!r} is not a merged model")
    k = order.index(choice.model)
    if choice.kind == "model":
        return Fallback("model", k, force=choice.force)
    tok = base_tok if choice.model == base_key else (toks.get(choice.model) or base_tok)
    held = _rows(merged[choice.model], tok)
    if choice.token_id is not None:
        row = choice.token_id
    else:
        row = tok.vocab().get(str(choice.token), ABSENT)
        if row == ABSENT:
            raise RecipeError(f"{choice.loc.prefix()}tokenizer.tokens {text!r}: token {choice.token!r} is not in "
                              f"{merged[choice.model].label}'s tokenizer")
    if not 0 <= row < held:
        raise RecipeError(f"{choice.loc.prefix()}tokenizer.tokens {text!r}: row {row} is past "
                          f"{merged[choice.model].label}'s {held} embedding rows")
    return Fallback("row", k, row, force=choice.force)


def _embedding_rows(ck: Checkpoint) -> int | None:
    return next((info.shape[0] for n, info in ck.tensors.items() if is_vocab_tensor(n) and info.shape), None)


def _rows(ck: Checkpoint, tok: Tokenizer) -> int:
    """The ids a model has rows for: its config's vocab_size (as mergekit reads it), bounded by
    its embedding; the tokenizer's length when it has neither."""
    cfg = ck.config or {}
    size = cfg.get("vocab_size")
    if not isinstance(size, int) and isinstance(cfg.get("text_config"), dict):
        size = cfg["text_config"].get("vocab_size")
    held = _embedding_rows(ck)
    if isinstance(size, int) and not isinstance(size, bool):
        return min(size, held) if held is not None else size
    return held if held is not None else len(tok.vocab())


def _unaligned(ck: Checkpoint, spec: VocabSpec) -> None:
    """No vocabulary to line rows up with (a SentencePiece-only tokenizer, or none): say so, and
    merge rows by id as without the setting."""
    where = ck.source_dir if ck.source_dir is not None else ck.path
    log.warning("%s: %s has no %s in %s, and mlite reads vocabularies from that file only: embedding rows "
                "are merged by id, not lined up by token (save the tokenizer with transformers' save_pretrained "
                "to make one)", spec.loc.prefix() + spec.written, ck.label, TOKENIZER_JSON, where)
