"""Resolve `org/name[@revision]` to a local snapshot through huggingface_hub.

Only weights (`*.safetensors`), JSON side files and tokenizer files are fetched. With
`HF_HUB_OFFLINE=1` only the local cache is consulted, and a miss is a clear error (exit 5)
rather than a network attempt.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ResolveError

ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
_REF = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def looks_like_hub_ref(ref: str) -> bool:
    return bool(_REF.match(ref)) and not ref.startswith((".", "/", "~"))


def split_ref(ref: str) -> tuple[str, str | None]:
    repo, _, rev = ref.partition("@")
    return repo, (rev or None)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub(ref: str, *, revision: str | None = None) -> Path:
    """Download (or find in the cache) the snapshot of a Hub model and return its folder."""
    repo, rev = split_ref(ref)
    rev = revision or rev
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # very old huggingface_hub
        from huggingface_hub import snapshot_download  # type: ignore[no-redef]

        HFValidationError = ValueError  # type: ignore[misc,assignment]  # noqa: N806
    try:
        local = snapshot_download(repo, revision=rev, allow_patterns=ALLOW_PATTERNS, local_files_only=offline())
    except HFValidationError as exc:
        raise ResolveError(f"{ref}: not a valid Hub reference ({exc})") from None
    except Exception as exc:  # network, auth, missing repo, offline cache miss
        why = "not in the local cache and HF_HUB_OFFLINE is set" if offline() else f"{exc.__class__.__name__}: {exc}"
        raise ResolveError(f"{ref}: cannot resolve Hub reference ({why.splitlines()[0]})") from None
    return Path(local)
