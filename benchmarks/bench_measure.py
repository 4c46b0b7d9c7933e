"""Measuring a whole merge process (wall time, peak memory) and the I/O floor it is judged by.

Peak memory is taken two ways, and the larger is reported:
- the kernel's exact high-water mark (`ru_maxrss`) of the merge process, read through GNU
  `/usr/bin/time -f %M`, which forks the command itself. (`os.wait4` on our own child would
  be wrong: Linux carries the forking parent's high-water mark across `exec`, so the child
  would report at least this benchmark process's own peak, which grows as it compares
  outputs.) Without GNU time the wait4 figure is used and flagged in the raw record;
- sampling `/proc/<pid>/status` of the whole process tree every `poll_s` seconds and summing
  VmRSS (catches worker processes and threads' combined use). RssAnon is sampled too, since RSS
  also counts page-cache pages a process has mmapped (safetensors' `safe_open` maps shards).

The floor is what any merge must do at least: read every input byte once and write the output
bytes once, measured after the same page-cache warm-up the merges get. Linux only (/proc).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

CHUNK = 64 * 1024 * 1024


@dataclass
class ProcessMeasure:
    """One finished process: how long, how much memory, and whether it succeeded."""

    wall_s: float
    peak_rss_bytes: int  # max(ru_maxrss, sampled sum of VmRSS over the tree)
    maxrss_bytes: int  # ru_maxrss from wait4
    sampled_rss_bytes: int
    sampled_anon_bytes: int
    user_s: float
    sys_s: float
    returncode: int


def _status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


# How often the sampler looks for new child processes (their memory is read every poll).
CHILD_SCAN_S = 0.5


class _TreeSampler(threading.Thread):
    """Polls the memory of a process and all its descendants until stopped."""

    def __init__(self, pid: int, poll_s: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.poll_s = poll_s
        self.peak_rss_kb = 0
        self.peak_anon_kb = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        pids = [self.pid]
        next_scan = 0.0
        while not self._stop_event.is_set():
            # Finding children walks every process on the machine (~1.3 ms of CPU here); doing
            # that every poll took ~7% of a core from the 2 the measured merge runs on. Children
            # are looked for every CHILD_SCAN_S; the known processes are read every poll.
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + CHILD_SCAN_S
                try:
                    pids = [self.pid] + [c.pid for c in root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    pids = [self.pid]
            rss = anon = 0
            for pid in pids:
                s = _status_kb(pid, ("VmRSS", "RssAnon"))
                rss += s["VmRSS"]
                anon += s["RssAnon"]
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_anon_kb = max(self.peak_anon_kb, anon)
            self._stop_event.wait(self.poll_s)

    def stop(self) -> None:
        self._stop_event.set()


def run_measured(
    cmd: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    poll_s: float = 0.02,
    timeout_s: float | None = None,
) -> ProcessMeasure:
    """Run `cmd` to completion (stdout+stderr to `log_path`) and measure the whole process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log_path.with_suffix(".maxrss")
    launcher = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] if os.path.exists("/usr/bin/time") else []
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen([*launcher, *cmd], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env) if env else None, cwd=cwd)
        sampler = _TreeSampler(proc.pid, poll_s)
        sampler.start()
        killer = None
        if timeout_s is not None:
            killer = threading.Timer(timeout_s, proc.kill)
            killer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if killer is not None:
            killer.cancel()
        sampler.stop()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    maxrss = usage.ru_maxrss * 1024  # KiB on Linux (inflated by the parent's peak, see above)
    if launcher:
        try:
            maxrss = int(rss_file.read_text().split()[-1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    sampled = sampler.peak_rss_kb * 1024
    return ProcessMeasure(
        wall_s=wall,
        peak_rss_bytes=max(maxrss, sampled),
        maxrss_bytes=maxrss,
        sampled_rss_bytes=sampled,
        sampled_anon_bytes=sampler.peak_anon_kb * 1024,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        returncode=proc.returncode,
    )


def read_files(paths: Iterable[Path]) -> tuple[int, float]:
    """Read every byte of `paths` with large sequential reads; returns (bytes, seconds)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - t0


def warm_page_cache(paths: Iterable[Path]) -> None:
    """Bring the inputs into the page cache, so every run (and the floor) starts alike.

    `os.sync()` first: dirty pages of the previous run's output must not be flushed on the
    next run's time.
    """
    os.sync()
    read_files(paths)


@dataclass
class Floor:
    """The I/O floor of one merge on this machine, in seconds."""

    read_bytes: int
    read_s: float  # all inputs, warm page cache, 64 MiB sequential reads
    write_bytes: int
    buffered_s: float  # output bytes written with 64 MiB buffered writes, closed, not fsynced
    fsync_s: float  # the extra time fsync then takes (reported, not part of the floor)
    direct_s: float | None  # the same bytes written with O_DIRECT (None: not supported there)

    @property
    def write_s(self) -> float:
        """The faster way of writing: the floor is what the machine can do, whichever way."""
        return min(self.buffered_s, self.direct_s) if self.direct_s is not None else self.buffered_s

    @property
    def floor_s(self) -> float:
        return self.read_s + self.write_s


def _write_buffered(target: Path, nbytes: int, payload: memoryview) -> tuple[float, float]:
    """Seconds to write `nbytes` through the page cache until close(), then to fsync."""
    t0 = time.perf_counter()
    with open(target, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            n = min(left, len(payload))
            f.write(payload[:n])
            left -= n
        write_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        os.fsync(f.fileno())
        fsync_s = time.perf_counter() - t1
    return write_s, fsync_s


def _write_direct(target: Path, nbytes: int, payload: mmap.mmap) -> float | None:
    """Seconds to write `nbytes` with O_DIRECT from an aligned buffer (on disk at close)."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except (OSError, AttributeError):
        return None
    view = memoryview(payload)
    try:
        t0 = time.perf_counter()
        done = 0
        while done < nbytes:
            n = min(len(view), -(-(nbytes - done) // 4096) * 4096)  # whole blocks; trimmed below
            done += os.pwrite(fd, view[:n], done)
        os.ftruncate(fd, nbytes)
        return time.perf_counter() - t0
    except OSError:
        return None
    finally:
        view.release()
        os.close(fd)


def measure_floor(inputs: Sequence[Path], write_bytes: int, scratch_dir: Path, repeats: int = 3) -> Floor:
    """The best of `repeats` attempts at reading all inputs and writing `write_bytes`.

    The write goes to `scratch_dir` (same file system as the merge outputs), from a buffer of
    random bytes, two ways: buffered, timed up to close() (what a process that does not fsync
    waits for; mergekit writes so) with the fsync that follows timed apart to show how far
    behind the disk is; and with O_DIRECT (what mlite does for big shards), done when the last
    write returns. The floor takes the faster.
    """
    scratch_dir.mkdir(parents=True, exist_ok=True)
    payload = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
    payload.write(os.urandom(CHUNK))
    best: Floor | None = None
    for _ in range(repeats):
        warm_page_cache(inputs)
        nread, read_s = read_files(inputs)
        target = scratch_dir / "floor-write.bin"
        buffered_s, fsync_s = _write_buffered(target, write_bytes, memoryview(payload))
        target.unlink()
        os.sync()
        direct_s = _write_direct(target, write_bytes, payload)
        target.unlink(missing_ok=True)
        floor = Floor(read_bytes=nread, read_s=read_s, write_bytes=write_bytes, buffered_s=buffered_s,
                      fsync_s=fsync_s, direct_s=direct_s)
        if best is None or floor.floor_s < best.floor_s:
            best = floor
    assert best is not None
    return best


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))
