"""Model Surgery end to end: check, edit with a sidecar, undo exactly, train and collect probes.

`surgery()` checks everything it can from headers (target tensors, hidden size, K) before any
tensor is read, runs the `surgery` method through the engine (one scoring pass, one output
pass), and — through the engine's publish hook — writes `surgery.json` and the original rows
(bit-exact, in the model's dtype) into the output before it is published. `undo_surgery()`
puts those rows back. `train_probe()` and `collect_features()` produce the probe file.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..dtypes import to_torch
from ..engine.plan import resolve_device
from ..errors import CheckpointError, MliteError, UsageError, one_line
from ..io.checkpoint import Checkpoint, load_small_file, open_checkpoint
from ..io.publish import beside, put_in_place
from ..io.safetensors_format import PlannedTensor, write_file
from ..io.writer import CheckpointWriter, check_output_dir, refuse_over_inputs
from ..methods.probe import ProbeFit
from ..methods.probe import train_probe as fit_probe
from ..methods.surgery import (
    DEFAULT_FRACTION,
    DEFAULT_TARGET,
    DIRECTIONS,
    SurgerySelection,
    k_from,
    probe_direction,
    target_layer,
)

SIDECAR_JSON = "surgery.json"
SIDECAR_ROWS = "surgery_original_rows.safetensors"
SIDECAR_FORMAT = "mlite-surgery/1"
STEP_ID = "surgery"
_ROWS_SUFFIX = "::rows"
PT_SUFFIXES = (".pt", ".pth")
# Files one of which a saved tokenizer has (fast, sentencepiece, BPE or WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")

log = logging.getLogger(__name__)


@dataclass
class SurgeryResult:
    """What an edit did: the output (or state dict), the rows chosen and the sidecar record."""

    output: Path | None
    selection: SurgerySelection
    record: dict[str, Any]
    state_dict: dict[str, torch.Tensor] | None = None
    original_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def k(self) -> int:
        return self.selection.k

    def rows_per_layer(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for e in self.selection.entries:
            counts[e.layer] = counts.get(e.layer, 0) + 1
        return dict(sorted(counts.items()))


@dataclass(frozen=True)
class Candidates:
    """The target tensors of a model, from headers: names, rows each, and K."""

    names: tuple[str, ...]
    n_rows: int
    k: int


# ---- probe files --------------------------------------------------------------------------
def load_probe(path: str | os.PathLike, *, allow_pt: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a probe file: safetensors, or `.pt` only when `allow_pt` (weights_only)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{p}: probe file not found")
    if p.suffix in PT_SUFFIXES:
        if not allow_pt:
            raise UsageError(f"{p}: pickle probe files are refused; convert to safetensors or opt in with --allow-pt (allow_pt=True)")
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise CheckpointError(f"{p}: cannot load with weights_only=True ({exc.__class__.__name__})") from None
        if isinstance(obj, torch.Tensor):
            return {"weight": obj}
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        raise CheckpointError(f"{p}: expected a tensor or a dict of tensors")
    if p.suffix != ".safetensors":
        raise UsageError(f"{p}: expected a .safetensors probe file (or .pt with --allow-pt, allow_pt=True)")
    return load_small_file(p)


def probe_vector(path: str | os.PathLike, *, allow_pt: bool = False) -> torch.Tensor:
    """w from a probe file; problems name the file."""
    tensors = load_probe(path, allow_pt=allow_pt)
    try:
        return probe_direction(tensors)
    except MliteError as exc:
        raise UsageError(f"{path}: {exc}") from None


# ---- checks from headers ------------------------------------------------------------------
def find_candidates(
    ckpt: Checkpoint, d: int, probe_label: str, *, target: str, top_k: int | None, fraction: float | None
) -> Candidates:
    """Every target tensor, checked against the probe's hidden size; K checked against the rows."""
    names = tuple(n for n in ckpt.names() if target_layer(n, target) is not None)
    if not names:
        raise CheckpointError(
            f"{ckpt.label}: no tensors match target '{target}' (expected names like model.layers.<i>.{target}.weight)"
        )
    hidden = (ckpt.config or {}).get("hidden_size")
    for name in names:
        info = ckpt.info(name)
        if len(info.shape) != 2 or info.shape[1] != d:
            size = info.shape[1] if len(info.shape) == 2 else list(info.shape)
            raise UsageError(
                f"probe {probe_label} has hidden size {d} but model {ckpt.label} has {size} "
                f"(tensor {name}, shape {list(info.shape)})"
            )
        if not info.is_float:
            raise CheckpointError(f"{ckpt.label}: target tensor {name} has non-float dtype {info.dtype}")
    if isinstance(hidden, int) and hidden != d:
        raise UsageError(f"probe {probe_label} has hidden size {d} but model {ckpt.label} has hidden_size {hidden}")
    n_rows = sum(ckpt.info(n).shape[0] for n in names)
    k = k_from(top_k, fraction if fraction is not None else DEFAULT_FRACTION, n_rows)
    if k > n_rows:
        raise UsageError(
            f"top_k = {k} is larger than the number of candidate rows ({n_rows} rows in {len(names)} '{target}' tensors)"
        )
    return Candidates(names, n_rows, k)


def _check_args(alpha: float, top_k: int | None, fraction: float | None, direction: str, target: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise UsageError(f"alpha must be a finite number, got {alpha!r}")
    if top_k is not None and fraction is not None:
        raise UsageError("give top_k or fraction, not both")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise UsageError(f"top_k must be a positive integer, got {top_k}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise UsageError(f"fraction must be in (0, 1], got {fraction}")
    if direction not in DIRECTIONS:
        raise UsageError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if not target or target.endswith(".weight"):
        raise UsageError(f"target must name a module such as 'mlp.gate_proj' (without '.weight'), got {target!r}")


# ---- the edit -----------------------------------------------------------------------------
def surgery(
    model: str | os.PathLike,
    probe: str | os.PathLike,
    *,
    alpha: float = 1.0,
    top_k: int | None = None,
    fraction: float | None = None,
    target: str = DEFAULT_TARGET,
    direction: str = "suppress",
    out: str | os.PathLike | None = None,
    device: str | None = None,
    force: bool = False,
    allow_pt: bool = False,
    progress: bool = False,
    allow_bin: bool = False,
) -> SurgeryResult:
    """Edit `model` with the probe direction; write to `out` with a sidecar, or return a state dict.

    K = `top_k`, or round(`fraction` · target rows) (default fraction 16384 / (32·11008), the
    reference's share for LLaMA-2-7B). Every check that needs no tensor data runs first.
    """
    from ..engine.plan import build_plan
    from ..engine.run import execute
    from ..recipe.model import OutputSpec, Recipe, StepSpec

    _check_args(alpha, top_k, fraction, direction, target)
    probe_path = Path(probe).expanduser().absolute()
    w = probe_vector(probe_path, allow_pt=allow_pt)
    ckpt = open_checkpoint(model, allow_bin=allow_bin)
    if ckpt.source_dir is not None and (ckpt.source_dir / SIDECAR_JSON).is_file():
        log.warning("%s was edited by mlite surgery already; this edit's sidecar replaces that one, so --undo of "
                    "the output restores that edited model, not the original (undo it first to edit the original)",
                    model)
    cands = find_candidates(ckpt, w.numel(), str(probe), target=target, top_k=top_k, fraction=fraction)
    out_path = Path(out).expanduser().absolute() if out is not None else None
    if out_path is not None:
        check_output_dir(out_path, force, [*ckpt.shards, probe_path])

    model_ref = str(Path(model).expanduser().absolute()) if Path(model).expanduser().exists() else str(model)
    params: dict[str, Any] = {"probe": str(probe_path), "alpha": float(alpha), "top_k": cands.k,
                              "target": target, "direction": direction}
    recipe = Recipe(
        inputs={"model": model_ref},
        steps=[StepSpec(id=STEP_ID, method="surgery", base="model", models=[], parameters=params)],
        output=OutputSpec(path=str(out_path) if out_path is not None else None),
        device=device,
        # pickles the user opted into (each checked above: the probe by allow_pt, the model by allow_bin)
        options={"allow_bin": allow_pt or allow_bin},
    )
    plan = build_plan(recipe, out=out_path, device=device, force=force, allow_bin=False)
    # The plan's copy of the model reads the original rows for the sidecar.
    source = plan.checkpoints["model"]
    captured: dict[str, Any] = {}

    def publish_hook(tmp_dir: Path, run: Any) -> None:
        sel: SurgerySelection = run.stats[STEP_ID]
        record, rows = sidecar_record(sel, source, model=str(model), probe=str(probe), fraction=fraction)
        write_sidecar(Path(tmp_dir), record, rows)
        captured["record"], captured["rows"] = record, rows

    # not resumable: the sidecar is written at publishing, from this run's selection
    run = execute(plan, progress=progress, publish_hook=publish_hook if out_path is not None else None,
                  resumable=False)
    selection: SurgerySelection = run.stats[STEP_ID]
    if "record" not in captured:
        captured["record"], captured["rows"] = sidecar_record(selection, source, model=str(model), probe=str(probe),
                                                              fraction=fraction)
    return SurgeryResult(output=run.output, selection=selection, record=captured["record"],
                         state_dict=run.state_dict, original_rows=captured["rows"], seconds=run.seconds)


def sidecar_record(
    sel: SurgerySelection, source: Checkpoint, *, model: str, probe: str, fraction: float | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """surgery.json's content and the original rows (model dtype, ascending rows per tensor)."""
    rows: dict[str, torch.Tensor] = {}
    dtypes: dict[str, str] = {}
    for name, idx in sel.rows.items():
        original = source.load(name)  # stored dtype: bit-exact
        rows[name] = original[idx].contiguous()
        rows[name + _ROWS_SUFFIX] = idx.to(torch.int64).contiguous()
        dtypes[name] = source.info(name).dtype
    record = {
        "format": SIDECAR_FORMAT,
        "model": model,
        "probe": probe,
        "alpha": sel.alpha,
        "direction": sel.direction,
        "target": sel.target,
        "top_k": sel.k,
        "fraction": fraction,
        "candidate_rows": sel.n_candidates,
        "candidate_tensors": sel.n_tensors,
        "dtypes": dtypes,
        "original_rows": SIDECAR_ROWS,
        "columns": ["tensor", "layer", "row", "score"],
        "selected": [[e.tensor, e.layer, e.row, e.score] for e in sel.entries],
    }
    return record, rows


def write_sidecar(directory: Path, record: dict[str, Any], rows: dict[str, torch.Tensor]) -> None:
    (directory / SIDECAR_JSON).write_text(json.dumps(record, indent=1) + "\n")
    write_file(rows, directory / SIDECAR_ROWS, {"format": SIDECAR_FORMAT})


def read_sidecar(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The sidecar of an edited model, checked for consistency with its own row list."""
    meta = directory / SIDECAR_JSON
    rows_file = directory / SIDECAR_ROWS
    if not meta.is_file():
        raise CheckpointError(f"{directory}: no {SIDECAR_JSON} (not the output of mlite surgery)")
    if not rows_file.is_file():
        raise CheckpointError(f"{directory}: {SIDECAR_ROWS} is missing; cannot restore the original rows")
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
        selected = record["selected"]
        if not isinstance(selected, list) or not all(isinstance(e, list) and len(e) >= 3 for e in selected):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{meta}: unreadable surgery record") from None
    rows = load_small_file(rows_file)
    expected: dict[str, list[int]] = {}
    try:
        for entry in selected:
            expected.setdefault(str(entry[0]), []).append(int(entry[2]))
    except (TypeError, ValueError):
        raise CheckpointError(f"{meta}: unreadable surgery record (a selected row is not [tensor, layer, row, score])") from None
    for name, r in expected.items():
        idx = rows.get(name + _ROWS_SUFFIX)
        if idx is not None and (idx.dtype != torch.int64 or idx.dim() != 1):
            raise CheckpointError(f"{rows_file}: row indices of {name} must be int64 [rows], got {idx.dtype} "
                                  f"{list(idx.shape)}")
        if idx is None or name not in rows or idx.tolist() != sorted(r):
            raise CheckpointError(f"{rows_file}: rows of {name} do not match {SIDECAR_JSON}")
    # undo restores every tensor of the rows file: each must be one the record selected rows of
    extra = sorted({k.removesuffix(_ROWS_SUFFIX) for k in rows} - set(expected))
    if extra:
        raise CheckpointError(f"{rows_file}: holds rows of {extra[0]!r}, which {SIDECAR_JSON} does not list")
    return record, rows


# ---- undo ---------------------------------------------------------------------------------
def undo_surgery(edited_model: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write `edited_model` with its original rows put back: bit-identical to the unedited model."""
    ckpt = open_checkpoint(edited_model)
    if ckpt.source_dir is None:
        raise CheckpointError(f"{edited_model}: not a checkpoint directory")
    check_output_dir(Path(out).expanduser().absolute(), force, ckpt.shards)
    record, rows = read_sidecar(ckpt.source_dir)
    restore = {n: rows[n + _ROWS_SUFFIX] for n in rows if not n.endswith(_ROWS_SUFFIX)}
    for name, idx in restore.items():
        info = ckpt.info(name)
        orig = rows[name]
        if orig.dtype != to_torch(info.dtype) or len(info.shape) != 2 or tuple(orig.shape) != (idx.numel(), info.shape[1]):
            raise CheckpointError(
                f"{ckpt.source_dir / SIDECAR_ROWS}: rows of {name} ({orig.dtype}, {list(orig.shape)}) do not fit "
                f"the model's tensor ({info.dtype}, {list(info.shape)})"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= info.shape[0]):
            raise CheckpointError(f"{ckpt.source_dir / SIDECAR_ROWS}: row index out of range for {name}")
    planned = [PlannedTensor(name=n, dtype=ckpt.info(n).dtype, shape=ckpt.info(n).shape) for n in ckpt.names()]
    shard_size = max(max((s.stat().st_size for s in ckpt.shards), default=1), 1)
    with CheckpointWriter(out, planned, shard_size=shard_size, force=force) as writer:
        for name in ckpt.names():
            t = ckpt.load(name)
            if name in restore:
                t = t.clone()
                t[restore[name]] = rows[name]
            writer.write(name, t)
        return writer.finish(copy_from=ckpt)


# ---- probes -------------------------------------------------------------------------------
@dataclass
class ProbeTrainResult:
    path: Path
    fit: ProbeFit


def train_probe(
    features_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    holdout: float = 0.1,
    optimizer: str = "lbfgs",
    force: bool = False,
) -> ProbeTrainResult:
    """Train a 2-class probe from a features file (`features` [N, d], `labels` [N]) and save it."""
    src = Path(features_path).expanduser()
    if not src.is_file():
        raise UsageError(f"{src}: features file not found")
    dest = Path(out).expanduser()
    refuse_over_inputs(dest, [src])
    _file_output(dest, force, "a probe")
    data = load_small_file(src)
    missing = [k for k in ("features", "labels") if k not in data]
    if missing:
        raise UsageError(f"{src}: missing tensor(s) {', '.join(missing)} (expected 'features' (N, d) and 'labels' (N,))")
    try:
        fit = fit_probe(data["features"], data["labels"], seed=seed, holdout=holdout,
                        optimizer=optimizer)  # type: ignore[arg-type]
    except MliteError as exc:
        raise UsageError(f"{src}: {exc}") from None
    metadata = {
        "format": "mlite-probe/1",
        "features": str(src),
        "seed": str(seed),
        "optimizer": optimizer,
        "train_accuracy": f"{fit.train_accuracy:.6f}",
        "heldout_accuracy": "" if fit.heldout_accuracy is None else f"{fit.heldout_accuracy:.6f}",
        "n_train": str(fit.n_train),
        "n_heldout": str(fit.n_heldout),
        # ‖w‖ (row 1, the direction surgery adds): the edit's size is α·‖w‖ (docs/methods/surgery.md)
        "direction_norm": f"{float(fit.weight[1].double().norm()):.6g}",
    }
    _atomic_save({"weight": fit.weight, "bias": fit.bias}, dest, metadata)
    return ProbeTrainResult(dest, fit)


def _file_output(dest: Path, force: bool, what: str) -> None:
    """A one-file output: never a directory (even with force), replaced only with force."""
    if dest.is_dir():
        raise UsageError(f"{dest}: is a directory; {what} is one .safetensors file: give a file path")
    if dest.exists() and not force:
        raise UsageError(f"{dest}: exists (use --force, or force=True, to replace it)")


def _atomic_save(tensors: dict[str, torch.Tensor], dest: Path, metadata: dict[str, str]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = beside(dest, "mlite-tmp")
    try:
        write_file(tensors, tmp, metadata, target=dest)
        put_in_place(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _version_at_least(version: str, wanted: tuple[int, ...]) -> bool:
    """`"4.57.0.dev0"` ≥ (4, 56): the leading digits of each dotted part, compared as numbers."""
    parts = tuple(int(m.group()) if (m := re.match(r"\d+", piece)) else 0 for piece in version.split("."))
    return parts[: len(wanted)] >= wanted


def read_texts(path: str | os.PathLike) -> list[str]:
    """One example per non-empty line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{p}: text file not found")
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    texts = [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise UsageError(f"{p}: no text lines")
    return texts


def collect_features(
    model_dir: str | os.PathLike,
    pos_texts: str | os.PathLike | Sequence[str],
    neg_texts: str | os.PathLike | Sequence[str],
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    device: str = "cpu",
    force: bool = False,
) -> Path:
    """Mean-pooled final hidden states of a local causal LM over two text sets → features file.

    Positive texts (the behaviour to suppress) get label 1, negative texts label 0. The final
    hidden state is transformers' last `hidden_states` entry (after the final norm), averaged
    over non-padding tokens. Needs the optional `probe` extra (transformers).
    """
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UsageError("mlite probe collect needs transformers (install the optional 'probe' extra: pip install transformers)") from None
    dest = Path(out).expanduser()
    _file_output(dest, force, "a feature set")
    src = Path(model_dir).expanduser()
    if not src.is_dir():
        raise UsageError(f"{src}: not a local model directory")
    text_files = [Path(t) for t in (pos_texts, neg_texts) if isinstance(t, (str, os.PathLike))]
    refuse_over_inputs(dest, [*(f for f in src.iterdir() if f.is_file()), *text_files])
    dev = resolve_device(device)
    pos = read_texts(pos_texts) if isinstance(pos_texts, (str, os.PathLike)) else list(pos_texts)
    neg = read_texts(neg_texts) if isinstance(neg_texts, (str, os.PathLike)) else list(neg_texts)
    if not pos or not neg:
        raise UsageError("collect_features needs at least one positive and one negative text")
    if src.is_dir() and not any((src / f).is_file() for f in TOKENIZER_FILES):
        # transformers would guess a tokenizer class and ask for sentencepiece or tiktoken instead
        raise CheckpointError(f"{src}: has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                              "save the model's tokenizer there")
    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        # transformers ≥ 4.56 names the dtype argument `dtype` and warns about `torch_dtype`
        dtype_arg = "dtype" if _version_at_least(transformers.__version__, (4, 56)) else "torch_dtype"
        lm = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, **{dtype_arg: torch.float32})
    except (OSError, ValueError, KeyError) as exc:
        why = one_line(exc, 300) or type(exc).__name__
        raise CheckpointError(f"{src}: cannot load model or tokenizer with transformers ({why})") from None
    if len(tok) == 0:  # transformers builds an empty tokenizer for a directory without tokenizer files
        raise CheckpointError(f"{src}: has no tokenizer files (tokenizer.json, vocab files); "
                              "save the model's tokenizer there")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None and batch_size > 1:
        raise CheckpointError(f"{src}: the tokenizer has no pad, end-of-sequence or unknown token to pad a batch "
                              "with; use --batch-size 1")
    try:
        lm.to(dev).eval()  # type: ignore[arg-type]  # (transformers types .to as a decorated wrapper)
    except torch.cuda.OutOfMemoryError:
        raise UsageError(f"{src}: the model does not fit in {dev} memory (it is loaded in float32)") from None
    feats: list[torch.Tensor] = []
    texts = pos + neg
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            try:
                batch = tok(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
                batch = {k: v.to(dev) for k, v in batch.items()}
                hidden = lm(**batch, output_hidden_states=True).hidden_states[-1].float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                # .cpu() inside the try: CUDA reports a kernel's error (a device-side assert on a
                # token id beyond the vocabulary) at the next synchronising call, which is this one
                feats.append(((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)).cpu())
            except torch.cuda.OutOfMemoryError:
                raise UsageError(f"{src}: out of {dev} memory on text {start + 1}; lower --batch-size or "
                                 "--max-length") from None
            except (ValueError, IndexError, RuntimeError) as exc:
                # e.g. a token id beyond the model's vocabulary: the tokenizer is not this model's
                why = one_line(exc, 300) or type(exc).__name__
                raise CheckpointError(f"{src}: running the model on text {start + 1} failed ({why})") from None
    features = torch.cat(feats).contiguous()
    labels = torch.tensor([1] * len(pos) + [0] * len(neg), dtype=torch.int64)
    _atomic_save({"features": features, "labels": labels}, dest,
                 {"format": "mlite-features/1", "model": str(src), "positive": str(len(pos)), "negative": str(len(neg))})
    return dest
