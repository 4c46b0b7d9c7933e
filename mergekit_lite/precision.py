"""float32 matrix products at full float32 precision, whatever the session asked torch for.

A notebook (or a library imported into it) may have called
`torch.set_float32_matmul_precision("high")`, set `torch.backends.cuda.matmul.allow_tf32`, or
set the per-backend knobs of torch >= 2.9 (`torch.backends.cuda.matmul.fp32_precision = "tf32"`).
Then CUDA multiplies float32 matrices in TF32 (a 10-bit mantissa) and oneDNN on the CPU may use
bfloat16 ("medium"): a LoRA ΔW = B·A or a randomized SVD would carry ~1e-3 relative error, and
outputs would depend on the session. mlite's products run at IEEE float32 and put the
session's settings back afterwards.

torch >= 2.9 keeps the legacy setting and the per-backend knobs side by side, and before every
cuBLAS call checks that they agree (a "mix of the legacy and new APIs" is a RuntimeError). So
the block changes them the way the session did: through the legacy setter when the session's
state reads through it (it then moves both), through the per-backend knobs when it does not.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _matmul_knobs() -> list[Any]:
    """torch >= 2.9's per-backend matmul settings (CUDA, oneDNN); none on older torch."""
    knobs = [getattr(getattr(torch.backends, name, None), "matmul", None) for name in ("cuda", "mkldnn")]
    return knobs if all(hasattr(k, "fp32_precision") for k in knobs) else []


def _legacy_precision() -> str | None:
    """The legacy setting, or None where per-backend knobs set directly disagree with it."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def _pin_ieee() -> Callable[[], None]:
    """Set IEEE float32 matmuls; return what puts the session's settings back."""
    knobs = _matmul_knobs()
    saved = [k.fp32_precision for k in knobs]  # effective values: an inherited one reads as its parent's
    generic = getattr(torch.backends, "fp32_precision", None) if knobs else None
    legacy = _legacy_precision()
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
    else:
        for k in knobs:
            k.fp32_precision = "ieee"

    def restore() -> None:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for k, value in zip(knobs, saved, strict=True):
            if k.fp32_precision != value:
                # a value equal to the generic knob's was (most likely) inherited: inherit it again,
                # so that a later change of the generic knob still reaches this backend
                k.fp32_precision = "none" if value == generic else value

    return restore


# The settings are process-wide, and the engine's reader thread builds LoRA products while the
# main thread may factor others: the first block to enter pins them, the last to leave restores
# them (a second block saving the first one's pinned values would otherwise "restore" those).
_lock = threading.Lock()
_active = 0
_restore: Callable[[], None] | None = None


@contextlib.contextmanager
def full_float32_matmul() -> Iterator[None]:
    """The block's float32 matmuls in IEEE float32; the session's settings restored after (also a decorator)."""
    global _active, _restore
    with _lock:
        if _active == 0:
            _restore = _pin_ieee()
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _restore is not None:
                _restore()
                _restore = None
