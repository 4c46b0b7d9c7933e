"""NearSwap (alchemonaut, QuartetAnemoi-70B; mergekit's `nearswap`): take the model's value where
it is near the base.

Per entry, with θ₀ the base and θ₁ the one other model:

    w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1)
    θ = w·θ₁ + (1 − w)·θ₀

Entries within t of the base are swapped for the model's (w = 1); a farther one moves towards
the model by w·|θ₁ − θ₀| = t exactly. So, up to rounding, NearSwap is θ₀ + clamp(θ₁ − θ₀, −t, t):
every change of the model is kept up to t in size and clipped beyond. (Below the 1e-6 floor,
with t < 1e-6, an entry moves by |θ₁ − θ₀|·t/1e-6, still less than t.) t is in the weights' own
units (typically 1e-4 to 1e-2); t = 0 gives the base, a t above every |θ₁ − θ₀| the model.

The float32 operations are mergekit's, in its order and with its roundings: `t / x` on a tensor
is torch's `reciprocal(x) * t` (two roundings, not one division), and the two products are
rounded before they are added. So the output is mergekit's bit for bit. Each entry depends on
itself alone: the method is row-local and light (a few elementwise operations).
"""

from __future__ import annotations

import torch

from .registry import MethodSpec, Param, TensorJob, register
from .task_arithmetic import check_shapes, require_base

DISTANCE_MIN = 1e-6  # mergekit's floor on |θ₀ − θ₁|: entries closer than this count as this close

T = Param(
    "t",
    "float",
    None,
    "Distance from the base (in weight units) within which the model's value is taken whole; "
    "farther entries get the weight t/|θ₀ − θ₁|. 0 gives the base.",
    minimum=0.0,
    required=True,
)


def nearswap_weight(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1), with mergekit's roundings (see the module)."""
    return torch.sub(base, model).abs_().clamp_(min=DISTANCE_MIN).reciprocal_().mul_(t).clamp_(0.0, 1.0)


def merge_nearswap(job: TensorJob) -> torch.Tensor:
    """w·θ₁ + (1 − w)·θ₀, in the model's buffer when the engine hands it over."""
    base = require_base(job, "nearswap")
    check_shapes(job, job.models, base)
    (model,) = job.models  # exactly one: max_models
    w = nearswap_weight(base, model, float(job.params["t"]))
    out = model.mul_(w) if job.models_disposable else model * w
    # 1 − w as −w + 1 (the negation is exact, so the same rounding), in w's own buffer
    return out.add_(w.neg_().add_(1.0).mul_(base))


SPEC = register(
    MethodSpec(
        name="nearswap",
        summary="NearSwap: take the model's value where it is within t of the base, "
                "interpolate towards it by t/|θ₀ − θ₁| elsewhere.",
        params=(T,),
        merge=merge_nearswap,
        needs_base=True,
        min_models=1,
        max_models=1,
        row_local=lambda params: True,
        light=True,
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        doc="methods/nearswap.md",
    )
)
