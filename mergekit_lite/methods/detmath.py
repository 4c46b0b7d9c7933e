"""exp, tanh and sums whose float32 results do not depend on chunking, threads or neighbours.

Why this module exists: an exact streaming method (PCB global scope) computes the same
elementwise score once over a whole model row in memory and once tensor by tensor in
streaming passes, and promises the two give the same float32 bits. torch's CPU kernels for
transcendental functions run a vectorised implementation over the body of a buffer and a
scalar one over the tail (and per thread chunk), and the two may differ in the last bit; CUDA
has its own implementation again. Where a value lands in a buffer then decides its rounding,
which breaks bit-exactness between chunkings and devices.

These functions use only IEEE-754 basic operations (+, −, ×, ÷, comparisons, bit moves), each a
separate torch op, so every element is correctly rounded at every step on any device and any
chunking: the result is a pure function of the element. The maths runs in float64 with a
degree-13 Taylor polynomial after Cody–Waite range reduction (relative error ~1e-16, far below
float32's 6e-8), then rounds once to float32. The float32 results therefore equal the correctly
rounded exp/tanh except for arguments within ~1e-16 relative of a float32 rounding midpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

_LN2_HI = 6.93147180369123816490e-01  # ln 2 with its low 21 bits zero: k·_LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10  # ln 2 − _LN2_HI
_INV_LN2 = 1.44269504088896338700e00
# 1/k! for k = 13 down to 2: expm1(r) = r·(1 + r·(1/2! + r·(1/3! + …)))
_INV_FACT = tuple(1.0 / math.factorial(k) for k in range(13, 1, -1))
_EXP_ARG_LIMIT = 200.0  # exp(±200) is already inf / 0 in float32; keeps 2**k a normal float64
_TANH_ARG_LIMIT = 40.0  # tanh(20) rounds to 1.0 in float32 (and 2|y| is clamped to this)
_CHUNK = 1 << 16  # elements per float64 block (cache-sized temporaries); never changes results
_FAST_CHUNK = 1 << 20  # the fast path runs few, cheap ops: bigger blocks, fewer thread-pool rounds


def _expm1_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split exp(x) = 2**k · (1 + p) for float64 x in [−200, 200]; returns (k as int64, p).

    For |x| ≤ ln2/2, k = 0 and r = x exactly, so p is expm1(x) with full relative accuracy even
    for tiny x — what tanh needs to avoid cancellation in 1 − e^{−2|y|}.
    """
    k = torch.round(x * _INV_LN2)
    r = (x - k * _LN2_HI) - k * _LN2_LO  # x − k·_LN2_HI is exact (Sterbenz)
    h = r * _INV_FACT[0]
    for c in _INV_FACT[1:]:
        h.add_(c).mul_(r)  # in place: still one correctly rounded op at a time
    h.add_(1.0).mul_(r)
    return k.to(torch.int64), h


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k as float64 for integer k in the normal range, built from the exponent bits."""
    return ((k + 1023) << 52).view(torch.float64)


def _exp64(x: torch.Tensor) -> torch.Tensor:
    k, p = _expm1_parts(x.clamp(-_EXP_ARG_LIMIT, _EXP_ARG_LIMIT))
    return _pow2(k) * (1.0 + p)


def _tanh64(y: torch.Tensor) -> torch.Tensor:
    a = (y.abs() * 2.0).clamp(max=_TANH_ARG_LIMIT)
    k, p = _expm1_parts(-a)
    q = torch.where(k == 0, p, _pow2(k) * (1.0 + p) - 1.0)  # q = e^{−2|y|} − 1 ∈ (−1, 0]
    return torch.copysign(-q / (2.0 + q), y)


def _blockwise(fn, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        block = flat[start : start + _CHUNK].to(torch.float64)
        res = fn(block)
        out[start : start + _CHUNK] = torch.where(torch.isnan(block), block, res).to(torch.float32)
    return out.view(x.shape)


# Margin around a float64 result inside which its float32 rounding is not trusted: 8 float64
# ulps, well above the error of torch's float64 exp/tanh (≤ 1 ulp for SLEEF, glibc and CUDA,
# ≤ 2 ulp for some libm tanh) and of the basic-operation polynomials above (~1 ulp).
_RISK = 2.0**-49


def _fast_then_exact(fast, exact, x: torch.Tensor) -> torch.Tensor:
    """float32(f(x)) from torch's own float64 kernel, re-done exactly where rounding is at risk.

    A float64 result within a few ulps of the true value rounds to the same float32 as the
    true value unless the true value lies within those ulps of a float32 rounding boundary.
    Such elements (about one in 10⁷) are detected from the fast result itself and recomputed
    with the basic-operation path, whose result is a pure function of the element. Every other
    element's float32 equals that path's too, so the output is the same bits as `_blockwise`
    gives, at the speed of torch's vectorised kernels (about 8× faster on CPU).
    """
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    for start in range(0, flat.numel(), _FAST_CHUNK):
        block = flat[start : start + _FAST_CHUNK].to(torch.float64)
        y = fast(block)
        margin = y.abs() * _RISK
        res = y.to(torch.float32)
        risky = (y - margin).to(torch.float32) != (y + margin).to(torch.float32)
        if bool(risky.any()):
            sure = exact(block[risky])
            res[risky] = torch.where(torch.isnan(block[risky]), block[risky], sure).to(torch.float32)
        out[start : start + _FAST_CHUNK] = res
    return out.view(x.shape)


def exp_f32(x: torch.Tensor) -> torch.Tensor:
    """exp(x) rounded to float32, the same bits for an element whatever the chunking or device."""
    return _fast_then_exact(torch.exp, _exp64, x)


def tanh_f32(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) rounded to float32, the same bits for an element whatever the chunking or device."""
    return _fast_then_exact(torch.tanh, _tanh64, x)


def exp_f32_reference(x: torch.Tensor) -> torch.Tensor:
    """exp via basic operations only, for every element (slow): what `exp_f32` must equal."""
    return _blockwise(_exp64, x)


def tanh_f32_reference(x: torch.Tensor) -> torch.Tensor:
    """tanh via basic operations only, for every element (slow): what `tanh_f32` must equal."""
    return _blockwise(_tanh64, x)


# Elements per partial sum in `fixed_order_sum`; below torch's parallel grain (32768), so each
# partial sum is always computed by one thread, in one order.
_SUM_BLOCK = 4096


# Elements per float64 sum call: torch materialises a float64 copy of what it sums with
# dtype=float64, so a whole 256M-entry tensor cost 2 GB more; 1M-element row groups cost 8 MB.
# Each row's sum is the same computation in any group (tests/test_detmath.py pins it).
_SUM_CHUNK = 1 << 20


def _sum_group(rows: torch.Tensor) -> torch.Tensor:
    """Each row's float64 sum, by one thread in one order whatever the group's size.

    torch gives each output of a reduction with several outputs to one thread, but splits a
    single output's elements between threads (so a lone 4M-entry row summed with 4 threads
    differs in its last bits from the same row summed among others). A lone row is therefore
    summed as one of two: an expanded view of itself, which costs no copy of its elements.
    """
    if rows.shape[0] == 1 and rows.shape[1] > 1:
        return rows.to(torch.float64).expand(2, -1).sum(dim=1)[:1]
    return rows.sum(dim=1, dtype=torch.float64)


def row_sums64(rows: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension of each row of a 2-D tensor in float64, a bounded group of rows
    at a time (torch sums in a float64 copy of what it is given).

    On the CPU a row's bits depend on that row alone, not on how many rows share the call nor on
    threads (tests/test_detmath.py), so a row block's sums are the whole tensor's sums of those
    rows. (CUDA picks its reduction layout by the number of rows, so there a block's sums may
    differ in the last bits: docs/cli.md.)
    """
    step = max(1, _SUM_CHUNK // max(1, rows.shape[1]))
    if rows.shape[0] <= step:
        return _sum_group(rows)
    return torch.cat([_sum_group(rows[i : i + step]) for i in range(0, rows.shape[0], step)])


def flat_pieces(*tensors: torch.Tensor, size: int = _SUM_CHUNK) -> Iterator[tuple[torch.Tensor, ...]]:
    """The same consecutive slices of `size` entries of each tensor, flattened: what a sum over
    whole tensors feeds `FlatSum` with, so its products never need whole-tensor temporaries."""
    flat = [t.reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), size):
        yield tuple(f[start : start + size] for f in flat)


def combine64(vectors: Sequence[torch.Tensor], coefficients: Sequence[float], out: torch.Tensor, *,
              minus: torch.Tensor | None = None) -> torch.Tensor:
    """out = Σ kᵢ·(vᵢ − minus), the products and their sum in float64, rounded once to out's dtype.

    For coefficients found from a whole tensor's sums (karcher, multislerp): they can be large
    and of opposite signs when the inputs nearly cancel (a mean direction of near-opposite
    vectors divides by its small norm), where a float32 sum of the products loses every digit
    the float64 one keeps. vᵢ − minus is rounded in vᵢ's dtype first, as task vectors are
    everywhere else. Elementwise, a bounded piece at a time, so a row block gives the bits of
    the whole tensor; `out` may be one of the inputs (each piece is read before it is written).
    """
    terms = [(v, k) for v, k in zip(vectors, coefficients, strict=True) if k != 0.0]
    if not terms:
        return out.zero_()
    flat_out = out.view(-1)
    start = 0
    extra = () if minus is None else (minus,)
    for pieces in flat_pieces(*(v for v, _ in terms), *extra):
        base = pieces[-1] if minus is not None else None
        acc: torch.Tensor | None = None
        for piece, (_, k) in zip(pieces, terms, strict=False):
            x = (piece if base is None else piece - base).to(torch.float64).mul_(k)
            acc = x if acc is None else acc.add_(x)  # product rounded, then added: no fused multiply-add
        assert acc is not None
        flat_out[start : start + acc.numel()] = acc
        start += acc.numel()
    return out


def fixed_order_sum(x: torch.Tensor) -> float:
    """Σ x over every element, accumulated in float64 in an order set by the shape alone.

    torch reduces a tensor to a single value in two passes whose split follows the number of
    threads, so `x.sum()` differs in its last bits between a 1-thread and a 2-thread run (and
    between machines with other core counts), and a float32 result computed from it (an L1
    rescale factor, Model Stock's cosine) can change by an ulp. Reductions with several outputs
    give each output to one thread: summing rows of 4096 elements, then rows of those sums, and
    so on, makes every partial sum's order a function of the shape only.
    """
    flat = x.reshape(-1)
    while flat.numel() > _SUM_BLOCK:
        full = flat.numel() // _SUM_BLOCK * _SUM_BLOCK
        parts = row_sums64(flat[:full].reshape(-1, _SUM_BLOCK))
        if full < flat.numel():  # the tail: fewer than 4096 elements, one thread
            parts = torch.cat([parts, flat[full:].sum(dim=0, keepdim=True, dtype=torch.float64)])
        flat = parts
    return float(flat.sum(dtype=torch.float64))


class FlatSum:
    """`fixed_order_sum` of a tensor that arrives in consecutive pieces of its flattened values.

    A method that needs one sum over a whole tensor (slerp's angle, Model Stock's cosines, an L1
    rescale) can then take it over row blocks streamed one after another, with the bits it has
    on the whole tensor in memory. The pieces are regrouped into the groups `fixed_order_sum`
    forms: runs of 4096 values, 256 runs per call (`row_sums64`), counted from the tensor's
    first value, then the tail. Each group is summed from one aligned buffer, as the whole
    tensor's groups are summed from aligned slices, so a device whose reduction order depends
    on the number of rows per call or on alignment (CUDA) sums them the same way too.

    Holds one group's values at most (1M: 4 MiB in float32, grown as needed) and each run's sum
    as a Python float. Small tensors kept alive across a pass would sit between the pass's big
    transient blocks on the heap and fragment it: a 128M-entry embedding's three sums grew the
    process by 3 GB that way, with 3 MB of live tensors.
    """

    def __init__(self) -> None:
        self._runs: list[float] = []  # float64 sums of the complete groups' runs, in order
        self._buf: torch.Tensor | None = None  # the current group's values
        self._held = 0
        self._count = 0

    def add(self, piece: torch.Tensor) -> None:
        flat = piece.reshape(-1)
        self._count += flat.numel()
        while flat.numel():
            take = min(_SUM_CHUNK - self._held, flat.numel())
            if take == 0:  # a complete group, and more follows
                self._runs.extend(row_sums64(self._room(_SUM_CHUNK, flat).view(-1, _SUM_BLOCK)).tolist())
                self._held = 0
                continue
            buf = self._room(self._held + take, flat)
            buf[self._held : self._held + take] = flat[:take]
            self._held += take
            flat = flat[take:]

    def _room(self, need: int, like: torch.Tensor) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < need:
            size = min(_SUM_CHUNK, max(need, 2 * (self._buf.numel() if self._buf is not None else 0)))
            grown = torch.empty(size, dtype=like.dtype, device=like.device)
            if self._buf is not None and self._held:
                grown[: self._held] = self._buf[: self._held]
            self._buf = grown
        return self._buf

    def total(self) -> float:
        if self._buf is None:
            return 0.0
        held = self._buf[: self._held]
        if self._count <= _SUM_BLOCK:
            return float(held.sum(dtype=torch.float64))
        full = self._held // _SUM_BLOCK * _SUM_BLOCK
        parts = [torch.tensor(self._runs, dtype=torch.float64, device=held.device)]
        if full:
            parts.append(row_sums64(held[:full].view(-1, _SUM_BLOCK)))
        if full < self._held:  # the tail, as `fixed_order_sum` sums it
            parts.append(held[full:].sum(dim=0, keepdim=True, dtype=torch.float64))
        return fixed_order_sum(torch.cat(parts))


def fixed_order_row_sums(x: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension for each row of a 2-D tensor, in float64, independent of threads.

    With two rows or more torch gives each row to one thread already; a single row is summed
    with `fixed_order_sum`.
    """
    if x.shape[0] == 1:
        return torch.tensor([fixed_order_sum(x)], dtype=torch.float64, device=x.device)
    return row_sums64(x)


def exact_divisor(divisor: float, like: torch.Tensor) -> torch.Tensor | float:
    """`divisor` as a 0-d tensor of `like`'s dtype and device, for a division that is exact on any device.

    CUDA computes `t / s` for a Python number `s` (any CPU scalar) as `t · (1/s)`, which is an
    ulp off in part of the entries unless `s` is a power of two; the CPU divides. Dividing by a
    0-d tensor on the device takes the true-division kernel on both, with the same float32
    (float64) divisor the CPU rounds a Python number to, so CPU and GPU give the same bits.
    For float16/bfloat16 (the engine computes in float32; only direct calls meet them) the
    number itself comes back: the CPU divides those in float32 by the unrounded number, which
    a 0-d tensor of their dtype would round first.
    """
    if like.dtype not in (torch.float32, torch.float64):
        return float(divisor)
    return torch.tensor(float(divisor), dtype=like.dtype, device=like.device)
