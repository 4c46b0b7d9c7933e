"""The exact relation of our baselines to mergekit's definitions.

Each `mk_*` function below is an independent re-statement of mergekit's formula (arcee-ai/mergekit:
merge_methods/linear.py, generalized_task_arithmetic.py, sparsify.py, model_stock.py, slerp.py,
as read for this project), written from the maths, not copied. Each test asserts equality, or
pins down the documented difference:

- magnitude top-k (ties): mergekit keeps exactly k = int(density·n) entries, breaking ties in
  magnitude by an unspecified sort order; we keep every entry tied with the k-th largest.
  Identical whenever the k-th and (k+1)-th largest magnitudes differ.
- DARE/DELLA: mergekit draws masks from torch's global RNG; we draw from a per-tensor seeded
  generator. Given the same mask, `rescale: l1` is mergekit's rescale exactly. Our default
  `rescale: paper` divides by the keep probability instead.
- breadcrumbs: identical when there are no ties at the cuts, int(gamma·n) = 0 included
  (mergekit 0.1.5 keeps `indices[n_bottom : n_bottom + target]`).
- the normalising divisor Σ wᵢ is the float32 sum of float32 weights in both, so the 1e-8 guard
  decides alike for weights that cancel.
- DELLA: probabilities identical (mergekit ranks along dim 1; for 1-D/2-D tensors that is our row).
- slerp, model_stock, linear, task_arithmetic, TIES combination (election on weighted deltas,
  divisor = weights of agreeing models, λ after normalising): identical formulas.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mergekit_lite.methods.draws import uniforms
from mergekit_lite.methods.registry import TensorJob, get_method
from mergekit_lite.methods.sparsify import della_probabilities, outlier_mask


def make_job(method: str, base: torch.Tensor | None, models: list[torch.Tensor], seed: int = 0, **params: Any) -> TensorJob:
    spec = get_method(method)
    resolved = spec.defaults()  # type: ignore[union-attr]
    resolved.update(params)
    for p in spec.params:  # type: ignore[union-attr]
        if p.per_model and not isinstance(resolved[p.name], tuple):
            resolved[p.name] = (resolved[p.name],) * len(models)
    return TensorJob(name="model.layers.0.mlp.up_proj.weight", base=base, models=models, params=resolved, seed=seed)


def ours(method: str, base: torch.Tensor | None, models: list[torch.Tensor], **params: Any) -> torch.Tensor:
    return get_method(method).merge(make_job(method, base, models, **params))  # type: ignore[union-attr]


def draws(n_models: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    job = make_job("dare_linear", None, [], seed=seed)
    return [uniforms(job, i, shape) for i in range(n_models)]


# ------------------------------------------------------------ mergekit's formulas, re-stated


def mk_linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    w = torch.tensor(weights).view(-1, *([1] * tensors[0].dim()))
    res = (torch.stack(tensors) * w).sum(0)
    return res / w.sum(0) if normalize else res


def mk_rescaled(tensor: torch.Tensor, mask: torch.Tensor, l1: bool) -> torch.Tensor:
    masked = tensor * mask
    if not l1:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def mk_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel())
    mask[torch.argsort(tensor.abs().reshape(-1), descending=True)[:k]] = 1
    return tensor * mask.view(tensor.shape)


def mk_magnitude_outliers(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    n = tensor.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(tensor.abs().reshape(-1)).indices
    mask = torch.zeros(n)
    mask[order[n_bot : n_bot + target]] = 1
    return tensor * mask.view(tensor.shape)


def mk_della_probs(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    t = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1), dim=1).float() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return ((density - epsilon) + norm * 2 * epsilon).reshape(tensor.shape)


def mk_gta(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], *, consensus: bool,
           normalize: bool, lam: float) -> torch.Tensor:
    d = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * base.dim()))
    wd = d * w
    if consensus:
        majority = (wd.sum(0) >= 0).float() * 2 - 1
        mask = (wd.sign() == majority).float()
        mixed = (wd * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = wd.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def mk_model_stock(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    if filter_wise:  # vectors along the last dim; a 1-D tensor is one vector
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [m.unsqueeze(0) if m.dim() == 1 else m for m in models]
    else:
        w0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [w - w0 for w in ws]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            cos.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(models)
    t = n * c / (1 + (n - 1) * c)
    return (t * sum(ws) / n + (1 - t) * w0).reshape(base.shape)


def mk_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    def unit(v: torch.Tensor) -> torch.Tensor:
        n = v.norm()
        return v / n if n > 1e-8 else v

    dot = float((unit(v0) * unit(v1)).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return math.sin(theta * (1 - t)) / math.sin(theta) * v0 + math.sin(theta * t) / math.sin(theta) * v1


# ------------------------------------------------------------ fixtures


def distinct_magnitudes(rng: torch.Generator, n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Base and models whose task vectors have pairwise-distinct magnitudes (no ties anywhere)."""
    numel = math.prod(shape)
    base = torch.randn(shape, generator=rng)
    models = []
    for _ in range(n):
        mags = (torch.randperm(numel, generator=rng).float() + 1) / numel
        signs = torch.where(torch.rand(numel, generator=rng) < 0.5, -1.0, 1.0)
        models.append(base + (mags * signs).view(shape))
    return base, models


# ------------------------------------------------------------ tests


def test_linear_is_mergekit_linear(rng: torch.Generator) -> None:
    models = [torch.randn(4, 6, generator=rng) for _ in range(3)]
    for normalize in (True, False):
        torch.testing.assert_close(ours("linear", None, models, weight=(0.2, 0.5, 1.3), normalize=normalize),
                                   mk_linear(models, [0.2, 0.5, 1.3], normalize))


def test_task_arithmetic_is_mergekit_task_arithmetic(rng: torch.Generator) -> None:
    base, models = distinct_magnitudes(rng, 3, (5, 7))
    deltas = [m - base for m in models]
    for normalize in (False, True):
        got = ours("task_arithmetic", base, models, weight=(1.0, -0.5, 0.25), normalize=normalize, **{"lambda": 0.8})
        torch.testing.assert_close(got, mk_gta(base, deltas, [1.0, -0.5, 0.25], consensus=False,
                                               normalize=normalize, lam=0.8))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_weighted_sums_round_each_product_as_mergekit_does(method: str) -> None:
    """Bit for bit, on any CPU: wᵢτᵢ is rounded before it is added (an FMA would skip that rounding)."""
    rng = torch.Generator().manual_seed(11)
    base = torch.randn(64, 256, generator=rng)
    models = [base + torch.randn(64, 256, generator=rng) for _ in range(3)]
    weights = [0.3, 0.7, -0.45]
    params = {"density": 1.0} if method == "ties" else {}
    got = ours(method, base, models, weight=tuple(weights), normalize=True, **params)
    want = mk_gta(base, [m - base for m in models], weights, consensus=method == "ties", normalize=True, lam=1.0)
    assert torch.equal(got, want)


def test_ties_election_of_exactly_cancelling_weighted_deltas_is_plus() -> None:
    """0.3·τ + 0.3·(−τ) is exactly 0 once each product is rounded, so + is elected everywhere
    (the documented rule); a fused multiply-add leaves ±1e-10 and elected a random sign."""
    rng = torch.Generator().manual_seed(5)
    tau = torch.randn(128, 128, generator=rng)
    base = torch.zeros(128, 128)
    got = ours("ties", base, [base + tau, base - tau], weight=(0.3, 0.3), density=(1.0, 1.0), normalize=True)
    torch.testing.assert_close(got, tau.abs(), rtol=1e-6, atol=0)


def test_ties_tensor_scope_is_mergekit_ties_without_ties_in_magnitude(rng: torch.Generator) -> None:
    base, models = distinct_magnitudes(rng, 3, (6, 8))
    densities, weights = [0.3, 0.5, 0.75], [1.0, 0.6, 1.4]
    for normalize in (True, False):
        got = ours("ties", base, models, density=tuple(densities), weight=tuple(weights),
                   normalize=normalize, **{"lambda": 1.5})
        trimmed = [mk_magnitude(m - base, d) for m, d in zip(models, densities, strict=True)]
        torch.testing.assert_close(got, mk_gta(base, trimmed, weights, consensus=True, normalize=normalize, lam=1.5))


def test_ties_magnitude_ties_differ_from_mergekit_only_by_extra_tied_entries() -> None:
    tau = torch.tensor([2.0, -2.0, 2.0, 1.0, 0.5, 3.0])  # density 0.5 → k = 3; the 3rd largest is tied 3 ways
    mk = mk_magnitude(tau, 0.5)
    got = ours("ties", torch.zeros(6), [tau], density=(0.5,))
    assert int((mk != 0).sum()) == 3  # mergekit: exactly k, which of the tied ones is arbitrary
    assert got.tolist() == [2.0, -2.0, 2.0, 0.0, 0.0, 3.0]  # we: all tied entries
    assert torch.all((mk == 0) | (mk == got))  # every entry mergekit keeps we keep too


def test_dare_l1_is_mergekit_dare_given_the_same_mask(rng: torch.Generator) -> None:
    base, models = distinct_magnitudes(rng, 2, (4, 9))
    masks = [u < d for u, d in zip(draws(2, (4, 9), seed=9), (0.3, 0.6), strict=True)]
    deltas = [mk_rescaled(m - base, k, l1=True) for m, k in zip(models, masks, strict=True)]
    for method, consensus in (("dare_linear", False), ("dare_ties", True)):
        got = ours(method, base, models, density=(0.3, 0.6), weight=(0.7, 1.1), rescale="l1", seed=9)
        torch.testing.assert_close(got, mk_gta(base, deltas, [0.7, 1.1], consensus=consensus, normalize=False, lam=1.0))
    # our default (the paper) divides the kept entries by density instead
    paper = [(m - base) * k / d for m, k, d in zip(models, masks, (0.3, 0.6), strict=True)]
    got = ours("dare_linear", base, models, density=(0.3, 0.6), weight=(0.7, 1.1), seed=9)
    torch.testing.assert_close(got, mk_gta(base, paper, [0.7, 1.1], consensus=False, normalize=False, lam=1.0))


def test_breadcrumbs_is_mergekit_breadcrumbs_when_gamma_cuts_something(rng: torch.Generator) -> None:
    base, models = distinct_magnitudes(rng, 2, (10, 10))
    for density, gamma in ((0.5, 0.01), (0.9, 0.05), (0.3, 0.2), (0.5, 0.6)):
        got = ours("breadcrumbs", base, models, density=(density,) * 2, gamma=(gamma,) * 2, weight=(1.0, 0.5))
        crumbs = [mk_magnitude_outliers(m - base, density, gamma) for m in models]
        torch.testing.assert_close(got, mk_gta(base, crumbs, [1.0, 0.5], consensus=False, normalize=False, lam=1.0))
        got = ours("breadcrumbs_ties", base, models, density=(density,) * 2, gamma=(gamma,) * 2, weight=(1.0, 0.5))
        torch.testing.assert_close(got, mk_gta(base, crumbs, [1.0, 0.5], consensus=True, normalize=False, lam=1.0))


def test_breadcrumbs_gamma_below_one_entry_is_mergekit_too() -> None:
    tau = torch.tensor([0.1, -5.0, 2.0, -3.0, 0.5, 1.0, 4.0, -0.2, 0.3, 6.0])  # int(0.05·10) = 0
    kept = tau.abs() >= 2.0  # the top half: nothing is cut from the top
    assert torch.equal(outlier_mask(tau, 0.5, 0.05), kept)
    assert torch.equal(mk_magnitude_outliers(tau, 0.5, 0.05) != 0, kept)


def test_weight_sum_guard_sees_the_float32_sum_as_mergekit_does() -> None:
    # 0.7 − 0.3 − 0.4 is 5.6e-17 in float64 (below the 1e-8 guard: divide by 1) but −2.98e-8
    # in float32 (above it: divide by it), and mergekit adds the weights in float32.
    base = torch.tensor([1.0, -2.0, 0.5])
    models = [base + torch.tensor([0.25, 0.5, -1.0]), base + torch.tensor([1.0, 0.0, 2.0]), base.clone()]
    weights = [0.7, -0.3, -0.4]
    got = ours("task_arithmetic", base, models, weight=tuple(weights), normalize=True)
    expected = mk_gta(base, [m - base for m in models], weights, consensus=False, normalize=True, lam=1.0)
    torch.testing.assert_close(got, expected)
    assert got.abs().max() > 1e6  # the float32 divisor −2.98e-8 was used, not the guard's 1
    # weights whose float32 sum is below the guard but whose float64 sum is not: divide by 1
    tiny = [1.0, -0.99999999]
    got = ours("task_arithmetic", base, models[:2], weight=tuple(tiny), normalize=True)
    expected = mk_gta(base, [m - base for m in models[:2]], tiny, consensus=False, normalize=True, lam=1.0)
    torch.testing.assert_close(got, expected)
    assert got.abs().max() < 10
    # linear divides by the same float32 sum (no guard there, as in mergekit; only an exact 0 is refused)
    torch.testing.assert_close(ours("linear", None, models, weight=tuple(weights), normalize=True),
                               mk_linear(models, weights, True))


def test_della_probabilities_are_mergekit_della(rng: torch.Generator) -> None:
    for shape in ((12,), (5, 8)):
        _, (model,) = distinct_magnitudes(rng, 1, shape)
        torch.testing.assert_close(della_probabilities(model, 0.4, 0.15), mk_della_probs(model, 0.4, 0.15))


def test_della_l1_is_mergekit_della_given_the_same_mask(rng: torch.Generator) -> None:
    base, models = distinct_magnitudes(rng, 2, (6, 5))
    u = draws(2, (6, 5), seed=4)
    deltas = []
    for m, ui in zip(models, u, strict=True):
        mask = ui < mk_della_probs(m - base, 0.5, 0.2)
        deltas.append(mk_rescaled(m - base, mask, l1=True))
    for method, consensus, normalize in (("della", True, True), ("della_linear", False, False)):
        got = ours(method, base, models, density=(0.5, 0.5), epsilon=(0.2, 0.2), weight=(1.0, 0.3),
                   rescale="l1", seed=4, **{"lambda": 1.2})
        expected = mk_gta(base, deltas, [1.0, 0.3], consensus=consensus, normalize=normalize, lam=1.2)
        torch.testing.assert_close(got, expected)


def test_model_stock_is_mergekit_model_stock(rng: torch.Generator) -> None:
    base = torch.randn(8, 16, generator=rng)
    for n in (2, 3, 5):
        models = [base + 0.1 * torch.randn(8, 16, generator=rng) + 0.05 for _ in range(n)]
        torch.testing.assert_close(ours("model_stock", base, models), mk_model_stock(base, models))


def test_model_stock_filter_wise_is_mergekit_for_every_rank(rng: torch.Generator) -> None:
    # mergekit takes one ratio per vector along the last dim (for 3-D tensors too)
    for shape in ((12,), (6, 8), (2, 3, 4), (3, 4, 5)):
        base = torch.randn(shape, generator=rng)
        models = [base + 0.1 * torch.randn(shape, generator=rng) for _ in range(3)]
        torch.testing.assert_close(ours("model_stock", base, models, filter_wise=True),
                                   mk_model_stock(base, models, filter_wise=True))


def test_slerp_is_mergekit_slerp(rng: torch.Generator) -> None:
    a, b = torch.randn(32, generator=rng), torch.randn(32, generator=rng)
    for t in (0.0, 0.3, 0.5, 1.0):
        torch.testing.assert_close(ours("slerp", a, [b], t=t), mk_slerp(t, a, b))  # base → model
        torch.testing.assert_close(ours("slerp", None, [a, b], t=t), mk_slerp(t, a, b))
    near = a + 1e-3 * b  # colinear branch: lerp
    torch.testing.assert_close(ours("slerp", a, [near], t=0.4), mk_slerp(0.4, a, near))


def test_ties_election_does_not_depend_on_the_models_order() -> None:
    """bf16-like deltas whose weighted products cancel: a float32 fold in model order rounds the
    sum to 0 in one order and to ±2e-10 in another (mergekit's election does this); ours sums
    the float32 products in float64, where they add exactly."""
    base = torch.tensor([-0.0390625])
    taus = [-0.00341796875, -0.005126953125, -0.01025390625]
    weights = [0.3, 0.7, -0.45]
    results = set()
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]):
        got = ours("ties", base, [base + taus[i] for i in order], weight=tuple(weights[i] for i in order),
                   density=(1.0,) * 3, normalize=True)
        results.add(float(got[0]))
    assert len(results) == 1
