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

import logging
import math
import mmap
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .select import count_and_gather, sample_bracket

_log = logging.getLogger(__name__)

_LOW_BITS = 16
_BINS = 1 << _LOW_BITS
_LOW_MASK = _BINS - 1
_SIGN = 1 << 31
_ALL = (1 << 32) - 1
_CHUNK = 1 << 24  # elements per chunk in observe: keeps int64 temporaries at ~128 MiB

RankSpec = Sequence[Sequence[int]] | Callable[[int, int], Sequence[int]]


def resolve_ranks(spec: RankSpec, counts: Sequence[int], who: str) -> list[list[int]]:
    """Each row's 0-based ranks, once its size is known: checked in range and of one width.

    A row with no values keeps whatever it was given (it yields NaN, its ranks are not used).
    """
    out: list[list[int]] = []
    for row, count in enumerate(counts):
        ranks = [int(r) for r in (spec(row, count) if callable(spec) else spec[row])]
        if out and len(ranks) != len(out[0]):
            raise ValueError(f"{who}: every row must ask for the same number of ranks")
        if count > 0:
            for r in ranks:
                if not 0 <= r < count:
                    raise ValueError(f"{who}: rank {r} outside [0, {count}) for row {row}")
        out.append(ranks)
    return out


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


class _Selection:
    """What both selectors report: per-row counts after pass 1, values once finished."""

    _counts: torch.Tensor | None = None
    _result: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self._result is not None

    def counts(self) -> torch.Tensor:
        """Number of values seen per row (available after pass 1)."""
        if self._counts is None:
            raise RuntimeError(f"{type(self).__name__}: counts() before the first pass ended")
        return self._counts

    def values(self) -> torch.Tensor:
        """[n_rows, n_ranks] float32: sorted(row r)[rank j of row r]; NaN for an empty row."""
        if self._result is None:
            raise RuntimeError(f"{type(self).__name__}: values() before the selection finished")
        return self._result

    def _check_observe(self, row: int, n_rows: int) -> None:
        if self.done:
            raise RuntimeError(f"{type(self).__name__}: observe() after the selection finished")
        if not 0 <= row < n_rows:
            raise IndexError(f"{type(self).__name__}: row {row} out of range [0, {n_rows})")


class RadixSelect(_Selection):
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

    def observe(self, row: int, values: torch.Tensor) -> None:
        self._check_observe(row, self.n_rows)
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

    def _plan_second_pass(self) -> None:
        high = self._high if self._high is not None else torch.zeros(self.n_rows, _BINS, dtype=torch.int64)
        self._high = high.cpu()
        self._counts = self._high.sum(dim=1)
        all_ranks = resolve_ranks(self._rank_spec, [int(c) for c in self._counts], "RadixSelect")
        for row, ranks in enumerate(all_ranks):
            count = int(self._counts[row])
            lut = torch.full((_BINS,), -1, dtype=torch.int64)
            bins: list[int] = []
            slots: list[int] = []
            residuals: list[int] = []
            if count > 0:
                cum = self._high[row].cumsum(0)
                for r in ranks:
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
        self._width = len(all_ranks[0]) if all_ranks else 0

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


class OffHeapValues:
    """A growing float32 array kept in anonymous mappings of its own, outside the malloc heap.

    A selection pass keeps a few values of every block it sees (BracketSelect's bracket
    entries) until the pass ends. Kept as one small tensor per block, they sat between the
    pass's big transient blocks on the heap and pinned the space those freed: TIES with
    scope: global on a 36-layer model grew by 0.5 GB in its second pass with 50-75 MB of live
    tensors. A mapping doubles when full (the old one goes back to the system at once) and
    is unmapped when the array is dropped.
    """

    _MIN_CAPACITY = 1 << 16  # values (256 KiB)

    def __init__(self) -> None:
        self._data = torch.empty(0, dtype=torch.float32)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, values: torch.Tensor) -> None:
        flat = values.reshape(-1)
        need = self._size + flat.numel()
        if need > self._data.numel():
            capacity = max(self._MIN_CAPACITY, 1 << (need - 1).bit_length())
            grown = torch.frombuffer(mmap.mmap(-1, capacity * 4), dtype=torch.float32)
            grown[: self._size] = self._data[: self._size]
            self._data = grown  # the tensor holds its mapping; the old one is unmapped here
        self._data[self._size : need] = flat
        self._size = need

    def values(self) -> torch.Tensor:
        return self._data[: self._size]


SAMPLE_CAP = 1 << 18  # sampled values kept per row (1 MB); beyond, half of them are dropped
GATHER_CAP = 1 << 24  # values gathered per row and rank in pass 2 before giving up on the bracket


def brackets_fit(count: int, quantiles: Sequence[float]) -> bool:
    """Whether `BracketSelect`'s brackets around these quantile positions of a row of `count`
    values will hold no more than half of GATHER_CAP values each (so it finishes in two passes
    and holds a bounded number of values); else radix selection is the better choice.

    A bracket spans 4σ + 4 sample ranks either side of the quantile, σ = √(s·p·(1−p)), in a
    sample of s ≥ SAMPLE_CAP/2 values: the population fraction inside is at most
    2·(4σ + 4)/s, taken at the smallest sample.
    """
    if count <= SAMPLE_CAP:
        return True  # every value is kept as the sample: the brackets are exact
    s = SAMPLE_CAP // 2
    worst = max(2 * (4 * math.sqrt(s * p * (1 - p)) + 4) / s for p in quantiles)
    return count * worst <= GATHER_CAP // 2


def _seed(count: int, row: int) -> int:
    """A generator seed from a row's running count or stride, kept below 2⁶³ (torch's limit):
    the stride doubles each time a sample is halved, which a row fed many tiny blocks can do
    often enough to pass it; smaller seeds are unchanged, and with them the draws."""
    return (count * 1_000_003 + row) & (2**63 - 1)


class BracketSelect(_Selection):
    """Exact k-th smallest values of streamed rows like `RadixSelect`, but cheaper per value.

    Pass 1 keeps a sample of each row: every value while a row has at most SAMPLE_CAP of them,
    then a seeded random 1/2, 1/4, ... of them. Pass 2 counts, per requested rank, the values
    below a sample bracket around it and gathers the few inside it (or only counts them, when
    the bracket is one value); the rank's value is then selected among those. Pass 1 costs a
    small random gather and pass 2 two comparisons per value, against an order-preserving key
    and a histogram per value and pass for radix selection.

    The result is exact whatever the sample: a bracket that misses its rank (a row whose values
    are ordered adversarially for the sample, or a cut inside more than GATHER_CAP equal
    values) is detected by the counts and that selection is finished by a `RadixSelect` over
    two more passes, which `end_pass` asks for. Same interface and bit for bit the same values
    as `RadixSelect` (zeros come back as +0.0); NaN is supported by neither.
    """

    def __init__(self, n_rows: int, ranks: RankSpec) -> None:
        if n_rows < 1:
            raise ValueError("BracketSelect needs at least one row")
        self.n_rows = n_rows
        self._rank_spec = ranks
        self._pass = 1
        self._seen = [0] * n_rows
        self._stride = [1] * n_rows
        self._sample = [OffHeapValues() for _ in range(n_rows)]
        self._ranks: list[list[int]] = []
        self._bounds: list[list[tuple[float | None, float | None]]] = []
        self._below: list[list[int]] = []
        self._gathered: list[list[OffHeapValues | None]] = []  # None: given up (too many)
        self._inside: list[list[int]] = []
        self._counts: torch.Tensor | None = None
        self._fallback: RadixSelect | None = None
        self._result: torch.Tensor | None = None

    def observe(self, row: int, values: torch.Tensor) -> None:
        self._check_observe(row, self.n_rows)
        flat = values.reshape(-1).to(torch.float32)
        if self._fallback is not None:
            self._fallback.observe(row, flat)
        elif self._pass == 1:
            self._observe_sample(row, flat)
        else:
            self._observe_bracket(row, flat.cpu())

    def _observe_sample(self, row: int, flat: torch.Tensor) -> None:
        stride = self._stride[row]
        if stride == 1:
            picked = flat.cpu()  # copied into the sample's own mapping
        else:
            # Random positions, not every stride-th one: a regular spacing visits only some
            # columns of a matrix whose width shares a factor with it, and weight matrices
            # often differ column by column (low-rank deltas), which biases the sample.
            g = torch.Generator().manual_seed(_seed(self._seen[row], row))
            positions = torch.randint(flat.numel(), (max(1, flat.numel() // stride),), generator=g)
            picked = flat.cpu()[positions]
        self._seen[row] += flat.numel()
        self._sample[row].append(picked)
        while len(self._sample[row]) > SAMPLE_CAP:
            # Half of it drawn at random, with replacement (not every other value: the first blocks were kept
            # whole, and every other value of a whole block is again a regular spacing).
            merged = self._sample[row].values()
            g = torch.Generator().manual_seed(_seed(self._stride[row], row))
            merged = merged[torch.randint(merged.numel(), (merged.numel() // 2,), generator=g)]
            self._sample[row] = OffHeapValues()  # a fresh mapping: the full one is unmapped
            self._sample[row].append(merged)
            self._stride[row] *= 2

    def _observe_bracket(self, row: int, flat: torch.Tensor) -> None:
        for j, (lo, hi) in enumerate(self._bounds[row]):
            store = self._gathered[row][j]
            if store is None:
                continue
            below, inside, n_inside = count_and_gather(flat, lo, hi)
            self._below[row][j] += below
            self._inside[row][j] += n_inside
            if inside is None:
                continue  # a one-value bracket: counting is enough
            if self._inside[row][j] > GATHER_CAP:
                self._gathered[row][j] = None  # too many to hold: finish by radix selection
            else:
                store.append(inside)

    def brackets(self, row: int) -> list[tuple[float | None, float | None]] | None:
        """The value intervals [lo, hi] (None: unbounded) that the second pass counts below and
        gathers inside, one per rank of `row`; None outside that pass (before it, or once radix
        selection has taken over). Each requested value lies in its interval whenever the
        selection finishes in two passes: a caller can gather what it needs there alongside."""
        if self._pass != 2 or self._fallback is not None or self.done:
            return None
        return list(self._bounds[row])

    def end_pass(self) -> bool:
        """Close the current pass; True once `values()` is ready."""
        if self.done:
            return True
        if self._fallback is not None:
            if self._fallback.end_pass():
                self._finish_fallback()
                return True
            return False
        if self._pass == 1:
            self._plan_second_pass()
            self._pass = 2
            return False
        return self._finish()

    def _plan_second_pass(self) -> None:
        self._counts = torch.tensor(self._seen, dtype=torch.int64)
        all_ranks = resolve_ranks(self._rank_spec, self._seen, "BracketSelect")
        for row, ranks in enumerate(all_ranks):
            count = self._seen[row]
            bounds: list[tuple[float | None, float | None]] = []
            if count > 0:
                sample = np.sort(self._sample[row].values().numpy())
                population = sample if self._stride[row] == 1 else None
                for r in ranks:
                    if population is not None:  # every value was kept: the bracket is exact
                        bounds.append((float(sample[r]), float(sample[r])))
                    else:
                        bounds.append(sample_bracket(sample, r + 1, count))
            self._ranks.append(ranks)
            self._bounds.append(bounds)
            self._below.append([0] * len(bounds))
            self._inside.append([0] * len(bounds))
            self._gathered.append([OffHeapValues() for _ in bounds])
            self._sample[row] = OffHeapValues()
        self._width = len(all_ranks[0]) if all_ranks else 0

    def _finish(self) -> bool:
        out = torch.full((self.n_rows, self._width), float("nan"), dtype=torch.float32)
        missed = False
        for row in range(self.n_rows):
            if self._seen[row] == 0:
                continue
            for j, r in enumerate(self._ranks[row]):
                store = self._gathered[row][j]
                below, n_inside = self._below[row][j], self._inside[row][j]
                lo, hi = self._bounds[row][j]
                if store is None or not below <= r < below + n_inside:
                    missed = True
                elif lo is not None and lo == hi:
                    out[row, j] = lo + 0.0  # + 0.0: -0.0 comes back as +0.0, as from RadixSelect
                else:
                    inside = store.values().numpy()
                    out[row, j] = float(np.partition(inside, r - below)[r - below]) + 0.0
        self._gathered = []
        if not missed:
            self._result = out
            return True
        _log.debug("a sample bracket missed its rank; finishing with radix selection (2 more passes)")
        self._fallback = RadixSelect(self.n_rows, self._rank_spec)
        return False

    def _finish_fallback(self) -> None:
        assert self._fallback is not None
        self._result = self._fallback.values()


GROUP_CAP = 1 << 20  # float64 values `Float64Select` holds before merging equal ones


class Float64Select:
    """The exact value at one ascending position of a streamed row of float64 values.

    `BracketSelect` and `RadixSelect` select float32 values; a method that ranks float64
    values (SCE's variance spread) needs the float64 order. Rounding to float32 is monotone, so
    the wanted value's rounding c is the value at the same position among the roundings,
    which a `BracketSelect` finds. Its second pass counts the roundings below a bracket
    [lo, hi] around c and gathers those inside; alongside, this gathers the float64 values
    whose rounding is inside, among which the wanted value is then picked: two passes, as for
    float32. Where the bracket misses (radix selection takes over for two passes) or holds too
    many values, one more pass counts the values whose rounding is below c and gathers those
    that round to c. Exact whatever the data: no float64 order is ever approximated.

    Memory: `BracketSelect`'s, and the float64 values gathered: within the bracket (about as
    many as it gathers, at most GATHER_CAP), or those that round to c; a run of equal values is
    merged into distinct values with counts whenever GROUP_CAP are pending. NaN is not supported.

    `rank(count)` gives the 0-based ascending position once the number of values is known
    (it is not asked when no value was seen); `value()` is then a Python float, `count()` that
    number, and `count_above()` how many values exceed it (a selection that keeps exactly the
    top ones must know how many of the values equal to the cut it may take).
    """

    def __init__(self, rank: Callable[[int], int]) -> None:
        self._rank = rank
        self._coarse = BracketSelect(1, lambda _row, count: [rank(count)] if count else [0])
        self._pass = 1
        self._cut: torch.Tensor | None = None  # 0-d float32: the wanted value's rounding, for the last pass
        self._bracket: tuple[float | None, float | None] | None = None
        self._position = 0
        self._below = 0
        self._gathered = 0
        self._pending: list[torch.Tensor] = []
        self._n_pending = 0
        self._distinct = torch.empty(0, dtype=torch.float64)
        self._counts = torch.empty(0, dtype=torch.int64)
        self._count: int | None = None
        self._value: float | None = None
        self._above = 0
        self._done = False

    def observe(self, values: torch.Tensor) -> None:
        if self._done:
            raise RuntimeError("Float64Select: observe() after the selection finished")
        flat = values.reshape(-1).to(torch.float64)
        rounded = flat.to(torch.float32)
        if self._cut is not None:  # the extra pass: below c, and the values that round to c
            self._below += int(torch.count_nonzero(rounded < self._cut))
            self._gather(flat[rounded == self._cut])
            return
        self._coarse.observe(0, rounded)
        if self._pass == 2 and self._bracket is not None:
            lo, hi = self._bracket
            inside = torch.ones_like(rounded, dtype=torch.bool)
            if lo is not None:
                below = rounded < lo
                self._below += int(torch.count_nonzero(below))
                inside &= ~below
            if hi is not None:
                inside &= rounded <= hi
            self._gather(flat[inside])
            if self._gathered > GATHER_CAP:
                self._bracket = None  # as many as BracketSelect holds: finish with the extra pass
                self._reset_group()

    def _gather(self, values: torch.Tensor) -> None:
        if values.numel():
            self._pending.append(values.cpu())
            self._gathered += values.numel()
            self._n_pending += values.numel()
            if self._n_pending > GROUP_CAP:
                self._merge_pending()

    def _merge_pending(self) -> None:
        if not self._pending:
            return
        values = torch.cat([self._distinct, *self._pending])
        counts = torch.cat([self._counts, *(torch.ones(p.numel(), dtype=torch.int64) for p in self._pending)])
        self._distinct, inverse = torch.unique(values, sorted=True, return_inverse=True)
        self._counts = torch.zeros(self._distinct.numel(), dtype=torch.int64).index_add_(0, inverse, counts)
        self._pending, self._n_pending = [], 0

    def _reset_group(self) -> None:
        self._below, self._gathered, self._pending, self._n_pending = 0, 0, [], 0
        self._distinct, self._counts = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int64)

    def end_pass(self) -> bool:
        """Close the current pass; True once `value()` is ready."""
        if self._done:
            return True
        if self._cut is not None:
            return self._pick(self._below)
        finished = self._coarse.end_pass()
        self._pass += 1
        if not finished:
            bounds = self._coarse.brackets(0) if self._pass == 2 else None
            self._bracket = bounds[0] if bounds else None
            self._reset_group()
            return False
        self._count = int(self._coarse.counts()[0])
        if self._count == 0:
            self._done = True
            return True
        self._position = int(self._rank(self._count))
        cut = self._coarse.values()[0, 0].clone()
        if self._pass == 3 and self._bracket is not None:  # finished in two passes: the values are here
            self._merge_pending()
            rounded = self._distinct.to(torch.float32)
            below = self._below + int(self._counts[rounded < cut].sum())
            keep = rounded == cut
            self._distinct, self._counts = self._distinct[keep], self._counts[keep]
            return self._pick(below)
        self._cut = cut  # one more pass
        self._reset_group()
        return False

    def _pick(self, below: int) -> bool:
        """The value at the position among the gathered values that round to c, `below` being
        how many values round below c."""
        self._merge_pending()
        offset = self._position - below
        cum = self._counts.cumsum(0)
        if not 0 <= offset < (int(cum[-1]) if cum.numel() else 0):
            raise RuntimeError("Float64Select: a later pass saw different values than the first ones")
        index = int(torch.searchsorted(cum, torch.tensor(offset), right=True))
        self._value = float(self._distinct[index])
        # the values above rounded to c or above it; those that round to c are all gathered
        assert self._count is not None
        self._above = self._count - below - int(cum[index])
        self._reset_group()
        self._done = True
        return True

    def count(self) -> int:
        """How many values the row holds (once the float32 selection has ended)."""
        if self._count is None:
            raise RuntimeError("Float64Select: count() before the float32 selection ended")
        return self._count

    def count_above(self) -> int:
        """How many values are greater than `value()` (0 for a row with no values)."""
        if not self._done:
            raise RuntimeError("Float64Select: count_above() before the selection finished")
        return self._above

    def value(self) -> float:
        """sorted(values)[rank(count)], exactly; NaN for a row with no values."""
        if not self._done:
            raise RuntimeError("Float64Select: value() before the selection finished")
        return math.nan if self._value is None else self._value
