"""Shared pieces of the task-vector methods: sparsification masks, rescaling, sign election.

TIES, DARE, breadcrumbs, DELLA (and PCB) differ only in how they thin each task vector and how
they combine the survivors; the pieces live here once so that every method resolves ties in
magnitudes, rounds keep-counts and rescales in exactly the same, documented way.

Conventions shared by every mask below:
- Keep-counts round down like mergekit and the TIES code: k = int(density · numel), with the
  product taken in float64 (Python floats). density ≥ 1 keeps everything; k = 0 keeps nothing.
- Ties in magnitude never depend on memory order: a cut is a magnitude threshold, and entries
  equal to the threshold are kept. With no tie at the cut exactly k entries survive; with a tie
  every tied entry survives (so slightly more than k).
- Selection is exact and linear time (`select.kth_smallest_many`), never a full sort.
- Random keep decisions live in `draws` (keyed by seed, tensor, model and position) and the
  per-row magnitude order DELLA ranks by in `ranks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .detmath import FlatSum, exact_divisor, fixed_order_sum, flat_pieces
from .ranks import magnitude_orders
from .registry import BlockOrder, TensorJob
from .select import kth_largest, kth_smallest, kth_smallest_many  # noqa: F401  (re-exported)

L1_EPS = 1e-7  # mergekit's tolerance below which an L1 rescale is skipped


def keep_count(density: float, numel: int, *, at_least_one: bool = False) -> int:
    """How many entries a `density` keeps out of `numel` (floor, as mergekit's int(density*n)).

    `at_least_one`: a positive density keeps at least one entry of a non-empty tensor, as
    mergekit's per-tensor magnitude trim (TIES) does; the paper's global top-k does not.
    """
    if density >= 1:
        return numel
    k = max(0, int(float(density) * numel))
    if at_least_one and density > 0 and numel > 0:
        k = max(1, k)
    return k


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the top int(density·n) entries by |τ|; ties at the cut are all kept.

    Kept ⇔ |τ| ≥ v_k, v_k the k-th largest |τ|.
    """
    n = tau.numel()
    k = keep_count(density, n, at_least_one=True)
    if k >= n:
        return torch.ones_like(tau, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    magnitude = tau.abs()
    return magnitude >= kth_largest(magnitude, k)


def threshold_mask(tau: torch.Tensor, threshold: float | torch.Tensor, k: int, total: int) -> torch.Tensor:
    """The TIES trim with a threshold computed elsewhere (global scope: over the whole model)."""
    if k >= total:
        return torch.ones_like(tau, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    return tau.abs() >= threshold


def outlier_counts(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """Breadcrumbs' (n_bottom, n_top) drop counts, exactly as mergekit's magnitude_outliers.

    target = int(density·n), n_top = int(gamma·n), n_bottom = n − target − n_top; when that is
    negative the top cut shrinks so that `target` entries remain.
    """
    target = keep_count(density, numel)
    n_top = 0 if density >= 1 else int(float(gamma) * numel)
    n_bottom = numel - target - n_top
    if n_bottom < 0:
        n_top += n_bottom
        n_bottom = 0
    return n_bottom, n_top


def outlier_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the n_top largest |τ| (outliers) and the n_bottom smallest.

    In sorted-ascending order a₀ ≤ … ≤ a_{n−1} of |τ|, kept ⇔ a_{n_bottom} ≤ |τ| ≤ a_{n−n_top−1}:
    a closed magnitude interval, so ties at either cut are kept.
    """
    n = tau.numel()
    n_bottom, n_top = outlier_counts(density, gamma, n)
    if n_bottom + n_top >= n:
        return torch.zeros_like(tau, dtype=torch.bool)
    if n_bottom == 0 and n_top == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    magnitude = tau.abs()
    ks = [k for k, cut in ((n_bottom + 1, n_bottom > 0), (n - n_top, n_top > 0)) if cut]
    bounds = iter(kth_smallest_many(magnitude, ks))
    keep = torch.ones_like(tau, dtype=torch.bool)
    if n_bottom > 0:
        keep &= magnitude >= next(bounds)
    if n_top > 0:
        keep &= magnitude <= next(bounds)
    return keep


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities: linear in the |τ| rank within each row, density−ε … density+ε.

    Rows: a 1-D tensor is one row; an N-D tensor is reshaped to [shape[0], −1]. The smallest
    magnitude of a row gets density−ε, the largest density+ε, rank r of n gets
    density − ε + 2ε·r/(n−1). Equal magnitudes are ranked by position (stable sort). A row of
    one entry gets density. Returned in float32 so masks do not depend on the compute dtype.
    """
    return della_probabilities_many([tau], [density], [epsilon])[0]


def della_probabilities_many(
    taus: Sequence[torch.Tensor], densities: Sequence[float], epsilons: Sequence[float]
) -> list[torch.Tensor]:
    """`della_probabilities` for several task vectors, their rank sorts done as one batch."""
    # (an empty tensor is one empty row: reshape(0, -1) is ambiguous)
    rows = [t.reshape(1, -1) if t.dim() < 2 or t.numel() == 0 else t.reshape(t.shape[0], -1) for t in taus]
    ranked = [i for i, r in enumerate(rows) if r.shape[1] > 1]
    orders = dict(zip(ranked, magnitude_orders([rows[i] for i in ranked]), strict=True))
    out = []
    for i, (tau, density, epsilon) in enumerate(zip(taus, densities, epsilons, strict=True)):
        if i not in orders:
            out.append(torch.full(tau.shape, float(density), dtype=torch.float32, device=tau.device))
            continue
        order = orders[i].to(tau.device)
        n = order.shape[1]
        ranks = torch.arange(n, dtype=torch.float32, device=tau.device)
        fraction = ranks / exact_divisor(n - 1, ranks)
        line = (float(density) - float(epsilon)) + fraction * (2.0 * float(epsilon))
        probs = torch.empty(order.shape, dtype=torch.float32, device=tau.device)
        probs.scatter_(1, order, line.expand_as(order))  # rank r's probability to the entry of rank r
        out.append(probs.reshape(tau.shape))
    return out


def rescale_l1(original: torch.Tensor, masked: torch.Tensor, eps: float = L1_EPS,
               norms: tuple[float, float] | None = None) -> torch.Tensor:
    """mergekit's rescale: scale `masked` so its L1 norm equals that of `original`.

    Skipped (masked returned as is) when either norm is below `eps`, as mergekit does; this is
    also what keeps all-zero task vectors free of 0/0. `norms` gives (‖original‖₁, ‖masked‖₁)
    of the whole tensor when these are row blocks of it (`L1NormSums`).
    """
    if norms is None:
        # float64 sums in a fixed order: torch's own whole-tensor sum changes with the thread count
        norms = fixed_order_sum(original.abs()), fixed_order_sum(masked.abs())
    before, after = norms
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


@dataclass(frozen=True)
class L1Norms:
    """Per model, (‖τᵢ‖₁, ‖mᵢ ⊙ τᵢ‖₁) over one whole tensor; None for a model that drops nothing."""

    norms: tuple[tuple[float, float] | None, ...]


# (task vector, its entries that survive the drop, unscaled; None when nothing is dropped) per
# model, for one job: how a random-drop method thins, so that `L1NormSums` sees what it keeps.
Thinned = Callable[[TensorJob], Iterable[tuple[torch.Tensor, torch.Tensor | None]]]


class L1NormSums:
    """`rescale: l1` over a tensor too big to hold whole: a reducer over its row blocks (in
    order) summing each model's two L1 norms, with the bits `rescale_l1` takes on the whole
    tensor (`detmath.FlatSum`). The drops are position-keyed draws, so the statistics pass and
    the output pass drop the same entries."""

    def __init__(self, n_models: int, thinned: Thinned) -> None:
        self._thinned = thinned
        self._sums = [(FlatSum(), FlatSum()) for _ in range(n_models)]
        self._drops = [False] * n_models
        self._order = BlockOrder()

    def observe(self, job: TensorJob) -> None:
        self._order.check(job)
        for i, (tau, kept) in enumerate(self._thinned(job)):
            if kept is None:
                continue
            self._drops[i] = True
            before, after = self._sums[i]
            for t, k in flat_pieces(tau, kept):  # bounded |τ| temporaries
                before.add(t.abs())
                after.add(k.abs())

    def end_pass(self) -> bool:
        return True

    def result(self) -> L1Norms:
        return L1Norms(tuple((b.total(), a.total()) if drops else None
                             for (b, a), drops in zip(self._sums, self._drops, strict=True)))


def l1_norms(job: TensorJob, model: int) -> tuple[float, float] | None:
    """The whole tensor's L1 norms for a row block (from `L1NormSums`), None for a whole tensor."""
    if isinstance(job.stats, L1Norms):
        return job.stats.norms[model]
    if job.rows is not None:
        raise RuntimeError(f"rescale: l1 has no whole-tensor norms for a row block of tensor {job.name}")
    return None


def elect_signs(weighted_sum: torch.Tensor) -> torch.Tensor:
    """TIES sign election from Σ wᵢτ̂ᵢ: +1 where the sum is ≥ 0, −1 elsewhere (a zero sum elects +).

    Made with in-place float ops (ge_ writes 1.0/0.0 in the tensor's own dtype): torch's CPU
    kernels that produce or consume bool tensors (compare, where, masked_fill) run 5-15x slower
    than plain float ones, and this runs once per merged block.
    """
    return weighted_sum.clone().ge_(0).mul_(2).sub_(1)


def apply_mask(tau: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """τ ⊙ keep for a bool mask, multiplying by the mask's bytes (0/1): the same values as
    `tau * keep`, about 5x faster on the CPU (see `elect_signs`)."""
    return tau * keep.view(torch.uint8)
