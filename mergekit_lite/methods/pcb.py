"""PCB-Merging (Parameter Competition Balancing, Du et al., NeurIPS 2024): exact, streaming.

The maths (ALGORITHMS.md §1, docs/methods/pcb.md) over T, the n×D matrix of task vectors:
clamp |T| per row to two index quantiles, score every entry by intra-balancing
exp(n·N(Ã)²) times inter-balancing tanh(T·ΣT), keep the top `ratio` of each row's scores,
weight kept entries by their min-max-normalised score above the drop threshold, average the
clamped task vectors with those weights and add λ times the result to the base.

Everything a single entry needs beyond its own column (the n models' values at one position)
is four scalars per model: the clamp bounds lo/hi, the drop threshold t and the best score m.
That is what makes `scope: global` streamable: `PcbReducer` finds those scalars exactly with
radix selection (`stats.RadixSelect`) in four statistics passes, then every output tensor is
computed alone by `pcb_from_stats`. Elementwise results must not depend on how a row is cut
into tensors, so exp/tanh come from `detmath` (see there), every sum over models is an explicit
left fold, and order statistics are exact selections: the streamed result equals `pcb_dense`
on the whole row bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .detmath import exp_f32, tanh_f32
from .registry import MethodSpec, Param, Scope, TensorJob, register
from .select import kth_smallest, kth_smallest_many
from .stats import BracketSelect, RadixSelect, brackets_fit

MAX_MODELS = 88  # exp(n) overflows float32 from n = 89 on: every kept score would be inf
DEFAULT_MEMORY_BUDGET = 1 << 28  # 256 MiB: small models skip passes 2-4, big ones stream
_EPS = 1e-12  # the reference code's floor on the sum of weights


# --- index quantiles -------------------------------------------------------------------------


def quantile_index(count: int, p: float) -> int:
    """`int(count·p)` on a float64 product (Python semantics), kept inside [0, count − 1]."""
    return min(max(int(count * p), 0), count - 1)


def clamp_indices(count: int, clamp_ratio: float) -> tuple[int, int]:
    """Sorted positions of the clamp bounds: floor(D·c) and floor(D·(1−c)) − 1.

    For tiny rows (D·(1 − 2c) < 1) the upper position can fall below the lower one; we lift it
    to the lower one so lo ≤ hi always holds (the reference code clamps everything to the
    smaller value there, and its row comes out NaN).
    """
    lo = quantile_index(count, clamp_ratio)
    hi = min(max(int(count * (1 - clamp_ratio)) - 1, lo), count - 1)
    return lo, hi


def drop_index(count: int, ratio: float) -> int:
    """Sorted position of the drop threshold t: floor(D·(1 − r)); `ratio` is the fraction kept."""
    return quantile_index(count, 1 - ratio)


# --- the elementwise maths -------------------------------------------------------------------


def fold_sum(rows: torch.Tensor) -> torch.Tensor:
    """Σ over dim 0 as an explicit left fold, so every column rounds the same way in any chunk."""
    acc = rows[0].clone()
    for row in rows[1:]:
        acc = acc + row
    return acc


def column_scores(T: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamped task vectors T̃ and balance scores β for a block of columns of T (n×d, float32).

    lo/hi are the per-model clamp bounds ([n] float32, lo ≤ hi, both elements of |Tᵢ|), so
    min Ã = lo and max Ã = hi: the min-max normalisation of a row needs no other statistic.
    A row with hi = lo (all-zero, or every |τ| equal after clamping) normalises 0/0 → 0.
    """
    n = T.shape[0]
    lo_c, hi_c = lo.reshape(n, 1), hi.reshape(n, 1)
    # The same elementwise ops as the formulas say, but in place on buffers this function owns:
    # a whole tensor is scored with about five n×d float32 buffers alive instead of nine.
    A = T.abs().clamp_(min=lo_c, max=hi_c)
    T_clamped = torch.sign(T).mul_(A)
    span = hi_c - lo_c
    N = A.sub_(lo_c).div_(torch.where(span > 0, span, 1.0)).masked_fill_(~(span > 0), 0.0)
    del A
    intra = exp_f32(N.mul_(N).mul_(float(n)))  # N·N·n
    del N
    inter = tanh_f32(T * fold_sum(T))
    beta = intra.mul_(inter).add_(0.0)  # + 0.0 folds −0.0 into +0.0: one key per value for selection
    return T_clamped, beta


def score_weights(beta: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W = (β − t)/(m − t) where β > t, else 0 (so m = t, the reference's 0/0, gives weight 0)."""
    n = beta.shape[0]
    t_c, m_c = t.reshape(n, 1), m.reshape(n, 1)
    # Where β > t, m > t too (m is the row's largest β), so the division by the row's m − t is
    # the formula's; elsewhere its value (possibly 0/0) is replaced by 0, as `where` would.
    return (beta - t_c).div_(m_c - t_c).masked_fill_(~(beta > t_c), 0.0)


def combine(T_clamped: torch.Tensor, W: torch.Tensor, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """τₘ = Σᵢ λᵢ·Wᵢ·T̃ᵢ / max(Σᵢ Wᵢ, 1e-12) and the mask of entries some model kept."""
    num = (W[0] * T_clamped[0]) * coeffs[0]
    den = W[0].clone()
    for i in range(1, W.shape[0]):
        num = num + (W[i] * T_clamped[i]) * coeffs[i]
        den = den + W[i]
    merged = num / torch.clamp(den, min=_EPS)
    kept = den > 0
    return torch.where(kept, merged, 0.0), kept


def lambda_coeffs(lambdas: Sequence[float] | float, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-model λᵢ as float32 (a scalar λ applies to every model)."""
    values = [float(lambdas)] * n if isinstance(lambdas, (int, float)) else [float(v) for v in lambdas]
    if len(values) != n:
        raise ValueError(f"pcb: expected {n} lambda values, got {len(values)}")
    return torch.tensor(values, dtype=torch.float32, device=device)


# --- dense (in-memory) PCB -------------------------------------------------------------------


@dataclass(frozen=True)
class PcbStats:
    """The per-model scalars that decide every entry: what a global-scope run reduces to.

    Values are float32 numbers stored as Python floats (exact). `count` is D, the number of
    parameters per model over the scope; `passes` how many statistics passes produced them
    (0 when computed in memory by `row_stats`).
    """

    count: int
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    t: tuple[float, ...]
    m: tuple[float, ...]
    passes: int = 0

    def tensors(self, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        def f(v: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.float32, device=device)

        return f(self.lo), f(self.hi), f(self.t), f(self.m)


def _kth(rows: torch.Tensor, index: int) -> torch.Tensor:
    """sorted(row)[index] for every row: an exact selection (quickselect, no full sort)."""
    return torch.stack([kth_smallest(row, index + 1) for row in rows]).to(rows.device)


def clamp_bounds(T: torch.Tensor, clamp_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lo, hi per row of an in-memory T (n×D float32, D ≥ 1)."""
    lo_i, hi_i = clamp_indices(T.shape[1], clamp_ratio)
    pairs = [kth_smallest_many(row, [lo_i + 1, hi_i + 1]) for row in T.abs()]
    return torch.stack([p[0] for p in pairs]).to(T.device), torch.stack([p[1] for p in pairs]).to(T.device)


def _scored(T: torch.Tensor, ratio: float, clamp_ratio: float) -> tuple[torch.Tensor, ...]:
    """Steps 1–5 on an in-memory T (n×D, D ≥ 1): lo, hi, T̃, β, t, m, scoring every entry once."""
    lo, hi = clamp_bounds(T, clamp_ratio)
    T_clamped, beta = column_scores(T, lo, hi)
    t, m = _kth(beta, drop_index(T.shape[1], ratio)), beta.max(dim=1).values
    return lo, hi, T_clamped, beta, t, m


def _dense(
    T: torch.Tensor, ratio: float, clamp_ratio: float, lambdas: Sequence[float] | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-memory PCB over the columns of T; returns τₘ and the kept mask."""
    if T.shape[1] == 0:
        return T[0].clone(), torch.zeros(0, dtype=torch.bool, device=T.device)
    _, _, T_clamped, beta, t, m = _scored(T, ratio, clamp_ratio)
    return combine(T_clamped, score_weights(beta, t, m), lambda_coeffs(lambdas, T.shape[0], T.device))


def row_stats(T: torch.Tensor, ratio: float, clamp_ratio: float) -> PcbStats:
    """lo, hi, t, m of each row of an in-memory T (n×D float32) by exact selection."""
    n, count = T.shape
    if count == 0:
        empty = (0.0,) * n
        return PcbStats(0, empty, empty, empty, empty)
    lo, hi, _, _, t, m = _scored(T, ratio, clamp_ratio)
    return PcbStats(count, tuple(lo.tolist()), tuple(hi.tolist()), tuple(t.tolist()), tuple(m.tolist()))


def pcb_from_stats(
    T: torch.Tensor, stats: PcbStats, lambdas: Sequence[float] | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged task vector of a block of columns given the row statistics; also the kept mask.

    T is n×d (float32): any subset of the scope's columns. Columns are independent, so a model
    streamed tensor by tensor gives the same bits as the whole row at once.
    """
    lo, hi, t, m = stats.tensors(T.device)
    T_clamped, beta = column_scores(T, lo, hi)
    W = score_weights(beta, t, m)
    return combine(T_clamped, W, lambda_coeffs(lambdas, T.shape[0], T.device))


def pcb_dense(
    T: torch.Tensor, ratio: float = 0.1, clamp_ratio: float = 0.01, lambdas: Sequence[float] | float = 1.0
) -> torch.Tensor:
    """PCB merged task vector τₘ (length D) of an n×D matrix of task vectors, all in memory.

    Entries dropped by every model are 0 (the caller keeps the base value there).
    """
    if T.shape[0] > MAX_MODELS:
        raise ValueError(f"pcb supports at most {MAX_MODELS} models, got {T.shape[0]}")
    merged, _ = _dense(T.to(torch.float32).reshape(T.shape[0], -1), ratio, clamp_ratio, lambdas)
    return merged


# --- streaming global statistics -------------------------------------------------------------


def _task_matrix(job: TensorJob) -> torch.Tensor:
    if job.base is None:
        raise ValueError("pcb needs a base model")
    base = job.base.to(torch.float32).reshape(-1)
    return torch.stack([m.to(torch.float32).reshape(-1) - base for m in job.models])


class PcbReducer:
    """Exact lo, hi, t, m per model over every float tensor, in bounded memory.

    Passes (each streams every float tensor of base and models once):
      1. histogram the top 16 bits of |τᵢ|'s sortable key per model; count D;
      2. histogram the low 16 bits inside the bins holding ranks floor(D·c), floor(D·(1−c))−1
         → lo, hi exact;
      3. compute β for every entry (needs lo, hi), histogram its top 16 bits, track max β → m;
      4. histogram β's low 16 bits in the bin of rank floor(D·(1−r)) → t exact.
    When n·D·4 bytes of task vectors fit `memory_budget`, pass 1 keeps them and passes 2–4 run
    over that copy instead of asking the engine for more passes: same code, same numbers.
    """

    def __init__(self, params: Mapping[str, Any], n_models: int) -> None:
        if n_models > MAX_MODELS:
            raise ValueError(f"pcb supports at most {MAX_MODELS} models, got {n_models}")
        self.n = n_models
        self.ratio = float(params.get("ratio", 0.1))
        self.clamp_ratio = float(params.get("clamp_ratio", 0.01))
        self.budget = int(params.get("memory_budget", DEFAULT_MEMORY_BUDGET))
        self.stage = 1  # 1, 2: |τ| selection; 3, 4: β selection; 5: done
        self.engine_passes = 0
        self.count = 0
        self._abs: RadixSelect | BracketSelect = RadixSelect(n_models, self._clamp_ranks)
        self._beta: RadixSelect | BracketSelect = RadixSelect(n_models, self._drop_ranks)
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        self._max: torch.Tensor | None = None
        self._cache: list[torch.Tensor] | None = [] if self.budget > 0 else None
        self._cached_bytes = 0
        self._result: PcbStats | None = None

    @property
    def expected_passes(self) -> int:
        """Statistics passes when the scope's size is unknown: the upper bound, 4."""
        return 4

    def _clamp_ranks(self, row: int, count: int) -> list[int]:
        return list(clamp_indices(count, self.clamp_ratio))

    def _drop_ranks(self, row: int, count: int) -> list[int]:
        return [drop_index(count, self.ratio)]

    def expect(self, numel: int) -> None:
        """The engine's word on the scope's size, before the first pass.

        No cache when it cannot fit (without this the cache filled up to the budget before
        giving up, and the heap kept those 256 MiB). And sample-bracket selection instead of
        radix selection when the brackets' entries will fit in memory: it costs two comparisons
        per value and pass instead of a key and a histogram (PCB global on the 100M benchmark
        model: 30.3-30.8 s → 21.8-23.6 s, the same output bits), and gives the same values. Past that size (about 3·10⁹
        entries per model) the brackets would overflow and cost two more passes, so radix
        selection stays.
        """
        if self._cache is not None and self.n * numel * 4 > self.budget:
            self._cache = None
        if self.stage == 1 and self.count == 0 and brackets_fit(numel, (self.clamp_ratio, 1 - self.clamp_ratio,
                                                                         1 - self.ratio)):
            self._abs = BracketSelect(self.n, self._clamp_ranks)
            self._beta = BracketSelect(self.n, self._drop_ranks)

    def held_bytes(self, numel: int) -> int:
        """Memory the cached task vectors take over a scope of `numel` entries per model (dry-run
        estimates): n·numel float32 when they fit `memory_budget`, else nothing is kept."""
        return self.n * numel * 4 if self.passes_for(numel) == 1 else 0

    def passes_for(self, numel: int) -> int:
        """Statistics passes over a scope of `numel` entries per model (dry-run estimates): 1 when
        the n task vectors (float32) fit `memory_budget` and pass 1 keeps them, else 4."""
        return 1 if self._cache is not None and self.n * numel * 4 <= self.budget else 4

    # engine-facing protocol

    def observe(self, job: TensorJob) -> None:
        T = _task_matrix(job)
        if self.stage == 1 and self._cache is not None:
            self._cached_bytes += T.numel() * T.element_size()
            if self._cached_bytes <= self.budget:
                self._cache.append(T)
            else:
                self._cache = None  # over budget: stream every pass from the inputs
        self._feed(T)

    def end_pass(self) -> bool:
        self.engine_passes += 1
        done = self._close()
        if self.stage == 2 and self._cache is not None:
            while not done:
                for T in self._cache:
                    self._feed(T)
                done = self._close()
            self._cache = None
        return done

    def result(self) -> PcbStats:
        if self._result is None:
            raise RuntimeError("pcb: statistics requested before the passes finished")
        return self._result

    # the four stages

    def _feed(self, T: torch.Tensor) -> None:
        if self.stage == 1:
            self.count += T.shape[1]
        if self.stage in (1, 2):
            A = T.abs()
            for i in range(self.n):
                self._abs.observe(i, A[i])
            return
        if self.stage in (3, 4):
            assert self._lo is not None and self._hi is not None
            _, beta = column_scores(T, self._lo.to(T.device), self._hi.to(T.device))
            for i in range(self.n):
                self._beta.observe(i, beta[i])
            if self.stage == 3 and beta.shape[1] > 0:
                block_max = beta.max(dim=1).values.cpu()
                if self._max is None:
                    self._max = block_max
                else:  # in place: no small tensor left behind per block to fragment the heap
                    torch.maximum(self._max, block_max, out=self._max)
            return
        raise RuntimeError("pcb: observe() after the statistics passes finished")

    def _close(self) -> bool:
        if self.stage == 1 and self.count == 0:
            zeros = (0.0,) * self.n
            self._result = PcbStats(0, zeros, zeros, zeros, zeros, passes=1)
            self.stage = 5
            return True
        if self.stage in (1, 3):
            (self._abs if self.stage == 1 else self._beta).end_pass()
            self.stage += 1
            return False
        if self.stage == 2:
            if not self._abs.end_pass():  # a bracket missed: its selection needs more passes
                return False
            bounds = self._abs.values()
            self._lo, self._hi = bounds[:, 0].contiguous(), bounds[:, 1].contiguous()
            self.stage = 3
            return False
        if self.stage == 4:
            if not self._beta.end_pass():
                return False
            assert self._lo is not None and self._hi is not None and self._max is not None
            t = self._beta.values()[:, 0]
            self._result = PcbStats(
                self.count,
                tuple(self._lo.tolist()),
                tuple(self._hi.tolist()),
                tuple(t.tolist()),
                tuple(self._max.tolist()),
                passes=self.engine_passes,
            )
            self.stage = 5
            return True
        return True


# --- the registered method -------------------------------------------------------------------


def job_lambdas(params: Mapping[str, Any], n: int) -> list[float]:
    """λᵢ = lambda · weightᵢ (weight defaults to 1, so either one alone means what it says)."""
    lam = float(params.get("lambda", 1.0))
    weights = params.get("weight", 1.0)
    ws = [float(weights)] * n if isinstance(weights, (int, float)) else [float(w) for w in weights]
    return [lam * w for w in ws]


def merge_tensor(job: TensorJob) -> torch.Tensor:
    """One output tensor: global scope uses the reducer's statistics, tensor scope its own."""
    if job.base is None:
        raise ValueError("pcb needs a base model")
    n = len(job.models)
    if n > MAX_MODELS:
        raise ValueError(f"pcb supports at most {MAX_MODELS} models, got {n}")
    T = _task_matrix(job)
    lambdas = job_lambdas(job.params, n)
    if isinstance(job.stats, PcbStats):  # global scope, or a tensor streamed in row blocks
        merged, kept = pcb_from_stats(T, job.stats, lambdas)
    elif job.params.get("scope", "global") == "tensor":  # a whole tensor: its own statistics
        ratio, clamp_ratio = float(job.params.get("ratio", 0.1)), float(job.params.get("clamp_ratio", 0.01))
        merged, kept = _dense(T, ratio, clamp_ratio, lambdas)
    else:
        raise RuntimeError(f"pcb: global scope but no statistics for tensor {job.name}")
    base = job.base.to(torch.float32).reshape(-1)
    return torch.where(kept, base + merged, base).view(job.base.shape)


def _scope(params: Mapping[str, Any]) -> Scope:
    return "tensor" if params.get("scope", "global") == "tensor" else "global"


def _row_local(params: Mapping[str, Any]) -> bool:
    """Given global statistics every entry is computed from its own column alone."""
    return _scope(params) == "global"


def _tensor_reducer(params: Mapping[str, Any], n_models: int) -> PcbReducer | None:
    """Tensor scope on a tensor too big for one piece: the same exact statistics over its row blocks."""
    return PcbReducer(params, n_models) if _scope(params) == "tensor" else None


PARAMS = (
    Param("ratio", "float", 0.1, "fraction of each model's entries KEPT (0.1 drops 90%)",
          minimum=0.0, maximum=1.0, min_exclusive=True, per_tensor=False),
    Param("clamp_ratio", "float", 0.01, "fraction of |τ| clamped at each end before scoring",
          minimum=0.0, maximum=0.5, max_exclusive=True, per_tensor=False),
    Param("lambda", "float", 1.0, "scale of the merged task vector (negative allowed: task negation)",
          aliases=("scaling_coef",)),
    Param("weight", "float", 1.0, "per-model λᵢ, multiplied by lambda; does not affect the competition",
          per_model=True),
    Param("scope", "str", "global", "global: statistics over the whole model (reference); tensor: per tensor",
          choices=("global", "tensor"), per_tensor=False),
    Param("memory_budget", "int", DEFAULT_MEMORY_BUDGET,
          "bytes of task vectors the global statistics may hold in memory to skip passes 2-4; 0 = always stream",
          minimum=0, per_tensor=False),
)

SPEC = register(
    MethodSpec(
        name="pcb",
        summary="PCB-Merging: clamp, intra/inter balancing, drop, weighted mean of task vectors (exact, global)",
        params=PARAMS,
        merge=merge_tensor,
        needs_base=True,
        min_models=1,
        max_models=MAX_MODELS,
        scope=_scope,
        reducer=PcbReducer,
        row_local=_row_local,
        tensor_reducer=_tensor_reducer,
        paper="https://arxiv.org/abs/2410.02396",
        doc="methods/pcb.md",
    ),
    aliases=("pcb_merging",),
)
