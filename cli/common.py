"""What every command shares: consoles, logging verbosity and the user-error guard.

Results go to stdout; progress, logs and errors go to stderr, so `mlite ... --json | jq` works.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mergekit_lite.errors import MliteError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(verbose: int) -> None:
    """Warnings (a recipe that does not do what it says) as `warning: ...` lines; -v adds info,
    -vv debug, both with the logger's name."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    fmt = "%(levelname)s: %(message)s" if verbose <= 0 else "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_lowercase_level)


def _lowercase_level(record: logging.LogRecord) -> bool:
    record.levelname = record.levelname.lower()
    return True


SYSTEM_ERROR_EXIT = 6  # docs/cli.md: the operating system refused a read or a write


def guarded(fn: F) -> F:
    """Turn user mistakes (MliteError) and refusals of the system (OSError) into a one-line
    message and the promised exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MliteError as exc:
            for problem in exc.problems:
                err.print(f"[bold red]error:[/] {escape(problem)}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            # The system refused (permissions, a read-only or full disk): not a bug, so one line.
            where = f"{exc.filename}: " if exc.filename else ""
            err.print(f"[bold red]error:[/] {escape(where + (exc.strerror or str(exc)))}", markup=True,
                      highlight=False)
            raise typer.Exit(SYSTEM_ERROR_EXIT) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing was published; `mlite merge --resume` continues a merge "
                      "from where it stopped")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
