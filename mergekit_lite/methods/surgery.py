"""Model Surgery (Wang et al., NAACL 2025): probe-guided edits of gate-projection rows.

A linear probe on hidden states gives a behaviour direction w. Every row g of every target
matrix (by default `mlp.gate_proj.weight`, [d_ff, d]) is the input vector of one intermediate
neuron; the rows that point most against w (highest score = −cos(g, w)) over the whole model
get α·w added. Because the selection is a top-K over all layers, the method is global: a
`Reducer` scores every row in one streaming pass and keeps a bounded global top-K; the output
pass then edits only the selected rows and returns every other tensor unchanged.

`direction="promote"` is suppression of the opposite direction (w ↦ −w): score = +cos(g, w)
and g ← g − α·w. Nothing here reads files: the probe arrives as a dict of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import RecipeError
from .registry import MethodSpec, Param, TensorJob, register

# The reference edits 16,384 rows of LLaMA-2-7B's 32 × 11,008 gate rows.
DEFAULT_FRACTION = 16384 / (32 * 11008)
DEFAULT_TARGET = "mlp.gate_proj"
DIRECTIONS = ("suppress", "promote")
_COS_EPS = 1e-8

# Keys under which a probe file may hold its classifier weight: ours, then the reference's
# PPLM classification head (`mlp.weight`).
PROBE_KEYS = ("weight", "mlp.weight")


@dataclass(frozen=True)
class SelectedRow:
    """One edited row: which tensor, its layer, the row index and its score."""

    tensor: str
    layer: int
    row: int
    score: float


@dataclass(frozen=True)
class SurgerySelection:
    """The reducer's result: the global top-K in rank order plus what the edit needs.

    `vector` is the signed edit direction v (w for suppress, −w for promote) in float32 on the
    CPU; the edit is g ← g + alpha·v on every row listed in `rows`.
    """

    entries: tuple[SelectedRow, ...]
    rows: Mapping[str, torch.Tensor]  # tensor name → ascending int64 row indices
    vector: torch.Tensor
    alpha: float
    direction: str
    target: str
    n_candidates: int
    n_tensors: int

    @property
    def k(self) -> int:
        return len(self.entries)


def probe_direction(probe: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The behaviour direction w (float32, [d]) held by a probe.

    A [2, d] classifier weight gives its row 1 (the class to suppress), unnormalised, as the
    reference does; a [d] tensor is taken as w itself.
    """
    if isinstance(probe, torch.Tensor):
        t = probe
    else:
        key = next((k for k in PROBE_KEYS if k in probe), None)
        if key is None:
            if len(probe) != 1:
                found = ", ".join(sorted(probe)) or "nothing"
                raise RecipeError(f"probe: expected a tensor named 'weight' of shape (2, d) or (d,); found {found}")
            key = next(iter(probe))
        t = probe[key]
    if not t.is_floating_point():
        raise RecipeError(f"probe: weight must be a float tensor, got {t.dtype}")
    if t.dim() == 2 and t.shape[0] == 2:
        w = t[1]
    elif t.dim() == 1:
        w = t
    else:
        raise RecipeError(f"probe: weight must have shape (2, d) or (d,), got {tuple(t.shape)}")
    w = w.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(w).all()):
        raise RecipeError("probe: weight contains NaN or infinite values")
    if float(w.norm()) == 0.0:
        raise RecipeError("probe: the behaviour direction is all zeros")
    return w


def edit_vector(w: torch.Tensor, direction: str) -> torch.Tensor:
    """The signed direction v that both scores and edits: w to suppress, −w to promote."""
    if direction not in DIRECTIONS:
        raise RecipeError(f"direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return w if direction == "suppress" else -w


def target_layer(name: str, target: str) -> int | None:
    """The layer index of a target weight, or None when `name` is not a target.

    A target is `<prefix>.<target>.weight` where `target` matches whole dotted components
    (`gate_proj` matches `mlp.gate_proj`, never `xgate_proj`). The layer is the first integer
    component of the prefix (`model.layers.7.mlp...` → 7; MoE experts keep their layer's index).
    Targets without any integer component are not candidates.
    """
    suffix = f"{target}.weight"
    if not name.endswith(suffix):
        return None
    prefix = name[: -len(suffix)]
    if prefix and not prefix.endswith("."):
        return None
    for part in prefix.split("."):
        if part.isdigit():
            return int(part)
    return None


def row_scores(matrix: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """score_i = −cos(g_i, v) for every row g_i: high when the row points against v.

    v is the signed direction (w to suppress, −w to promote, so promote scores +cos(g, w)).
    Float32; each norm is clamped at 1e-8 so an all-zero row scores 0; NaN scores (rows
    holding NaN) become −inf so they rank last.
    """
    m = matrix.to(torch.float32)
    vv = v.to(device=m.device, dtype=torch.float32)
    dots = (m * vv).sum(dim=1)
    norms = m.norm(dim=1).clamp_min(_COS_EPS) * vv.norm().clamp_min(_COS_EPS)
    scores = -(dots / norms)
    return torch.nan_to_num(scores, nan=-math.inf)


def rank_order(score: torch.Tensor, layer: torch.Tensor, name_rank: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Indices sorting candidates by score desc, then layer, tensor name, row ascending.

    Built from stable sorts, least significant key first, so exact ties never depend on the
    order in which tensors were visited or on the sort implementation.
    """
    order = torch.argsort(row, stable=True)
    for key, desc in ((name_rank, False), (layer, False), (score, True)):
        idx = torch.sort(key[order], descending=desc, stable=True).indices
        order = order[idx]
    return order


def k_from(top_k: int | None, fraction: float, n_candidates: int) -> int:
    """K: `top_k` when given, else round(fraction · number of candidate rows), at least 1."""
    if top_k is not None:
        return int(top_k)
    return max(1, math.floor(fraction * n_candidates + 0.5))


@dataclass
class _Pool:
    """Candidate rows kept so far (CPU tensors), bounded by `limit` when K is known."""

    score: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float32))
    layer: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    tid: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    row: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    def add(self, score: torch.Tensor, layer: int, tid: int, row: torch.Tensor) -> None:
        n = score.numel()
        self.score = torch.cat([self.score, score])
        self.layer = torch.cat([self.layer, torch.full((n,), layer, dtype=torch.int64)])
        self.tid = torch.cat([self.tid, torch.full((n,), tid, dtype=torch.int64)])
        self.row = torch.cat([self.row, row])

    def select(self, names: Sequence[str], limit: int | None) -> None:
        """Sort by the tie-break order and keep the first `limit` rows."""
        ranks = {n: i for i, n in enumerate(sorted(names))}
        name_rank = torch.tensor([ranks[n] for n in names], dtype=torch.int64)[self.tid]
        order = rank_order(self.score, self.layer, name_rank, self.row)
        if limit is not None:
            order = order[:limit]
        self.score, self.layer, self.tid, self.row = (t[order] for t in (self.score, self.layer, self.tid, self.row))


class SurgeryReducer:
    """One pass over the model: score every target row, keep the global top-K.

    With `top_k` given, memory stays O(K): each tensor contributes at most its own top-K, and
    the pool is cut back to K whenever it exceeds 2K. With only `fraction`, K depends on the
    total number of target rows, which is known only at the end, so every row's score is kept
    (one float and two ints per row, about 1/d of the target matrices' size).
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.direction = str(params.get("direction", "suppress"))
        if self.direction not in DIRECTIONS:
            raise RecipeError(f"surgery: direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        self.target = str(params.get("target", DEFAULT_TARGET))
        self.alpha = float(params.get("alpha", 1.0))
        top_k = params.get("top_k")
        self.top_k = None if top_k is None else int(top_k)
        self.fraction = float(params.get("fraction", DEFAULT_FRACTION))
        # The probe may arrive here as loaded tensors or, when the engine only substitutes
        # tensor files into per-tensor jobs, as the file name: then the first job supplies it.
        self.vector: torch.Tensor | None = None
        self.probe_label = "probe"
        self._set_probe(params.get("probe"), required=False)
        self._pool = _Pool()
        self._names: list[str] = []
        self._tids: dict[str, int] = {}
        self._seen: set[tuple[str, int]] = set()
        self._n_candidates = 0
        self._result: SurgerySelection | None = None

    def _set_probe(self, probe: Any, *, required: bool) -> None:
        if isinstance(probe, (Mapping, torch.Tensor)):
            self.vector = edit_vector(probe_direction(probe), self.direction)
            path = getattr(probe, "path", None)  # a recipe's probe file (engine.plan.TensorFile)
            self.probe_label = f"probe {path}" if path is not None else "probe"
        elif required:
            raise RecipeError("surgery: parameter 'probe' must name a probe file (safetensors with 'weight')")

    def wants(self, name: str) -> bool:
        """Only target tensors are scored: the engine need not read the others."""
        return target_layer(name, self.target) is not None

    def observe(self, job: TensorJob) -> None:
        """Score one target tensor, or one row block of it (`job.rows` = (start, stop))."""
        layer = target_layer(job.name, self.target)
        offset = job.rows[0] if job.rows is not None else 0
        if layer is None or (job.name, offset) in self._seen:
            return
        if self.vector is None:
            self._set_probe(job.params.get("probe"), required=True)
        assert self.vector is not None
        w = job.base
        if w is None:
            raise RecipeError(f"surgery: step has no base model to edit (tensor {job.name})")
        d = self.vector.numel()
        if w.dim() != 2 or w.shape[1] != d:
            raise RecipeError(
                f"surgery: {self.probe_label} has hidden size {d} but target tensor {job.name} has shape {list(w.shape)} "
                f"(expected rows of size {d})"
            )
        self._seen.add((job.name, offset))
        scores = row_scores(w, self.vector).cpu()
        rows = torch.arange(offset, offset + scores.numel(), dtype=torch.int64)
        order = torch.sort(scores, descending=True, stable=True).indices  # ties: row ascending
        if self.top_k is not None:
            order = order[: self.top_k]
        tid = self._tids.get(job.name)
        if tid is None:
            tid = self._tids[job.name] = len(self._names)
            self._names.append(job.name)
        self._pool.add(scores[order], layer, tid, rows[order])
        self._n_candidates += scores.numel()
        if self.top_k is not None and self._pool.score.numel() > 2 * self.top_k:
            self._pool.select(self._names, self.top_k)

    def end_pass(self) -> bool:
        return True

    def result(self) -> SurgerySelection:
        if self._result is None:
            self._result = self._finish()
        return self._result

    def _finish(self) -> SurgerySelection:
        if self._n_candidates == 0:
            raise RecipeError(
                f"surgery: the model has no target modules matching '{self.target}' "
                f"(expected tensors like model.layers.<i>.{self.target}.weight)"
            )
        k = k_from(self.top_k, self.fraction, self._n_candidates)
        if k > self._n_candidates:
            raise RecipeError(
                f"surgery: top_k = {k} is larger than the number of candidate rows ({self._n_candidates} rows "
                f"in {len(self._names)} '{self.target}' tensors)"
            )
        self._pool.select(self._names, k)
        assert self.vector is not None
        p = self._pool
        entries = tuple(
            SelectedRow(self._names[t], int(layer), int(r), float(s))
            for s, layer, t, r in zip(p.score.tolist(), p.layer.tolist(), p.tid.tolist(), p.row.tolist(), strict=True)
        )
        by_tensor: dict[str, list[int]] = {}
        for e in entries:
            by_tensor.setdefault(e.tensor, []).append(e.row)
        rows = {n: torch.tensor(sorted(r), dtype=torch.int64) for n, r in by_tensor.items()}
        return SurgerySelection(
            entries=entries,
            rows=rows,
            vector=self.vector,
            alpha=self.alpha,
            direction=self.direction,
            target=self.target,
            n_candidates=self._n_candidates,
            n_tensors=len(self._names),
        )


def apply_edit(weight: torch.Tensor, rows: torch.Tensor, vector: torch.Tensor, alpha: float) -> torch.Tensor:
    """weight with `alpha·vector` added to `rows` (float32; the caller casts once)."""
    out = weight.to(torch.float32).clone()
    if rows.numel():
        idx = rows.to(out.device)
        out[idx] = out[idx] + alpha * vector.to(device=out.device, dtype=torch.float32)
    return out


def surgery_merge(job: TensorJob) -> torch.Tensor:
    """Output pass: edit the selected rows of a target tensor; return every other tensor as is."""
    sel = job.stats
    if not isinstance(sel, SurgerySelection):
        raise RuntimeError("surgery needs the statistics pass result (job.stats) before the output pass")
    if job.base is None:
        raise RecipeError(f"surgery: step has no base model to edit (tensor {job.name})")
    rows = sel.rows.get(job.name)
    if rows is None:
        return job.base
    if job.rows is not None:  # a row block [start, stop) of the tensor
        start, stop = job.rows
        rows = rows[(rows >= start) & (rows < stop)] - start
    return apply_edit(job.base, rows, sel.vector, sel.alpha)


def _make_reducer(params: Mapping[str, Any], n_models: int) -> SurgeryReducer:
    return SurgeryReducer(params)


def _keeps_base(name: str, selection: Any) -> bool:
    """A tensor with no selected row is written as the model stores it (see surgery_merge)."""
    return isinstance(selection, SurgerySelection) and name not in selection.rows


SPEC = register(
    MethodSpec(
        name="surgery",
        summary="Model Surgery: add α·w (probe direction) to the gate rows most anti-aligned with w, global top-K.",
        params=(
            Param("probe", "tensor_file", None, "probe file: safetensors with 'weight' of shape (2, d) (row 1 = behaviour) or (d,)",
                  required=True, per_tensor=False),
            Param("alpha", "float", 1.0, "edit strength: g ← g + α·w on the selected rows", per_tensor=False),
            Param("top_k", "int", None, "number of rows to edit over the whole model (give this or fraction)",
                  minimum=1, per_tensor=False),
            Param("fraction", "float", DEFAULT_FRACTION, "fraction of all target rows to edit when top_k is not set",
                  minimum=0.0, maximum=1.0, min_exclusive=True, per_tensor=False),
            Param("target", "str", DEFAULT_TARGET, "module whose weight rows are candidates (dotted suffix)",
                  per_tensor=False),
            Param("direction", "str", "suppress", "suppress the probe's class (score −cos) or promote it (+cos, −w)",
                  choices=DIRECTIONS, per_tensor=False),
        ),
        merge=surgery_merge,
        needs_base=True,
        min_models=0,
        max_models=0,
        exclusive=(("top_k", "fraction"),),
        scope=lambda params: "global",
        reducer=_make_reducer,
        keeps_base=_keeps_base,
        row_local=lambda params: True,  # row-wise: rows of a block are scored and edited alone
        paper="https://arxiv.org/abs/2407.08770",
        doc="methods/surgery.md",
    )
)
