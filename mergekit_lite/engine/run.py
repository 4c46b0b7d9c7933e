"""Executing a plan: statistics passes for global steps, then one streaming output pass.

For each tensor name (in input-shard order) the reader thread loads the raw inputs, the main
thread runs the step chain in memory (a step consumes the previous step's tensor directly),
and the writer thread streams results into pre-laid-out shards. Global steps first get their
own passes, each streaming the step's inputs through the method's `Reducer`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..dtypes import to_torch
from ..errors import CheckpointError, RecipeError
from ..io import chat_template
from ..io.chat_template import TOKENIZER_FILES
from ..io.checkpoint import TIED_HEAD
from ..io.deltas import is_vocab_tensor
from ..io.model_card import model_card
from ..io.safetensors_format import PlannedTensor
from ..io.writer import CheckpointWriter, all_finite, config_dtype_update, require_finite
from ..methods.registry import TensorJob, reducer_reads
from .fingerprint import fingerprint
from .memory import streaming_heap
from .plan import (
    Leaf,
    Operand,
    Patched,
    Plan,
    StepPlan,
    StepRef,
    for_present,
    present,
    scope_numel,
    step_closure,
    step_src,
)
from .stream import (
    BackgroundWriter,
    Bundle,
    CpuClock,
    LiveTensors,
    WorkItem,
    prefetch,
    whole_tensor_limit,
    work_items,
)
from .threads import torch_threads

log = logging.getLogger(__name__)

PREFETCH_DEPTH = 2

TensorHook = Callable[[str, TensorJob, torch.Tensor], None]
PublishHook = Callable[[Path, "RunResult"], None]


@dataclass
class RunResult:
    output: Path | None
    state_dict: dict[str, torch.Tensor] | None
    stats: dict[str, Any]
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    tensors: int = 0
    passes: list[dict[str, Any]] = field(default_factory=list)
    max_live_tensors: int = 0
    saved: dict[str, Path] = field(default_factory=dict)
    resumed: int = 0  # output tensors found already written by an interrupted run
    # CPU seconds of the passes by role: "reading" and "writing" (the I/O threads), "computing"
    # (every other thread of the process: the merging thread, torch's workers, the progress bar).
    cpu_seconds: dict[str, float] = field(default_factory=dict)


class _Evaluator:
    """Computes step values for one tensor name from its loaded bundle, memoised per name."""

    def __init__(self, plan: Plan, stats: dict[str, Any], hook: TensorHook | None) -> None:
        self.plan = plan
        self.stats = stats
        self.hook = hook
        self.single_use = _single_use_leaves(plan)

    def run(self, step_id: str, bundle: Bundle, memo: dict[Any, torch.Tensor]) -> torch.Tensor:
        key = ("step", step_id)
        if key not in memo:
            memo[key] = self._step(self.plan.steps[step_id], bundle, memo)
        return memo[key]

    def job(self, st: StepPlan, bundle: Bundle, memo: dict[Any, torch.Tensor], with_stats: bool,
            disposable: bool = False) -> TensorJob:
        """The step's job for this bundle; `disposable` lets the method overwrite its models
        where the engine can prove nothing reads them afterwards (`_disposable`)."""
        name = bundle.name
        patch = bundle.patches.get(st.delta_key) if st.delta_key is not None else None
        if patch is not None:
            patch = patch.to(self.plan.device)
        if patch is not None and patch.kind == "replace":
            # The saved tensor stands in for the base, and the LoRA delta PEFT adds on top of it
            # (`_step` only gets here when there is one) is the step's delta, which λ scales.
            base, delta = patch.tensor, patch.on_top
        else:
            base = self._value(st.base, bundle, memo) if st.base is not None else None
            delta = patch.tensor if patch is not None else None
        # a layer stack's slice with fewer sources merges its own models, with their values
        models = [self._value(st.models[i], bundle, memo) for i in present(self.plan, st, name)]
        params, _ = for_present(self.plan, st, name, _with_tensor_files(self.plan, st, st.resolver.for_tensor(name)))
        rows = self.plan.vocab_rows.get(name)
        if rows is not None:
            base = base[:rows] if base is not None else None
            models = [m[:rows] for m in models]
            delta = delta[:rows] if delta is not None else None
        return TensorJob(name=name, base=base, models=models, params=params, seed=self.plan.seed,
                         stats=self.stats.get(st.id) if with_stats else None, delta=delta, rows=bundle.rows,
                         models_disposable=disposable and self._disposable(st, bundle))

    def stored_base(self, step_id: str, bundle: Bundle, dtype: torch.dtype) -> torch.Tensor | None:
        """The base as the checkpoint stores it, when the step keeps it as it is and the output
        dtype is the stored one: writing those bytes is what a float32 round trip would write.

        Not with a tensor hook (it expects a job), a patch or a trimmed vocabulary.
        """
        st = self.plan.steps[step_id]
        keeps = st.spec.keeps_base
        if (keeps is None or self.hook is not None or not isinstance(st.base, Leaf) or st.delta_key is not None
                or bundle.name in self.plan.vocab_rows or not keeps(bundle.name, self.stats.get(step_id))):
            return None
        stored = bundle.leaves.get(st.base.key)
        return stored if stored is not None and stored.dtype == dtype else None

    def _disposable(self, st: StepPlan, bundle: Bundle) -> bool:
        """Whether every model tensor is a float copy that nothing reads after this step.

        A model's value is made for this bundle alone: `Checkpoint.load` returns memory the
        caller owns, and the float32 cast, if any, is a copy of it. It is safe to overwrite
        when the operand is a checkpoint leaf used once in the whole plan (a leaf feeding two
        steps, or the base and a model at once, is shared through the memo), no hook looks at
        the job afterwards, and the tensor is not vocabulary-trimmed (its untrimmed rows are
        then taken from an input).
        """
        if self.hook is not None or bundle.name in self.plan.vocab_rows:
            return False
        return all(isinstance(op, Leaf) and op.key in self.single_use for op in st.models)

    def _step(self, st: StepPlan, bundle: Bundle, memo: dict[Any, torch.Tensor]) -> torch.Tensor:
        if st.delta_key is not None:
            patch = bundle.patches.get(st.delta_key)
            if patch is not None and patch.kind == "replace" and patch.on_top is None:
                return patch.tensor.to(self.plan.device, torch.float32)
        job = self.job(st, bundle, memo, with_stats=True, disposable=True)
        out = st.spec.merge(job)
        rows = self.plan.vocab_rows.get(bundle.name)
        if rows is not None:
            full = self._value(st.base if st.base is not None else st.models[0], bundle, memo).clone()
            full[:rows] = out
            out = full
        if self.hook is not None:
            self.hook(bundle.name, job, out)
        return out

    def _value(self, op: Operand, bundle: Bundle, memo: dict[Any, torch.Tensor]) -> torch.Tensor:
        if isinstance(op, StepRef):
            return self.run(op.step_id, bundle, memo)
        key = ("op", op)
        if key in memo:
            return memo[key]
        if isinstance(op, Leaf):
            value = bundle.leaves[op.key]
            if value.device != self.plan.device:
                # upload the stored bytes, then cast on the device: `.to(cuda, float32)` would cast
                # on the CPU first and send twice the bytes of a bf16 input
                value = value.to(self.plan.device)
            value = value.to(torch.float32)
        else:
            assert isinstance(op, Patched)
            base = self._value(op.base, bundle, memo)
            patch = bundle.patches.get(op.delta_key)
            if patch is None:
                value = base
            else:  # as PEFT loads the adapter: λ = 1
                value = patch.to(self.plan.device).value(base)
        memo[key] = value
        return value


def _blame_inputs(plan: Plan, step_id: str, name: str, rows: tuple[int, int] | None) -> None:
    """After step `step_id`'s value for `name` came out non-finite: a CheckpointError naming the
    input of that step that holds inf or NaN there, if one does. The inputs are read again from
    their files (this runs only on that failure): a step may have scaled its own float32 copy in
    place, which the overflow being reported would have made infinite too."""
    ck_keys, delta_keys = plan.leaves_of(step_id)
    for key in sorted(ck_keys):
        ck = plan.checkpoints[key]
        if name in ck and ck.info(name).is_float and not all_finite(ck.load(name, rows=rows)):
            raise CheckpointError(f"{ck.label}: tensor {name!r} holds inf or NaN")
    shape = next(o.shape for o in plan.outputs if o.name == name)
    for key in sorted(delta_keys):
        patch = plan.deltas[key].patch(name, shape, "cpu")
        parts = [] if patch is None else [patch.tensor] + ([patch.on_top] if patch.on_top is not None else [])
        if not all(all_finite(t) for t in parts):
            raise CheckpointError(f"{plan.deltas[key].label}: its change to {name!r} holds inf or NaN")


def _single_use_leaves(plan: Plan) -> set[str]:
    """Checkpoint keys that appear as exactly one operand in the whole plan (patched bases included)."""
    uses: dict[str, int] = {}

    def visit(op: Operand | None) -> None:
        if isinstance(op, Leaf):
            uses[op.key] = uses.get(op.key, 0) + 1
        elif isinstance(op, Patched):
            visit(op.base)

    for st in plan.steps.values():
        visit(st.base)
        for m in st.models:
            visit(m)
    return {k for k, n in uses.items() if n == 1}


def _with_tensor_files(plan: Plan, st: StepPlan, params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters with every tensor_file path replaced by the tensors loaded at planning time."""
    out = dict(params)
    for p in st.spec.params:
        if p.kind == "tensor_file" and isinstance(out.get(p.name), str):
            out[p.name] = plan.tensor_files[out[p.name]]
    return out


def _loader(plan: Plan, ck_keys: set[str], delta_keys: set[str], copy_keys: set[str]) -> Callable[[WorkItem], Bundle]:
    float_names = {o.name for o in plan.outputs if o.is_float}
    shapes = {o.name: o.shape for o in plan.outputs}

    def load(item: WorkItem) -> Bundle:
        name = item.name
        bundle = Bundle(name, item.rows)
        keys = ck_keys if name in float_names else copy_keys
        for k in sorted(keys):
            ck = plan.checkpoints[k]
            if name in ck:
                bundle.leaves[k] = ck.load(name, rows=item.rows)
        if name in float_names:
            for k in sorted(delta_keys):  # a patched tensor is never row-blocked (_block_mode)
                bundle.patches[k] = plan.deltas[k].patch(name, shapes[name], "cpu")
        return bundle

    return load


def _announce(reducer: Any, numel: int) -> None:
    """Tell a reducer how many entries per model its passes will see, when it asks (`expect`):
    PCB then knows before its first block whether the task vectors fit its memory budget."""
    expect = getattr(reducer, "expect", None)
    if callable(expect):
        expect(numel)


def _block_mode(plan: Plan, step_ids: list[str], *, local_stats: bool) -> Callable[[str], str]:
    """How a tensor may be streamed: "whole", in row "blocks", or in blocks after "local" stats.

    Row blocks need every step of the chain to be row-local for that tensor's parameters.
    With `local_stats`, a step that is not row-local but offers a `tensor_reducer` (TIES'
    per-tensor top-k) is also fine: its statistics are first gathered over the tensor's blocks.
    """
    closure = step_closure(plan, step_ids)
    # A LoRA's ΔW = B·A (or a saved tensor) is made whole: the tensors a delta changes are too.
    # The others (most of a model, for a LoRA: its embeddings among them) stream in blocks.
    patched = {name for sid in step_ids for key in plan.leaves_of(sid)[1] for name in plan.deltas[key].targets()}
    float_names = {o.name for o in plan.outputs if o.is_float}

    def mode(name: str) -> str:
        if name in patched or name not in float_names or name in plan.vocab_rows:
            return "whole"
        needs_stats = False
        for st in closure:
            params = st.resolver.for_tensor(name)
            if st.spec.row_local(params):
                continue
            if local_stats and st.spec.tensor_reducer is not None and st.spec.tensor_reducer(
                    *for_present(plan, st, name, params)):
                needs_stats = True
                continue
            return "whole"
        return "local" if needs_stats else "blocks"

    return mode


def _progress(enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    )


def execute(
    plan: Plan,
    *,
    progress: bool = True,
    publish_hook: PublishHook | None = None,
    tensor_hook: TensorHook | None = None,
    keep_state_dict: bool | None = None,
    resume: bool = False,
    threads: int | None = None,
    resumable: bool = True,
) -> RunResult:
    """Run every statistics pass, then the output pass; publish atomically when done.

    Writes are resumable: an interrupted run keeps its partial output (hidden beside the
    target), and `resume=True` continues it when nothing that decides the output changed;
    `resumable=False` (a workflow with no `--resume`, whose publish hook writes more than
    tensors) throws the partial output away instead.
    Statistics passes are cheap next to the output and are always redone. `threads` fixes
    torch's CPU threads for the run; None lets the engine choose (engine/threads.py).
    """
    with torch_threads(plan, threads), _no_full_collections(), streaming_heap():
        return _execute(plan, progress, publish_hook, tensor_hook, keep_state_dict, resume, resumable)


@contextlib.contextmanager
def _no_full_collections() -> Iterator[None]:
    """Keep Python's cyclic GC off the objects that exist before the merge starts.

    The streaming loop allocates enough small Python objects to trigger oldest-generation
    collections, and each of those walks every object torch and the rest of the process ever
    created: 2-3% of a linear merge's CPU time. Freezing moves them out of the collector's
    sight for the run (objects the merge creates are still collected); unfreezing hands them
    back. Where objects are frozen already (by the CLI, or by a notebook's own `gc.freeze`),
    nothing is done: unfreezing would hand back the caller's objects too.
    """
    if gc.get_freeze_count() > 0:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _blamed_on(plan: Plan, st: StepPlan) -> Iterator[None]:
    """A recipe problem a step's statistics find (surgery's top_k above the rows the model has)
    points at the step's line and names it, as the plan's own checks do."""
    try:
        yield
    except RecipeError as exc:
        if len(exc.problems) != 1:
            raise
        raise RecipeError(f"{step_src(plan, st)}: step {st.id!r}: {exc.problems[0]}") from None


def _execute(plan: Plan, progress: bool, publish_hook: PublishHook | None, tensor_hook: TensorHook | None,
             keep_state_dict: bool | None, resume: bool, resumable: bool) -> RunResult:
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    clock = CpuClock()
    for ck in plan.checkpoints.values():
        ck.bytes_read = 0
        ck.reads.clear()
    stats: dict[str, Any] = {}
    live = LiveTensors()
    result = RunResult(output=None, state_dict=None, stats=stats)
    float_names = [o.name for o in plan.outputs if o.is_float]
    with _progress(progress) as bar:
        # 1. statistics passes of global steps, in topological order
        for st in plan.global_steps:
            assert st.spec.reducer is not None, f"method {st.spec.name} is global but has no reducer"
            reducer = st.spec.reducer(_with_tensor_files(plan, st, st.resolver.scalar_values()), len(st.models))
            _announce(reducer, scope_numel(plan))
            evaluator = _Evaluator(plan, stats, None)
            ck_keys, dkeys = plan.leaves_of(st.id)
            names = [n for n in float_names if reducer_reads(reducer)(n)]
            shapes = {o.name: o.shape for o in plan.outputs}
            mode = _block_mode(plan, [st.id], local_stats=False)

            def blockable(name: str, mode: Callable[[str], str] = mode) -> bool:
                # A "whole" tensor (vocabulary-trimmed, LoRA-patched, or fed by a step that is
                # not row-local, like slerp) must reach the reducer whole, as in the output pass.
                return mode(name) == "blocks"

            n = 0
            with _blamed_on(plan, st):
                while True:
                    n += 1
                    task = bar.add_task(f"{st.id}: statistics pass {n}", total=len(names), rate="") if bar else None
                    before = _bytes(plan)
                    items = work_items(names, shapes, blockable)
                    for bundle in prefetch(items, _loader(plan, ck_keys, dkeys, set()), PREFETCH_DEPTH, live, clock):
                        reducer.observe(evaluator.job(st, bundle, {}, with_stats=False))
                        if bar and (bundle.rows is None or bundle.rows[1] == shapes[bundle.name][0]):
                            bar.advance(task)
                    result.passes.append({"step": st.id, "kind": "statistics", "bytes_read": _bytes(plan) - before})
                    if reducer.end_pass():
                        break
                stats[st.id] = reducer.result()
        # 2. the output pass
        _output_pass(plan, stats, live, clock, result, bar, publish_hook, tensor_hook, keep_state_dict, resume,
                     resumable)
    io = clock.seconds
    result.cpu_seconds = {"reading": io["reading"], "computing": max(0.0, time.process_time() - cpu0 - sum(io.values())),
                          "writing": io["writing"]}
    result.stats = stats
    result.bytes_read = _bytes(plan)
    result.seconds = time.perf_counter() - t0
    result.max_live_tensors = live.peak
    result.tensors = len(plan.outputs)
    return result


def _bytes(plan: Plan) -> int:
    total = sum(ck.bytes_read for ck in plan.checkpoints.values())
    total += sum(int(getattr(d, "bytes_read", 0)) for d in plan.deltas.values())
    return total


def _output_pass(plan: Plan, stats: dict[str, Any], live: LiveTensors, clock: CpuClock, result: RunResult, bar: Any,
                 publish_hook: PublishHook | None, tensor_hook: TensorHook | None, keep: bool | None,
                 resume: bool, resumable: bool) -> None:
    out_ids = plan.output_step_ids
    ck_keys, dkeys, copy_keys = plan.inputs_of(out_ids)
    planned = [PlannedTensor(o.name, o.dtype, o.shape) for o in plan.outputs]
    out_dtype = {o.name: to_torch(o.dtype) for o in plan.outputs}
    float_names = {o.name for o in plan.outputs if o.is_float}

    writers: dict[str, CheckpointWriter] = {}
    targets = plan.write_targets()
    keep_sd = keep if keep is not None else plan.out is None
    state: dict[str, torch.Tensor] | None = {} if keep_sd else None
    key = fingerprint(plan) if targets and resumable else None
    with contextlib.ExitStack() as stack:
        for sid, path in targets.items():
            writers[sid] = stack.enter_context(CheckpointWriter(
                path, planned, shard_size=plan.shard_size, force=plan.force, partial_key=f"{key}:{sid}" if key else None,
                resume=resume))
        # Tensors every writer already holds (a resumed run) are not computed again.
        skip = set.intersection(*(w.done for w in writers.values())) if writers and state is None else set()
        result.resumed = len(skip)
        background = {sid: BackgroundWriter(w.write, clock=clock) for sid, w in writers.items()}
        evaluator = _Evaluator(plan, stats, tensor_hook)
        task = bar.add_task("writing" if writers else "merging", total=len(plan.outputs), rate="") if bar else None
        t_start = time.perf_counter()
        before = _bytes(plan)
        shapes = {o.name: o.shape for o in plan.outputs}
        load_all = _loader(plan, ck_keys, dkeys, copy_keys)

        def emit(bundle: Bundle, ev: _Evaluator) -> None:
            memo: dict[Any, torch.Tensor] = {}
            name, rows = bundle.name, bundle.rows
            for sid in out_ids:
                write_it = sid in background and name not in writers[sid].done
                if not write_it and not (sid == plan.final and state is not None):
                    continue  # already written by the interrupted run being resumed
                if name in float_names:
                    stored = ev.stored_base(sid, bundle, out_dtype[name])
                    if stored is not None:
                        value = stored
                    else:
                        value = ev.run(sid, bundle, memo)
                        if write_it:
                            value = writers[sid].prepare(name, value, rows[0] if rows else None)
                        else:
                            value = value.to(out_dtype[name])
                    # In the output dtype (a float16 cast overflows at 65504), and on this thread:
                    # the writer thread's torch reductions would start a second OpenMP team next
                    # to the computing one (ties at 100M: +15% wall).
                    try:
                        require_finite(name, value)
                    except RecipeError:
                        _blame_inputs(plan, sid, name, rows)  # an input's inf/NaN is the input's fault
                        raise
                else:
                    value = bundle.leaves[plan.copy_leaf(sid)]
                if write_it:
                    background[sid].put(name, value, rows[0] if rows else None)
                if sid == plan.final and state is not None:
                    if rows is None:
                        state[name] = value.cpu()
                    else:
                        if name not in state:
                            state[name] = torch.empty(shapes[name], dtype=value.dtype)
                        state[name][rows[0] : rows[1]] = value.cpu()
            if bar and (rows is None or rows[1] == shapes[name][0]):
                rate = (_bytes(plan) - before) / max(time.perf_counter() - t_start, 1e-9)
                bar.update(task, advance=1, rate=f"{rate / 1e6:.0f} MB/s")

        tensor_stats: dict[str, dict[str, Any]] = {}  # step → its per-tensor statistics passes

        def emit_with_local_stats(name: str) -> None:
            """A big tensor of a per-tensor-statistics method: stats over its blocks, then blocks."""
            local = dict(stats)
            for st in step_closure(plan, out_ids):
                params = st.resolver.for_tensor(name)
                if st.spec.row_local(params):
                    continue
                make = st.spec.tensor_reducer
                reducer = make(*for_present(plan, st, name, _with_tensor_files(plan, st, params))) if make else None
                # _block_mode calls a tensor "local" only when every such step has a reducer
                assert reducer is not None, f"step {st.id}: tensor {name} has no per-tensor reducer"
                _announce(reducer, math.prod(shapes[name]))
                ev = _Evaluator(plan, local, None)
                load = _loader(plan, plan.leaves_of(st.id)[0], set(), set())
                entry = tensor_stats.setdefault(
                    st.id, {"step": st.id, "kind": "tensor statistics", "passes": 0, "bytes_read": 0})

                def counted(item: WorkItem, load: Callable[[WorkItem], Bundle] = load,
                            entry: dict[str, Any] = entry) -> Bundle:
                    # this loader's own reads (the output pass reads ahead on another thread)
                    bundle = load(item)
                    entry["bytes_read"] += sum(t.numel() * t.element_size() for t in bundle.leaves.values())
                    return bundle

                passes = 0
                while True:
                    passes += 1
                    blocks = work_items([name], shapes, lambda _n: True)
                    for b in prefetch(blocks, counted, PREFETCH_DEPTH, live, clock):
                        reducer.observe(ev.job(st, b, {}, with_stats=False))
                    if reducer.end_pass():
                        break
                entry["passes"] = max(entry["passes"], passes)
                local[st.id] = reducer.result()
            ev = _Evaluator(plan, local, tensor_hook)
            for b in prefetch(work_items([name], shapes, lambda _n: True), load_all, PREFETCH_DEPTH, live, clock):
                emit(b, ev)

        mode = _block_mode(plan, out_ids, local_stats=True)
        deferred: set[str] = set()

        def blockable(name: str) -> bool:
            m = mode(name)
            if m == "local" and math.prod(shapes[name]) > whole_tensor_limit():
                deferred.add(name)
            return m == "blocks"

        def load_or_defer(item: WorkItem) -> Bundle:
            return Bundle(item.name) if item.name in deferred else load_all(item)

        items = work_items([o.name for o in plan.outputs if o.name not in skip], shapes, blockable)
        try:
            for bundle in prefetch(items, load_or_defer, PREFETCH_DEPTH, live, clock):
                if bundle.name in deferred:
                    emit_with_local_stats(bundle.name)
                else:
                    emit(bundle, evaluator)
        finally:
            for bw in background.values():
                bw.close()
        # as the dry run lists them: each step's per-tensor statistics, then the output pass
        result.passes.extend(tensor_stats.values())
        stats_read = sum(e["bytes_read"] for e in tensor_stats.values())
        result.passes.append({"step": plan.final, "kind": "output", "bytes_read": _bytes(plan) - before - stats_read})
        result.state_dict = state
        side_files = {**plan.tokenizer_files, **_chat_template_files(plan)}
        for sid, writer in writers.items():
            st = plan.steps[sid]
            card = _card(plan, st)
            if publish_hook is not None and sid == plan.final:
                result.output = writer.out_dir
                publish_hook(writer.tmp_dir, result)
            dtype_update = _config_dtype(plan)
            path = writer.finish(copy_from=plan.copy_from, config_updates=dtype_update, model_card=card,
                                 extra_files=side_files)
            result.bytes_written += writer.bytes_written
            if sid == plan.final:
                result.output = path
            else:
                result.saved[sid] = path


def _config_dtype(plan: Plan) -> dict[str, Any]:
    """config.json updates, so that the copied config describes the tensors written: the output's
    dtype; untied embeddings when the output stores an lm_head (a tied config would make
    transformers drop it); the vocabulary size of the written embedding (merging shared rows, or
    copying the config of another model than the reference, may change it)."""
    floats = [o.dtype for o in plan.outputs if o.is_float]
    config = plan.copy_from.config if plan.copy_from is not None else None
    update: dict[str, Any] = config_dtype_update(max(set(floats), key=floats.count), config) if floats else {}
    stores_head = any(o.name == TIED_HEAD for o in plan.outputs)
    if plan.untied_head or (stores_head and config is not None and config.get("tie_word_embeddings") is True):
        update["tie_word_embeddings"] = False
    embedding = next((o for o in plan.outputs if is_vocab_tensor(o.name) and o.name != TIED_HEAD), None)
    rows = embedding.shape[0] if embedding is not None else None
    if config is not None and isinstance(config.get("vocab_size"), int) and rows is not None and config["vocab_size"] != rows:
        update["vocab_size"] = rows
    return update


def _chat_template_files(plan: Plan) -> dict[str, bytes]:
    """The files that set the output's chat template (none when the recipe sets none)."""
    setting = plan.recipe.output.chat_template
    if setting is None:
        return {}
    tokenizer_dir = plan.copy_from.source_dir if plan.copy_from is not None else None
    template = chat_template.resolve(setting, (ck.source_dir for ck in plan.checkpoints.values()))
    if template is None:
        log.warning("chat_template: auto: no input model carries a chat template; the output gets none")
        return {}
    if tokenizer_dir is None or not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        log.warning("chat_template: the output has no tokenizer files to carry it; written as %s only",
                    chat_template.TEMPLATE_FILE)
    edited = plan.tokenizer_files.get(chat_template.TOKENIZER_CONFIG)
    config = json.loads(edited) if edited is not None else None
    return chat_template.template_files(template, tokenizer_dir, config)


def _card(plan: Plan, st: StepPlan) -> str:
    recipe = plan.recipe
    n_inputs = len(plan.leaves_of(st.id)[0])
    text = None
    if recipe.source is not None and Path(recipe.source).is_file():
        text = Path(recipe.source).read_text()
    chain = " → ".join(f"{s.id} ({s.spec.name})" for s in plan.steps.values())
    what = f"This checkpoint was produced by mergekit_lite from {n_inputs} input checkpoints with the steps: {chain}."
    return model_card(base_models=[plan.checkpoints[plan.copy_leaf(st.id)].label], title=f"{st.id}", what=what,
                      recipe_yaml=text)

