"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522): interpolate the average toward the base.

Per tensor, with τᵢ = θᵢ − θ₀ flattened: cos = mean over pairs i<j of cos(τᵢ, τⱼ) (norm product
clamped at 1e-6, cos clamped to [−1, 1], as mergekit), t = N·cos / (1 + (N−1)·cos),
θ = t·mean(θᵢ) + (1 − t)·θ₀. `filter_wise: true` computes cos and t per vector along the last
dimension instead (mergekit's option: a 2-D weight's rows; 1-D tensors are one vector). Needs at
least two fine-tuned models.

Degenerate case: 1 + (N−1)·cos ≥ 0 always (pairwise cosines of N vectors average ≥ −1/(N−1)),
with equality only when the directions cancel out; below 1e-6 we take t = 0 (the base) instead
of dividing by zero.

Memory: a tensor too big to hold whole at little cost (an embedding) is streamed in row blocks.
With one ratio per tensor it is read twice, once for the sums (`PairSums`, the method's
`tensor_reducer`) and once for the output; filter-wise each row needs only itself, and it is
read once. The sums are `fixed_order_sum`s either way, so blocks give the bits of the whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RecipeError
from .detmath import FlatSum, exact_divisor, fixed_order_row_sums, flat_pieces, row_sums64
from .registry import BlockOrder, MethodSpec, Param, TensorJob, register
from .task_arithmetic import check_shapes, require_base, task_vectors

NORM_PRODUCT_MIN = 1e-6
DENOMINATOR_MIN = 1e-6

FILTER_WISE = Param(
    "filter_wise", "bool", False, "Compute the interpolation ratio per row (output filter) instead of per tensor."
)


def _rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The vectors whose angles are taken, one per row: the whole tensor, or (filter-wise) each
    vector along the last dimension, as mergekit takes norms and dot products over dim −1
    (for a 2-D weight, its rows; a 1-D tensor is one vector either way)."""
    if not filter_wise or x.dim() < 2:
        return x.reshape(1, -1)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: a width of 0 leaves it undecided


def _cosines(squares: Sequence[torch.Tensor], dots: Mapping[tuple[int, int], torch.Tensor],
             dtype: torch.dtype) -> torch.Tensor:
    """Mean over pairs of cos(τᵢ, τⱼ) from float64 sums, one entry per row; rounded to `dtype`."""
    norms = [s.sqrt() for s in squares]
    cosines = []
    for (i, j), dot in sorted(dots.items()):
        product = (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_MIN)
        cosines.append((dot / product).clamp(-1, 1).to(dtype))
    # Each row's P cosines averaged as one contiguous run: a mean over dim 0 of [P, rows] rounds a
    # column by where it falls in the vector lanes, so a row block of another height (filter-wise
    # streaming) rounded some rows' means differently. On CUDA a mean multiplies by 1/P (docs/cli.md).
    return torch.stack(cosines, dim=-1).mean(dim=-1)


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def mean_pairwise_cos(taus: list[torch.Tensor],
                      row_sums: Callable[[torch.Tensor], torch.Tensor] = fixed_order_row_sums) -> torch.Tensor:
    """Mean over pairs of row-wise cosines; rows are the last dim of each [rows, cols] input.

    Norms and dot products are float64 sums in a fixed order (`row_sums`), then rounded to
    float32: a whole-tensor float32 sum would change with the thread count.
    """
    squares = [row_sums(t * t) for t in taus]
    dots = {(i, j): row_sums(taus[i] * taus[j]) for i, j in _pairs(len(taus))}
    return _cosines(squares, dots, taus[0].dtype)


class PairSums:
    """‖τᵢ‖² and τᵢ·τⱼ over one whole tensor, fed in consecutive pieces (row blocks, in order):
    `fixed_order_sum`s of the float32 products, the bits `mean_pairwise_cos` has on the tensor
    held whole. Model Stock's `tensor_reducer`, and its whole-tensor sums too."""

    def __init__(self, n_models: int) -> None:
        self._squares = [FlatSum() for _ in range(n_models)]
        self._dots = {pair: FlatSum() for pair in _pairs(n_models)}
        self._dtype, self._device = torch.float32, torch.device("cpu")  # the task vectors'
        self._order = BlockOrder()

    def add(self, taus: Sequence[torch.Tensor]) -> None:
        self._dtype, self._device = taus[0].dtype, taus[0].device
        for piece in flat_pieces(*taus):  # bounded float32 products
            for i, x in enumerate(piece):
                self._squares[i].add(x * x)
            for (i, j), acc in self._dots.items():
                acc.add(piece[i] * piece[j])

    def observe(self, job: TensorJob) -> None:
        self._order.check(job)
        self.add(task_vectors(job, "model_stock"))

    def end_pass(self) -> bool:
        return True

    def result(self) -> StockCosine:
        squares = [self._as_row(s) for s in self._squares]
        return StockCosine(_cosines(squares, {k: self._as_row(v) for k, v in self._dots.items()}, self._dtype))

    def _as_row(self, acc: FlatSum) -> torch.Tensor:
        """A sum as `fixed_order_row_sums` gives a one-row tensor's: float64, shape [1], on the device."""
        return torch.tensor([acc.total()], dtype=torch.float64, device=self._device)


@dataclass(frozen=True)
class StockCosine:
    """The mean pairwise cosine of one whole tensor's task vectors (shape [1])."""

    cos: torch.Tensor


def stock_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    denominator = 1 + (n - 1) * cos
    safe = denominator.abs() >= DENOMINATOR_MIN
    return torch.where(safe, n * cos / torch.where(safe, denominator, 1.0), 0.0)


def merge_model_stock(job: TensorJob) -> torch.Tensor:
    if len(job.models) < 2:
        raise RecipeError(f"model_stock: needs at least two fine-tuned models, got {len(job.models)}")
    filter_wise = bool(job.params.get("filter_wise", False))
    check_shapes(job, job.models, require_base(job, "model_stock"))
    assert job.base is not None
    base = _rows(job.base, filter_wise)
    mean = torch.zeros_like(base)
    for m in job.models:  # before the task vectors, which may be computed in the models' buffers
        mean += _rows(m, filter_wise)
    mean /= exact_divisor(len(job.models), mean)
    if filter_wise:
        # a ≥2-D tensor's rows may arrive in blocks: each row's sums must not depend on its block
        row_sums = row_sums64 if job.base.dim() >= 2 else fixed_order_row_sums
        cos = mean_pairwise_cos([_rows(t, True) for t in task_vectors(job, "model_stock")], row_sums)
    elif isinstance(job.stats, StockCosine):  # a row block of a big tensor: its cosine, from all of it
        cos = job.stats.cos
    elif job.rows is None:
        sums = PairSums(len(job.models))
        sums.add(task_vectors(job, "model_stock"))
        cos = sums.result().cos
    else:
        raise RuntimeError(f"model_stock: no cosine for a row block of tensor {job.name}")
    t = stock_ratio(cos, len(job.models)).unsqueeze(-1)  # [rows, 1]
    return (t * mean + (1 - t) * base).reshape(job.base.shape)


def _tensor_reducer(params: Mapping[str, Any], n_models: int) -> PairSums | None:
    return None if params.get("filter_wise", False) else PairSums(n_models)


SPEC = register(
    MethodSpec(
        name="model_stock",
        summary="Model Stock: average the models, then pull toward the base by their task-vector angle.",
        params=(FILTER_WISE,),
        merge=merge_model_stock,
        needs_base=True,
        min_models=2,
        # filter-wise, each row's ratio depends on that row alone; per tensor, a big tensor's
        # cosine is summed over its row blocks first
        row_local=lambda params: bool(params.get("filter_wise", False)),
        tensor_reducer=_tensor_reducer,
        paper="https://arxiv.org/abs/2403.19522",
        doc="methods/model_stock.md",
    )
)
