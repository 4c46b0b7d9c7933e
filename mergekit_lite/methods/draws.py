"""Position-keyed random keep decisions for DARE and DELLA.

Every entry of a tensor gets one uniform u on the 2⁻³² grid, a function of (recipe seed, tensor
name, model, position) only, and is kept when u < p. That makes a seed's masks independent of
the visiting order, the worker count, the device and whether the engine streams the tensor
whole or in row blocks.

u is built so that the common case costs one random byte per entry. Model i of a tensor has a
63-bit stream seed s (from seed, tensor name, i), and the entry at flat position k gets
- B: byte k of the raw output of numpy's PCG64(s) (little-endian 64-bit words);
- F: the top 24 bits of SplitMix64's output for state s + (k+1)·γ (γ = 0x9E3779B97F4A7C15);
- u = (B·2²⁴ + F) / 2³².
A row block starting at position k0 jumps the generator ahead by ⌊k0/8⌋ words
(`PCG64.advance`, logarithmic in the distance) instead of drawing and discarding them.
Deciding u < p needs F only when B = ⌊256p⌋, one entry in 256, so `keep_mask` hashes just
those. A float32 draw per entry (the previous scheme) cost about 2 ns; a byte costs about
0.3 ns, and draws were most of a DARE merge's time.
`uniforms` computes u for every entry: it is the definition the fast path is tested against.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from .registry import TensorJob, tensor_seed

FINE_BITS = 24  # bits of u below the byte B
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _span(job: TensorJob, shape: tuple[int, ...]) -> tuple[int, int]:
    """The flat positions [start, end) of this job's rows in the whole tensor."""
    numel = math.prod(shape)
    row_numel = numel // shape[0] if shape and shape[0] else 1
    start = (job.rows[0] if job.rows else 0) * row_numel
    return start, start + numel


def stream_seed(job: TensorJob, model: int) -> int:
    """s: the seed of model `model`'s draws for this tensor."""
    return tensor_seed(tensor_seed(job.seed, job.name), f"draws:{model}")


def top_bytes(job: TensorJob, model: int, shape: tuple[int, ...]) -> np.ndarray:
    """B for every entry of the job's rows (flat uint8, a view of the generated words)."""
    start, end = _span(job, shape)
    first, last = start // 8, -(-end // 8)
    generator = np.random.PCG64(stream_seed(job, model))
    if first:
        generator.advance(first)
    words = generator.random_raw(last - first)
    if sys.byteorder != "little":
        words = words.byteswap()
    return words.view(np.uint8)[start - 8 * first : end - 8 * first]


def fine_bits(job: TensorJob, model: int, positions: np.ndarray) -> np.ndarray:
    """F (as int64) for the given flat positions of the whole tensor."""
    state = np.asarray(positions, dtype=np.int64).astype(np.uint64) + np.uint64(1)
    state *= _GAMMA  # arrays wrap around silently, as SplitMix64 wants
    state += np.uint64(stream_seed(job, model))
    state ^= state >> np.uint64(30)
    state *= _MIX1
    state ^= state >> np.uint64(27)
    state *= _MIX2
    state ^= state >> np.uint64(31)
    return (state >> np.uint64(64 - FINE_BITS)).astype(np.int64)


def uniforms(job: TensorJob, model: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """u for every entry of the job's rows, in float64 (exact: u has 32 bits), on the CPU."""
    shape = tuple(shape)
    start, end = _span(job, shape)
    high = top_bytes(job, model, shape).astype(np.int64) << FINE_BITS
    u = (high + fine_bits(job, model, np.arange(start, end))).astype(np.float64) / 2.0**32
    return torch.from_numpy(u).reshape(shape)


def keep_mask(job: TensorJob, model: int, shape: torch.Size | tuple[int, ...],
              probability: float | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """u < p for every entry of the job's rows, exactly as `uniforms(...) < p` (p in float64).

    `probability` is one float or a tensor of the job's shape (DELLA's per-entry p). With
    q = 256p: B < ⌊q⌋ keeps and B > ⌊q⌋ drops whatever F is; only B = ⌊q⌋ compares F with
    (q − ⌊q⌋)·2²⁴. The mask is built on the CPU and moved, so it is the same on every device.
    """
    shape = tuple(shape)
    start, _ = _span(job, shape)
    raw = top_bytes(job, model, shape)
    if isinstance(probability, torch.Tensor):
        # 256p is exact in p's own float type (a power-of-two scale). p = 1 (q = 256) is taken as
        # ⌊q⌋ = 255 with a fraction of 1, which keeps B = 255 too, so ⌊q⌋ always fits a byte.
        wide = torch.float64 if probability.dtype == torch.float64 else torch.float32
        p = probability.detach().to("cpu", wide).reshape(-1)
        # torch converts float → int16 much faster than → uint8; the values are 0..255 either way.
        # p < 0 gets ⌊q⌋ = 0 and a negative fraction (never kept), p > 1 a fraction above 1.
        whole = p.mul(256.0).clamp_(0.0, 255.0).to(torch.int16).to(torch.uint8).numpy()
        keep_np = raw < whole
        tied = np.flatnonzero(raw == whole)
        if tied.size:
            fraction = p.numpy()[tied].astype(np.float64) * 256.0 - whole[tied]
            keep_np[tied] = fine_bits(job, model, tied + start) < fraction * 2.0**FINE_BITS
    else:
        q = float(probability) * 256.0
        if q >= 256.0 or q <= 0.0:  # u ∈ [0, 1): always or never below p
            return torch.full(shape, q >= 256.0, dtype=torch.bool, device=device)
        whole_q = math.floor(q)
        keep_np = raw < np.uint8(whole_q)
        if q > whole_q:
            tied = np.flatnonzero(raw == np.uint8(whole_q))
            keep_np[tied] = fine_bits(job, model, tied + start) < (q - whole_q) * 2.0**FINE_BITS
    return torch.from_numpy(keep_np).reshape(shape).to(device)
