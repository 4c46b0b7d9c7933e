"""Shared pieces of the task-vector methods: sparsification masks, rescaling, sign election.

TIES, DARE, breadcrumbs, DELLA (and PCB) differ only in how they thin each task vector and how
they combine the survivors; the pieces live here once so that every method resolves ties in
magnitudes, rounds keep-counts and rescales in exactly the same, documented way.

Conventions shared by every mask below:
- Keep-counts round down like mergekit and the TIES code: k = int(density · numel), with the
  product taken in float64 (Python floats). density ≥ 1 keeps everything; k = 0 keeps nothing.
- Ties in magnitude never depend on memory order: a cut is a magnitude threshold, and entries
  equal to the threshold are kept. With no tie at the cut exactly k entries survive; with a tie
  every tied entry survives (so slightly more than k).
- Selection is exact and linear time (`select.kth_smallest_many`), never a full sort.
- Random draws are keyed by (seed, tensor, model, position) and made on the CPU, then moved to
  the tensor's device (`position_uniforms`), so a seed gives the same mask on CPU and GPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .registry import TensorJob, tensor_seed
from .select import kth_largest, kth_smallest, kth_smallest_many  # noqa: F401  (re-exported)

L1_EPS = 1e-7  # mergekit's tolerance below which an L1 rescale is skipped


def keep_count(density: float, numel: int, *, at_least_one: bool = False) -> int:
    """How many entries a `density` keeps out of `numel` (floor, as mergekit's int(density*n)).

    `at_least_one`: a positive density keeps at least one entry of a non-empty tensor, as
    mergekit's per-tensor magnitude trim (TIES) does; the paper's global top-k does not.
    """
    if density >= 1:
        return numel
    k = max(0, int(float(density) * numel))
    if at_least_one and density > 0 and numel > 0:
        k = max(1, k)
    return k


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the top int(density·n) entries by |τ|; ties at the cut are all kept.

    Kept ⇔ |τ| ≥ v_k, v_k the k-th largest |τ|.
    """
    n = tau.numel()
    k = keep_count(density, n, at_least_one=True)
    if k >= n:
        return torch.ones_like(tau, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    magnitude = tau.abs()
    return magnitude >= kth_largest(magnitude, k)


def threshold_mask(tau: torch.Tensor, threshold: float | torch.Tensor, k: int, total: int) -> torch.Tensor:
    """The TIES trim with a threshold computed elsewhere (global scope: over the whole model)."""
    if k >= total:
        return torch.ones_like(tau, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    return tau.abs() >= threshold


def outlier_counts(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """Breadcrumbs' (n_bottom, n_top) drop counts, exactly as mergekit's magnitude_outliers.

    target = int(density·n), n_top = int(gamma·n), n_bottom = n − target − n_top; when that is
    negative the top cut shrinks so that `target` entries remain.
    """
    target = keep_count(density, numel)
    n_top = 0 if density >= 1 else int(float(gamma) * numel)
    n_bottom = numel - target - n_top
    if n_bottom < 0:
        n_top += n_bottom
        n_bottom = 0
    return n_bottom, n_top


def outlier_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the n_top largest |τ| (outliers) and the n_bottom smallest.

    In sorted-ascending order a₀ ≤ … ≤ a_{n−1} of |τ|, kept ⇔ a_{n_bottom} ≤ |τ| ≤ a_{n−n_top−1}:
    a closed magnitude interval, so ties at either cut are kept.
    """
    n = tau.numel()
    n_bottom, n_top = outlier_counts(density, gamma, n)
    if n_bottom + n_top >= n:
        return torch.zeros_like(tau, dtype=torch.bool)
    if n_bottom == 0 and n_top == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    magnitude = tau.abs()
    ks = [k for k, cut in ((n_bottom + 1, n_bottom > 0), (n - n_top, n_top > 0)) if cut]
    bounds = iter(kth_smallest_many(magnitude, ks))
    keep = torch.ones_like(tau, dtype=torch.bool)
    if n_bottom > 0:
        keep &= magnitude >= next(bounds)
    if n_top > 0:
        keep &= magnitude <= next(bounds)
    return keep


DRAW_BLOCK = 1 << 16  # entries per independently seeded stretch of draws


def position_uniforms(job: TensorJob, model: int, shape: torch.Size | tuple[int, ...],
                      device: torch.device | str) -> torch.Tensor:
    """float32 U[0,1) draws for a tensor (or the row block `job.rows` of it), one per entry.

    The flattened tensor is cut into fixed stretches of DRAW_BLOCK entries; stretch j of model
    i draws from a numpy PCG64 generator seeded by (seed, tensor name, i, j). An entry's draw
    therefore depends only on where it is, never on how the engine cuts the tensor into row
    blocks, the visiting order, the number of workers or the device (draws are made on the CPU,
    then moved). Only the stretches a block overlaps are generated, and only up to the block's
    end (a shorter draw from a seeded generator is a prefix of a longer one;
    `tests/test_methods_baselines.py` checks that this holds). Short stretches keep the draws a
    block discards (the start of its first stretch) small; PCG64 draws float32 about 1.7x
    faster than torch's CPU generator, and draws are most of a DARE merge's time.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    row_numel = numel // shape[0] if shape and shape[0] else 1
    start = (job.rows[0] if job.rows else 0) * row_numel
    out = np.empty(numel, dtype=np.float32)
    key = tensor_seed(job.seed, job.name)
    end = start + numel
    for j in range(start // DRAW_BLOCK, (end - 1) // DRAW_BLOCK + 1 if numel else 0):
        a, b = max(start, j * DRAW_BLOCK), min(end, (j + 1) * DRAW_BLOCK)
        generator = np.random.Generator(np.random.PCG64(tensor_seed(key, f"{model}:{j}")))
        skip = a - j * DRAW_BLOCK
        if skip:
            out[a - start : b - start] = generator.random(b - j * DRAW_BLOCK, dtype=np.float32)[skip:]
        else:
            generator.random(dtype=np.float32, out=out[a - start : b - start])
    return torch.from_numpy(out).reshape(shape).to(device)


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities: linear in the |τ| rank within each row, density−ε … density+ε.

    Rows: a 1-D tensor is one row; an N-D tensor is reshaped to [shape[0], −1]. The smallest
    magnitude of a row gets density−ε, the largest density+ε, rank r of n gets
    density − ε + 2ε·r/(n−1). Equal magnitudes are ranked by position (stable sort). A row of
    one entry gets density. Returned in float32 so masks do not depend on the compute dtype.
    """
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    if n <= 1:
        return torch.full(tau.shape, float(density), dtype=torch.float32, device=tau.device)
    order = magnitude_order(rows)
    fraction = torch.arange(n, dtype=torch.float32, device=tau.device) / float(n - 1)
    line = (float(density) - float(epsilon)) + fraction * (2.0 * float(epsilon))
    probs = torch.empty(order.shape, dtype=torch.float32, device=tau.device)
    probs.scatter_(1, order, line.expand_as(order))  # rank r's probability to the entry of rank r
    return probs.reshape(tau.shape)


def magnitude_order(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the positions sorted by |value|, equal magnitudes in position order (stable).

    For float32 the sort runs on int64 keys |value|-bits << 32 | position: a non-negative
    float's bits order like the float, the keys are unique, so an unstable sort gives exactly
    the stable order, and sorting integers is about 1.7x faster than a stable float sort here.
    """
    magnitude = rows.abs()
    if magnitude.dtype != torch.float32:
        return torch.sort(magnitude, dim=1, stable=True).indices
    positions = torch.arange(rows.shape[1], dtype=torch.int64, device=rows.device)
    keys = (magnitude.contiguous().view(torch.int32).to(torch.int64) << 32) | positions
    return torch.sort(keys, dim=1).indices


def rescale_l1(original: torch.Tensor, masked: torch.Tensor, eps: float = L1_EPS) -> torch.Tensor:
    """mergekit's rescale: scale `masked` so its L1 norm equals that of `original`.

    Skipped (masked returned as is) when either norm is below `eps`, as mergekit does; this is
    also what keeps all-zero task vectors free of 0/0.
    """
    before = original.abs().sum()
    after = masked.abs().sum()
    if float(before) < eps or float(after) < eps:
        return masked
    return masked * (before / after)


def elect_signs(weighted_sum: torch.Tensor) -> torch.Tensor:
    """TIES sign election from Σ wᵢτ̂ᵢ: +1 where the sum is ≥ 0, −1 elsewhere (a zero sum elects +)."""
    return torch.where(weighted_sum >= 0, 1.0, -1.0).to(weighted_sum.dtype)
