"""Exact order statistics over data too big to hold: two-pass radix selection.

Global-scope methods (TIES' top-k over the whole model, PCB's quantiles) need the k-th smallest
value of a row of billions of floats that never sits in memory at once. Sorting is impossible,
sampling is inexact. Radix selection on the float32 bit pattern is exact with two streaming
passes and a bounded summary: pass 1 histograms the top 16 bits of each value's order-preserving
32-bit key (65,536 bins per row), which pins the bin holding each requested rank; pass 2
histograms the low 16 bits of the values that fall in those bins only, which pins the key and so
the exact float. The answer equals `sorted(values)[rank]` bit for bit.

Keys: a float32 bit pattern read as an unsigned integer sorts positive floats correctly and
negative floats backwards, so negatives have all bits flipped and non-negatives get the sign bit
set. -0.0 is folded into +0.0 first (they compare equal, so they must share one key). NaN has no
place in an order and is not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_LOW_BITS = 16
_BINS = 1 << _LOW_BITS
_LOW_MASK = _BINS - 1
_SIGN = 1 << 31
_ALL = (1 << 32) - 1
_CHUNK = 1 << 24  # elements per chunk in observe: keeps int64 temporaries at ~128 MiB

RankSpec = Sequence[Sequence[int]] | Callable[[int, int], Sequence[int]]


def float_to_key(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving map float32 → int64 key in [0, 2**32): a < b ⇔ key(a) < key(b)."""
    x = values.to(torch.float32).reshape(-1).contiguous() + 0.0  # -0.0 + 0.0 == +0.0
    bits = x.view(torch.int32).to(torch.int64) & _ALL
    negative = bits >= _SIGN
    return torch.where(negative, _ALL - bits, bits + _SIGN)


def key_to_float(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of `float_to_key`."""
    keys = keys.to(torch.int64)
    bits = torch.where(keys >= _SIGN, keys - _SIGN, _ALL - keys)
    signed = torch.where(bits >= _SIGN, bits - (1 << 32), bits).to(torch.int32)
    return signed.view(torch.float32)


def exact_select(values: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """In-memory reference: `sort(values)[rank]` for each rank (float32). For tests and small rows."""
    ordered = torch.sort(values.to(torch.float32).reshape(-1)).values
    return ordered[torch.as_tensor(list(ranks), dtype=torch.int64, device=ordered.device)]


class RadixSelect:
    """Exact k-th smallest values of several streamed rows, in two passes, O(rows · 65,536) memory.

    Usage: feed every value of every row with `observe(row, values)` (any shapes, any number of
    calls, any order), call `end_pass()`; feed exactly the same values again, call `end_pass()`,
    which now returns True; `values()` is then a float32 tensor [n_rows, n_ranks] with
    `values()[r, j] = sorted(row r)[rank j of row r]`.

    `ranks` gives 0-based ascending positions: either a list per row (all the same length), or a
    callable `(row, count) -> ranks` called after pass 1 once each row's size is known (e.g.
    `lambda row, n: [int(n * 0.9)]`). A row with no values yields NaN for its ranks (the
    callable is still asked, with count 0, and its answer ignored).
    """

    def __init__(self, n_rows: int, ranks: RankSpec) -> None:
        if n_rows < 1:
            raise ValueError("RadixSelect needs at least one row")
        self.n_rows = n_rows
        self._rank_spec = ranks
        self._pass = 1
        self._high: torch.Tensor | None = None  # [n_rows, 65536] int64
        self._low: list[torch.Tensor | None] = [None] * n_rows  # per row: [n_slots, 65536]
        self._ranks: list[list[int]] = []
        self._target_bins: list[list[int]] = []  # per row: distinct high bins (slots)
        self._slot_of_rank: list[list[int]] = []
        self._residual: list[list[int]] = []
        self._luts: list[torch.Tensor] = []
        self._counts: torch.Tensor | None = None
        self._result: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self._result is not None

    def observe(self, row: int, values: torch.Tensor) -> None:
        if self.done:
            raise RuntimeError("RadixSelect: observe() after the selection finished")
        if not 0 <= row < self.n_rows:
            raise IndexError(f"RadixSelect: row {row} out of range [0, {self.n_rows})")
        flat = values.reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            keys = float_to_key(flat[start : start + _CHUNK])
            if self._pass == 1:
                self._observe_high(row, keys)
            else:
                self._observe_low(row, keys)

    def _observe_high(self, row: int, keys: torch.Tensor) -> None:
        if self._high is None:
            self._high = torch.zeros(self.n_rows, _BINS, dtype=torch.int64, device=keys.device)
        hist = torch.bincount(keys >> _LOW_BITS, minlength=_BINS)
        self._high[row] += hist.to(self._high.device)

    def _observe_low(self, row: int, keys: torch.Tensor) -> None:
        n_slots = len(self._target_bins[row])
        if n_slots == 0:
            return
        lut = self._luts[row]
        if lut.device != keys.device:
            lut = self._luts[row] = lut.to(keys.device)
        slot = lut[keys >> _LOW_BITS]
        hit = slot >= 0
        combined = slot[hit] * _BINS + (keys[hit] & _LOW_MASK)
        hist = torch.bincount(combined, minlength=n_slots * _BINS).view(n_slots, _BINS)
        low = self._low[row]
        if low is None:
            self._low[row] = hist
        else:
            low += hist.to(low.device)

    def end_pass(self) -> bool:
        """Close the current pass; True once `values()` is ready."""
        if self.done:
            return True
        if self._pass == 1:
            self._plan_second_pass()
            self._pass = 2
            return False
        self._finish()
        return True

    def counts(self) -> torch.Tensor:
        """Number of values seen per row (available after pass 1)."""
        if self._counts is None:
            raise RuntimeError("RadixSelect: counts() before the first pass ended")
        return self._counts

    def values(self) -> torch.Tensor:
        if self._result is None:
            raise RuntimeError("RadixSelect: values() before both passes ended")
        return self._result

    def _plan_second_pass(self) -> None:
        high = self._high if self._high is not None else torch.zeros(self.n_rows, _BINS, dtype=torch.int64)
        self._high = high.cpu()
        self._counts = self._high.sum(dim=1)
        width: int | None = None
        for row in range(self.n_rows):
            count = int(self._counts[row])
            spec = self._rank_spec
            ranks = [int(r) for r in (spec(row, count) if callable(spec) else spec[row])]
            if width is None:
                width = len(ranks)
            elif len(ranks) != width:
                raise ValueError("RadixSelect: every row must ask for the same number of ranks")
            lut = torch.full((_BINS,), -1, dtype=torch.int64)
            bins: list[int] = []
            slots: list[int] = []
            residuals: list[int] = []
            if count > 0:
                cum = self._high[row].cumsum(0)
                for r in ranks:
                    if not 0 <= r < count:
                        raise ValueError(f"RadixSelect: rank {r} outside [0, {count}) for row {row}")
                    b = int(torch.searchsorted(cum, torch.tensor(r), right=True))
                    before = int(cum[b]) - int(self._high[row, b])
                    if b not in bins:
                        lut[b] = len(bins)
                        bins.append(b)
                    slots.append(bins.index(b))
                    residuals.append(r - before)
            self._ranks.append(ranks)
            self._target_bins.append(bins)
            self._slot_of_rank.append(slots)
            self._residual.append(residuals)
            self._luts.append(lut)
        self._width = width or 0

    def _finish(self) -> None:
        out = torch.full((self.n_rows, self._width), float("nan"), dtype=torch.float32)
        for row in range(self.n_rows):
            if not self._target_bins[row]:
                continue
            low = self._low[row]
            if low is None:
                raise RuntimeError(f"RadixSelect: row {row} received no values in the second pass")
            low = low.cpu()
            seen = low.sum(dim=1)
            expected = self._high[row, self._target_bins[row]] if self._high is not None else seen
            if not torch.equal(seen, expected):
                raise RuntimeError("RadixSelect: the second pass saw different values than the first")
            cum = low.cumsum(dim=1)
            keys = []
            for slot, residual in zip(self._slot_of_rank[row], self._residual[row], strict=True):
                lo = int(torch.searchsorted(cum[slot], torch.tensor(residual), right=True))
                if lo >= _BINS:
                    raise RuntimeError("RadixSelect: the second pass saw different values than the first")
                keys.append((self._target_bins[row][slot] << _LOW_BITS) | lo)
            out[row] = key_to_float(torch.tensor(keys, dtype=torch.int64))
        self._result = out
        self._high = None  # free the histograms; counts() stays available
        self._low = [None] * self.n_rows
