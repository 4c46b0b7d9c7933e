"""The `mlite` command line: a thin face over `mergekit_lite.api` (installed as `mergekit_lite.cli`).

One process-wide setting has to be made here, before anything imports torch: torch's OpenMP
runtime on Linux (libgomp) lets idle workers spin for about 300k pause loops, several
milliseconds, after every parallel region. The engine runs numpy work (DELLA's rank sorts) in
Python threads between torch calls, and a spinning worker holds one of the cores that work
needs: on 2 cores a 500M DELLA merge took 26.5-27.8 s with the default and 24.4-26.2 s with
10k loops (about 0.2 ms, still enough to bridge consecutive torch calls).
A value the user set is kept; in a notebook where torch is already imported it has no effect.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
