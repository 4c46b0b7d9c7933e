"""A checkpoint's tokenizer as its `tokenizer.json` holds it, and the edits that make an output
tokenizer from it.

mergekit's `tokenizer_source` (and its `tokenizer:` block) lines embedding rows up by token: the
output gets one tokenizer (the base's, another model's, or the union of all) and every model's
rows are moved to that tokenizer's ids. This module reads what that needs, the token → id map
transformers' `get_vocab()` gives (the tokenizer model's vocabulary plus its added tokens), and
builds the output tokenizer the way mergekit's transformers calls do: dropping the tokens past
a model's embedding (`get_stripped_tokenizer`) and adding tokens with the ids the `tokenizers`
library gives them. Only the `tokenizers` JSON format is read, so no tokenizer library is
needed; a checkpoint without `tokenizer.json` has no vocabulary here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, one_line

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# an added token's settings, in the order `tokenizers` writes them
ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass
class Tokenizer:
    """One `tokenizer.json` (and the `tokenizer_config.json` beside it, whose added-token list
    transformers also reads), held as parsed JSON so that an edited copy can be written back."""

    directory: Path
    data: dict[str, Any]
    config: dict[str, Any] | None = None
    edited: bool = field(default=False)

    @property
    def model_vocab(self) -> dict[str, int]:
        """The tokenizer model's own token → id (BPE, WordPiece, WordLevel: a map; Unigram: a
        list of [piece, score] in id order)."""
        vocab = (self.data.get("model") or {}).get("vocab") or {}
        if isinstance(vocab, dict):
            return {str(tok): int(i) for tok, i in vocab.items()}
        return {str(entry[0]): i for i, entry in enumerate(vocab)}

    @property
    def added_tokens(self) -> list[dict[str, Any]]:
        """The added-token entries, by id (as transformers' `added_tokens_decoder` lists them)."""
        return sorted(self.data.get("added_tokens") or [], key=lambda e: int(e["id"]))

    def vocab(self) -> dict[str, int]:
        """token → id as transformers' `get_vocab()` gives it: the model's vocabulary, then the
        added tokens (an added token's id wins for its text)."""
        out = self.model_vocab
        for entry in self.added_tokens:
            out[str(entry["content"])] = int(entry["id"])
        return out

    def files(self) -> dict[str, bytes]:
        """The edited tokenizer as files for the output (nothing when it was not edited)."""
        if not self.edited:
            return {}
        out = {TOKENIZER_JSON: (json.dumps(self.data, indent=2, ensure_ascii=False) + "\n").encode()}
        if self.config is not None:
            out[TOKENIZER_CONFIG] = (json.dumps(self.config, indent=2, ensure_ascii=False) + "\n").encode()
        return out


def read_tokenizer(directory: Path | None) -> Tokenizer | None:
    """`directory`'s tokenizer, None when it has no `tokenizer.json`."""
    if directory is None:
        return None
    path = directory / TOKENIZER_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ValueError("no 'model' object")
        tok = Tokenizer(directory, data, _read_config(directory / TOKENIZER_CONFIG))
        tok.vocab()  # every entry readable
        return tok
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{path}: unreadable tokenizer ({one_line(exc)})") from None


def describe(directory: Path | None) -> dict[str, Any] | None:
    """A tokenizer in brief, for `mlite inspect`: its tokens, and its added tokens (the last few
    named: chat markers and padding tokens are what fine-tunes add); None without tokenizer.json."""
    tok = read_tokenizer(directory)
    if tok is None:
        return None
    added = tok.added_tokens
    return {"tokens": len(tok.vocab()), "added_tokens": len(added),
            "last_added": [str(e["content"]) for e in added[-3:]]}


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stripped(tok: Tokenizer, vocab_size: int) -> Tokenizer:
    """`tok` without the tokens whose ids are `vocab_size` or more (the model's embedding has
    no row for them), as mergekit strips its base tokenizer: from the vocabulary, the added
    tokens and the BPE merges that use them. Only BPE tokenizers can be stripped (mergekit's
    limit too); `tok` itself is returned when nothing is past the embedding."""
    unused = {t for t, i in tok.vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    model = tok.data["model"]
    if model.get("type") != "BPE":
        raise CheckpointError(
            f"{tok.directory / TOKENIZER_JSON}: {len(unused)} token(s) have ids past the embedding's "
            f"{vocab_size} rows, and only BPE tokenizers can be stripped of them (this one is "
            f"{model.get('type')!r})")

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(p in unused for p in parts)

    data = {**tok.data,
            "added_tokens": [e for e in tok.data.get("added_tokens") or [] if int(e["id"]) < vocab_size],
            "model": {**model, "vocab": {t: i for t, i in model["vocab"].items() if t not in unused},
                      "merges": [m for m in model.get("merges") or [] if keep(m)]}}
    config = _config_copy(tok.config)
    if config is not None and isinstance(config.get("added_tokens_decoder"), dict):
        config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < vocab_size}
    return Tokenizer(tok.directory, data, config, edited=True)


def _config_copy(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy of tokenizer_config.json that can take added-token edits without touching `config`
    (the rest of it is shared: it is never changed)."""
    if config is None:
        return None
    out = dict(config)
    if isinstance(out.get("added_tokens_decoder"), dict):
        out["added_tokens_decoder"] = dict(out["added_tokens_decoder"])
    return out


def added_entry(content: str, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """An added-token entry as transformers' `add_tokens(text)` makes it (not special, so
    normalized), or with the flags another tokenizer's entry gives it."""
    entry: dict[str, Any] = {"id": -1, "content": content, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": True, "special": False}
    for k in ADDED_FLAGS:
        if flags is not None and k in flags:
            entry[k] = bool(flags[k])
    return entry


def with_added(tok: Tokenizer, entries: list[dict[str, Any]]) -> Tokenizer:
    """`tok` with `entries` added in order, each getting the id the `tokenizers` library gives:
    an entry whose text is already an added token is skipped; one whose text is in the model's
    vocabulary becomes an added token with that id; any other gets the next id past both the
    model's vocabulary and the added tokens."""
    if not entries:
        return tok
    out = Tokenizer(tok.directory, {**tok.data, "added_tokens": list(tok.data.get("added_tokens") or [])},
                    _config_copy(tok.config), tok.edited)
    model_vocab = out.model_vocab
    model_size = len(model_vocab)
    added = out.data["added_tokens"]
    taken = {str(e["content"]) for e in added}
    top = max((int(e["id"]) for e in added), default=None)  # the highest added id so far
    for entry in entries:
        content = str(entry["content"])
        if not content or content in taken:
            continue
        if content in model_vocab:
            new_id = model_vocab[content]
        else:
            new_id = model_size if top is None or (top < model_size and model_size > 0) else top + 1
        top = new_id if top is None else max(top, new_id)
        added.append({**entry, "id": new_id})
        taken.add(content)
        out.edited = True
        if out.config is not None:
            decoder = out.config.setdefault("added_tokens_decoder", {})
            if isinstance(decoder, dict):
                decoder[str(new_id)] = {"content": content, **{k: entry[k] for k in ADDED_FLAGS if k in entry}}
    return out


def union(base: Tokenizer, others: list[tuple[Tokenizer, int]]) -> Tokenizer:
    """The union tokenizer mergekit's `tokenizer_source: union` builds: `base` (already
    stripped), then every token of the others (each with its embedding's row count, past which
    its tokens are ignored) that `base` lacks, in order: their vocabulary tokens first, as plain
    added tokens, then their added tokens with their own settings (the first model's settings
    win for a token several add). `others` should start with `base` itself, as mergekit's list
    does, so that its own added tokens keep their place."""
    vocab_tokens: dict[str, None] = {}
    added: dict[str, dict[str, Any]] = {}
    for tok, rows in others:
        added_texts = {str(e["content"]) for e in tok.added_tokens}
        for text, i in sorted(tok.vocab().items(), key=lambda kv: kv[1]):
            if i < rows and text not in added_texts:
                vocab_tokens.setdefault(text, None)
        for e in tok.added_tokens:
            if int(e["id"]) < rows:
                added.setdefault(str(e["content"]), e)
    have = base.vocab()
    entries = [added_entry(t) for t in vocab_tokens if t not in added and t not in have]
    entries += [added_entry(t, e) for t, e in added.items()]
    return with_added(base, entries)
