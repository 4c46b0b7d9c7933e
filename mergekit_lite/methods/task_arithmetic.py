"""Task arithmetic (Ilharco et al., arXiv 2212.04089) and the combination step it shares.

θ = θ₀ + λ Σ wᵢ τᵢ. Every sparsifying method (TIES, DARE, breadcrumbs, DELLA) is "thin each τᵢ,
then combine like task arithmetic, optionally with TIES' sign election", so the combination and
the common parameters live here once. The combination follows mergekit's generalized task
arithmetic exactly: weight, optionally elect signs on the weighted deltas, optionally divide by
the weights that contributed, then multiply by λ (after normalising).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import CheckpointError, RecipeError
from .detmath import exact_divisor
from .registry import MethodSpec, Param, TensorJob, register
from .sparsify import elect_signs

# Below this |Σ w| a plain (non-elected) normalisation divides by 1 instead, as mergekit does.
WEIGHT_SUM_EPS = 1e-8

WEIGHT = Param(
    "weight", "float", 1.0, "Weight of this model's task vector (negative = subtract it).", per_model=True
)
DENSITY = Param(
    "density",
    "float",
    1.0,
    "Fraction of each task vector's entries kept (1 = keep all).",
    per_model=True,
    minimum=0.0,
    min_exclusive=True,
    maximum=1.0,
)
LAMBDA = Param("lambda", "float", 1.0, "Scale of the merged task vector, applied after normalising.")
INT8_MASK = Param(
    "int8_mask",
    "bool",
    False,
    "Accepted for mergekit recipes and ignored: in mergekit it only saves memory, the output is identical.",
)
RESCALE = Param(
    "rescale",
    "str",
    "paper",
    "How kept entries are rescaled: paper = divide by the keep probability, "
    "l1 = match the task vector's L1 norm (mergekit), none = no rescaling.",
    choices=("paper", "l1", "none"),
)


def normalize_param(default: bool) -> Param:
    return Param(
        "normalize",
        "bool",
        default,
        "Divide the merged task vector by the sum of the weights of the models that contributed.",
    )


def weight_sum(weights: Sequence[float]) -> float:
    """Σ wᵢ as float32 maths gives it (the weights rounded to float32, added in float32).

    The normalising divisor and its near-zero guard must see the same sum as mergekit's, which
    adds the weights as a float32 tensor: weights that cancel, like (0.7, −0.3, −0.4), sum to
    −2.98e-8 in float32 but 5.6e-17 in float64, and the two fall on opposite sides of 1e-8.
    """
    return _float32_sum(tuple(float(w) for w in weights))


@functools.lru_cache(maxsize=256)
def _float32_sum(weights: tuple[float, ...]) -> float:
    # cached: a step asks once per tensor (per row block when streaming), always with the same weights
    return float(torch.tensor(weights, dtype=torch.float32).sum())


def per_model(params: Mapping[str, Any], name: str, n: int) -> tuple[float, ...]:
    """A per-model parameter as n floats (the engine passes tuples; a scalar is broadcast)."""
    value = params[name]
    if isinstance(value, (int, float)):
        return (float(value),) * n
    values = tuple(float(v) for v in value)
    if len(values) != n:
        raise RecipeError(f"parameter {name!r}: {len(values)} values for {n} models")
    return values


def require_base(job: TensorJob, method: str) -> torch.Tensor:
    if job.base is None:
        raise RecipeError(f"{method}: a base model is required (tensor {job.name})")
    return job.base


def check_shapes(job: TensorJob, tensors: Sequence[torch.Tensor], reference: torch.Tensor) -> None:
    for i, t in enumerate(tensors):
        if t.shape != reference.shape:
            raise CheckpointError(
                f"tensor {job.name}: model {i + 1} has shape {tuple(t.shape)}, "
                f"expected {tuple(reference.shape)}"
            )


def task_vectors(job: TensorJob, method: str) -> list[torch.Tensor]:
    """τᵢ = θᵢ − θ₀ for every model (shapes checked), in the models' own buffers when disposable."""
    base = require_base(job, method)
    check_shapes(job, job.models, base)
    if job.models_disposable:
        return [m.sub_(base) for m in job.models]
    return [m - base for m in job.models]


def weighted_first(t: torch.Tensor, w: float, *, in_place: bool) -> torch.Tensor:
    """w·t, the start of a weighted sum: t itself (or a copy) when w is 1, since t·1.0 is t bit for bit.

    Starting a sum from its first term rather than from zeros saves a fill and an add per
    tensor, and keeps a −0 first term −0 (0 + −0 would be +0).
    """
    if in_place:
        return t if w == 1 else t.mul_(w)
    return t.clone() if w == 1 else t * w


def combine(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], *, elect: bool, normalize: bool, lam: float,
    owned: bool = False,
) -> torch.Tensor:
    """λ · combine(wᵢ τ̂ᵢ): the shared final step of every task-vector method.

    Without election: Σ wᵢτ̂ᵢ, divided by Σ wᵢ when normalising (by 1 if |Σ wᵢ| < 1e-8).
    With election (TIES): γ = sign(Σ wᵢτ̂ᵢ) (0 elects +); only entries whose weighted value
    wᵢτ̂ᵢ has sign γ count (zeros never do); normalising divides each entry by the sum of the
    weights that counted there (by 1 where none did, so dropped entries stay at the base).
    Works in the deltas' dtype (the election's sum in float64), accumulating model by model (no
    n-fold stack). The deltas are not modified unless `owned` (distinct tensors the caller
    drops afterwards): an election then turns each into wᵢτ̂ᵢ in place, once, where it would
    otherwise compute every product twice, for the vote and for the sum (three models: about
    8% of the combination's time).

    Each product wᵢτ̂ᵢ is rounded before it is added, as mergekit's `(deltas * weights).sum(0)`
    does. torch's `add_(d, alpha=w)` would be shorter, but on CPUs with FMA (and on GPUs) it
    fuses the product into the add, skipping that rounding: the bits then depend on the machine,
    and where rounded products cancel exactly (0.3·τ − 0.3·τ) a leftover of 1e-10 would decide
    TIES' sign election instead of the documented "a zero sum elects +".
    """
    ref = deltas[0]
    scratch = torch.empty_like(ref) if any(w != 1 for w in weights) and not (elect and owned) else None

    def weighted(d: torch.Tensor, w: float) -> torch.Tensor:
        """wᵢτ̂ᵢ, rounded before it is added (see above); d itself when w is 1."""
        return d if w == 1 else torch.mul(d, w, out=scratch)

    if elect:
        if owned:  # each product made once, in its delta (the same bits as in the scratch buffer)
            deltas = [d if w == 1 else d.mul_(w) for d, w in zip(deltas, weights, strict=True)]
        pending = [1.0] * len(deltas) if owned else weights  # the weights `weighted` still applies
        gamma = _elect(deltas, pending, weighted)
        mixed = torch.zeros_like(ref)
        divisor = torch.zeros_like(ref) if normalize else None
        agree = torch.empty_like(ref)
        for d, w, p in zip(deltas, weights, pending, strict=True):
            wd = weighted(d, p)
            torch.mul(wd, gamma, out=agree)
            agree.gt_(0)  # in place, in the float dtype: 1 where wᵢτ̂ᵢ has the elected sign, else 0
            mixed.addcmul_(wd, agree)  # + wᵢτ̂ᵢ·1 or + 0: the same bits as a masked add
            if divisor is not None:
                divisor.add_(agree, alpha=w)  # agree·w is 0 or w exactly: no rounding to fuse away
        if divisor is not None:
            divisor.add_(divisor.clone().eq_(0))  # 0 → 1 where no model counted (float ops, see elect_signs)
            mixed /= divisor
        return _normalize_and_scale(mixed, weights, False, lam)  # the divisor did the normalising
    mixed = weighted_first(ref, weights[0], in_place=owned)
    for d, w in zip(deltas[1:], weights[1:], strict=True):
        mixed.add_(weighted(d, w))
    return _normalize_and_scale(mixed, weights, normalize, lam)


def _elect(deltas: Sequence[torch.Tensor], weights: Sequence[float],
           weighted: Callable[[torch.Tensor, float], torch.Tensor]) -> torch.Tensor:
    """γ = sign(Σ wᵢτ̂ᵢ) (a zero sum elects +), the exact sum's sign whatever the models' order.

    Each product is rounded to float32 first, as in mergekit. Two rounded products sum to 0 in
    float32 only when they cancel exactly, and their sum is commutative: float32 gives the exact
    sign. From three on a float32 fold depends on the order (cancelling products round to 0 in
    one order and to −2e-10 in another, electing opposite signs), so the sum is taken in
    float64, where n float32 products add exactly while their magnitudes at one position lie
    within a factor 2^(29 − ⌈log₂ n⌉) of each other (2^27 for three or four models), and an
    exact sum has the exact sign in any order; beyond that spread the sign can only be wrong
    where large products cancel to within the smallest one. `weighted` may return one reused
    buffer: each product is consumed before the next is made.
    """
    if len(deltas) <= 2:
        total = torch.zeros_like(deltas[0])
        for d, w in zip(deltas, weights, strict=True):
            total.add_(weighted(d, w))
        return elect_signs(total)
    total = torch.empty(deltas[0].shape, dtype=torch.float64, device=deltas[0].device)
    part = torch.empty_like(total)
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        if i == 0:
            total.copy_(weighted(d, w))
        else:
            total.add_(part.copy_(weighted(d, w)))  # a float64 add: mixed-dtype adds are 2x slower
    return total.ge_(0).to(deltas[0].dtype).mul_(2).sub_(1)  # as elect_signs, on our own buffer


def _normalize_and_scale(mixed: torch.Tensor, weights: Sequence[float], normalize: bool, lam: float) -> torch.Tensor:
    """In place: Σ wᵢτ̂ᵢ → λ · Σ wᵢτ̂ᵢ / Σ wᵢ (no division when not normalising, or |Σ wᵢ| < 1e-8)."""
    if normalize:
        s = weight_sum(weights)
        if abs(s) >= WEIGHT_SUM_EPS:  # below it mergekit divides by 1: nothing to do
            mixed /= exact_divisor(s, mixed)
    if lam != 1:
        mixed *= lam
    return mixed


def row_local_unless_l1(params: Mapping[str, Any]) -> bool:
    """Random-drop methods are row-local except with `rescale: l1`, which needs whole-tensor norms."""
    return params.get("rescale", "paper") != "l1"


def add_to_base(job: TensorJob, deltas: Sequence[torch.Tensor], *, elect: bool) -> torch.Tensor:
    """θ₀ + combine(τ̂ᵢ) with the step's weight, normalize and lambda: every task-vector method's end.

    The deltas are consumed (`owned`): callers pass distinct tensors of their own.
    """
    mixed = combine(
        deltas,
        per_model(job.params, "weight", len(deltas)),
        elect=elect,
        normalize=bool(job.params["normalize"]),
        lam=float(job.params["lambda"]),
        owned=True,  # every caller hands over its thinned task vectors, fresh or disposable
    )
    return mixed.add_(require_base(job, "add_to_base"))  # mixed is ours: θ₀ + x == x + θ₀, bit for bit


def merge_task_arithmetic(job: TensorJob) -> torch.Tensor:
    """`add_to_base(task_vectors(...))` without holding n task vectors or a fresh θ₀ + x.

    The same float32 operations in the same order, so the same bits, in about half the time:
    the sum is built in place from its first term, and each τᵢ is computed in one reused
    scratch buffer (or, when the engine hands over disposable models, in the model's own
    buffer), so a row block's working set stays in the CPU caches (a 1.5B merge of 3 models
    spends most of its compute time here).
    """
    base = require_base(job, "task_arithmetic")
    check_shapes(job, job.models, base)
    weights = per_model(job.params, "weight", len(job.models))
    own = job.models_disposable
    scratch = None if own else torch.empty_like(base)
    mixed: torch.Tensor | None = None
    for m, w in zip(job.models, weights, strict=True):
        delta = m.sub_(base) if own else torch.sub(m, base, out=scratch)
        if mixed is None:
            # The first term needs a buffer of its own unless it already is the model's.
            mixed = weighted_first(delta, w, in_place=own)
        else:
            mixed.add_(delta if w == 1 else delta.mul_(w))  # rounded product, then add: see combine
    assert mixed is not None  # min_models = 1
    _normalize_and_scale(mixed, weights, bool(job.params["normalize"]), float(job.params["lambda"]))
    return mixed.add_(base)


SPEC = register(
    MethodSpec(
        name="task_arithmetic",
        summary="θ₀ + λ Σ wᵢ(θᵢ − θ₀): add (or, with negative weights, subtract) task vectors.",
        params=(WEIGHT, LAMBDA, normalize_param(False), INT8_MASK),
        merge=merge_task_arithmetic,
        needs_base=True,
        min_models=1,
        paper="https://arxiv.org/abs/2212.04089",
        doc="methods/task_arithmetic.md",
        row_local=lambda params: True,
        light=True,
    )
)
