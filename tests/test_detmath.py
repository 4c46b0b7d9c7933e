"""Fixed-order float64 sums: computed a group of rows at a time, the same bits as in one call."""

from __future__ import annotations

import pytest
import torch

from mergekit_lite.methods import detmath


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(300, 4096), (37, 10003), (5, 70001), (2, 3)])
def test_row_sums_in_groups_equal_one_call(monkeypatch, threads, shape):
    """Grouping bounds the float64 copy torch makes (a 256M-entry tensor cost 2 GB more in one call)."""
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 1e3
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = x.sum(dim=1, dtype=torch.float64)
        for chunk in (1, 4096, 3 * shape[1], 1 << 20):  # one row, a few, many, all
            monkeypatch.setattr(detmath, "_SUM_CHUNK", chunk)
            assert torch.equal(detmath.fixed_order_row_sums(x), whole), chunk
        monkeypatch.setattr(detmath, "_SUM_CHUNK", 1 << 20)
        want = detmath.fixed_order_sum(x)
        monkeypatch.setattr(detmath, "_SUM_CHUNK", 4096)
        assert detmath.fixed_order_sum(x) == want
    finally:
        torch.set_num_threads(before)


def test_fixed_order_sum_golden():
    # 10000 ones and a tail: rows of 4096 (4096, 4096), the tail 1808, then those three summed
    assert detmath.fixed_order_sum(torch.ones(10000)) == 10000.0
    assert detmath.fixed_order_sum(torch.tensor([0.5, 0.25, -1.0])) == -0.25
