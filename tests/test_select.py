"""Exact selection: the sampled-bracket algorithms must return exactly what sorting returns.

The bracket only decides where to look, so every case here (including adversarial layouts
that make the bracket miss, and cuts inside huge runs of equal values) must equal the sorted
order statistic; the tests also check that misses are finished by the radix fallback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite.methods import select as select_mod
from mergekit_lite.methods import stats
from mergekit_lite.methods.select import count_and_gather, kth_largest, kth_smallest, kth_smallest_many
from mergekit_lite.methods.stats import BracketSelect, RadixSelect, exact_select


def sorted_kth(t: torch.Tensor, k: int) -> float:
    return float(np.sort(t.reshape(-1).numpy())[k - 1])


def run_select(cls: type, rows: Sequence[torch.Tensor], ranks: Callable[[int, int], list[int]],
               chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    sel = cls(len(rows), ranks)
    passes = 0
    while True:
        passes += 1
        for i, r in enumerate(rows):
            for part in r.split(chunk):
                sel.observe(i, part)
        if sel.end_pass():
            return sel.values(), sel.counts(), passes


def test_kth_small_hand_checked() -> None:
    x = torch.tensor([5.0, -1.0, 3.0, 3.0, 0.5])
    assert [float(v) for v in kth_smallest_many(x, [1, 2, 3, 4, 5])] == [-1.0, 0.5, 3.0, 3.0, 5.0]
    assert float(kth_largest(x, 1)) == 5.0 and float(kth_largest(x, 2)) == 3.0
    with pytest.raises(ValueError, match="outside"):
        kth_smallest(x, 6)


@pytest.mark.parametrize("kind", ["normal", "abs", "half_zeros", "few_values", "sorted", "float64"])
def test_kth_bracketed_equals_sort(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    n = 400_000  # above SMALL: the bracketed path
    x = {
        "normal": lambda: torch.randn(n, generator=g),
        "abs": lambda: (torch.randn(n, generator=g) * 1e-3).abs(),
        "half_zeros": lambda: torch.cat([torch.zeros(n // 2), torch.randn(n // 2, generator=g)]),
        "few_values": lambda: torch.randint(0, 4, (n,), generator=g).float(),
        "sorted": lambda: torch.arange(n).float(),
        "float64": lambda: torch.randn(n, generator=g, dtype=torch.float64),
    }[kind]()
    ks = [1, 2, n // 1000, n // 3, n // 2, n // 2 + 1, n - n // 100, n - 1, n]
    got = kth_smallest_many(x, ks)
    assert all(v.dtype == x.dtype for v in got)
    assert [float(v) for v in got] == [sorted_kth(x, k) for k in ks]


def test_kth_nan_sorts_last_like_numpy() -> None:
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(0))
    x[::5] = float("nan")
    n_real = x.numel() - x.numel() // 5
    assert float(kth_smallest(x, n_real)) == float(np.nanmax(x.numpy()))
    assert np.isnan(float(kth_smallest(x, n_real + 1)))


def test_kth_bracket_miss_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample that lies about the distribution only costs time."""
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(select_mod, "_sample_positions", lambda n: np.arange(select_mod.SAMPLE))  # a biased sample
    x[: select_mod.SAMPLE] = 100.0
    assert float(kth_smallest(x, 1000)) == sorted_kth(x, 1000)


def test_count_and_gather() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0, 5.0])
    below, inside, n = count_and_gather(x, 1.0, 3.0)
    assert below == 1 and n == 4 and inside is not None and inside.tolist() == [1.0, 2.0, 2.0, 3.0]
    assert count_and_gather(x, 2.0, 2.0) == (2, None, 2)  # one-value bracket: counted only
    below, inside, n = count_and_gather(x, None, 1.0)
    assert below == 0 and inside is not None and inside.tolist() == [0.0, 1.0]
    below, inside, n = count_and_gather(x, 3.0, None)
    assert below == 4 and inside is not None and inside.tolist() == [3.0, 5.0]


@pytest.mark.parametrize("cap", [1 << 18, 1000])
def test_bracket_select_equals_radix_and_sort(cap: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small cap: the sample is thinned (a random half, quarter, ... of the values) and still brackets the ranks."""
    monkeypatch.setattr(stats, "SAMPLE_CAP", cap)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randn(120_000, generator=g), torch.randn(120_000, generator=g).abs(),
            torch.cat([torch.zeros(60_000), torch.randn(60_000, generator=g)]),
            torch.arange(120_000).flip(0).float()]

    def ranks(row: int, n: int) -> list[int]:
        return [0, n // 3, n // 2, n - 1]

    got, counts, passes = run_select(BracketSelect, rows, ranks, 7_001)
    ref, _, _ = run_select(RadixSelect, rows, ranks, 7_001)
    assert passes == 2 and counts.tolist() == [120_000] * 4
    assert torch.equal(got, ref)
    for i, r in enumerate(rows):
        assert torch.equal(got[i], exact_select(r, ranks(i, r.numel())))


def test_bracket_select_zero_cut_is_counted_not_gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cut inside a run of equal values (sparse task vectors: zeros) needs no gathering."""
    monkeypatch.setattr(stats, "GATHER_CAP", 10)
    monkeypatch.setattr(stats, "SAMPLE_CAP", 5000)
    row = torch.cat([torch.zeros(90_000), torch.rand(10_000, generator=torch.Generator().manual_seed(0)) + 1])
    got, _, passes = run_select(BracketSelect, [row], lambda r, n: [n // 2], 10_000)
    assert passes == 2 and float(got[0, 0]) == 0.0


def test_bracket_select_misses_finish_by_radix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Too many values inside a bracket: two radix passes more, the same exact answer."""
    monkeypatch.setattr(stats, "GATHER_CAP", 10)
    monkeypatch.setattr(stats, "SAMPLE_CAP", 1000)
    row = torch.randn(50_000, generator=torch.Generator().manual_seed(2))
    got, _, passes = run_select(BracketSelect, [row], lambda r, n: [n // 2, n - 10], 3_000)
    assert passes == 4
    assert torch.equal(got[0], exact_select(row, [25_000, 49_990]))


def test_bracket_select_empty_row_and_fixed_ranks() -> None:
    sel = BracketSelect(2, lambda row, n: [n - 1] if n else [0])
    for _ in range(2):
        sel.observe(0, torch.tensor([3.0, 9.0, -1.0]))
        done = sel.end_pass()
    assert done and float(sel.values()[0, 0]) == 9.0 and np.isnan(float(sel.values()[1, 0]))
    got, _, _ = run_select(BracketSelect, [torch.tensor([4.0, 1.0, 2.0])], [[0, 2]], 2)  # type: ignore[arg-type]
    assert got.tolist() == [[1.0, 4.0]]


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.integers(-20, 20).map(lambda v: v / 8), min_size=1, max_size=3000),
    fractions=st.lists(st.floats(0, 0.999), min_size=1, max_size=3),
    chunk=st.integers(1, 500),
    cap=st.sampled_from([8, 100, 1 << 18]),
)
def test_bracket_select_property(values: list[float], fractions: list[float], chunk: int, cap: int) -> None:
    old = stats.SAMPLE_CAP
    stats.SAMPLE_CAP = cap
    try:
        row = torch.tensor(values, dtype=torch.float32)
        got, _, _ = run_select(BracketSelect, [row], lambda r, n: [int(f * n) for f in fractions], chunk)
    finally:
        stats.SAMPLE_CAP = old
    expected = exact_select(row, [int(f * row.numel()) for f in fractions])
    assert torch.equal(got[0] == 0, expected == 0) and torch.equal(got[0][expected != 0], expected[expected != 0])


def test_off_heap_values_grow_and_keep_order():
    """The store BracketSelect keeps its samples and bracket entries in (outside the malloc heap,
    so they cannot pin freed blocks): appends across several doublings come back in order."""
    from mergekit_lite.methods.stats import OffHeapValues

    store = OffHeapValues()
    assert len(store) == 0 and store.values().numel() == 0
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(n, generator=g) for n in (1, 0, 70_000, 3, 200_000, (5, 7))]
    for p in pieces:
        store.append(p)
    want = torch.cat([p.reshape(-1) for p in pieces])
    assert len(store) == want.numel() and torch.equal(store.values(), want)
    assert store.values().dtype == torch.float32


def test_bracket_select_many_tiny_blocks_keep_seeds_in_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block keeps at least one sampled value, so a row fed many tiny blocks halves its
    sample (doubling the stride) every SAMPLE_CAP/2 blocks; the generator seed drawn from the
    stride passed 2⁶³ and torch refused it (ValueError) on the 403rd block of 4 at a cap of 16."""
    monkeypatch.setattr(stats, "SAMPLE_CAP", 16)
    row = torch.randn(8_000, generator=torch.Generator().manual_seed(4))
    got, _, _ = run_select(BracketSelect, [row], lambda r, n: [n // 2], 4)
    assert torch.equal(got[0], exact_select(row, [4_000]))


def run_select64(values: torch.Tensor, rank: Callable[[int], int], chunk: int) -> tuple[float, int, int]:
    """Select, and check `count_above` (how many values exceed the answer: SCE keeps exactly k
    entries with it) on every way the selection finishes."""
    sel = stats.Float64Select(rank)
    passes = 0
    while True:
        passes += 1
        for part in values.split(chunk):
            sel.observe(part)
        if sel.end_pass():
            value = sel.value()
            assert sel.count_above() == (int((values > value).sum()) if values.numel() else 0)
            return value, (sel.count() if values.numel() else 0), passes


@pytest.mark.parametrize("cap", [1 << 18, 1000])
def test_float64_select_is_the_float64_order(cap: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values that round to one float32 are told apart: the answer is sorted(values)[rank] in float64."""
    monkeypatch.setattr(stats, "SAMPLE_CAP", cap)
    g = torch.Generator().manual_seed(3)
    coarse = torch.randn(40_000, generator=g, dtype=torch.float64).to(torch.float32).to(torch.float64)
    # each float32 value, and eight distinct float64 values within a fraction of its float32 spacing
    fine = coarse.repeat(8) * (1 + torch.arange(8, dtype=torch.float64).repeat_interleave(40_000) * 2.0**-40)
    values = fine[torch.randperm(fine.numel(), generator=g)]
    assert int(torch.unique(values.to(torch.float32)).numel()) < int(torch.unique(values).numel())
    ordered = torch.sort(values).values
    for rank in (0, 1, 7, 8, 159_999, 160_000, 319_999):
        got, count, passes = run_select64(values, lambda n, r=rank: r, 7_001)
        assert got == float(ordered[rank]) and count == 320_000 and passes == 2, rank


def test_float64_select_cut_inside_many_equal_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cut inside a long run of equal values: they are merged with counts, not all held."""
    monkeypatch.setattr(stats, "GROUP_CAP", 100)
    g = torch.Generator().manual_seed(4)
    values = torch.cat([torch.full((50_000,), 0.1, dtype=torch.float64),
                        torch.full((20_000,), 0.1 * (1 + 2.0**-40), dtype=torch.float64),
                        torch.rand(30_000, generator=g, dtype=torch.float64)])
    values = values[torch.randperm(values.numel(), generator=g)]
    ordered = torch.sort(values).values
    for rank in (10, 40_000, 60_000, 75_000, 99_999):
        got, _, _ = run_select64(values, lambda n, r=rank: r, 3_333)
        assert got == float(ordered[rank]), rank


def test_float64_select_no_values() -> None:
    got, count, passes = run_select64(torch.empty(0, dtype=torch.float64), lambda n: 0, 10)
    assert math.isnan(got) and passes == 2


def test_float64_select_finishes_with_one_more_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """More float64 values inside the bracket than GATHER_CAP (30,000 distinct values that all round
    to 1.0 in float32, a one-value bracket the float32 selection only counts): a third pass
    gathers those that round to the float32 answer. A bracket the float32 selection itself gives
    up on (radix selection, two passes more): the same extra pass after it. Exact either way."""
    monkeypatch.setattr(stats, "GATHER_CAP", 10)
    g = torch.Generator().manual_seed(6)
    tied = 1.0 + torch.arange(30_000, dtype=torch.float64) * 2.0**-45
    values = torch.cat([tied, torch.rand(20_000, generator=g, dtype=torch.float64) * 3])
    values = values[torch.randperm(values.numel(), generator=g)]
    ordered = torch.sort(values).values
    for sample_cap, rank, passes in ((1 << 18, 25_000, 3), (1 << 18, 49_990, 2), (1000, 49_990, 5)):
        monkeypatch.setattr(stats, "SAMPLE_CAP", sample_cap)
        got, _, n = run_select64(values, lambda n, r=rank: r, 3_000)
        assert got == float(ordered[rank]) and n == passes, (sample_cap, rank, n)
