"""Passthrough (mergekit's `passthrough`): one model, copied, each tensor optionally scaled.

θ = s·θ₁ with s = `scale` (default 1: the model itself, bit for bit). mergekit users reach for
it to convert a checkpoint's dtype, to zero or damp chosen tensors (`scale` with filters or a
layer gradient: `[{filter: o_proj, value: 0}, {value: 1}]`), and as the method of `slices:`
recipes. mlite reads a `slices:` recipe when it is one slice over every layer (docs/recipes.md),
so stacking layer ranges of several models (frankenmerges) stays refused. In a chain it rescales
an earlier step's output.

One float32 product per entry, mergekit's own (`tensor * scale`), so the output is mergekit's
bit for bit; scale 1 multiplies nothing, as mergekit skips the product when no scale is given.
"""

from __future__ import annotations

import torch

from .registry import MethodSpec, Param, TensorJob, register

SCALE = Param("scale", "float", 1.0, "Factor applied to every entry of the tensor (1 = the model as it is).",
              per_model=True)


def merge_passthrough(job: TensorJob) -> torch.Tensor:
    """s·θ₁, in the model's buffer when the engine hands it over."""
    (model,) = job.models  # exactly one: max_models
    (scale,) = job.params["scale"]
    if scale == 1.0:
        return model if job.models_disposable else model.clone()
    return model.mul_(scale) if job.models_disposable else model * scale


SPEC = register(
    MethodSpec(
        name="passthrough",
        summary="Passthrough: one model as it is, or with each tensor scaled (mergekit's passthrough).",
        params=(SCALE,),
        merge=merge_passthrough,
        needs_base=False,
        min_models=1,
        max_models=1,
        row_local=lambda params: True,
        light=True,
        paper="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/passthrough.py",
        doc="methods/passthrough.md",
    )
)
