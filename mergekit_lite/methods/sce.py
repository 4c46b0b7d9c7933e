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
float32) and keeps exactly mergekit's k entries (its float32 product included), as its
torch.topk does; of the entries tied with the k-th largest (common with bf16 checkpoints), the
first ones in flat index order (torch.topk's tie order is unspecified: the count is mergekit's,
which tied entries can differ). Keeping every tied entry instead would select more than k, and
since the energy weights are means over the selected entries, move every output entry.

Memory. Steps 1 and 2 are tensor-wide, step 3 is per entry once the cut and the weights are
known, so a tensor bigger than the engine's whole-tensor limit streams in row blocks after
per-tensor statistics passes (`SceSums`, the method's `tensor_reducer`): with select_topk in
(0, 1), the exact k-th largest float64 spread and the count above it over three passes
(`stats.Float64Select`), then one pass, in block order, that finds the last tied entry to keep
and sums the masked mean squares with the bits of the whole tensor (`detmath.FlatSum`); with
select_topk 0 or 1 only the last. Each block is then selected and
combined from these, giving the whole-tensor path's bits. Within a block or a whole tensor, the
float64 spreads and the election's float64 sums are made a bounded piece at a time. A tensor
held whole (up to the limit) still keeps its float64 spread while its cut is selected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .detmath import FlatSum, flat_pieces
from .registry import BlockOrder, MethodSpec, Param, TensorJob, register
from .select import kth_largest
from .stats import Float64Select
from .task_arithmetic import INT8_MASK, _elect, require_base, task_vectors

# mergekit's guards: below this |Σⱼ mean(τⱼ²)| every model weighs 1/N; the divisor's floor.
WEIGHT_SUM_EPS = 1e-6
DIVISOR_MIN = 1e-6
# Entries per piece of the elementwise work (float64 spreads, the election's float64 sums):
# bounded temporaries (about 40 MB) whatever the block or tensor size; a streamed block (512K
# entries) is one piece. Smaller pieces ran slower (more torch calls, less work per thread).
_PIECE = 1 << 20

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
    out = torch.empty(taus[0].numel(), dtype=torch.float64, device=taus[0].device)
    start = 0
    for piece in flat_pieces(*taus):
        _piece_spread(piece, out[start : start + piece[0].numel()])
        start += piece[0].numel()
    return out.view(taus[0].shape)


def _piece_spread(piece: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """`spread` of the same flat slice of every τᵢ, into `out` (or a new float64 tensor).

    Every operation is elementwise and separately rounded, so an entry's spread is the same
    bits in any slice: blocks and whole tensors select alike. (The sum starts from the first
    square rather than from 0: 0 + x is x, so the bits are those of Σ from 0.)
    """
    cols = [p.to(torch.float64, copy=True) for p in piece]  # copies: the in-place ops below must not reach τ
    mean = cols[0] + cols[1] if len(cols) > 1 else cols[0].clone()
    for c in cols[2:]:
        mean += c
    mean /= len(cols)
    acc = torch.sub(cols[0], mean, out=out).square_() if out is not None else cols[0].sub_(mean).square_()
    for c in cols[1:]:
        # three separately rounded ops, not addcmul: a fused multiply-add (CUDA, and CPU vector
        # lanes but not the scalar tail) would round an entry by where it falls in the buffer
        acc += c.sub_(mean).square_()
    return acc


def variance_mask(taus: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """Select: True at exactly the k entries of largest variance across the models, k =
    `keep_count` of the non-zero variances; of the entries tied with the k-th largest, the
    first ones in flat index order (`Cut`)."""
    if select_topk >= 1:
        return torch.ones_like(taus[0], dtype=torch.bool)
    if select_topk <= 0:
        return torch.zeros_like(taus[0], dtype=torch.bool)
    v = spread(taus)
    cut = variance_cut(v, keep_count(int(torch.count_nonzero(v)), select_topk))
    keep = torch.empty(v.shape, dtype=torch.bool, device=v.device)
    _piece_keep(v.view(-1), cut, 0, out=keep.view(-1))
    return keep


@dataclass(frozen=True)
class Cut:
    """Which entries Select keeps: those whose spread is above `value`, and those equal to it
    whose flat index is below `tie_end` (the first tied entries in flat index order, as many as
    k leaves room for). `value` inf keeps nothing. A rule on flat indices, not on blocks: any
    row blocks, in any order, select what the whole tensor selects."""

    value: float
    tie_end: int


def variance_cut(v: torch.Tensor, k: int) -> Cut:
    """The `Cut` keeping exactly k entries of the spreads `v` (the whole tensor's), 0 ≤ k ≤ its
    non-zero count: the k-th largest spread (> 0, so zeros are never kept), with the first
    k − #(spread > it) of its ties."""
    if k == 0:
        return Cut(math.inf, 0)
    flat = v.reshape(-1)
    value = kth_largest(flat, k)
    wanted = k - int(torch.count_nonzero(flat > value))  # ≥ 1: the k-th largest itself is tied with it
    tied = torch.nonzero(flat == value).view(-1)
    return Cut(float(value), int(tied[wanted - 1]) + 1)


def _piece_keep(v: torch.Tensor, cut: Cut, offset: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The keep mask of a flat piece of spreads starting at flat index `offset`: v > cut, or
    v == cut before `tie_end`. Comparisons only, so any piece gives the whole tensor's bits."""
    keep = torch.gt(v, cut.value, out=out) if out is not None else v.gt(cut.value)
    ties = min(max(cut.tie_end - offset, 0), v.numel())
    if ties:
        keep[:ties] |= v[:ties] == cut.value
    return keep


def keep_selected(taus: Sequence[torch.Tensor], cut: Cut | None, offset: int = 0) -> None:
    """Select with a `Cut` found over the whole tensor, on τ's whose first entry is the
    tensor's flat index `offset` (a row block's): τᵢ ← τᵢ ⊙ keep, in place, a bounded piece at
    a time. `cut` None keeps everything; the factors are the bytes of a bool mask, as the
    whole-tensor path multiplies by, so the bits are its bits."""
    if cut is None:
        return
    for piece in flat_pieces(*taus, size=_PIECE):
        if math.isinf(cut.value):
            keep = torch.zeros(piece[0].shape, dtype=torch.uint8, device=piece[0].device)
        else:
            keep = _piece_keep(_piece_spread(piece), cut, offset).view(torch.uint8)
        for p in piece:
            p.mul_(keep)
        offset += piece[0].numel()


def block_offset(rows: tuple[int, int] | None, numel: int) -> int:
    """The flat index, in its tensor, of the first entry of a row block of `numel` entries
    (0 for a whole tensor)."""
    if rows is None or rows[1] <= rows[0]:
        return 0
    return rows[0] * (numel // (rows[1] - rows[0]))


def mean_square(total: float, numel: int, dtype: torch.dtype) -> float:
    """mean(τ²) from the float64 sum of its squares, rounded to the tensors' dtype as mergekit's are."""
    return float(torch.tensor(total / numel, dtype=torch.float64).to(dtype))


def mean_squares(taus: Sequence[torch.Tensor]) -> list[float]:
    """mean(τᵢ²) over each whole tensor, rounded to the tensors' dtype as mergekit's are: float64
    squares (exact for float32) summed in `detmath`'s fixed order, so the weights do not depend
    on the thread count (nor on row blocks: `SceSums` feeds the same `FlatSum`s block by block)."""
    numel = taus[0].numel()
    out = []
    for t in taus:
        acc = FlatSum()
        for (p,) in flat_pieces(t):
            x = p.to(torch.float64)
            acc.add(x * x)
        out.append(mean_square(acc.total(), numel, taus[0].dtype))
    return out


def energy_weights(means: Sequence[float], dtype: torch.dtype) -> list[float]:
    """Calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²), or 1/N each below mergekit's 1e-6 guard.

    The sum, its guard and the divisions are done in the tensors' dtype as mergekit does them
    (a float32 sum of float32 means), so the guard decides alike at its boundary.
    """
    values = torch.tensor(list(means), dtype=dtype)
    total = float(values.sum())
    if abs(total) < WEIGHT_SUM_EPS:
        return (torch.ones_like(values) / len(means)).tolist()
    return (values / total).tolist()


def sce_weights(taus: Sequence[torch.Tensor]) -> list[float]:
    """Calculate on whole (selected) task vectors: `energy_weights` of their `mean_squares`."""
    return energy_weights(mean_squares(taus), taus[0].dtype)


@dataclass(frozen=True)
class SceStats:
    """What a row block needs from its whole tensor: the Select `Cut` (None keeps every entry)
    and the weights."""

    cut: Cut | None
    weights: tuple[float, ...]


class SceSums:
    """SCE's per-tensor statistics over a big tensor's row blocks (`MethodSpec.tensor_reducer`).

    With select_topk in (0, 1): every spread feeds an exact float64 selection (two passes, three
    to five where its sample misses), which also counts the non-zero ones in its first pass:
    mergekit's k comes from that count, and since k never exceeds it, the k-th largest of all
    spreads is the k-th largest non-zero one, the whole-tensor path's cut value. The selection
    also counts the spreads above it, so k − that many tied entries are to be kept. Then one
    pass, in block order, finds where the last of them lies (the `Cut`'s tie_end: tied entries
    are counted in flat index order across blocks) and sums each model's selected squares in
    `FlatSum`s, which regroup the pieces as `mean_squares` groups the whole tensor's: exactly k
    entries, the same means, the same weights.
    """

    def __init__(self, params: Mapping[str, Any], n_models: int) -> None:
        self._topk = float(params["select_topk"])
        self._select: Float64Select | None = None
        self._cut: Cut | None = None
        self._ties_left = 0  # tied entries still to keep, in block order, during the energy pass
        self._tie_end: int | None = None
        self._offset = 0
        if self._topk <= 0:
            self._cut = Cut(math.inf, 0)
        elif self._topk < 1:
            self._select = Float64Select(self._rank)
        self.expected_passes = 1 if self._select is None else 3  # read by the planner (a sample miss adds 1-3)
        self._nonzero = 0
        self._select_passes = 0
        self._sums = [FlatSum() for _ in range(n_models)]
        self._numel = 0
        self._dtype = torch.float32
        self._order = BlockOrder()

    def _rank(self, count: int) -> int:
        """Ascending position of the k-th largest of `count` spreads (clamped when k is 0)."""
        return min(max(count - keep_count(self._nonzero, self._topk), 0), count - 1)

    def observe(self, job: TensorJob) -> None:
        taus = [t.contiguous() for t in task_vectors(job, "sce")]
        if self._select is not None:
            for piece in flat_pieces(*taus, size=_PIECE):
                v = _piece_spread(piece)
                if self._select_passes == 0:
                    self._nonzero += int(torch.count_nonzero(v))
                self._select.observe(v)
            return
        self._order.check(job)
        self._numel += taus[0].numel()
        self._dtype = taus[0].dtype
        if self._cut is not None and math.isinf(self._cut.value):
            return  # nothing selected: every sum stays 0, as the whole tensor's zeros sum to
        if self._cut is not None:
            self._select_block(taus, self._cut.value)
        self._offset += taus[0].numel()
        for piece in flat_pieces(*taus):
            for acc, p in zip(self._sums, piece, strict=True):
                x = p.to(torch.float64)
                acc.add(x * x)

    def _select_block(self, taus: Sequence[torch.Tensor], value: float) -> None:
        """`keep_selected` for a block of the energy pass, which also finds tie_end: the tied
        entries are counted, in flat index order, against those still to keep, and the flat
        index after the last one to keep is noted. Until then every tied entry is kept."""
        start = self._offset
        for piece in flat_pieces(*taus, size=_PIECE):
            v = _piece_spread(piece)
            if self._tie_end is None:
                tied = v == value
                n = int(torch.count_nonzero(tied))
                if n >= self._ties_left:
                    self._tie_end = start + int(torch.nonzero(tied).view(-1)[self._ties_left - 1]) + 1
                else:
                    self._ties_left -= n
            tie_end = self._tie_end if self._tie_end is not None else start + v.numel()
            keep = _piece_keep(v, Cut(value, tie_end), start).view(torch.uint8)
            for p in piece:
                p.mul_(keep)
            start += v.numel()

    def end_pass(self) -> bool:
        if self._select is None:
            return True
        self._select_passes += 1
        if self._select.end_pass():
            k = keep_count(self._nonzero, self._topk)
            if k == 0:
                self._cut = Cut(math.inf, 0)
            else:
                self._cut = Cut(self._select.value(), 0)  # tie_end: found by the energy pass
                self._ties_left = k - self._select.count_above()  # ≥ 1: the k-th largest is tied with itself
            self._select = None  # next: the energy pass
        return False

    def result(self) -> SceStats:
        cut = self._cut
        if cut is not None and not math.isinf(cut.value):
            if self._tie_end is None:
                raise RuntimeError("sce: the energy pass did not reach the last tied entry to keep")
            cut = Cut(cut.value, self._tie_end)
        means = [mean_square(acc.total(), self._numel, self._dtype) for acc in self._sums]
        return SceStats(cut=cut, weights=tuple(energy_weights(means, self._dtype)))


def erase_and_combine(taus: list[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Erase: Σᵢ wᵢeᵢτᵢ / max(Σᵢ wᵢeᵢ, 1e-6), eᵢ = 1 where τᵢ has the elected sign γ = sign(Σ τᵢ).

    Consumes `taus` (contiguous; overwritten, the first becomes the result), a bounded piece at
    a time: every operation is per entry, so pieces give the bits of the whole, and the
    election's float64 sums stay small. The election is `task_arithmetic`'s, on unit weights:
    exact in any model order. Each wᵢτᵢ is rounded before it is added, as mergekit's
    `(task_vectors * weights).sum(0)` rounds it; the agree factor is 0 or 1, so multiplying by
    it rounds nothing.
    """
    for piece in flat_pieces(*taus, size=_PIECE):
        _erase_piece(list(piece), weights)
    return taus[0]


def _erase_piece(taus: list[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`erase_and_combine` of one flat slice, written into the first τ's slice."""
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
    """Whole tensors select and weigh themselves; a row block takes the cut and the weights of
    its tensor from `SceSums` (`job.stats`)."""
    base = require_base(job, "sce")
    # our own buffers either way (fresh, or the disposable models), contiguous for the in-place pieces
    taus = [t.contiguous() for t in task_vectors(job, "sce")]
    if base.numel() == 0:
        return base.clone()
    if isinstance(job.stats, SceStats):
        keep_selected(taus, job.stats.cut, block_offset(job.rows, taus[0].numel()))
        weights = list(job.stats.weights)
    elif job.rows is not None:
        raise RuntimeError(f"sce: no whole-tensor statistics for a row block of tensor {job.name}")
    else:
        keep = variance_mask(taus, float(job.params["select_topk"]))
        if not bool(keep.all()):
            for t in taus:
                t.mul_(keep.view(torch.uint8))  # `sparsify.apply_mask`, in place
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
        # not row-local (the cut and the weights are tensor-wide): tensors above the engine's
        # whole-tensor limit stream in row blocks after `SceSums`' passes, the others stay whole
        tensor_reducer=lambda params, n_models: SceSums(params, n_models),
        paper="https://arxiv.org/abs/2408.07990",
        doc="methods/sce.md",
    )
)

