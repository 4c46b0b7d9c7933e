"""What every command shares: consoles, logging verbosity and the user-error guard.

Results go to stdout; progress, logs and errors go to stderr, so `mlite ... --json | jq` works.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from mergekit_lite.errors import MliteError, one_line

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

# The click that typer runs on: recent typer releases carry their own copy as typer._click (and
# raise its exceptions), older ones use the click package.
_click: Any = getattr(typer.core, "_click", None) or typer.core.click  # type: ignore[attr-defined]


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

# The SIGINT handler to put back when a command starts: `main` keeps its "nothing was started"
# handler through typer's own start-up (which would turn Ctrl-C into a silent exit 130).
_SIGINT_AT_COMMAND: list[Any] = []


def restore_sigint_at_command(previous: Any) -> None:
    _SIGINT_AT_COMMAND[:] = [previous]


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler, `timeout`), raised where Ctrl-C would be: the same clean-up,
    and a merge's partial output kept for --resume."""


def terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _kept_work(exc: BaseException, command: str, first: str = "") -> str:
    """Where a stopped merge or patch kept its work (CheckpointWriter marks the exception), if it did.

    `command` is the command's function name, which is its CLI name, but for a `_cmd` suffix
    (`surgery_cmd`: a function named like the API's `surgery` would shadow it)."""
    kept = getattr(exc, "resumable", None)
    if kept is None:
        return ""
    name = command.removesuffix("_cmd")
    return f"; the work so far is kept in {kept}: {first}`mlite {name} --resume` (same arguments) continues it"


def guarded(fn: F) -> F:
    """Turn user mistakes (MliteError) and refusals of the system (OSError) into a one-line
    message and the promised exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _SIGINT_AT_COMMAND:  # from here on, the command's own handling of Ctrl-C (below)
            signal.signal(signal.SIGINT, _SIGINT_AT_COMMAND.pop())
        try:
            return fn(*args, **kwargs)
        except MliteError as exc:
            for problem in exc.problems:
                err.print(f"[bold red]error:[/] {escape(problem)}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            # The system refused (permissions, a read-only or full disk): not a bug, so one line.
            where = f"{exc.filename}: " if exc.filename else ""
            resume = _kept_work(exc, fn.__name__, "free space, then ")
            err.print(f"[bold red]error:[/] {escape(where + (exc.strerror or str(exc)) + resume)}", markup=True,
                      highlight=False)
            raise typer.Exit(SYSTEM_ERROR_EXIT) from None
        except KeyboardInterrupt as exc:
            err.print(f"interrupted: nothing was published{_kept_work(exc, fn.__name__)}", highlight=False)
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None

    return wrapper  # type: ignore[return-value]


class OneLineErrorsGroup(TyperGroup):
    """The root command group: command-line mistakes get the same one-line `error:` as every other
    user mistake, instead of click's usage block in a rich frame (five lines or more).

    Runs the command in click's non-standalone mode, so that usage errors come here as exceptions,
    and does what standalone mode would do with everything else. `mlite` alone (or a command
    group alone) still prints its help.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,  # type: ignore[override]
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click.exceptions.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                # The help was the answer; typer's rich help has already printed it.
                message = exc.format_message()
                if message and message != "None":
                    typer.echo(message)
            else:
                err.print(f"[bold red]error:[/] {escape(usage_error_line(exc))}", markup=True, highlight=False)
            code = exc.exit_code
        except typer.Abort:
            err.print("aborted")
            code = 1
        # Non-standalone mode returns what the command returned, or the code of typer.Exit; every
        # command returns None on success.
        code = code if isinstance(code, int) and not isinstance(code, bool) else 0
        if not standalone_mode:
            return code
        sys.exit(code)


def usage_error_line(exc: Any) -> str:
    """`mlite merge: Missing argument 'recipe'. (see 'mlite merge --help')`: one line, naming the command."""
    message = one_line(exc.format_message())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    return f"{ctx.command_path}: {message} (see '{ctx.command_path} --help')"
