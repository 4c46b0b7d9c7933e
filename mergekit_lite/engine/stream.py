"""Moving tensors: a reader thread that prefetches inputs, a writer thread that drains outputs.

A merge is bound by reading n+1 models and writing one, so reading the next tensor's inputs
while the current one computes, and writing the previous result while it does, keeps the
disk busy. Both queues are bounded, which is what bounds memory: at most PREFETCH_DEPTH
tensors' inputs are ever loaded ahead, and `LiveTensors` counts them so tests can prove it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

_DONE = object()


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


@dataclass
class Bundle:
    """The raw inputs of one tensor name: checkpoint tensors (CPU, stored dtype) and patches."""

    name: str
    leaves: dict[str, torch.Tensor] = field(default_factory=dict)
    patches: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.leaves) + sum(p is not None for p in self.patches.values())


def prefetch(names: Iterable[str], load: Callable[[str], Bundle], depth: int, live: LiveTensors) -> Iterator[Bundle]:
    """Yield `load(name)` for each name, loading up to `depth` names ahead in a thread."""
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def worker() -> None:
        try:
            for name in names:
                if stop.is_set():
                    return
                bundle = load(name)
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
    """Runs `write(name, tensor)` in one thread, with at most `depth` results waiting."""

    def __init__(self, write: Callable[[str, torch.Tensor], None], depth: int = 2) -> None:
        self._write = write
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mlite-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
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

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((name, tensor))

    def close(self) -> None:
        self._q.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error
