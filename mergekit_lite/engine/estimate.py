"""What a run will cost, from the plan alone: bytes read per pass, bytes written, output
shards, and a peak-memory estimate (dry-run prints it; `Plan.estimate` returns it).

It follows the run's own decisions (which tensors stream in row blocks, which reducers hold
what between passes) by asking the engine the same questions, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from ..io.safetensors_format import PlannedTensor
from ..io.writer import plan_shards
from ..methods.registry import Reducer, reducer_reads
from . import stream
from .plan import OutputTensor, Plan, for_present, header_reducer, numel, scope_numel, step_closure
from .run import PREFETCH_DEPTH, _block_mode, _with_tensor_files
from .stream import whole_tensor_limit


def estimate(plan: Plan) -> dict[str, Any]:
    """What a run will read and write, from headers alone (dry-run and tests rely on it)."""
    float_names = [o.name for o in plan.outputs if o.is_float]

    def leaf_bytes(step_id: str, names: list[str]) -> int:
        ck_keys, dkeys = plan.leaves_of(step_id)
        total = 0
        for n in names:
            for k in ck_keys:
                ck = plan.checkpoints[k]
                if n in ck:
                    total += ck.info(n).nbytes
        for k in dkeys:
            total += plan.deltas[k].bytes_to_read(names)
        return total

    passes = []
    held = 0  # what reducers keep between passes (PCB's cached task vectors)
    scope = scope_numel(plan)
    for st in plan.global_steps:
        try:
            reducer = header_reducer(st) if st.spec.reducer is not None else None
        except Exception:  # a reducer that needs real inputs to be built cannot say how it will run
            reducer = None
        held = max(held, _held_bytes(reducer, scope))
        n_passes = _expected_passes(reducer, scope)
        read = reducer_reads(reducer) if reducer is not None else lambda _name: True
        per = leaf_bytes(st.id, [n for n in float_names if read(n)])
        passes.append({"step": st.id, "kind": "statistics", "passes": n_passes, "bytes_read": per * n_passes})
    out_ids = plan.output_step_ids
    passes += _tensor_statistics_passes(plan, out_ids)
    read_out = _output_pass_bytes(plan, out_ids)
    passes.append({"step": plan.final, "kind": "output", "passes": 1, "bytes_read": read_out})
    # every target gets the same layout: the output's tensors, dtypes and shard size
    layouts = plan_shards([PlannedTensor(o.name, o.dtype, o.shape) for o in plan.outputs], plan.shard_size)
    targets = plan.write_targets()
    written = sum(lay.size for lay in layouts) * len(targets)
    n_inputs = sum(len(plan.leaves_of(s)[0]) for s in out_ids) + 1

    unit, tensor_held = _largest_unit(plan, out_ids)
    peak = RUNTIME_BYTES + unit * 4 * (n_inputs + 2) * (PREFETCH_DEPTH + 1) + max(held, tensor_held)
    return {
        "steps": [{"id": s.id, "method": s.spec.name, "scope": s.scope, "models": len(s.models)} for s in plan.steps.values()],
        "tensors": len(plan.outputs),
        "passes": passes,
        "bytes_read": sum(p["bytes_read"] for p in passes),
        "bytes_written": written,
        "output_shards": [{"file": lay.file_name, "tensors": len(lay.tensors), "bytes": lay.size} for lay in layouts]
        if targets else [],
        "output": str(plan.out) if plan.out else None,
        "saves": [{"step": sid, "path": str(path)} for sid, path in targets.items()
                  if not (sid == plan.final and plan.out is not None)],
        "device": str(plan.device),
        "peak_memory_estimate": peak,
        "layer_stack": _stack_layout(plan),
        "vocabulary": plan.vocab.describe() if plan.vocab is not None else None,
    }


def _stack_layout(plan: Plan) -> list[dict[str, Any]] | None:
    """A layer stack's slices as a dry run shows them: output layers [first, last] and, per
    place, the input and its layers (None without a stack)."""
    stack = plan.recipe.options.get("layer_stack")
    if stack is None:
        return None
    return [{"layers": [piece.start, piece.start + piece.length - 1],
             "sources": [{"input": src.input, "layers": [src.first_layer, src.first_layer + piece.length - 1]}
                         for src in piece.sources if src is not None]}
            for piece in stack.slices]


# Peak RSS of `mlite merge` on a model of a few kB (Python, torch, mlite; Linux x86-64, CPU torch
# 2.13): what every run pays before its tensors.
RUNTIME_BYTES = 250 * 1000**2


def _largest_unit(plan: Plan, out_ids: list[str]) -> tuple[int, int]:
    """Entries of the largest piece of work a run holds at once (a whole tensor, or a row block
    of one the engine streams), and the most a per-tensor reducer keeps between its passes.

    The same decisions the run makes (`run._block_mode`): blocks where every step of the chain
    is row-local, blocks after per-tensor statistics for a tensor over `whole_tensor_limit`,
    whole tensors otherwise (a LoRA's targets, vocabulary-trimmed tensors, 1-D tensors); a
    global step's statistics pass sees row blocks only where every step feeding it is row-local.
    """

    def block(o: OutputTensor) -> int:
        row = numel(o.shape) // o.shape[0] if o.shape[0] else 1
        return max(1, stream.CHUNK_ELEMENTS // max(row, 1)) * row

    def splits(o: OutputTensor) -> bool:
        return o.is_float and len(o.shape) >= 2 and numel(o.shape) > stream.CHUNK_ELEMENTS

    modes = [_block_mode(plan, out_ids, local_stats=True)]
    modes += [_block_mode(plan, [st.id], local_stats=False) for st in plan.global_steps]
    unit = held = 0
    for o in plan.outputs:
        n = numel(o.shape)
        for i, mode in enumerate(modes):
            m = mode(o.name) if splits(o) else "whole"
            streamed = m == "blocks" or (i == 0 and m == "local" and n > whole_tensor_limit())
            unit = max(unit, block(o) if streamed else n)
        if splits(o) and modes[0](o.name) == "local" and n > whole_tensor_limit():
            for st in step_closure(plan, out_ids):
                params = st.resolver.for_tensor(o.name)
                if st.spec.tensor_reducer is not None and not st.spec.row_local(params):
                    reducer = st.spec.tensor_reducer(*for_present(plan, st, o.name, _with_tensor_files(plan, st, params)))
                    held = max(held, _held_bytes(reducer, n))
    return unit, held


def _held_bytes(reducer: Reducer | None, count: int) -> int:
    """Bytes a reducer keeps between passes over `count` entries per model (`held_bytes`, 0 if it does not say)."""
    fn = getattr(reducer, "held_bytes", None)
    return int(fn(count)) if callable(fn) else 0


def _expected_passes(reducer: Reducer | None, count: int) -> int:
    """Passes the step's reducer announces, 1 when it does not say.

    A reducer whose pass count depends on the size of its scope (PCB holds the task vectors in
    memory when they fit its budget) answers `passes_for(numel)`; others `expected_passes`.
    """
    if reducer is None:
        return 1
    if hasattr(reducer, "passes_for"):
        return int(reducer.passes_for(count))
    return int(getattr(reducer, "expected_passes", 1) or 1)


def _tensor_statistics_passes(plan: Plan, out_ids: list[str]) -> list[dict[str, Any]]:
    """The reads of per-tensor statistics: a tensor too big to compute whole, for a method that
    needs statistics of the whole tensor (TIES' top-k), is read once per statistics pass before
    its output blocks (engine/run.py, `emit_with_local_stats`)."""
    mode = _block_mode(plan, out_ids, local_stats=True)
    out: dict[str, dict[str, Any]] = {}
    for o in plan.outputs:
        if not o.is_float or numel(o.shape) <= whole_tensor_limit() or mode(o.name) != "local":
            continue
        for st in step_closure(plan, out_ids):
            params = st.resolver.for_tensor(o.name)
            if st.spec.row_local(params) or st.spec.tensor_reducer is None:
                continue
            reducer = st.spec.tensor_reducer(*for_present(plan, st, o.name, _with_tensor_files(plan, st, params)))
            if reducer is None:
                continue
            n = _expected_passes(reducer, numel(o.shape))  # PCB's cache can make it one
            per = sum(plan.checkpoints[k].info(o.name).nbytes for k in plan.leaves_of(st.id)[0]
                      if o.name in plan.checkpoints[k])
            entry = out.setdefault(st.id, {"step": st.id, "kind": "tensor statistics", "passes": n, "bytes_read": 0})
            entry["bytes_read"] += per * n
    return list(out.values())


def _output_pass_bytes(plan: Plan, step_ids: list[str]) -> int:
    ck_keys, dkeys, copy_keys = plan.inputs_of(step_ids)
    total = 0
    for o in plan.outputs:
        keys = ck_keys if o.is_float else copy_keys
        for k in keys:
            ck = plan.checkpoints[k]
            if o.name in ck:
                total += ck.info(o.name).nbytes
    for k in dkeys:
        total += plan.deltas[k].bytes_to_read()
    return total
