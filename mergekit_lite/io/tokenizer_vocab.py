"""What a checkpoint's tokenizer calls each id, read from its `tokenizer.json`.

mlite merges embedding rows by id. mergekit's `tokenizer_source` instead lines rows up by token,
so a recipe that gives it is only read the same way when every merged model's ids mean the same
tokens as the tokenizer source's: the plan compares the id → token maps read here. Only the
`tokenizers` JSON format is read (no tokenizer library is needed); a checkpoint without it
cannot be compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, one_line


def read_vocab(directory: Path | None) -> dict[int, str] | None:
    """id → token of `directory/tokenizer.json` (its model's vocabulary and its added tokens),
    None when there is no such file."""
    if directory is None:
        return None
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return _ids(data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unreadable tokenizer ({one_line(exc)})") from None


def _ids(data: dict[str, Any]) -> dict[int, str]:
    vocab = (data.get("model") or {}).get("vocab") or {}
    out: dict[int, str] = {}
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        out.update({int(i): str(tok) for tok, i in vocab.items()})
    else:  # Unigram: [[piece, score], ...] in id order
        out.update({i: str(entry[0]) for i, entry in enumerate(vocab)})
    for added in data.get("added_tokens") or []:
        out[int(added["id"])] = str(added["content"])
    return out


def first_differences(got: dict[int, str], want: dict[int, str], rows: int, limit: int = 3) -> list[int]:
    """The first ids below `rows` that `want` names and `got` names otherwise (or not at all).

    Ids `want` lacks are padding rows to it (mergekit's resize drops them), not compared."""
    found: list[int] = []
    for i in range(rows):
        if i in want and got.get(i) != want[i]:
            found.append(i)
            if len(found) == limit:
                break
    return found
