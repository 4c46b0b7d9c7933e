"""Low-rank approximation of a delta by truncated SVD, at a fixed rank or an energy fraction.

Used to store a dense delta (a full fine-tune minus its base, or a DoRA patch) as LoRA factors.
By Eckart–Young the truncated SVD is the best rank-k approximation in Frobenius norm, so the
reported relative error ‖Δ − B·A‖_F / ‖Δ‖_F is the smallest any rank-k adapter can reach.
Small matrices get an exact SVD; large ones a randomized SVD (Halko, Martinsson & Tropp 2011)
whose Gaussian sketch comes from numpy's seeded generator, the same numbers on every machine
(torch's CPU `randn` takes another code path on CPUs without AVX2). The SVD and QR themselves
are LAPACK's (cuSOLVER's on CUDA): the same machine, BLAS build and thread count give the same
bits on every run; another CPU, BLAS, thread count or device moves the factors at float32
rounding of the SVD (singular vectors by up to ~1e-4 relative where singular values are
close), not the error reached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..precision import full_float32_matmul

# Matrices whose smaller side is at most this use the exact SVD.
EXACT_MAX_DIM = 1024
OVERSAMPLE = 10
POWER_ITERS = 4


@dataclass(frozen=True)
class LowRank:
    """ΔW ≈ b @ a with a = √S·Vᵀ [k, in] and b = U·√S [out, k] (the singular values split evenly)."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int
    rel_error: float
    energy: float  # fraction of ‖Δ‖_F² the kept singular values hold
    exact: bool  # True when the exact SVD was used


def rank_for_energy(sigma: torch.Tensor, total: float | None, energy: float) -> int:
    """The smallest k whose top-k singular values hold `energy` of the total squared norm.

    `total` None means that `sigma` is the whole spectrum: the total is then Σσ² itself, so the
    fractions end at exactly 1 and `energy` 1 keeps every nonzero singular value. (‖Δ‖²_F summed
    from the matrix differs from Σσ² of a float32 SVD by about 1e-7 relative, which would need a
    tolerance, and any tolerance drops real components: diag(1, 1e-4) at energy 1 kept rank 1.)
    Otherwise `sigma` is the top of a spectrum whose squares sum to `total`.
    """
    cum = torch.cumsum(sigma.double() ** 2, 0)
    denominator = float(cum[-1]) if total is None and len(cum) else total
    if not denominator or denominator <= 0:
        return 0
    reached = torch.nonzero(cum / denominator >= energy)
    return int(reached[0]) + 1 if len(reached) else len(sigma)


@full_float32_matmul()
def randomized_svd(
    m: torch.Tensor, k: int, *, seed: int = 0, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-k (U, S, Vh) of `m` from a seeded Gaussian sketch with power iterations."""
    rows, cols = m.shape
    width = min(k + oversample, min(rows, cols))
    sketch = np.random.default_rng(seed).standard_normal((cols, width), dtype=np.float32)
    omega = torch.from_numpy(sketch).to(device=m.device, dtype=m.dtype)
    q, _ = torch.linalg.qr(m @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(m.T @ q)
        q, _ = torch.linalg.qr(m @ z)
    ub, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k]


def truncated_svd(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    seed: int = 0,
    exact_max_dim: int = EXACT_MAX_DIM,
) -> LowRank:
    """Factor a 2-D delta at `rank` (clamped to its smaller side) or at the smallest rank holding
    `energy` ∈ (0, 1] of ‖Δ‖_F². A zero delta gives rank 0 (empty factors)."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    if delta.dim() != 2:
        raise ValueError(f"truncated_svd needs a matrix, got shape {list(delta.shape)}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    m = delta.float()
    rows, cols = m.shape
    small = min(rows, cols)
    total = sum_squares64(m)
    if total == 0.0:
        return LowRank(m.new_zeros(0, cols), m.new_zeros(rows, 0), 0, 0.0, 1.0, True)
    exact = small <= exact_max_dim
    if exact:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        k = min(rank, small) if rank is not None else rank_for_energy(s, None, float(energy))  # type: ignore[arg-type]
    elif rank is not None:
        k = min(rank, small)
        u, s, vh = randomized_svd(m, k, seed=seed)
    else:
        u, s, vh, k, exact = _energy_randomized(m, total, float(energy), seed)  # type: ignore[arg-type]
    u, s, vh = u[:, :k], s[:k], vh[:k]
    root = s.clamp_min(0).sqrt()
    b = u * root
    a = root[:, None] * vh
    err = relative_error(m, b, a)
    kept = float((s.double() ** 2).sum()) / total
    return LowRank(a.contiguous(), b.contiguous(), k, err, min(kept, 1.0), exact)


def spectrum(delta: torch.Tensor, cap: int, *, seed: int = 0, exact_max_dim: int = EXACT_MAX_DIM) -> torch.Tensor:
    """The `cap` largest singular values of a 2-D delta (fewer when it has fewer), descending:
    exact up to `exact_max_dim` on the smaller side, from a seeded randomized SVD beyond."""
    m = delta.float()
    k = min(cap, *m.shape)
    if min(m.shape) <= exact_max_dim:
        return torch.linalg.svdvals(m)[:k]
    return randomized_svd(m, k, seed=seed)[1][:k]


def allocate_ranks(spectra: Mapping[str, torch.Tensor], costs: Mapping[str, int], budget: int,
                   baseline: Mapping[str, int] | None = None) -> dict[str, int]:
    """Per module, the rank that a shared parameter budget gives it, by singular-value importance.

    A rank-1 term of module m keeps σ² of ‖Δ_m‖² and costs `costs[m]` parameters (its rows plus
    columns in a LoRA). Terms are taken greedily by σ²/cost, largest first, while they fit the
    budget, to keep as much of Σ_m ‖Δ_m‖² as possible (so to make the summed squared error
    Σ_m ‖Δ_m − B_m·A_m‖² small). σ decreases along a spectrum, so each module's terms come in
    order; equal ratios go by module order, then index. Greedy is not optimal when terms of
    different costs compete for the last of the budget; given a `baseline` allocation that fits
    the budget (the same rank everywhere), the one keeping more energy is returned, so the
    shared budget never does worse than it.
    """
    terms = sorted((-(v * v) / costs[name], order, i, name)
                   for order, (name, s) in enumerate(spectra.items())
                   for i, v in enumerate(s.double().tolist()))
    ranks = dict.fromkeys(spectra, 0)
    left = budget
    for _, _, i, name in terms:
        if i == ranks[name] and costs[name] <= left:  # the next term of its module, and it fits
            ranks[name] += 1
            left -= costs[name]
    if baseline is None:
        return ranks

    def kept(alloc: Mapping[str, int]) -> float:
        return sum(float((s[: alloc.get(name, 0)].double() ** 2).sum()) for name, s in spectra.items())

    return dict(baseline) if kept(baseline) > kept(ranks) else ranks


def _energy_randomized(
    m: torch.Tensor, total: float, energy: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
    """Grow the sketch until its singular values reach `energy`; fall back to the exact SVD."""
    small = min(m.shape)
    width = 32
    while width < small // 2:
        u, s, vh = randomized_svd(m, width, seed=seed)
        k = rank_for_energy(s, total, energy)
        if k < len(s):  # reached inside the sketch; else it may lie beyond it: grow
            return u, s, vh, k, False
        width *= 2
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u, s, vh, rank_for_energy(s, None, energy), True


# Elements per float64 temporary in the norms below: a float64 copy of a whole 262144×1024
# embedding (and its B·A) would cost 2 GB apiece, where these reports need only sums.
_CHUNK = 1 << 20


def _row_blocks(t: torch.Tensor) -> list[slice]:
    rows = t.shape[0] if t.dim() > 0 else 1
    width = max(1, t.numel() // max(1, rows))
    step = max(1, _CHUNK // width)
    return [slice(i, i + step) for i in range(0, rows, step)]


def sum_squares64(t: torch.Tensor) -> float:
    """Σ t² in float64, a block of rows at a time (‖t‖_F² for the reports, without a float64 copy)."""
    if t.dim() == 0:
        return float(t.double() ** 2)
    return sum(float(t[rows].double().pow(2).sum()) for rows in _row_blocks(t))


def norm64(t: torch.Tensor) -> float:
    """‖t‖_F in float64, a block of rows at a time."""
    return math.sqrt(sum_squares64(t))


def relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """‖Δ − B·A‖_F / ‖Δ‖_F (0 for a zero delta reproduced exactly), in float64 by row blocks."""
    a64 = a.double()
    norm2 = diff2 = 0.0
    for rows in _row_blocks(delta):
        d = delta[rows].double()
        norm2 += float(d.pow(2).sum())
        diff2 += float((d - b[rows].double() @ a64).pow(2).sum())
    norm, diff = math.sqrt(norm2), math.sqrt(diff2)
    return diff / norm if norm > 0 else diff
