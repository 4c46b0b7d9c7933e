"""SCE: Select, Calculate, Erase (FuseChat, Wan et al., arXiv 2408.07990; mergekit's `sce`).

Per tensor, with τᵢ = θᵢ − θ₀ for N models:

1. Select: when `select_topk` < 1, keep the entries where the task vectors disagree most. With
   v the population variance of τ₁..τ_N at each entry and k = int(#{v ≠ 0} · select_topk), one
   mask (the same for every model) keeps the k entries of largest v; τᵢ ← τᵢ ⊙ mask.
2. Calculate: one weight per model from the energy of its (selected) task vector,
   wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) over the tensor, or 1/N each when |Σⱼ mean(τⱼ²)| < 1e-6.
3. Erase: TIES' sign election on the plain sum, γ = sign(Σ τᵢ) (a zero sum elects +); entry
   (i, p) counts when τᵢ has the sign γ there (a zero never does).

θ = θ₀ + Σᵢ wᵢeᵢτᵢ / max(Σᵢ wᵢeᵢ, 1e-6).

Everything follows mergekit 0.1.5 (docs/methods/sce.md lists the measured differences), whose
two thresholds matter in practice:
- the 1e-6 guard in step 2 is on the *mean squared* task vector: fine-tunes move entries by
  1e-4 to 1e-3, so mean(τ²) is 1e-8 to 1e-6 and the guard usually fires. Most tensors of a real
  LLM merge then get equal weights, and SCE behaves like a TIES disjoint mean of the selected
  entries. We keep the guard as it is so that mergekit recipes give mergekit's tensors.
- the 1e-6 floor of the divisor: a model whose weight is below 1e-6 and which alone agrees
  with γ at an entry adds wᵢτᵢ/1e-6, not τᵢ.

Selection ranks the variance computed in float64 (every float32 τ enters exactly; mergekit's is
float32), and keeps every entry tied with the k-th largest, as `sparsify`'s masks do; the keep
count k is mergekit's, float32 product included. Memory: the task vectors (in the models' own
buffers when the engine hands them over), one float64 variance while selecting, and three
tensors for the combination; the whole tensor is held (not row-local: the variance cut and the
weights are tensor-wide).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .detmath import FlatSum, flat_pieces
from .registry import MethodSpec, Param, TensorJob, register
from .select import kth_largest
from .task_arithmetic import INT8_MASK, _elect, require_base, task_vectors

# mergekit's guards: below this |Σⱼ mean(τⱼ²)| every model weighs 1/N; the divisor's floor.
WEIGHT_SUM_EPS = 1e-6
DIVISOR_MIN = 1e-6

SELECT_TOPK = Param(
    "select_topk",
    "float",
    1.0,
    "Fraction of entries kept, those where the task vectors' variance across models is largest "
    "(1 = keep all, 0 = keep none: the base).",
    minimum=0.0,
    maximum=1.0,
)


def keep_count(nonzero: int, select_topk: float) -> int:
    """k = int(nonzero · select_topk) with mergekit's arithmetic: its count of non-zero variances
    is a 0-d int64 tensor, and multiplying it by a Python float gives a float32 tensor. The
    float32 product differs from the float64 one: past 2²⁴ entries the count itself rounds (an
    embedding of 131,072,003 non-zero variances counts as 131,072,000), and a product just under
    an integer can round up to it. Taking the same product keeps the same number of entries."""
    return int(torch.tensor(nonzero, dtype=torch.int64) * float(select_topk))


def spread(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """N · (population variance of τ₁..τ_N) at every entry, in float64: Σᵢ (τᵢ − mean)².

    The factor N changes no ranking and no zero, so selection needs no division. float64 holds
    every float32 τ and their mean to well within the spacing of distinct variances, and the
    spread is exactly 0 where, and only where, all τᵢ are equal (N·x/N is x in float64), as
    mergekit's count of non-zero variances needs. Computed a bounded slice at a time, so the
    float64 temporaries stay small beside the output.
    """
    n = len(taus)
    out = torch.empty(taus[0].numel(), dtype=torch.float64, device=taus[0].device)
    start = 0
    for piece in flat_pieces(*taus):
        cols = [p.to(torch.float64) for p in piece]
        mean = cols[0].clone()
        for c in cols[1:]:
            mean += c
        mean /= n
        acc = out[start : start + mean.numel()]
        acc.zero_()
        for c in cols:
            # three separately rounded ops, not addcmul: a fused multiply-add (CUDA, and CPU vector
            # lanes but not the scalar tail) would round an entry by where it falls in the buffer
            acc += c.sub_(mean).square_()
        start += mean.numel()
    return out.view(taus[0].shape)


def variance_mask(taus: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """Select: True at the k entries of largest variance across the models (every entry tied
    with the k-th largest included), k = `keep_count` of the non-zero variances."""
    if select_topk >= 1:
        return torch.ones_like(taus[0], dtype=torch.bool)
    if select_topk <= 0:
        return torch.zeros_like(taus[0], dtype=torch.bool)
    v = spread(taus)
    k = keep_count(int(torch.count_nonzero(v)), select_topk)
    if k == 0:
        return torch.zeros_like(taus[0], dtype=torch.bool)
    return v >= kth_largest(v, k)  # the k-th largest is > 0 (k ≤ the non-zero count): zeros never kept


def mean_squares(taus: Sequence[torch.Tensor]) -> list[float]:
    """mean(τᵢ²) over each whole tensor, rounded to the tensors' dtype as mergekit's are: float64
    squares (exact for float32) summed in `detmath`'s fixed order, so the weights do not depend
    on the thread count."""
    numel = taus[0].numel()
    dtype = taus[0].dtype
    out = []
    for t in taus:
        acc = FlatSum()
        for (p,) in flat_pieces(t):
            x = p.to(torch.float64)
            acc.add(x * x)
        out.append(float(torch.tensor(acc.total() / numel, dtype=torch.float64).to(dtype)))
    return out


def sce_weights(taus: Sequence[torch.Tensor]) -> list[float]:
    """Calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²), or 1/N each below mergekit's 1e-6 guard.

    The sum, its guard and the divisions are done in the tensors' dtype as mergekit does them
    (a float32 sum of float32 means), so the guard decides alike at its boundary.
    """
    dtype = taus[0].dtype
    means = torch.tensor(mean_squares(taus), dtype=dtype)
    total = float(means.sum())
    if abs(total) < WEIGHT_SUM_EPS:
        return (torch.ones_like(means) / len(taus)).tolist()
    return (means / total).tolist()


def erase_and_combine(taus: list[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Erase: Σᵢ wᵢeᵢτᵢ / max(Σᵢ wᵢeᵢ, 1e-6), eᵢ = 1 where τᵢ has the elected sign γ = sign(Σ τᵢ).

    Consumes `taus` (overwritten; the first becomes the result). The election is
    `task_arithmetic`'s, on unit weights: exact in any model order. Each wᵢτᵢ is rounded
    before it is added, as mergekit's `(task_vectors * weights).sum(0)` rounds it; the agree
    factor is 0 or 1, so multiplying by it rounds nothing.
    """
    gamma = _elect(taus, [1.0] * len(taus), lambda d, _w: d)
    agree = torch.empty_like(taus[0])
    divisor = torch.zeros_like(taus[0])
    mixed: torch.Tensor | None = None
    for t, w in zip(taus, weights, strict=True):
        torch.mul(t, gamma, out=agree).gt_(0)  # before scaling: a w of 0 must not hide the sign
        if w != 1:
            t.mul_(w)
        if mixed is None:
            mixed = t.mul_(agree)
        else:
            mixed.addcmul_(t, agree)  # + wᵢτᵢ·1 or + 0: the bits of a masked add
        divisor.add_(agree, alpha=w)  # 0 or w exactly
    assert mixed is not None
    return mixed.div_(divisor.clamp_(min=DIVISOR_MIN))


def merge_sce(job: TensorJob) -> torch.Tensor:
    base = require_base(job, "sce")
    taus = task_vectors(job, "sce")  # our own buffers either way: fresh, or the disposable models
    if base.numel() == 0:
        return base.clone()
    keep = variance_mask(taus, float(job.params["select_topk"]))
    if not bool(keep.all()):
        taus = [t.mul_(keep.view(torch.uint8)) for t in taus]  # `sparsify.apply_mask`, in place
    del keep
    weights = sce_weights(taus)
    return erase_and_combine(taus, weights).add_(base)


SPEC = register(
    MethodSpec(
        name="sce",
        summary="SCE: keep the entries of highest variance across models, weight each task vector "
                "by its energy, TIES-elect signs, disjoint weighted mean.",
        params=(SELECT_TOPK, INT8_MASK),
        merge=merge_sce,
        needs_base=True,
        min_models=1,
        paper="https://arxiv.org/abs/2408.07990",
        doc="methods/sce.md",
    )
)

