"""The safetensors mark that tells a patch checkpoint from a model.

A multiplier M (W' = W ⊙ M) or an additive delta ΔW has a model's tensor names and shapes, so
nothing in its index tells it apart from a model; merged as one, it would give a well-formed
and meaningless output. mlite writes `mlite_patch: multiplicative | additive` in each shard's
metadata and reads it wherever a checkpoint is taken as a model or as a patch.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, MliteError
from .checkpoint import Checkpoint
from .safetensors_format import read_header

PATCH_KEY = "mlite_patch"  # safetensors metadata key marking a patch checkpoint
MULTIPLICATIVE = "multiplicative"
ADDITIVE = "additive"


def patch_kind(ck: Checkpoint) -> str | None:
    """The `mlite_patch` mark of a checkpoint's shards (None: unmarked, e.g. a model).

    Shards that disagree are a damaged or hand-assembled patch: refused, since a multiplier
    applied to half a model's tensors and a model's weights used as factors for the other
    half would be silently wrong.
    """
    marks = {read_header(s).metadata.get(PATCH_KEY) if s.suffix == ".safetensors" else None for s in ck.shards}
    if len(marks) > 1:
        raise CheckpointError(f"{ck.label}: some shards are marked {PATCH_KEY}={sorted(m or '' for m in marks)}; "
                              "a patch's shards all carry the same mark")
    return next(iter(marks), None)


def stored_patch_kind(ref: str | Path) -> str | None:
    """The mark of the checkpoint at a local path, read from one shard's header (a cheap probe
    the plan asks of every model reference; `patch_kind` checks all shards when it is opened),
    None when there is none or no safetensors there (whoever opens it says what is wrong)."""
    path = Path(ref).expanduser()
    shards = [path] if path.suffix == ".safetensors" else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not shards or not shards[0].is_file():
        return None
    try:
        return read_header(shards[0]).metadata.get(PATCH_KEY)
    except MliteError:
        return None


def not_a_model(ck: Checkpoint, kind: str) -> str:
    """Why a marked patch cannot be merged as a model, and what to do with it instead."""
    use = ("give it as a patch: a step's 'delta:', or mlite patch --delta" if kind == ADDITIVE
           else "apply it first: mlite hadamard apply --base MODEL --multiplier it")
    return f"{ck.label}: is an mlite {kind} patch ({PATCH_KEY}={kind} in its safetensors metadata), not a model; {use}"
