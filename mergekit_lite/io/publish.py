"""Moving a finished output into place, and out of the way what it replaces.

Every output is built beside its target and renamed onto it, so a reader sees the old output
or the new one, never half of either. A directory cannot be renamed onto a non-empty one, so a
replaced directory is first renamed aside, then deleted. By then the new output is published:
failing to delete the old one (a file the user may not remove, a Ctrl-C in a big tree) must not
turn a finished run into a failed one, nor leave the old files hidden without a word.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def beside(target: Path, tag: str) -> Path:
    """A hidden, unique name next to `target` (same file system, so renames are atomic)."""
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"


def put_in_place(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` (file or directory) onto `target`, replacing what is there."""
    trash = None
    if target.is_dir() and not target.is_symlink():
        trash = beside(target, "mlite-old")
        os.rename(target, trash)
    os.replace(tmp, target)
    if trash is not None:
        remove_replaced(trash, target)


def remove_replaced(trash: Path, target: Path) -> None:
    """Delete a replaced output renamed aside; say where it is left if that fails."""
    problems: list[str] = []
    try:
        shutil.rmtree(trash, onerror=lambda fn, path, exc: problems.append(f"{path}: {exc[1]}"))
    except KeyboardInterrupt:
        problems.append("interrupted")
    if problems or trash.exists():
        log.warning("%s is in place, but the output it replaced could not all be deleted (%s); delete %s "
                    "yourself", target, problems[0] if problems else "files remain", trash)
