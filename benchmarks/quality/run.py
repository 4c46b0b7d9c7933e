"""One command for the whole merge-quality suite: `python -m benchmarks.quality.run --all`.

Runs (or reuses from `.cache/`) the three experiments, then renders docs/results.md. A part
that fails records its error in `.cache/results/<part>.error` and the page says it was not
run; the other parts still run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

PARTS = ("merging", "portability", "surgery")


def _log(path: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return log


def run_part(name: str, log: Callable[[str], None]) -> Any:
    from . import cache as qcache

    results = qcache.CACHE / "results"
    results.mkdir(parents=True, exist_ok=True)
    err = results / f"{name}.error"
    try:
        if name == "merging":
            from . import merging

            value = qcache.cached_json(results / "merging.json", lambda: merging.run(log))
        elif name == "portability":
            from . import portability

            value = portability.run(log)
        else:
            from . import surgery_eval

            value = surgery_eval.run(log)
    except Exception as exc:  # a benchmark part failing must not hide the others' results
        err.write_text(f"{type(exc).__name__}: {exc}".splitlines()[0][:300] + "\n")
        log(f"{name} failed:\n{traceback.format_exc()}")
        return None
    err.unlink(missing_ok=True)
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--all", action="store_true", help="every part, then the report")
    for p in PARTS:
        ap.add_argument(f"--{p}", action="store_true", help=f"run the {p} part")
    ap.add_argument("--report", action="store_true", help="re-render docs/results.md from the cache")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = ap.parse_args(argv)
    chosen = [p for p in PARTS if args.all or getattr(args, p)]
    if not chosen and not args.report:
        ap.error("nothing to do: pass --all, a part (--merging/--portability/--surgery) or --report")
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import cache as qcache
    from . import report

    qcache.CACHE.mkdir(parents=True, exist_ok=True)
    log = _log(str(qcache.CACHE / "run.log"))
    failed = [p for p in chosen if run_part(p, log) is None]
    page = report.write()
    log(f"wrote {page}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
