"""ranks.magnitude_order: the stable |value| order per row, whatever path computes it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite.methods import ranks


def stable_order(rows: torch.Tensor) -> torch.Tensor:
    """The definition: a stable sort of |value| (ties by position)."""
    return torch.sort(rows.abs().double(), dim=1, stable=True).indices


def bf16_task_vector(rows: int, n: int, seed: int) -> torch.Tensor:
    """A realistic τ: a bf16 fine-tune minus its bf16 base, with some bases near zero."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, n, generator=g) * 0.02).to(torch.bfloat16)
    base[:, ::97] = (torch.randn(rows, (n + 96) // 97, generator=g) * 1e-6).to(torch.bfloat16)
    tuned = (base.float() + torch.randn(rows, n, generator=g) * 0.001).to(torch.bfloat16)
    return tuned.float() - base.float()


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 2), (4, 3), (64, 4096), (5, 14_336), (2, 70_001)])
def test_bf16_task_vectors(rows: int, n: int) -> None:
    tau = bf16_task_vector(rows, n, seed=n)
    assert torch.equal(ranks.magnitude_order(tau), stable_order(tau))


@pytest.mark.parametrize("wide_fraction", [0.0, 0.01, 1.0])
def test_full_precision_rows_by_repair_or_by_wide_keys(wide_fraction: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 values with 23 significant bits: repaired run by run (1.0) or sorted on 64-bit keys (0.0)."""
    monkeypatch.setattr(ranks, "WIDE_FRACTION", wide_fraction)
    tau = torch.randn(40, 3000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ranks.magnitude_order(tau), stable_order(tau))
    mixed = bf16_task_vector(40, 3000, seed=2)
    mixed[::3] = tau[::3]
    assert torch.equal(ranks.magnitude_order(mixed), stable_order(mixed))


def test_ties_zeros_signs_and_infinities() -> None:
    tau = torch.tensor([[0.0, -0.0, 1.0, -1.0, 1.0, float("inf"), -float("inf"), 0.5, -0.5, 1e-40]] * 3)
    tau[1] = tau[1].flip(0)
    assert torch.equal(ranks.magnitude_order(tau), stable_order(tau))
    assert ranks.magnitude_order(tau)[0].tolist() == [0, 1, 9, 7, 8, 2, 3, 4, 5, 6]


def test_parallel_chunks_match_one_thread() -> None:
    tau = bf16_task_vector(300, 1000, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ranks.magnitude_order(tau)
        torch.set_num_threads(4)
        assert len(ranks._chunks(300, 1000)) == 4
        assert torch.equal(ranks.magnitude_order(tau), single)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, stable_order(tau))


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=60),
    rows=st.integers(1, 4),
)
def test_any_float32_rows(values: list[float], rows: int) -> None:
    tau = torch.tensor(values, dtype=torch.float32).repeat(rows, 1)
    tau[-1] = tau[-1].flip(0)
    assert torch.equal(ranks.magnitude_order(tau), stable_order(tau))


def test_other_dtypes_use_a_stable_torch_sort() -> None:
    tau = torch.tensor([[2.0, -1.0, 1.0, 0.5]], dtype=torch.float64)
    assert ranks.magnitude_order(tau).tolist() == [[3, 1, 2, 0]]
