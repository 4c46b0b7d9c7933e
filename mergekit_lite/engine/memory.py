"""Keep freed tensor memory from piling up in the C heap.

A merge allocates and frees tensors of a few to a few hundred MB, many times, from two threads
(the prefetcher allocates input buffers, the main thread frees them). glibc's malloc raises its
mmap threshold every time such a block is freed, after which same-sized blocks come from the
heap arenas, where freed memory is kept instead of returned: peak RSS grows well beyond the
tensors actually alive (1.0 GB instead of 0.68 GB for a 100M-parameter TIES merge). Fixing the
thresholds keeps big blocks on mmap, returned to the system as soon as they are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 20  # blocks of 1 MiB and more are mmapped and returned when freed
_done = False


def limit_heap_growth() -> bool:
    """Fix glibc's mmap/trim thresholds once per process; a no-op (False) elsewhere."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    log.debug("malloc thresholds fixed at %d bytes: %s", _THRESHOLD, ok)
    _done = ok
    return ok
