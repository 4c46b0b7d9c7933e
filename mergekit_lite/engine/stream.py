"""Moving tensors: a reader thread that prefetches inputs, a writer thread that drains outputs.

A merge is bound by reading n+1 models and writing one, so reading the next tensor's inputs
while the current one computes, and writing the previous result while it does, keeps the
disk busy. Both queues are bounded, which is what bounds memory: at most PREFETCH_DEPTH
tensors' inputs are ever loaded ahead, and `LiveTensors` counts them so tests can prove it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

_DONE = object()
# Row blocks of about 512K elements: 2 MB per float32 operand, so a block's inputs, its float32
# copies and the method's temporaries stay in the CPU caches while it is computed. On a 2-core
# EPYC a task-arithmetic step runs about 2x faster on 1M-element blocks than on whole 50 MB
# tensors (with the heap settings of engine/memory.py; about 9x without them), and a 1.5B
# task-arithmetic merge takes 5.7-6.7 s on 512K blocks against 6.6-7.0 s on 1M ones (128K
# blocks: 8.2-9.5 s, the per-block overhead wins). Heavier methods are indifferent.
CHUNK_ELEMENTS = 1 << 19
# A tensor whose method needs statistics of the whole tensor (TIES' per-tensor top-k) is
# computed whole up to this many row blocks' worth of elements (4M); bigger ones are streamed in
# blocks after a statistics pass over them, which costs extra reads but bounds memory.
WHOLE_TENSOR_BLOCKS = 8


@dataclass(frozen=True)
class WorkItem:
    """One unit of streaming work: a whole tensor, or rows [a, b) of a big one."""

    name: str
    rows: tuple[int, int] | None = None


def whole_tensor_limit() -> int:
    """Elements above which a tensor needing whole-tensor statistics is streamed in blocks."""
    return WHOLE_TENSOR_BLOCKS * CHUNK_ELEMENTS


def work_items(names: Iterable[str], shapes: dict[str, tuple[int, ...]], chunkable: Callable[[str], bool],
               chunk_elements: int | None = None) -> Iterator[WorkItem]:
    """Split tensors bigger than `chunk_elements` into row blocks where `chunkable` allows.

    `chunkable` is only asked about tensors big enough to be split.
    """
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    for name in names:
        shape = shapes[name]
        numel = 1
        for d in shape:
            numel *= d
        if len(shape) < 2 or numel <= chunk_elements or not chunkable(name):
            yield WorkItem(name)
            continue
        row = numel // shape[0] if shape[0] else 1
        step = max(1, chunk_elements // max(row, 1))
        for a in range(0, shape[0], step):
            yield WorkItem(name, (a, min(shape[0], a + step)))


class LiveTensors:
    """Counts input tensors loaded and not yet released; remembers the high-water mark."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live = 0
        self.peak = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.live += n
            self.peak = max(self.peak, self.live)

    def release(self, n: int) -> None:
        with self._lock:
            self.live -= n


class CpuClock:
    """CPU seconds spent by the engine's reader and writer threads, by role.

    Whether a merge is bound by I/O or by arithmetic decides what would make it faster, and
    the threads' wall times cannot tell (they mostly wait on each other); their CPU times can.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {"reading": 0.0, "writing": 0.0}

    def add(self, role: str, seconds: float) -> None:
        with self._lock:
            self.seconds[role] = self.seconds.get(role, 0.0) + seconds


@dataclass
class Bundle:
    """The raw inputs of one tensor name: checkpoint tensors (CPU, stored dtype) and patches."""

    name: str
    rows: tuple[int, int] | None = None  # a row block of a big tensor, or the whole tensor
    leaves: dict[str, torch.Tensor] = field(default_factory=dict)
    patches: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.leaves) + sum(p is not None for p in self.patches.values())


def prefetch(items: Iterable[WorkItem], load: Callable[[WorkItem], Bundle], depth: int,
             live: LiveTensors, clock: CpuClock | None = None) -> Iterator[Bundle]:
    """Yield `load(item)` for each item, loading up to `depth` items ahead in a thread.

    The thread's CPU time is added to `clock` as "reading".
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def worker() -> None:
        started = time.thread_time()
        try:
            for item in items:
                if stop.is_set():
                    return
                bundle = load(item)
                live.add(bundle.count)
                while not stop.is_set():
                    try:
                        q.put(bundle, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(exc)
        finally:
            if clock is not None:
                clock.add("reading", time.thread_time() - started)

    thread = threading.Thread(target=worker, name="mlite-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            live.release(item.count)
    finally:
        stop.set()
        while thread.is_alive():
            try:
                item = q.get(timeout=0.05)
                if isinstance(item, Bundle):
                    live.release(item.count)
            except queue.Empty:
                pass
        thread.join()


class BackgroundWriter:
    """Runs `write(name, tensor, row_start)` in one thread, with at most `depth` results waiting.

    The thread's CPU time is added to `clock` as "writing".
    """

    def __init__(self, write: Callable[[str, torch.Tensor, int | None], None], depth: int = 2,
                 clock: CpuClock | None = None) -> None:
        self._write = write
        self._clock = clock
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mlite-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.thread_time()
        try:
            while True:
                item = self._q.get()
                if item is _DONE:
                    return
                if self._error is not None:
                    continue
                try:
                    self._write(*item)
                except BaseException as exc:
                    self._error = exc
        finally:
            if self._clock is not None:
                self._clock.add("writing", time.thread_time() - started)

    def put(self, name: str, tensor: torch.Tensor, row_start: int | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((name, tensor, row_start))

    def close(self) -> None:
        self._q.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error
