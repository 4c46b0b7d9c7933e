"""Linear merge (weighted average of the models, "model soups").

θ = Σ wᵢθᵢ / Σ wᵢ, or Σ wᵢθᵢ with `normalize: false`. The base, if the step names one, is not
used: a linear merge averages parameters, not task vectors (list the base among the models to
include it, as in mergekit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import RecipeError
from .detmath import exact_divisor
from .registry import MethodSpec, Param, TensorJob, register
from .task_arithmetic import WEIGHT, check_shapes, normalize_param, per_model, weight_sum, weighted_first


def merge_linear(job: TensorJob) -> torch.Tensor:
    models = job.models
    check_shapes(job, models, models[0])
    weights = per_model(job.params, "weight", len(models))
    out = weighted_first(models[0], weights[0], in_place=job.models_disposable)
    for m, w in zip(models[1:], weights[1:], strict=True):
        out += m if w == 1 else m * w  # m * 1.0 is m, bit for bit; skip the pass
    if job.params["normalize"]:
        total = weight_sum(weights)
        if total == 0:
            raise RecipeError(
                f"linear: the weights sum to 0 for tensor {job.name}; "
                "a weighted average is undefined (set normalize: false or change the weights)"
            )
        out /= exact_divisor(total, out)
    return out


PARAMS: tuple[Param, ...] = (WEIGHT, normalize_param(True))


def weights_sum_problem(params: Mapping[str, Any], n: int) -> str | None:
    """The plan's check before a run: normalising by weights that sum to 0 has no answer."""
    if params["normalize"] and weight_sum(per_model(params, "weight", n)) == 0:
        return ("the weights sum to 0, so a weighted average is undefined "
                "(set normalize: false or change the weights)")
    return None

SPEC = register(
    MethodSpec(
        name="linear",
        summary="Weighted average Σ wᵢθᵢ / Σ wᵢ of the models (no base needed).",
        params=PARAMS,
        merge=merge_linear,
        needs_base=False,
        min_models=1,
        base_joins_models=True,  # mergekit averages a base_model that models leaves out in
        paper="https://arxiv.org/abs/2203.05482",
        doc="methods/linear.md",
        row_local=lambda params: True,
        light=True,
        check=weights_sum_problem,
    )
)
