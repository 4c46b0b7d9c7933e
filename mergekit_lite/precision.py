"""float32 matrix products at full float32 precision, whatever the session asked torch for.

A notebook (or a library imported into it) may have called
`torch.set_float32_matmul_precision("high")` or set `torch.backends.cuda.matmul.fp32_precision =
"tf32"`. Then CUDA multiplies float32 matrices in TF32 (a 10-bit mantissa) and oneDNN on the CPU
may use bfloat16 ("medium"): a LoRA ΔW = B·A or a randomized SVD would carry ~1e-3 relative
error, and outputs would depend on the session. mlite's products run with these settings at
IEEE float32 and put the session's settings back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def full_float32_matmul() -> Iterator[None]:
    """The block's float32 matmuls in IEEE float32; the previous settings restored after (also a decorator)."""
    backends = [getattr(getattr(torch.backends, name, None), "matmul", None) for name in ("cuda", "mkldnn")]
    if all(hasattr(b, "fp32_precision") for b in backends):
        # torch >= 2.9: per-backend settings. The legacy getter raises once these were set
        # directly, so they are saved and restored as they are.
        saved = [b.fp32_precision for b in backends]
        try:
            for b in backends:
                b.fp32_precision = "ieee"
            yield
        finally:
            for b, value in zip(backends, saved, strict=True):
                b.fp32_precision = value
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
