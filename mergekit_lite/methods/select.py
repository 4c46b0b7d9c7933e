"""Exact order statistics of an in-memory tensor, in about the time of three comparisons per entry.

Every trimming method needs the k-th smallest magnitude of a tensor (TIES' cut, breadcrumbs'
two cuts, PCB's quantiles). A full sort is O(n log n); numpy's introselect is linear but
single-threaded and about 7 ns per float32 entry, which made selection most of a TIES merge.

`kth_smallest_many` uses Floyd and Rivest's sampling idea, kept exact:
1. sort a fixed pseudo-random sample of 32,768 entries and read off two sample values lo ≤ hi
   that bracket the wanted rank with a margin of four standard deviations;
2. count the entries below lo and gather those in [lo, hi] (about 2 % of the tensor);
3. if the rank falls inside the gathered entries (it almost always does), select it there;
   otherwise fall back to introselect over the whole tensor.

The answer is the k-th smallest value by construction (the bracket only decides where to look),
so the sample, its positions and a failed bracket can change the time, never the result. NaN
sorts last, as in numpy: it is neither counted nor gathered, so ranks among the other values
are unaffected, and a rank that lands on a NaN falls back to introselect, which returns NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

SMALL = 1 << 17  # below this many entries introselect alone is as fast
SAMPLE = 1 << 15  # entries in the bracketing sample
MARGIN_SIGMAS = 4.0  # bracket half-width in standard deviations of the sample rank


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flattened tensor, exactly."""
    return kth_smallest_many(values, [k])[0]


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (1-based) of a flattened tensor."""
    return kth_smallest(values, values.numel() - k + 1)


def kth_smallest_many(values: torch.Tensor, ks: Sequence[int]) -> list[torch.Tensor]:
    """Several order statistics (1-based ranks) of one flattened tensor, each as a 0-d tensor.

    CPU float32/float64 tensors use the bracketed selection above; other devices and dtypes use
    `torch.kthvalue`. Both return exactly `sorted(values)[k - 1]`.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"rank {k} outside [1, {n}]")
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64):
        return [torch.kthvalue(flat, k).values for k in ks]
    array = flat.contiguous().numpy()
    if n <= SMALL:
        picked = np.partition(array, [k - 1 for k in ks])
        return [torch.tensor(picked[k - 1], dtype=flat.dtype) for k in ks]
    sample = np.sort(array[_sample_positions(n)])
    out = []
    for k in ks:
        value = _bracketed(array, k, sample)
        if value is None:
            value = np.partition(array, k - 1)[k - 1]
        out.append(torch.tensor(value, dtype=flat.dtype))
    return out


def _sample_positions(n: int) -> np.ndarray:
    """SAMPLE positions in [0, n), the same for every tensor of n entries (seeded by n)."""
    return np.random.default_rng(n).integers(0, n, SAMPLE)


def sample_bracket(sample: np.ndarray, k: int, n: int) -> tuple[float | None, float | None]:
    """Values (lo, hi) of a sorted sample that bracket rank k of n with a 4-sigma margin.

    None means unbounded on that side. A sample of the whole population (size n) brackets the
    rank exactly: lo = hi = the k-th smallest.
    """
    s = sample.size
    if s == n:
        return float(sample[k - 1]), float(sample[k - 1])
    p = (k - 0.5) / n
    centre = p * s
    half = MARGIN_SIGMAS * math.sqrt(s * p * (1.0 - p)) + 4.0
    lo_at, hi_at = math.floor(centre - half), math.ceil(centre + half)
    lo = float(sample[lo_at]) if lo_at >= 0 else None
    hi = float(sample[hi_at]) if hi_at < s else None
    return lo, hi


def _bracketed(array: np.ndarray, k: int, sample: np.ndarray) -> np.floating | None:
    """The k-th smallest entry if a sample bracket around rank k holds it, else None."""
    lo, hi = sample_bracket(sample, k, array.size)
    if lo is None and hi is None:
        return None
    below, candidates, n_inside = count_and_gather(torch.from_numpy(array), lo, hi)
    if not below < k <= below + n_inside:
        return None
    if candidates is None:  # a one-value bracket
        return array.dtype.type(lo)
    return np.partition(candidates.numpy(), k - below - 1)[k - below - 1]


def count_and_gather(x: torch.Tensor, lo: float | None, hi: float | None) -> tuple[int, torch.Tensor | None, int]:
    """For a flat CPU tensor: (entries < lo, the entries in [lo, hi], how many those are).

    None bounds are unbounded. A bracket of one value (lo == hi) only counts: its entries are
    all equal, so the gathered tensor comes back as None; a cut inside millions of equal
    values (the zeros of a sparse task vector) then costs nothing to hold.
    """
    below = int(np.count_nonzero(x.numpy() < lo)) if lo is not None else 0
    if lo is not None and lo == hi:
        return below, None, int(np.count_nonzero(x.numpy() <= hi)) - below
    if lo is None and hi is None:
        return below, x, x.numel()
    if lo is None:
        inside = x <= float(hi)  # type: ignore[arg-type]
    elif hi is None:
        inside = x >= float(lo)
    else:
        inside = (x >= float(lo)) & (x <= float(hi))
    gathered = x[inside]
    return below, gathered, gathered.numel()
