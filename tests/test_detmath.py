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


@pytest.mark.parametrize("threads", [1, 4])
def test_a_lone_row_sums_as_among_others(threads):
    """A row's float64 sum is the same bits alone or among other rows, with any thread count:
    torch splits a single output's elements between threads (a lone 4M-entry row differed in
    its last bits at 4 threads), which would make a one-row block differ from the whole tensor."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4_000_037, generator=g) * 1e3
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    want = x.sum(dim=1, dtype=torch.float64)
    torch.set_num_threads(threads)
    try:
        got = torch.cat([detmath.row_sums64(x[i : i + 1]) for i in range(3)])
        assert torch.equal(got, want)
        assert torch.equal(detmath.row_sums64(x), want)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("numel", [1, 4095, 4096, 4097, 8192, 12289, 300_001, 2_500_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_sum_of_pieces_equals_fixed_order_sum(numel, dtype):
    """FlatSum fed any split of a tensor's values gives `fixed_order_sum` of the whole, bit for bit."""
    g = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=g) * torch.logspace(-3, 3, numel)).to(dtype)
    want = detmath.fixed_order_sum(x)
    splits = [[numel], [1] * min(numel, 5000) + ([numel - 5000] if numel > 5000 else []),
              [4096] * (numel // 4096) + [numel % 4096],
              [int(v) for v in torch.randint(0, 9000, (400,), generator=g)],
              [int(v) for v in torch.randint(0, 700_000, (6,), generator=g)]]  # across 1M-value groups
    for sizes in splits:
        acc = detmath.FlatSum()
        start = 0
        for size in sizes:
            acc.add(x[start : start + size])
            start += size
        acc.add(x[start:])  # whatever the split left
        assert acc.total() == want, sizes[:5]


def test_flat_sum_golden():
    acc = detmath.FlatSum()
    assert acc.total() == 0.0
    for piece in (torch.ones(3000), torch.ones(3000), torch.full((10,), 0.5)):
        acc.add(piece)
    assert acc.total() == 6005.0


def test_per_tensor_sums_refuse_blocks_out_of_order():
    """The regrouped sums depend on the blocks' order: a block that does not start where the
    last one stopped is an error, not a silent change of bits."""
    from mergekit_lite.methods.registry import TensorJob
    from mergekit_lite.methods.slerp import SlerpAngle

    def job(rows):
        x = torch.ones(rows[1] - rows[0], 4)
        return TensorJob("w", None, [x, 2 * x], {"t": 0.5}, rows=rows)

    reducer = SlerpAngle()
    reducer.observe(job((0, 3)))
    reducer.observe(job((3, 5)))
    with pytest.raises(RuntimeError, match=r"tensor w: row block \(2, 6\) out of order"):
        reducer.observe(job((2, 6)))
