"""`extract`: store a dense delta as a PEFT LoRA adapter by truncated SVD, with its error.

The delta of each 2-D weight (θ_ft − θ_base, or any delta source) is factored at a fixed rank or
at the smallest rank holding an energy fraction of ‖Δ‖_F²; ranks that differ between modules
go to the adapter's `rank_pattern`. Tensors LoRA cannot express (1-D norms and biases,
tensors a patch replaces outright) travel as `modules_to_save` full tensors holding the
patched value; the bias of a LoRA-adapted module as its `base_layer.bias`. One tensor is in
memory at a time.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..engine.plan import resolve_device
from ..errors import CheckpointError, UsageError
from ..io.adapters import Factors, write_adapter
from ..io.checkpoint import CONV1D_MODULES, Checkpoint, open_checkpoint
from ..io.deltas import EMBEDDING_MODULES, DeltaSource, FullDelta
from ..methods.lowrank import EXACT_MAX_DIM, allocate_ranks, norm64, relative_error, spectrum, truncated_svd
from ..methods.registry import tensor_seed

PathLike = str | os.PathLike

REPORT_FILE = "mlite_extract_report.json"


@dataclass(frozen=True)
class TensorReport:
    """What happened to one tensor: `lora` (factored), `full` (stored whole), `skipped`."""

    name: str
    shape: tuple[int, ...]
    kind: str
    delta_norm: float
    rank: int = 0
    rel_error: float = 0.0
    note: str = ""


@dataclass
class ExtractResult:
    output: Path | None
    tensors: list[TensorReport] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((t.rel_error for t in self.tensors if t.kind == "lora"), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"output": str(self.output) if self.output else None, "max_rel_error": self.max_rel_error,
                "tensors": [asdict(t) for t in self.tensors]}


# Every nn.Embedding a LoRA may target, beyond the input embeddings: position and token-type
# tables (GPT-2's wpe, BERT's position_embeddings), whose LoRA is lora_embedding_A/B too.
OTHER_EMBEDDINGS = ("wpe", "position_embeddings", "token_type_embeddings", "embed_positions")


def is_embedding(name: str) -> bool:
    module = name.rsplit(".", 1)[0]
    return module.rsplit(".", 1)[-1] in (*EMBEDDING_MODULES, *OTHER_EMBEDDINGS)


def check_rank_args(rank: int | None, energy: float | None, budget_rank: int | None = None) -> None:
    if sum(x is not None for x in (rank, energy, budget_rank)) != 1:
        raise UsageError("give exactly one of --rank, --energy or --budget-rank (rank=, energy= or budget_rank=)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)):
        raise UsageError(f"--rank (rank=) must be a positive integer, got {rank!r}")
    if budget_rank is not None and (isinstance(budget_rank, bool) or not isinstance(budget_rank, numbers.Integral)
                                    or budget_rank < 1):
        raise UsageError(f"--budget-rank (budget_rank=) must be a positive integer, got {budget_rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, numbers.Real)):
        raise UsageError(f"--energy (energy=) must be a number in (0, 1], got {energy!r}")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank (rank=) must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy (energy=) must be in (0, 1], got {energy}")


def dense_to_adapter(
    base: Checkpoint,
    delta: DeltaSource,
    *,
    lam: float = 1.0,
    rank: int | None = None,
    energy: float | None = None,
    budget_rank: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    full_tensors: bool = True,
    exact_max_dim: int = EXACT_MAX_DIM,
    on_tensor: Callable[[TensorReport], None] | None = None,
    factor_dtype: torch.dtype = torch.float32,
) -> tuple[list[Factors], dict[str, torch.Tensor], list[TensorReport]]:
    """Factor every 2-D `.weight` delta of `delta` relative to `base`; keep the rest whole.

    Full tensors hold base + λ·Δ (or the replaced value), so loading the adapter onto `base`
    gives the patched model; a module that has both a LoRA and a full tensor cannot be
    expressed by PEFT, so its full tensor is skipped and reported, except a bias (written as the
    module's `base_layer.bias`, which peft loads beside the LoRA). The relative errors are
    those of the factors as written in `factor_dtype` (rounding them to bf16 adds ~1e-3).

    `budget_rank` shares the parameters that rank on every factored module would cost among the
    modules by singular-value importance (`allocate_ranks`; a module gets at most
    BUDGET_CAP × that rank): a first pass reads every delta for its spectrum.
    """
    factors: list[Factors] = []
    full: dict[str, torch.Tensor] = {}
    reports: list[TensorReport] = []
    targets = delta.targets()
    conv1d = base.conv1d_weights

    # A tied embedding goes whole: peft (0.21) ties a LoRA on it to the head by sharing its
    # factors, and merge_and_unload() then adds the delta twice to the one shared weight (2·Δ,
    # logits 2.8 from the fine-tune); saved whole, with its head copy (`write_adapter`), it is
    # right unmerged and merged. Not for Conv1D models (peft does not find GPT-2's tie) nor
    # without full tensors.
    tied_whole = base.tied_head_source if full_tensors and not conv1d else None

    def factored(name: str, shape: tuple[int, ...]) -> bool:
        """Whether a LoRA carries this tensor: a 2-D weight, and in a Conv1D model only its
        Conv1D layers and embeddings (fan_in_fan_out is one switch for the whole adapter, so a
        Linear layer there, such as an untied lm_head, goes whole; and not a tied embedding)."""
        if len(shape) != 2 or not name.endswith(".weight") or name == tied_whole:
            return False
        return not conv1d or is_embedding(name) or name.rsplit(".", 2)[-2] in CONV1D_MODULES

    lora_modules = {n.rsplit(".", 1)[0] for n, s in targets.items() if factored(n, s)}
    ranks = (_budget_ranks(base, delta, [n for n in base.names() if n in targets and factored(n, targets[n])],
                           budget_rank, lam=lam, seed=seed, device=device, exact_max_dim=exact_max_dim)
             if budget_rank is not None else None)
    biases: list[int] = []  # reports of biases of modules whose weight may get factors

    def is_bias(name: str, shape: tuple[int, ...]) -> bool:
        """Of a LoRA-adapted module's tensors, peft loads the bias on its own (`<m>.base_layer.bias`,
        what it saves for `bias: lora_only`), so a bias delta travels beside the LoRA."""
        return name.endswith(".bias") and len(shape) == 1

    for name in base.names():
        if name not in targets:
            continue
        info = base.info(name)
        d = _delta_of(base, delta, name, info.shape, lam, device)
        if d is None:
            continue
        norm = norm64(d)
        module = name.rsplit(".", 1)[0]
        if norm == 0.0:
            rep = TensorReport(name, info.shape, "skipped", 0.0, note="zero delta")
        elif ranks is not None and factored(name, info.shape) and ranks.get(name, 0) == 0:
            rep = TensorReport(name, info.shape, "skipped", norm, 0, 1.0, "rank 0 in the shared budget: not carried")
        elif factored(name, info.shape):
            emb = is_embedding(name)
            # PEFT stores an embedding's ΔE [vocab, dim] and a Conv1D's ΔW [in, out] as (B·A)ᵀ,
            # so factor the transpose.
            m = d.T if emb or conv1d else d
            lr = truncated_svd(m, rank=ranks[name] if ranks is not None else rank, energy=energy,
                               seed=tensor_seed(seed, name), exact_max_dim=exact_max_dim)
            factors.append(Factors(module, lr.a.cpu(), lr.b.cpu(), embedding=emb, fan_in_fan_out=conv1d and not emb))
            rel = lr.rel_error
            if factor_dtype != torch.float32:  # the error of what is written, not of the float32 factors
                rel = relative_error(m, lr.b.to(factor_dtype), lr.a.to(factor_dtype))
            rep = TensorReport(name, info.shape, "lora", norm, lr.rank, rel, "" if lr.exact else "randomized SVD")
        elif not full_tensors:
            rep = TensorReport(name, info.shape, "skipped", norm, note="not factored (full tensors disabled)")
        elif module in lora_modules and not is_bias(name, info.shape):
            rep = TensorReport(name, info.shape, "skipped", norm,
                               note=f"module {module} is LoRA-adapted; a saved module would replace its LoRA")
        else:
            full[name] = (base.load(name, device, torch.float32) + d).cpu()
            rel = 0.0
            if factor_dtype != torch.float32:  # a full tensor is written in that dtype too
                stored = full[name].to(factor_dtype).double() - base.load(name, "cpu", torch.float32).double()
                rel = float(torch.linalg.norm(stored - d.double().cpu()) / norm)
            linear = conv1d and len(info.shape) == 2 and name.endswith(".weight")
            note = "a Linear layer in a Conv1D model: saved whole" if linear else ""
            if name == tied_whole:
                note = "tied to the output head: saved whole (peft merges a tied embedding's LoRA twice)"
            rep = TensorReport(name, info.shape, "full", norm, rel_error=rel, note=note)
        if rep.kind == "full" and module in lora_modules:  # a bias: its place depends on its weight's factors
            biases.append(len(reports))
        elif on_tensor is not None:
            on_tensor(rep)
        reports.append(rep)
    # A bias beside factors is written as <module>.base_layer.bias (`write_adapter`); beside a
    # weight with no delta (so no factors), it is saved with its module like any 1-D delta.
    factored_modules = {f.module for f in factors}
    for i in biases:
        if reports[i].name.rsplit(".", 1)[0] in factored_modules:
            reports[i] = replace(reports[i], note="bias of a LoRA-adapted module: saved as its base_layer.bias "
                                                  "(bias: lora_only)")
        if on_tensor is not None:
            on_tensor(reports[i])
    # peft's modules_to_save replaces a module whole and loads every parameter of it: a
    # LayerNorm whose weight changed but whose bias did not still needs its bias written.
    # (A LoRA-adapted module's bias is loaded on its own: its module is not saved.)
    saved = {n.rsplit(".", 1)[0] for n in full} - factored_modules
    for name in base.names():
        module, _, param = name.rpartition(".")
        if module in saved and name not in full and "." not in param:
            full[name] = base.load(name, device, torch.float32).cpu()
    return factors, full, reports


# A module's rank under a shared budget is at most this many times the budget rank: the width of
# the randomized SVD sketch its spectrum comes from (and a bound no one module can exceed).
BUDGET_CAP = 4


def _delta_of(base: Checkpoint, delta: DeltaSource, name: str, shape: tuple[int, ...], lam: float,
              device: str) -> torch.Tensor | None:
    """λ·Δ of one tensor in float32 (a replaced tensor: its new value minus the base's), None
    when the delta does not touch it."""
    p = delta.patch(name, shape, device)
    if p is None:
        return None
    return p.tensor * lam if p.kind == "add" else p.value(None, lam) - base.load(name, device, torch.float32)


def _budget_ranks(base: Checkpoint, delta: DeltaSource, names: list[str], budget_rank: int, *, lam: float,
                  seed: int, device: str, exact_max_dim: int) -> dict[str, int]:
    """Each factored tensor's rank in the shared budget: the parameters of `budget_rank` on every
    module with a non-zero delta, allocated by σ²/(rows + cols) over all their spectra."""
    spectra: dict[str, torch.Tensor] = {}
    costs: dict[str, int] = {}
    for name in names:
        shape = base.info(name).shape
        d = _delta_of(base, delta, name, shape, lam, device)
        if d is None or norm64(d) == 0.0:
            continue
        spectra[name] = spectrum(d, BUDGET_CAP * budget_rank, seed=tensor_seed(seed, name),
                                 exact_max_dim=exact_max_dim).cpu()
        costs[name] = shape[0] + shape[1]
    uniform = {name: min(budget_rank, len(s)) for name, s in spectra.items()}  # fits: ≤ budget_rank each
    return allocate_ranks(spectra, costs, budget_rank * sum(costs.values()), baseline=uniform)


def extract(
    model: PathLike,
    base: PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget_rank: int | None = None,
    out: PathLike | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    full_tensors: bool = True,
    force: bool = False,
    on_tensor: Callable[[TensorReport], None] | None = None,
    allow_bin: bool = False,
) -> ExtractResult:
    """Factor θ_model − θ_base into a PEFT LoRA adapter (written to `out` when given).

    `rank` fixes every module's rank; `energy` picks per module the smallest rank holding that
    fraction of ‖Δ‖_F²; `budget_rank` gives the adapter the parameters of that rank on every
    module, shared among them by singular-value importance (the most ‖Δ‖² kept in all). Returns
    per-tensor ranks and relative errors ‖Δ − B·A‖_F / ‖Δ‖_F.
    `allow_bin` accepts pickle (.bin) checkpoints, loaded with weights_only=True.
    """
    check_rank_args(rank, energy, budget_rank)
    device = str(resolve_device(device))
    base_ck = open_checkpoint(base, allow_bin=allow_bin)
    ft = open_checkpoint(model, allow_bin=allow_bin)
    delta = FullDelta(ft, base_ck)
    shapes = {n: base_ck.info(n).shape for n in base_ck.names()}
    problems = delta.check(shapes)
    missing = [n for n in base_ck.names() if base_ck.info(n).is_float and n not in ft]
    if missing:  # the adapter would silently leave them as the base's
        problems.append(f"{ft.label}: tensor {missing[0]!r} of the base is missing"
                        + (f" ({len(missing)} tensors in all)" if len(missing) > 1 else ""))
    if problems:
        raise CheckpointError(problems[0], problems=problems)
    if out is not None:
        from ..io.writer import check_output_dir

        check_output_dir(Path(out).expanduser().absolute(), force, [*base_ck.shards, *delta.files()])
    factors, full, reports = dense_to_adapter(base_ck, delta, rank=rank, energy=energy, budget_rank=budget_rank,
                                              seed=seed, device=device,
                                              full_tensors=full_tensors, on_tensor=on_tensor,
                                              factor_dtype=_out_dtype(dtype))
    if out is not None:
        require_factors(factors, reports, f"{model} against {base}")
    result = ExtractResult(None, reports)
    if out is not None:
        result.output = write_adapter(
            out, factors, full, base_model_name_or_path=str(base), dtype=_out_dtype(dtype), force=force, base=base_ck,
            extra_files={REPORT_FILE: (json.dumps(result.to_json() | {"output": str(out)}, indent=2) + "\n").encode()},
        )
    return result


def require_factors(factors: list[Factors], reports: list[TensorReport], what: str) -> None:
    """A PEFT adapter needs at least one LoRA module: refuse to write one PEFT cannot load."""
    if not factors:
        differ = [r.name for r in reports if r.delta_norm > 0]
        raise CheckpointError(f"{what}: no weight matrix differs, so there is no LoRA to write"
                              + (f" ({len(differ)} other tensors differ, e.g. {differ[0]})" if differ else ""))


def _out_dtype(dtype: str | None) -> torch.dtype:
    """Adapter dtype: float32 unless asked (factors are small; rounding them would add error)."""
    from ..dtypes import parse_user_dtype, to_torch

    return to_torch(parse_user_dtype(dtype)) if dtype is not None else torch.float32
