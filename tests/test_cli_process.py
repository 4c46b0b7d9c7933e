"""The installed entry point as a real process: exit codes and output survive the fast exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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
    # The child starts as a shell would start it, with Ctrl-C delivered and handled by Python,
    # whatever signal state the test worker passes on (one CI run saw the signal never arrive).
    entry = ("import builtins, os, signal, sys\n"
             "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
             "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
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


@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("terminated", [False, True])
def test_interrupt_message_offers_resume_only_where_work_was_kept(capsys, tmp_path, kept, terminated):
    """Ctrl-C before a merge's writer existed (loading, statistics passes) offered a --resume with
    nothing on disk; a patch that kept its work did not say so. SIGTERM is handled as Ctrl-C."""
    import typer
    from mergekit_lite.cli.common import Terminated, guarded

    def interrupted() -> None:
        exc = Terminated() if terminated else KeyboardInterrupt()
        if kept:
            exc.resumable = tmp_path / ".out.mlite-partial"  # type: ignore[attr-defined]
        raise exc

    interrupted.__name__ = "patch"
    with pytest.raises(typer.Exit) as exc:
        guarded(interrupted)()
    assert exc.value.exit_code == (143 if terminated else 130)
    err = capsys.readouterr().err.replace("\n", " ")
    resume = (f"; the work so far is kept in {tmp_path / '.out.mlite-partial'}: `mlite patch --resume` "
              "(same arguments) continues it") if kept else ""
    assert " ".join(err.split()) == f"interrupted: nothing was published{resume}"


def test_sigterm_mid_merge_keeps_the_work_and_resume_finishes_it(tmp_path):
    """kill (SIGTERM) ended a merge with no message and exit -15; it is now Ctrl-C's clean stop."""
    from helpers import load_dir

    from mergekit_lite.synthetic import build_model_set

    ms = build_model_set(tmp_path / "models", num_shards=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: {{base: {ms.base}, a: {ms.finetunes[0]}, b: {ms.finetunes[1]}}}\n"
                      "steps: [{id: m, method: ties, base: base, models: [a, b], parameters: {density: 0.5}}]\n")
    killer = ("import os, signal, sys\n"
              "from mergekit_lite.io import writer\n"
              "real = writer.CheckpointWriter.write\n"
              "def write(self, *args, **kwargs):\n"
              "    real(self, *args, **kwargs)\n"
              "    if not getattr(self, 'sent', False):\n"
              "        self.sent = True\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "writer.CheckpointWriter.write = write\n"
              f"{ENTRY}\n")
    res = subprocess.run([sys.executable, "-c", killer, "merge", str(recipe), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    partial = tmp_path / ".out.mlite-partial"
    assert res.returncode == 143 and not (tmp_path / "out").exists() and partial.is_dir(), res.stderr
    assert " ".join(res.stderr.split()) == (f"interrupted: nothing was published; the work so far is kept in "
                                            f"{partial}: `mlite merge --resume` (same arguments) continues it")
    res = _mlite("merge", str(recipe), "--out", str(tmp_path / "out"), "--resume")
    assert res.returncode == 0 and "resumed:" in res.stdout, res.stderr
    clean = _mlite("merge", str(recipe), "--out", str(tmp_path / "clean"))
    assert clean.returncode == 0
    got, want = load_dir(tmp_path / "out"), load_dir(tmp_path / "clean")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_windows_is_refused_with_one_clear_message():
    """Positioned file I/O is POSIX-only: importing the package elsewhere says what to do."""
    code = "import os; os.name = 'nt'; import mergekit_lite"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == (
        "ImportError: mergekit_lite needs Linux or macOS (it reads and writes tensors with "
        "positioned POSIX file I/O); on Windows, run it under WSL2")


def test_main_keeps_its_ctrl_c_handler_until_the_command_starts():
    """Between the imports and the command, typer turned Ctrl-C into a silent exit 130."""
    import signal

    from mergekit_lite.cli import common

    seen = []
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *a: None)  # stands for main's "nothing was started"
    try:
        common.restore_sigint_at_command(before)
        common.guarded(lambda: seen.append(signal.getsignal(signal.SIGINT)))()
        assert seen == [before] and common._SIGINT_AT_COMMAND == []
    finally:
        signal.signal(signal.SIGINT, before)
