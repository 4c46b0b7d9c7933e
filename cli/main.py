"""The `mlite` typer application; each command group lives in its own module.

Every module in COMMAND_MODULES exposes `register(app)`, which adds its commands. The modules
only parse arguments and print; the work is done by `mergekit_lite.api`.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any


def _interrupted_while_loading(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C in the second or so the imports take: nothing has started, so say so and leave
    (a KeyboardInterrupt there would print a traceback through importlib)."""
    sys.stderr.write("interrupted: nothing was started\n")
    os._exit(130)


# Until the commands are registered (the end of this module), and only where Ctrl-C would
# otherwise raise KeyboardInterrupt (not when a shell started us with SIGINT ignored, nor
# under another handler); only the main thread may set it.
_SIGINT_BEFORE: Any = None
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    try:
        _SIGINT_BEFORE = signal.signal(signal.SIGINT, _interrupted_while_loading)
    except ValueError:
        pass

import typer  # noqa: E402  (after the handler: typer, rich and torch are the slow imports)

from mergekit_lite import __version__  # noqa: E402

from .common import OneLineErrorsGroup, setup_logging  # noqa: E402

app = typer.Typer(
    name="mlite",
    cls=OneLineErrorsGroup,
    help="Merge, patch and edit model checkpoints, tensor by tensor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES: tuple[str, ...] = (
    "inspect_cmd",
    "methods_cmd",
    "merge_cmd",
    "demo_cmd",
    "patch_cmd",
    "extract_cmd",
    "hadamard_cmd",
    "bank_cmd",
    "mos_cmd",
    "surgery_cmd",
    "probe_cmd",
    "compat_cmd",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlite {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """mergekit_lite: streaming, exact model merging."""
    setup_logging(0)  # every command prints warnings as `warning: ...`; -v/-vv (where offered) say more


def _register_commands() -> None:
    """Import every command module (and with them torch and the engine) with the cyclic GC off.

    Importing torch creates several hundred thousand objects, which sets off one full
    collection after another, each walking everything imported so far: about 0.2 s of the
    CLI's 1.3 s start-up, paid by every command (measured on 2 cores: `import torch` then exit
    0.96 s with the GC on, 0.89 s off; the whole CLI import 1.30 s against 1.09 s). The modules'
    objects live as long as the process, so after the imports they are frozen (moved where no
    collection visits them) rather than collected; objects made later are collected as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in COMMAND_MODULES:
            importlib.import_module(f"{__package__}.{name}").register(app)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


_register_commands()
if _SIGINT_BEFORE is not None:  # commands handle Ctrl-C themselves from here on
    signal.signal(signal.SIGINT, _SIGINT_BEFORE)


def main() -> None:
    """Run the command, then end the process without the interpreter's teardown.

    Once torch is imported, a normal exit spends about 0.5 s unloading modules and freeing
    objects (measured: `import torch` then exit 1.6 s, then `os._exit` 1.0-1.2 s), a quarter of
    a 100M merge's wall time. Every command has finished its work by the time it returns:
    outputs are published, threads joined, files closed. So the streams and log handlers are
    flushed and the process exits at once with the command's code.
    """
    from mergekit_lite.engine.memory import keep_after_run

    from .common import restore_sigint_at_command, terminate

    keep_after_run()  # the process ends with the command: no heap to hand back
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        restore_sigint_at_command(signal.signal(signal.SIGINT, _interrupted_while_loading))
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminate)
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    _exit_now(code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # what `sys.exit("message")` would have printed
    return 1


def _exit_now(code: int) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
