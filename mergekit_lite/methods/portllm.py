"""PortLLM (Khan et al., arXiv 2410.10870): carry a fine-tune's patch onto an evolved base.

θ_new' = θ_new + λ·Δ, where Δ is the patch of the fine-tune (a LoRA's s·B·A per module, or
θ_ft − θ_old for a full fine-tune). Tensors the patch does not touch stay θ_new's. The engine
turns the step's delta source into `job.delta` for the tensors it patches; tensors the source
replaces outright (PEFT's modules_to_save, when the old base is unknown) never reach this
function. See docs/methods/portllm.md.
"""

from __future__ import annotations

import torch

from ..errors import RecipeError
from .registry import MethodSpec, Param, TensorJob, register

LAMBDA = Param("lambda", "float", 1.0, "Scale of the ported patch (1 = the paper).")


def port(base: torch.Tensor, delta: torch.Tensor | None, lam: float = 1.0) -> torch.Tensor:
    """base + λ·delta in float32; the base itself when there is no delta for this tensor."""
    if delta is None:
        return base
    if delta.shape != base.shape:
        raise RecipeError(f"portllm: patch of shape {list(delta.shape)} does not fit base {list(base.shape)}")
    return base + float(lam) * delta


def merge(job: TensorJob) -> torch.Tensor:
    if job.base is None:
        raise RecipeError(f"portllm: a base model is required (tensor {job.name})")
    return port(job.base, job.delta, float(job.params.get("lambda", 1.0)))


SPEC = register(
    MethodSpec(
        name="portllm",
        summary="Port a LoRA or fine-tune patch from an old base onto a new one: θ_new + λ·Δ.",
        params=(LAMBDA,),
        merge=merge,
        needs_base=True,
        min_models=0,
        max_models=0,
        uses_delta=True,
        # θ_new + λΔ is elementwise; the engine keeps the tensors a delta changes whole, so the
        # others (Δ = None: the base itself) stream in row blocks
        row_local=lambda params: True,
        paper="https://arxiv.org/abs/2410.10870",
        doc="methods/portllm.md",
    )
)
