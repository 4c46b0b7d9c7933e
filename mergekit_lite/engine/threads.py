"""How many threads torch's CPU kernels get during a merge.

A merge runs three kinds of work at once: a reader thread copying the next tensors out of the
page cache, the computing thread, and a writer thread copying results into the output files.
For methods whose per-element work is a handful of arithmetic operations (linear and task
arithmetic: `MethodSpec.light`) the two copies cost as much as the arithmetic, and torch's
intra-op threads then only compete with them for the cores: every OpenMP region has to wait
for a worker that the reader or writer has pushed off its core. Measured on 2 cores (bf16,
3 fine-tunes, whole process): a 1.5B linear merge took 8.1-12.7 s with 2 torch threads and
7.1-7.8 s with 1; 500M task arithmetic 4.2-7.2 s with 2 and 4.2-4.9 s with 1. Methods with
more work per element keep every thread: DARE's keep mask (500M dare_ties 7.0-7.5 s with 2
threads, 7.8-8.2 s with 1), TIES' selection, DELLA's sorts (500M DELLA 29.4 s with 1 thread
against 21-24 s with 2), PCB.

So a light CPU plan leaves one core to the I/O threads; anything else runs as configured. An
explicit thread count (`--threads`, `threads=`) always wins.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
from collections.abc import Iterator

import torch

from ..errors import UsageError
from .plan import Plan

log = logging.getLogger(__name__)


def max_threads() -> int:
    """The most intra-op threads worth asking for: beyond a few per core they only cost."""
    return 4 * (os.cpu_count() or 1)


def is_light(plan: Plan) -> bool:
    """Whether every step of the plan does only light per-element arithmetic on the CPU."""
    return plan.device.type == "cpu" and all(st.spec.light for st in plan.steps.values())


def compute_threads(plan: Plan, requested: int | None, available: int) -> int:
    """The intra-op thread count for this plan: `requested`, else one core left for I/O."""
    if requested is not None:
        return max(1, requested)
    if is_light(plan):
        return max(1, available - 1)
    return available


@contextlib.contextmanager
def torch_threads(plan: Plan, requested: int | None = None) -> Iterator[int]:
    """Run the block with `compute_threads` intra-op threads; restore the previous count after.

    Restoring matters in a notebook, where the process goes on to do other torch work.
    """
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, numbers.Integral) or requested < 1):
        raise UsageError(f"threads must be a positive integer, got {requested!r}")
    if requested is not None and requested > max_threads():
        # OpenMP starts every thread it is asked for: 100000 of them crash the process.
        raise UsageError(f"threads must be at most {max_threads()} (4 per core on this machine), got {requested}")
    before = torch.get_num_threads()
    n = compute_threads(plan, requested, before)
    if n != before:
        log.debug("torch intra-op threads: %d (was %d)", n, before)
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
