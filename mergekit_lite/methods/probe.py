"""Deterministic training of a 2-class linear probe on hidden-state features.

Model Surgery needs a direction w in the model's hidden space: the weight row of the class
"behaviour present" of a linear classifier Linear(d, 2) trained with cross-entropy on
mean-pooled final hidden states. Training is a convex problem, so we start from zeros and
solve it in float64 — by default with full-batch L-BFGS (the same answer on every run and
machine up to float rounding), or with seeded mini-batch Adam as the reference code does
(lr 1e-4; its argparse defaults are 10 epochs at batch 64). The objective is cross-entropy plus
a small L2 penalty on the raw-feature weights (it keeps separable data from driving them to
infinity); features are rescaled only to condition the optimiser, and the weights mapped back,
so the returned probe acts on raw features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import UsageError

Optimizer = Literal["lbfgs", "adam"]


@dataclass(frozen=True)
class ProbeFit:
    """A trained probe: logits = features @ weight.T + bias; class 1 = the behaviour."""

    weight: torch.Tensor  # [2, d] float32
    bias: torch.Tensor  # [2] float32
    train_accuracy: float
    heldout_accuracy: float | None  # None when the held-out split is empty
    n_train: int
    n_heldout: int
    final_loss: float


def check_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Labels as int64 0/1 of length n; both classes must be present."""
    if labels.dim() != 1 or labels.numel() != n:
        raise UsageError(f"labels must have shape ({n},) to match the features, got {tuple(labels.shape)}")
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not bool((labels == labels.round()).all()):
            raise UsageError("labels must be 0 or 1")
    y = labels.to(torch.int64)
    bad = (y != 0) & (y != 1)
    if bool(bad.any()):
        raise UsageError(f"labels must be 0 or 1, found {int(y[bad][0])}")
    if int(y.sum()) in (0, n):
        raise UsageError("labels must contain both classes (0 and 1)")
    return y


def split_indices(labels: torch.Tensor, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded train/held-out split: round(holdout·n_c) samples of each class held out.

    Each class keeps at least one training sample, so both classes are always seen in training.
    """
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in (0, 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_held = min(math.floor(holdout * idx.numel() + 0.5), idx.numel() - 1)
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(held)).values


def _accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    pred = (x @ weight.T + bias).argmax(dim=1)
    return float((pred == y).to(torch.float64).mean())


def train_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    holdout: float = 0.1,
    optimizer: Optimizer = "lbfgs",
    l2: float = 1e-4,
    max_iter: int = 200,
    epochs: int = 10,
    lr: float = 1e-4,
    batch_size: int = 64,
) -> ProbeFit:
    """Fit Linear(d, 2) with cross-entropy (+ `l2`·‖W‖² on the raw-feature weights).

    `seed` fixes the split (and Adam's shuffling); the same inputs give the same probe.
    """
    if features.dim() != 2 or features.shape[1] == 0:
        raise UsageError(f"features must have shape (N, d) with d >= 1, got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise UsageError(f"features must be floating point, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise UsageError("features contain NaN or infinite values")
    if not 0.0 <= holdout < 1.0:
        raise UsageError(f"holdout must be in [0, 1), got {holdout}")
    if optimizer not in ("lbfgs", "adam"):
        raise UsageError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    # A notebook may call this under torch.no_grad() or torch.inference_mode(): the fit needs
    # gradients, and tensors of its own (an inference tensor cannot be saved for backward).
    with torch.inference_mode(False), torch.enable_grad():
        return _fit(features, labels, seed=seed, holdout=holdout, optimizer=optimizer, l2=l2, max_iter=max_iter,
                    epochs=epochs, lr=lr, batch_size=batch_size)


def _fit(features: torch.Tensor, labels: torch.Tensor, *, seed: int, holdout: float, optimizer: Optimizer,
         l2: float, max_iter: int, epochs: int, lr: float, batch_size: int) -> ProbeFit:
    n, d = features.shape
    y = check_labels(labels.detach().cpu(), n).clone()  # the fit runs on the CPU, with the features
    x = features.detach().to(device="cpu", dtype=torch.float64).clone()
    tr, ho = split_indices(y, holdout, seed)
    x_tr, y_tr = x[tr], y[tr]

    # The L2 penalty is on the raw-feature weights, so the fit is the L2-regularised logistic
    # regression on raw features whatever the scaling below. Penalising the standardised weights
    # instead let a near-constant, label-free feature (std 1e-4) take ~100% of ‖w‖² once mapped
    # back (its weight divided by its std). The scaling only conditions the optimiser:
    # √(σ² + 8·l2) balances each coordinate's data curvature (~σ²/4) against the penalty's (2·l2).
    mu = x_tr.mean(dim=0)
    std = x_tr.std(dim=0, unbiased=False)
    sigma = torch.sqrt(std * std + 8.0 * l2) if l2 > 0 else torch.where(std > 0, std, torch.ones_like(std))
    z_tr = (x_tr - mu) / sigma

    w = torch.zeros(2, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def loss_of(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z @ w.T + b, t) + l2 * ((w / sigma) ** 2).sum()

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(z_tr, y_tr)
            loss.backward()
            return loss

        opt.step(closure)
    else:
        g = torch.Generator().manual_seed(seed)
        adam = torch.optim.Adam([w, b], lr=lr)
        for _ in range(epochs):
            perm = torch.randperm(z_tr.shape[0], generator=g)
            for start in range(0, perm.numel(), batch_size):
                batch = perm[start : start + batch_size]
                adam.zero_grad()
                loss_of(z_tr[batch], y_tr[batch]).backward()
                adam.step()

    with torch.no_grad():
        final_loss = float(loss_of(z_tr, y_tr))
        # Back to raw features: W z + b = (W/σ) x + (b − (W/σ)·μ).
        weight = w / sigma
        bias = b - weight @ mu
        train_acc = _accuracy(x_tr, y_tr, weight, bias)
        held_acc = _accuracy(x[ho], y[ho], weight, bias) if ho.numel() else None
    return ProbeFit(
        weight=weight.to(torch.float32).contiguous(),
        bias=bias.to(torch.float32).contiguous(),
        train_accuracy=train_acc,
        heldout_accuracy=held_acc,
        n_train=int(tr.numel()),
        n_heldout=int(ho.numel()),
        final_loss=final_loss,
    )
