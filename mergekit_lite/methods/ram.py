"""RAM: Reinforced Agent Merging (arXiv 2601.13572), mergekit's `ram` and `ramplus_tl`.

Per tensor, with τᵢ = θᵢ − θ₀ for N models and a threshold ε (`epsilon`): model i *moved*
entry p when |τᵢ[p]| > ε, and c[p] counts the models that moved it. An entry moved by one model
takes that model's change whole; an entry moved by several takes the mean of their changes
(the models that did not move it are left out of the mean, so they do not dilute it); an entry
nobody moved stays at the base:

    ram:         θ = θ₀ + Σᵢ mᵢ·τᵢ / max(c, 1)              mᵢ = [|τᵢ| > ε]

`ramplus_tl` (RAM+, tensor-local) also rescales each model's *unique* entries (c = 1). Over the
whole tensor, model i has sᵢ shared moved entries (c > 1) and uᵢ unique ones; the more of its
changes it shares, the more its unique changes are boosted:

    ρᵢ = sᵢ / max(uᵢ, ε),   λᵢ = 1 + r·clamp(ρᵢ, 0, α)
    ramplus_tl:  θ = θ₀ + Σᵢ mᵢ·τᵢ·(λᵢ where c = 1, 1/c where c > 1)

The arithmetic is mergekit 0.1.5's, operation for operation: the threshold compares in the
tensors' dtype (ε rounded to float32, as torch rounds a Python number to a float32 tensor's
dtype), each term mᵢτᵢ/c (or mᵢτᵢ·λᵢ) is rounded before the terms are added in model order,
and only then is the base added. The counts sᵢ, uᵢ are integers, so they are exact however a
tensor is split; ρ and λ are then computed from them with mergekit's own torch operations on a
small int64 tensor (int64 counts clamped by the float ε become float32, divided in float32), so
λ has mergekit's float32 bits. A non-finite τ comes out non-finite as in mergekit (the masks are
multiplied in, never selected with `where`), so the engine's finiteness check names the input.

`ram` depends on each entry alone: row-local, big tensors stream in row blocks. `ramplus_tl`
needs sᵢ and uᵢ over the whole tensor: a tensor held whole counts them itself; a big one is
read twice in row blocks, once to count (`RamCounter`, the method's `tensor_reducer`) and once
to write, with the same bits. Memory: the task vectors (in the models' own buffers when the
engine hands them over), the count and one mask buffer shared by the models; ramplus_tl adds
three entry-sized buffers (which model moved an entry, and the 0/1 and λ scales). On one CPU
thread, 3 models × 4M entries: ram 28 ms, ramplus_tl 72 ms (task_arithmetic 8 ms, sce 71 ms),
so ram counts as light and ramplus_tl does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .registry import MethodSpec, Param, TensorJob, register
from .task_arithmetic import check_shapes, require_base, task_vectors

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

_EPSILON_HELP = ("Threshold on |θᵢ − θ₀|: a model moved an entry when its change exceeds it "
                 "(entries it did not move are dropped from its task vector).")
EPSILON = Param("epsilon", "float", 1e-5, _EPSILON_HELP, minimum=0.0)
# ramplus_tl also floors the divisor of ρ with it: at 0, a model that left a tensor unchanged gives 0/0
EPSILON_PLUS = Param("epsilon", "float", 1e-5, _EPSILON_HELP + " Also the floor of ρ's divisor, so > 0.",
                     minimum=0.0, min_exclusive=True)
R = Param("r", "float", 0.1, "Boost of a model's unique entries per unit of its shared/unique ratio ρ "
          "(λ = 1 + r·clamp(ρ, 0, alpha)); 0 gives plain ram.")
ALPHA = Param("alpha", "float", 0.2, "Cap on the ratio ρ in λ = 1 + r·clamp(ρ, 0, alpha).")


@dataclass(frozen=True)
class RamCounts:
    """Per model, over one whole tensor: its moved entries that others moved too (shared) and
    those it alone moved (unique). All that ramplus_tl's λᵢ depend on."""

    shared: tuple[int, ...]
    unique: tuple[int, ...]


def mask_and_count(taus: Sequence[torch.Tensor], epsilon: float, *,
                   per_model: bool = False) -> tuple[torch.Tensor, RamCounts | None]:
    """Zero each τᵢ where it did not move (in place: mᵢτᵢ, so a NaN stays NaN as NaN·0) and
    return c = Σᵢ mᵢ at each entry (in τ's float dtype: small integers, exact).

    With `per_model`, also each model's shared and unique counts over these entries: uᵢ is the
    number of entries with c = 1 whose one mover is i (read off Σᵢ i·mᵢ, which is i there), and
    sᵢ = #mᵢ − uᵢ (a moved entry has c ≥ 1). Integer counts: they add up exactly over row blocks.
    One mask buffer serves every model, rather than mergekit's N-fold stacks.
    """
    count = torch.zeros_like(taus[0])
    mask = torch.empty_like(taus[0])
    mover = torch.zeros_like(taus[0]) if per_model and len(taus) > 1 else None
    moved_total = []
    for i, t in enumerate(taus):
        # mᵢ: 1.0 where |τᵢ| > ε, compared in τ's dtype as mergekit's `abs() > epsilon` (ε rounded
        # to float32 for float32 tensors); |NaN| > ε is false: a NaN never moved
        torch.abs(t, out=mask).gt_(epsilon)
        t.mul_(mask)
        count.add_(mask)
        if per_model:
            moved_total.append(int(torch.count_nonzero(mask.bool())))  # 10× faster than on floats
            if mover is not None and i:
                mover.add_(mask, alpha=i)  # small integers: exact
    if not per_model:
        return count, None
    if mover is None:  # one model: every entry it moved is unique
        return count, RamCounts((0,), tuple(moved_total))
    unique_at = count == 1
    unique = [int(torch.count_nonzero(mover.eq(i).logical_and_(unique_at))) for i in range(len(taus))]
    return count, RamCounts(tuple(m - u for m, u in zip(moved_total, unique, strict=True)), tuple(unique))


def ramplus_lambdas(counts: RamCounts, r: float, alpha: float, epsilon: float) -> list[float]:
    """λᵢ = 1 + r·clamp(sᵢ / max(uᵢ, ε), 0, α), with mergekit's dtypes: the int64 counts clamped
    by the Python float ε become a float32 tensor (ε rounded to float32), the division and the
    rest are float32. torch's clamp gives α for every ρ when α < 0 (min above max), as mergekit
    gets. The values are float32 numbers returned as Python floats (exact)."""
    shared = torch.tensor(counts.shared, dtype=torch.int64)
    unique = torch.tensor(counts.unique, dtype=torch.int64)
    rho = shared / unique.clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    return [float(v) for v in lam.tolist()]


def combine(base: torch.Tensor, taus: list[torch.Tensor], count: torch.Tensor,
            lambdas: Sequence[float] | None = None) -> torch.Tensor:
    """θ₀ + Σᵢ mᵢτᵢ·(λᵢ at c = 1, 1/c at c > 1), from masked task vectors (`mask_and_count`),
    consuming `taus` and `count` (overwritten).

    Each term is rounded as mergekit rounds it: mᵢτᵢ/max(c, 1) is mergekit's overlap term where
    c > 1 and, divided by 1, its unique term τᵢ where c = 1 (each is added to the other's exact
    zero); the unique term's λᵢ multiplies after that exact division, giving τᵢ·λᵢ rounded once.
    The terms are added in model order and the base last, as mergekit's `sum(dim=0)` and
    `base + merged` do (torch adds a handful of rows one after the other).
    """
    lams = [1.0] * len(taus) if lambdas is None else list(lambdas)
    boost: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    if any(lam != 1.0 for lam in lams):
        unique_at = count.eq(1).to(count.dtype)  # 1.0 where c = 1
        boost = (unique_at, 1 - unique_at, torch.empty_like(count))
    divisor = count.clamp_(min=1)
    merged: torch.Tensor | None = None
    for t, lam in zip(taus, lams, strict=True):
        t.div_(divisor)
        if boost is not None and lam != 1.0:
            unique_at, elsewhere, scale = boost
            # λᵢ where c = 1, else 1, exactly (one of the two terms is 0); cheaper than `where`
            torch.mul(unique_at, lam, out=scale).add_(elsewhere)
            t.mul_(scale)
        merged = t if merged is None else merged.add_(t)
    assert merged is not None
    return merged.add_(base)


def _eps(job: TensorJob) -> float:
    return float(job.params["epsilon"])


def merge_ram(job: TensorJob) -> torch.Tensor:
    """RAM on one tensor or row block (each entry depends on that entry alone)."""
    base = require_base(job, "ram")
    taus = task_vectors(job, "ram")  # fresh buffers, or the disposable models'
    if not taus:
        return base.clone()
    count, _ = mask_and_count(taus, _eps(job))
    return combine(base, taus, count)


def merge_ramplus_tl(job: TensorJob) -> torch.Tensor:
    """RAM+ on one tensor, or on a row block with the whole tensor's counts in `job.stats`."""
    base = require_base(job, "ramplus_tl")
    taus = task_vectors(job, "ramplus_tl")
    if not taus:
        return base.clone()
    eps = _eps(job)
    given = job.stats if isinstance(job.stats, RamCounts) else None
    if given is None and job.rows is not None:
        raise RuntimeError(f"ramplus_tl: no shared/unique counts for a row block of tensor {job.name}")
    count, counted = mask_and_count(taus, eps, per_model=given is None)
    counts = given if given is not None else counted
    assert counts is not None
    lambdas = ramplus_lambdas(counts, float(job.params["r"]), float(job.params["alpha"]), eps)
    return combine(base, taus, count, lambdas)


class RamCounter:
    """Reducer over the row blocks of one tensor: each model's shared and unique counts
    (`RamCounts`). Integer sums, so neither the blocks' sizes nor their order change them."""

    def __init__(self, params: Mapping[str, Any], n_models: int) -> None:
        self._epsilon = float(params["epsilon"])
        self._shared = [0] * n_models
        self._unique = [0] * n_models

    def observe(self, job: TensorJob) -> None:
        base = require_base(job, "ramplus_tl")
        check_shapes(job, job.models, base)
        taus = [m - base for m in job.models]  # our own: the output pass reads the models again
        if not taus:
            return
        _, counts = mask_and_count(taus, self._epsilon, per_model=True)
        assert counts is not None
        for i, (s, u) in enumerate(zip(counts.shared, counts.unique, strict=True)):
            self._shared[i] += s
            self._unique[i] += u

    def end_pass(self) -> bool:
        return True

    def result(self) -> RamCounts:
        return RamCounts(tuple(self._shared), tuple(self._unique))


def ramplus_problem(params: Mapping[str, Any], n_models: int) -> str | None:
    """What mergekit's float32 λ cannot take (checked for every tensor before a run): ε, r or α
    beyond float32's range (mergekit fails converting ε or α, and an infinite r gives ∞·0 = NaN),
    an r·α whose λ overflows, and an ε so small it rounds to 0 in float32, where a model that
    left the tensor unchanged makes ρ = 0/0 and the whole tensor NaN."""
    eps, r, alpha = (float(params[k]) for k in ("epsilon", "r", "alpha"))
    for name, value in (("epsilon", eps), ("r", r), ("alpha", alpha)):
        if abs(value) > FLOAT32_MAX:
            return f"{name} = {value:g} is beyond float32's range, in which λ is computed"
    if abs(r * alpha) + 1 > FLOAT32_MAX:
        return f"r·alpha = {r * alpha:g} overflows float32: λ would be infinite"
    if float(torch.tensor(eps, dtype=torch.float32)) == 0.0:
        return f"epsilon = {eps:g} rounds to 0 in float32: ρ's divisor would be 0"
    return None


RAM = register(
    MethodSpec(
        name="ram",
        summary="RAM: per entry, the change of the one model that moved it, or the mean change of "
                "the models that moved it (|θᵢ − θ₀| > epsilon); unmoved entries stay at the base.",
        params=(EPSILON,),
        merge=merge_ram,
        needs_base=True,
        min_models=1,
        row_local=lambda params: True,
        light=True,
        paper="https://arxiv.org/abs/2601.13572",
        doc="methods/ram.md",
    )
)

RAMPLUS_TL = register(
    MethodSpec(
        name="ramplus_tl",
        summary="RAM+ (tensor-local): RAM, with each model's unique changes scaled by "
                "1 + r·clamp(shared/unique, 0, alpha), its counts taken over the tensor.",
        params=(EPSILON_PLUS, R, ALPHA),
        merge=merge_ramplus_tl,
        needs_base=True,
        min_models=1,
        tensor_reducer=lambda params, n_models: RamCounter(params, n_models),
        check=ramplus_problem,
        paper="https://arxiv.org/abs/2601.13572",
        doc="methods/ram.md",
    )
)
