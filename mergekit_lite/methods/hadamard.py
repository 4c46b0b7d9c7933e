"""Multiplicative (Hadamard) patches: W' = W ⊙ M, and the additive ΔW = W' − W it equals.

A HUT-style fine-tune stores its change as an elementwise multiplier of the base weight rather
than as an addend. These functions move between the two forms for one tensor (or one block of
rows of it): pure maths, no I/O.

Everything is computed in float64, where a product or difference of float32/float16/bfloat16
values is exact, and rounded once to the requested dtype, so the result does not depend on
the order of operations. (torch casts float64 to float16/bfloat16 through float32; for these
operations that second rounding cannot move a result by more than one unit in the last place.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COMPUTE = torch.float64


@dataclass(frozen=True)
class MultiplierSplit:
    """A multiplier and the entries it cannot express.

    `unrepresentable` marks entries where no finite multiplier of the stored dtype gives the
    fine-tune: the base is 0 and the delta is not, or W'/W overflows the dtype. `multiplier` holds
    1 there (the base value kept), so a caller that accepts the loss has a usable tensor;
    `dropped_norm` is ‖ΔW‖ over those entries, what accepting it costs.
    """

    multiplier: torch.Tensor
    unrepresentable: torch.Tensor
    dropped_norm: float

    @property
    def count(self) -> int:
        return int(self.unrepresentable.sum())


def apply_multiplier(w: torch.Tensor, m: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W ⊙ M, rounded once to `dtype` (default: W's dtype).

    The product of two float32 values is exact in float64, so the result is W ⊙ M correctly
    rounded, whatever dtypes W and M are stored in.
    """
    out = w.to(COMPUTE) * m.to(COMPUTE)
    return out.to(dtype or w.dtype)


def delta_from_multiplier(w: torch.Tensor, m: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ΔW = W ⊙ (M − 1) = W ⊙ M − W, rounded once to `dtype` (default: W's dtype).

    Computed as W·(M − 1), not W·M − W: for a multiplier near 1, M − 1 is exact in float64 and the
    product then is too, where W·M − W would cancel digits.
    """
    out = w.to(COMPUTE) * (m.to(COMPUTE) - 1.0)
    return out.to(dtype or w.dtype)


def multiplier_from_delta(w: torch.Tensor, delta: torch.Tensor, *,
                          dtype: torch.dtype = torch.float32) -> MultiplierSplit:
    """M = (W + ΔW) / W, stored as `dtype`; M = 1 where W = 0 and ΔW = 0.

    Where W = 0 and ΔW ≠ 0, or where the quotient overflows `dtype`, no multiplier exists: those
    entries are marked in the result (M = 1 there) so the caller can refuse or accept the loss.
    An unchanged entry gets exactly 1 (x / x), so a zero delta gives M = 1 everywhere. The quotient
    is rounded once from float64, which for float32 is the correctly rounded quotient. Inputs
    holding inf or NaN have no meaningful multiplier: their entries are marked too.
    """
    w64 = w.to(COMPUTE)
    d64 = delta.to(COMPUTE)
    zero = w64 == 0
    m = ((w64 + d64) / w64.masked_fill(zero, 1.0)).to(dtype).masked_fill_(zero, 1.0)
    bad = ~(m.abs() <= torch.finfo(dtype).max)  # inf and NaN (isfinite is several times slower)
    bad |= zero & (d64 != 0)
    m.masked_fill_(bad, 1.0)
    dropped = math.sqrt(float(d64[bad].pow(2).sum())) if bool(bad.any()) else 0.0
    return MultiplierSplit(m, bad, dropped)
