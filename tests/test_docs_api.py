"""docs/api.md's code blocks run as they stand, in an empty folder (the audit found they did not)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_python_block_of_the_api_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)  # run_demo's report
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), {"__name__": f"api_doc_{i}"})
    # what the blocks promise to leave behind
    for name in ("merged", "patched", "lora", "mult", "ft1-again", "delta", "task1-merged", "edited", "restored"):
        assert (tmp_path / name).is_dir(), name
    for name in ("probe.safetensors", "bank.safetensors", "merged-bank.safetensors"):
        assert (tmp_path / name).is_file(), name


def test_the_api_exports_what_the_page_names() -> None:
    import mergekit_lite as mlite

    assert {m.name for m in mlite.all_methods()} >= {"ties", "pcb", "linear"}
    assert mlite.get_method("ties").name == "ties" and callable(mlite.run_demo)
    assert isinstance(mlite.method_aliases("ties"), list)
