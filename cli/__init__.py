"""The `mlite` command line: a thin face over `mergekit_lite.api` (installed as `mergekit_lite.cli`).

One process-wide setting has to be made here, before anything imports torch: torch's OpenMP
runtime on Linux (libgomp) lets idle workers spin for about 300k pause loops, several
milliseconds, after every parallel region. The engine's reader and writer threads (and
DELLA's numpy rank sorts) run between torch calls, and a spinning worker holds a core they
need. Measured on 2 cores, whole process: 500M TIES 19.6 s with 10k loops, 15.4-16.9 s with
none, 15.9 s with 2k; 500M DELLA 26.5-27.8 s with the default, 19.9-20.7 s with 10k loops,
21.1-21.7 s with none, 20.0 s with 2k. 2k loops (roughly 40 µs) bridges consecutive torch
calls without holding a core through the I/O threads' work.
A value the user set is kept; in a notebook where torch is already imported it has no effect.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "2000")
