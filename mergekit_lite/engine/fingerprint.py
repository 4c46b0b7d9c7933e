"""Resumability: a digest of everything that decides an output's bytes.

`--resume` finishes a run only when the fingerprint stored with its partial output equals the
one of the run asked for now.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .plan import Plan

# Raised whenever a change can move any output bit (a method's sums regrouped, a mean taken in
# another order), so that `--resume` refuses to finish with new code a run begun with old code,
# even within one release. 2: slerp's sums as fixed_order_sum, model_stock's per-row means.
NUMERICS = 2


def fingerprint(plan: Plan) -> str:
    """A digest of everything that decides the output's bytes, so a resume never mixes runs.

    Inputs are identified by their files' names and `file_identity` (not contents: hashing
    terabytes to resume would defeat the purpose); steps by method and parameters as written;
    the output by its tensors, dtypes, shard size and seed; the kind of device.
    """
    from .. import __version__

    def files_of(path: Path) -> list[tuple[str, tuple[int, ...]]]:
        if path.is_file():
            paths = [path]
        elif path.is_dir():
            paths = sorted(p for p in path.iterdir() if p.is_file())
        else:
            return []
        return [(p.name, file_identity(p)) for p in paths]

    data: dict[str, Any] = {
        "version": __version__,
        "numerics": NUMERICS,
        "inputs": {k: [ck.label, [(s.name, file_identity(s)) for s in ck.shards]]
                   for k, ck in sorted(plan.checkpoints.items())},
        # every file a delta reads: an adapter's, or a full fine-tune's shards and its old base's
        "deltas": {k: [d.label, [(p.name, file_identity(p)) for p in d.files() if p.is_file()]]
                   for k, d in sorted(plan.deltas.items())},
        "steps": [[s.id, s.spec.name, s.spec_step.base, s.spec_step.models, s.spec_step.delta,
                   s.spec_step.old_base, s.spec_step.parameters, s.spec_step.model_parameters, s.spec_step.slices]
                  for s in plan.steps.values()],
        "layer_stack": stack.describe() if (stack := plan.recipe.options.get("layer_stack")) else None,
        "tensor_files": {k: files_of(Path(k)) for k in sorted(plan.tensor_files)},
        "outputs": [[o.name, list(o.shape), o.dtype] for o in plan.outputs],
        "shard_size": plan.shard_size,
        "seed": plan.seed,
        "vocab_rows": sorted(plan.vocab_rows.items()),
        # the vocabulary the rows follow: the recipe's setting, the tokenizers read, the files written
        "vocab": [str(plan.recipe.options.get("vocab_spec")),
                  [file_identity(t) for ck in plan.checkpoints.values() if ck.source_dir is not None
                   and (t := ck.source_dir / "tokenizer.json").is_file()],
                  sorted((n, hashlib.sha256(b).hexdigest()) for n, b in plan.tokenizer_files.items())],
        # CPU and CUDA may round reductions differently: a resume on another kind of device starts afresh
        "device": plan.device.type,
    }
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_identity(path: Path) -> tuple[int, ...]:
    """Size, inode and the modification and change times of `path` (links followed).

    The change time (ctime) is the one a user cannot set: a file rewritten in place with its old
    mtime put back (`cp -p`, `touch -r`, `rsync -t` onto the same inode) keeps size and mtime but
    gets a new ctime, and one replaced by another file gets a new inode. A chmod or a hard link
    also moves ctime; the run then starts afresh, the safe side of a false alarm. The device
    number is left out: network and FUSE file systems may get another one at each mount, which
    would discard a resumable run after a reboot.
    """
    st = path.stat()
    return (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
