"""The installed entry point as a real process: exit codes and output survive the fast exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mergekit_lite import __version__

ENTRY = "import sys; from mergekit_lite.cli.main import main; sys.argv[0] = 'mlite'; main()"


def _mlite(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True, timeout=120, **kwargs)


def test_version_and_success_code():
    res = _mlite("--version")
    assert res.returncode == 0 and res.stdout == f"mlite {__version__}\n"


@pytest.mark.parametrize(("args", "code", "message"), [
    (("merge", "/nonexistent/recipe.yaml"), 2, "recipe file not found: /nonexistent/recipe.yaml"),
    (("inspect", "/nonexistent"), 5, "/nonexistent: no such file or directory"),
    (("no-such-command",), 2, "error: mlite: No such command 'no-such-command'. (see 'mlite --help')"),
    (("merge",), 2, "error: mlite merge: Missing argument 'recipe'. (see 'mlite merge --help')"),
    (("merge", "r.yaml", "--bogus"), 2, "error: mlite merge: No such option: --bogus"),
    (("merge", "r.yaml", "--threads", "two"), 2, "error: mlite merge: Invalid value for '--threads'"),
    (("merge", "r.yaml", "--threads", "0"), 2, "error: mlite merge: Invalid value for '--threads'"),
    (("patch", "--delta", "d"), 2, "error: mlite patch: Missing option '--base'."),
    (("mos", "merge"), 2, "error: mlite mos merge: Missing argument 'bank'."),
])
def test_user_errors_keep_their_code_and_one_line(args, code, message):
    res = _mlite(*args)
    assert res.returncode == code
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # click's framed usage block was 5+ lines


@pytest.mark.parametrize("args", [(), ("mos",), ("bank",), ("probe",)])
def test_a_command_group_alone_prints_its_help(args):
    res = _mlite(*args)
    assert res.returncode == 2 and "Usage:" in res.stdout and "error" not in res.stderr


def test_long_output_into_a_pipe_is_flushed_whole():
    res = _mlite("methods")
    assert res.returncode == 0 and "ties" in res.stdout and "slerp" in res.stdout


def test_ctrl_c_while_loading_is_one_line_and_130():
    """Ctrl-C during the second of imports (here: sent as torch's import starts) exits 130 with
    one line; it used to print a KeyboardInterrupt traceback through importlib."""
    entry = ("import builtins, os, signal, sys\n"
             "real = builtins.__import__\n"
             "def hook(name, *args, **kwargs):\n"
             "    if name == 'torch':\n"
             "        os.kill(os.getpid(), signal.SIGINT)\n"
             "    return real(name, *args, **kwargs)\n"
             "builtins.__import__ = hook\n"
             "from mergekit_lite.cli.main import main\n"
             "sys.argv[0] = 'mlite'\n"
             "main()\n")
    res = subprocess.run([sys.executable, "-c", entry, "methods"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 130 and res.stderr == "interrupted: nothing was started\n", res.stderr


@pytest.mark.parametrize(("command", "resume"), [("merge", True), ("patch", False), ("extract", False)])
def test_ctrl_c_message_offers_resume_only_for_merge(capsys, command, resume):
    import typer
    from mergekit_lite.cli.common import guarded

    def interrupted() -> None:
        raise KeyboardInterrupt

    interrupted.__name__ = command
    with pytest.raises(typer.Exit) as exc:
        guarded(interrupted)()
    assert exc.value.exit_code == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: nothing was published") and ("--resume" in err) == resume


def test_windows_is_refused_with_one_clear_message():
    """Positioned file I/O is POSIX-only: importing the package elsewhere says what to do."""
    code = "import os; os.name = 'nt'; import mergekit_lite"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == (
        "ImportError: mergekit_lite needs Linux or macOS (it reads and writes tensors with "
        "positioned POSIX file I/O); on Windows, run it under WSL2")
