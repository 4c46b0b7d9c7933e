"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522): interpolate the average toward the base.

Per tensor, with τᵢ = θᵢ − θ₀ flattened: cos = mean over pairs i<j of cos(τᵢ, τⱼ) (norm product
clamped at 1e-6, cos clamped to [−1, 1], as mergekit), t = N·cos / (1 + (N−1)·cos),
θ = t·mean(θᵢ) + (1 − t)·θ₀. `filter_wise: true` computes cos and t per vector along the last
dimension instead (mergekit's option: a 2-D weight's rows; 1-D tensors are one vector). Needs at
least two fine-tuned models.

Degenerate case: 1 + (N−1)·cos ≥ 0 always (pairwise cosines of N vectors average ≥ −1/(N−1)),
with equality only when the directions cancel out; below 1e-6 we take t = 0 (the base) instead
of dividing by zero.
"""

from __future__ import annotations

import torch

from ..errors import RecipeError
from .detmath import exact_divisor, fixed_order_row_sums
from .registry import MethodSpec, Param, TensorJob, register
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
    return x.reshape(-1, x.shape[-1])


def mean_pairwise_cos(taus: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs of row-wise cosines; rows are the last dim of each [rows, cols] input.

    Norms and dot products are float64 sums in a fixed order (`fixed_order_row_sums`), then
    rounded to float32: a whole-tensor float32 sum would change with the thread count.
    """
    norms = [fixed_order_row_sums(t * t).sqrt() for t in taus]
    cosines = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            product = (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_MIN)
            cosines.append((fixed_order_row_sums(taus[i] * taus[j]) / product).clamp(-1, 1).to(taus[i].dtype))
    return torch.stack(cosines).mean(dim=0)  # as mergekit; on CUDA a mean multiplies by 1/N (docs/cli.md)


def stock_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    denominator = 1 + (n - 1) * cos
    safe = denominator.abs() >= DENOMINATOR_MIN
    return torch.where(safe, n * cos / torch.where(safe, denominator, 1.0), 0.0)


def merge_model_stock(job: TensorJob) -> torch.Tensor:
    if len(job.models) < 2:
        raise RecipeError(f"model_stock: needs at least two fine-tuned models, got {len(job.models)}")
    filter_wise = bool(job.params.get("filter_wise", False))
    check_shapes(job, job.models, require_base(job, "model_stock"))
    base = _rows(job.base, filter_wise)  # type: ignore[arg-type]
    mean = torch.zeros_like(base)
    for m in job.models:  # before the task vectors, which may be computed in the models' buffers
        mean += _rows(m, filter_wise)
    mean /= exact_divisor(len(job.models), mean)
    taus = task_vectors(job, "model_stock")
    rows = [_rows(t, filter_wise) for t in taus]
    t = stock_ratio(mean_pairwise_cos(rows), len(taus)).unsqueeze(-1)  # [rows, 1]
    return (t * mean + (1 - t) * base).reshape(job.base.shape)  # type: ignore[union-attr]


SPEC = register(
    MethodSpec(
        name="model_stock",
        summary="Model Stock: average the models, then pull toward the base by their task-vector angle.",
        params=(FILTER_WISE,),
        merge=merge_model_stock,
        needs_base=True,
        min_models=2,
        paper="https://arxiv.org/abs/2403.19522",
        doc="methods/model_stock.md",
    )
)
