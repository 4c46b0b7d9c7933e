"""Exact per-row magnitude order, the one full sort a merge method still needs (DELLA's ranks).

The order is by |value| ascending, equal magnitudes by position: the stable order. A
non-negative float32's bits order like the float, so (|value| bits, position) is a unique
integer key and any sort of it gives exactly the stable order.

On the CPU the key is packed into 32 bits: a row of n entries needs b = ⌈log2 n⌉ position bits,
so the magnitude keeps its top 32 − b significant bits (the block's largest magnitude says how
many there are: 30 when every |τ| < 2). numpy sorts 32-bit keys at about 10 ns per entry, half
the time of 64-bit keys and a quarter of torch's CPU sort. Truncation can only misorder entries
whose truncated magnitudes are equal, and those sit next to each other after the sort: a pass
over the full magnitudes in sorted order finds every descent, and only the runs that contain
one are re-sorted on full keys (`_repair_runs`). Task vectors of bf16/fp16 checkpoints have
few significant bits (a difference of two nearby bf16 values is a small multiple of an ulp),
so such runs are rare: a few per thousand rows, up to a fifth of the rows of a wide MLP matrix.
Where more than 1% of a range's entries lose bits (full-precision float32 task vectors), the
range is sorted on exact 64-bit keys instead (about 12 ns per entry on 2 cores, bf16 about 9).

The sort runs in parallel chunks of rows (numpy releases the GIL), for every tensor of a call at
once: torch's OpenMP workers spin for milliseconds after each parallel region and would share
the cores with the sort, so one batch per merge step pays that once, not once per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

PARALLEL_MIN = 1 << 16  # entries below which one thread sorts everything
WIDE_FRACTION = 0.01  # share of entries losing bits above which a range is sorted on 64-bit keys


def magnitude_order(rows: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D tensor, the positions sorted by |value|, equal magnitudes in position order."""
    return magnitude_orders([rows])[0]


def magnitude_orders(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`magnitude_order` of several 2-D tensors, their CPU float32 sorts done as one parallel batch."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    batch: list[tuple[int, _RowSort]] = []
    for i, rows in enumerate(tensors):
        if rows.dtype != torch.float32 or rows.device.type != "cpu" or rows.shape[1] >= 1 << 31:
            out[i] = torch.sort(rows.abs(), dim=1, stable=True).indices
        else:
            batch.append((i, _RowSort(rows.detach().contiguous().numpy())))
    jobs = [(job, a, b) for _, job in batch for a, b in _chunks(*job.values.shape)]
    if len(jobs) == 1 or torch.get_num_threads() == 1:
        truncated = [job.sort_rows(a, b) for job, a, b in jobs]
    else:
        truncated = list(_pool(torch.get_num_threads()).map(lambda j: j[0].sort_rows(j[1], j[2]), jobs))
    lossy = {id(job) for (job, _, _), cut in zip(jobs, truncated, strict=True) if cut}
    for i, job in batch:
        if id(job) in lossy:
            _repair_runs(job.bits, job.keys, job.order, job.position_bits)
        out[i] = torch.from_numpy(job.order)
    return out  # type: ignore[return-value]


class _RowSort:
    """One tensor's buffers; `sort_rows` fills a range of rows and may run in any thread."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        n = values.shape[1]
        self.position_bits = max(1, (n - 1).bit_length())
        self.positions = np.arange(n, dtype=np.uint32)
        self.bits = np.empty(values.shape, dtype=np.int32)
        self.keys = np.empty(values.shape, dtype=np.uint32)
        self.order = np.empty(values.shape, dtype=np.int64)

    def sort_rows(self, a: int, b: int) -> bool:
        """Sort rows a..b on (truncated magnitude << b) | position; True if bits were dropped.

        How many magnitude bits fit is decided per range from its largest magnitude; a row's
        keys are all truncated alike, which is all the repair needs. Where more than
        WIDE_FRACTION of the entries lose bits (full-precision float32 task vectors), repairing
        would cost more than it saves, so the range is sorted on exact 64-bit keys instead.
        """
        bits, keys = self.bits[a:b], self.keys[a:b]
        np.abs(self.values[a:b], out=bits.view(np.float32))
        shift = max(0, int(bits.max()).bit_length() + self.position_bits - 32) if bits.size else 0
        if shift and np.count_nonzero(bits & np.int32((1 << shift) - 1)) > WIDE_FRACTION * bits.size:
            wide = bits.astype(np.int64) << 32
            wide |= self.positions
            wide.sort(axis=1)
            np.bitwise_and(wide, 0xFFFFFFFF, out=self.order[a:b])
            return False
        np.right_shift(bits.view(np.uint32), np.uint32(shift), out=keys)
        keys <<= np.uint32(self.position_bits)
        keys |= self.positions
        keys.sort(axis=1)
        np.bitwise_and(keys, np.uint32((1 << self.position_bits) - 1), out=self.order[a:b], casting="unsafe")
        return shift > 0


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="mlite-sort")
    return _POOLS[workers]


def _chunks(rows: int, n: int) -> list[tuple[int, int]]:
    """Row ranges of about PARALLEL_MIN entries or more, at most one per torch thread."""
    pieces = max(1, min(torch.get_num_threads(), rows, rows * n // PARALLEL_MIN))
    step = -(-rows // pieces)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _repair_runs(bits: np.ndarray, keys: np.ndarray, order: np.ndarray, position_bits: int) -> None:
    """Re-sort, by (full magnitude, position), the runs of equal truncated key that need it.

    Entries of equal truncated magnitude sit together in position order; only where their full
    magnitudes differ can that be wrong, which shows as a descent of the full magnitudes along
    the sorted row. Such runs are rare (entries with more significant bits than the key keeps
    that also share a truncated value). A run is found from its truncated value v by binary
    search (its keys are those in [v << b, (v + 1) << b)), and every run is re-sorted in place:
    it occupies the same slots before and after.
    """
    full = torch.gather(torch.from_numpy(bits), 1, torch.from_numpy(order))
    rows_at, cols_at = (t.numpy() for t in torch.nonzero(full[:, 1:] < full[:, :-1], as_tuple=True))
    if rows_at.size == 0:
        return
    n = bits.shape[1]
    bad = np.unique(rows_at)
    # The bad rows' keys in one ascending line: row i's keys offset by i·2³³ (keys are < 2³²).
    line = (keys[bad].astype(np.int64) + (np.arange(bad.size, dtype=np.int64) << 33)[:, None]).reshape(-1)
    offset = np.searchsorted(bad, rows_at).astype(np.int64) << 33
    value = keys[rows_at, cols_at].astype(np.int64) >> position_bits
    starts, first = np.unique(np.searchsorted(line, offset + (value << position_bits)), return_index=True)
    ends = np.searchsorted(line, offset[first] + ((value[first] + 1) << position_bits))
    lengths = ends - starts
    run = np.repeat(np.arange(starts.size), lengths)
    slot = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
    row, col = bad[slot // n], slot % n
    position = order[row, col]
    fixed = np.lexsort((position, bits[row, position], run))
    order[row, col] = position[fixed]
