"""Arcee Fusion (mergekit's `arcee_fusion`): take the fine-tune's entries that changed the most.

Per tensor, with a base θ₀ and one fine-tune θ₁: each vector along the last dimension (a 2-D
weight's rows; a 1-D tensor is one vector) gets a KL divergence between the softmaxes of its
two versions, KL = Σ p·log(p/q) with p = softmax(θ₁) + 1e-8 and q = softmax(θ₀) + 1e-8, and
each entry an importance |θ₁ − θ₀|·KL of its row. Entries whose importance reaches the outlier
fence median + 1.5·(Q3 − Q1) of the tensor's importances take the fine-tune's value, the others
keep the base's: θ = θ₀ + (θ₁ − θ₀)·mask. So a tensor moves only where a change is both large
and in a row whose output distribution it shifts.

Quantiles are index quantiles as mergekit takes them: the value at sorted position
⌊q·(n−1)⌋, the product taken in float32. mergekit sorts a random sample of 1,000,000 entries
(drawn with replacement, unseeded) when a tensor has more; we select the exact order
statistics of every entry (`select.kth_smallest_many`, no full sort), so tensors of up to 1M
entries give mergekit's mask and bigger ones mergekit's mask without its sampling noise.

The elementwise maths (softmax, the 1e-8, log, products) is float32 torch, as in mergekit; only
each row's KL sum is a float64 sum in a fixed order (`detmath.row_sums64`), rounded to float32,
so the result does not depend on threads (torch splits a single long row's float32 sum by
thread count). Rows are scored a bounded group at a time: the temporaries stay small.

Memory. An importance depends on its own row alone (a row's KL sum has the same bits in any
group of rows), so a row block's importances are the whole tensor's importances of those rows;
only the fence is tensor-wide. A tensor above the engine's whole-tensor limit therefore streams
in row blocks: two passes select the three quantiles exactly over the blocks' importances
(`FenceSelect`, the method's `tensor_reducer`, on `stats.BracketSelect`), then each block is
masked against that fence. Both selections are exact, so blocks give the whole tensor's bits
(a quantile of 0 may come back as +0.0 where the whole tensor's is −0.0: the same fence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RecipeError
from .detmath import row_sums64
from .registry import MethodSpec, TensorJob, register
from .select import kth_smallest_many
from .stats import BracketSelect
from .task_arithmetic import check_shapes, require_base

SOFTMAX_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)
FENCE = 1.5  # Tukey's outlier fence: median + 1.5 interquartile ranges
_GROUP = 1 << 20  # entries per group of rows scored at once


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The vectors softmax runs over, one per row: along the last dimension (a 0-d tensor is one
    vector of one entry)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def row_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(θ₁) + ε ‖ softmax(θ₀) + ε) of every row, as a float32 column [rows, 1]."""
    a, b = _rows(model), _rows(base)
    out = torch.empty(a.shape[0], 1, dtype=a.dtype, device=a.device)
    step = max(1, _GROUP // max(1, a.shape[1]))
    for start in range(0, a.shape[0], step):
        p = torch.softmax(a[start : start + step], dim=-1).add_(SOFTMAX_EPS)
        q = torch.softmax(b[start : start + step], dim=-1).add_(SOFTMAX_EPS)
        terms = torch.div(p, q, out=q).log_().mul_(p)  # p·log(p/q), in q's buffer
        out[start : start + step, 0] = row_sums64(terms).to(out.dtype)
    return out


def quantile_positions(count: int) -> list[int]:
    """Sorted positions ⌊q·(count − 1)⌋ of Q1, the median and Q3, the product in float32 (as
    mergekit computes it: from 5,592,410 entries on, Q3's float32 product can round up)."""
    scaled = torch.tensor(QUANTILES, dtype=torch.float32) * (count - 1)
    return [int(v) for v in scaled.tolist()]


def fence_of(q1: torch.Tensor, median: torch.Tensor, q3: torch.Tensor) -> torch.Tensor:
    """median + 1.5·(Q3 − Q1) from the three quantiles (float32 0-d tensors), in float32 as mergekit."""
    return median + FENCE * (q3 - q1)


def fence(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5·(Q3 − Q1) of every entry, a float32 0-d tensor on importance's device."""
    q1, median, q3 = kth_smallest_many(importance, [i + 1 for i in quantile_positions(importance.numel())])
    return fence_of(q1, median, q3).to(importance.device)


def importance_of(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ₁ − θ₀| · KL(row), one row per vector along the last dimension ([rows, last dim])."""
    kl = row_kl(model, base)
    return _rows(model - base).abs_().mul_(kl)


def _model(job: TensorJob) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, the one model), checked."""
    base = require_base(job, "arcee_fusion")
    if len(job.models) != 1:
        raise RecipeError(f"arcee_fusion: needs exactly one model besides the base, got {len(job.models)} "
                          f"(tensor {job.name})")
    check_shapes(job, job.models, base)
    return base, job.models[0]


@dataclass(frozen=True)
class Fence:
    """A whole tensor's fence, for its row blocks (a float32 value)."""

    value: float


class FenceSelect:
    """Q1, the median and Q3 of a big tensor's importances over its row blocks: the exact order
    statistics `fence` takes on the whole tensor (`stats.BracketSelect`, two passes, or four if
    its sample misses), at mergekit's float32 positions."""

    expected_passes = 2  # read by the planner

    def __init__(self) -> None:
        self._select = BracketSelect(1, lambda _row, count: quantile_positions(count))

    def observe(self, job: TensorJob) -> None:
        base, model = _model(job)
        if model.numel():
            self._select.observe(0, importance_of(model, base))

    def end_pass(self) -> bool:
        return self._select.end_pass()

    def result(self) -> Fence:
        q1, median, q3 = self._select.values()[0]
        return Fence(float(fence_of(q1, median, q3)))


def merge_arcee_fusion(job: TensorJob) -> torch.Tensor:
    """A whole tensor finds its own fence; a row block takes its tensor's from `FenceSelect`."""
    base, model = _model(job)
    if model.numel() == 0:
        return base.clone()
    kl = row_kl(model, base)
    diff = model.sub_(base) if job.models_disposable else model - base
    importance = _rows(diff).abs().mul_(kl)
    if isinstance(job.stats, Fence):
        cut = torch.tensor(job.stats.value, dtype=importance.dtype, device=importance.device)
    elif job.rows is not None:
        raise RuntimeError(f"arcee_fusion: no whole-tensor fence for a row block of tensor {job.name}")
    else:
        cut = fence(importance)
    keep = importance.ge_(cut)  # 1.0 where the change is kept, in importance's buffer
    return diff.mul_(keep.view(diff.shape)).add_(base)  # θ₀ + x and x + θ₀ are the same bits


SPEC = register(
    MethodSpec(
        name="arcee_fusion",
        summary="Arcee Fusion: keep the fine-tune's entries whose change × row KL is an outlier; else the base.",
        params=(),
        merge=merge_arcee_fusion,
        needs_base=True,
        min_models=1,
        max_models=1,
        # the fence is tensor-wide: tensors above the engine's whole-tensor limit stream in row
        # blocks after `FenceSelect`'s passes, the others stay whole
        tensor_reducer=lambda params, n_models: FenceSelect(),
        paper="https://arcee.ai",
        doc="methods/arcee_fusion.md",
    )
)
