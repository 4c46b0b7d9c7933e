"""Recipe → plan: open every input (headers only), wire the steps, check everything up front.

A `Plan` is everything the run needs to know before reading a tensor: which checkpoints and
patches feed which step, the per-tensor parameter resolvers, which steps are global (and so
need statistics passes), the output tensors (names, shapes, dtypes) in input-shard order and
the output layout. All problems found on the way are reported together, recipe problems
first (exit 3), then checkpoint problems (exit 4).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..dtypes import from_torch, is_float, parse_user_dtype, to_torch
from ..errors import CheckpointError, MliteError, RecipeError, UsageError, combine
from ..io.checkpoint import TIED_HEAD, Checkpoint, load_small_file, open_checkpoint
from ..io.deltas import is_vocab_tensor
from ..io.patch_marks import ADDITIVE, not_a_model, patch_kind, stored_patch_kind
from ..io.writer import DEFAULT_SHARD_SIZE, check_output_dir
from ..methods.registry import MethodSpec, Reducer, get_method
from ..recipe.model import Recipe, StepSpec
from ..recipe.params import ParamResolver, SlicedResolver
from ..recipe.settings import count_layers
from ..recipe.stack import LayerStack
from ..recipe.validate import MPS_UNSUPPORTED
from ..recipe.vocab import REFERENCE
from .stack import stacked_checkpoints
from .vocab import VocabOutcome, align_vocabularies

log = logging.getLogger(__name__)


# ---- operands: what a step reads ------------------------------------------------------
@dataclass(frozen=True)
class Leaf:
    """A checkpoint input, read tensor by tensor."""

    key: str


@dataclass(frozen=True)
class StepRef:
    """The result of an earlier step, computed in memory for the same tensor."""

    step_id: str


@dataclass(frozen=True)
class Patched:
    """An adapter (or fine-tune delta) used as a model: `base + Δ` relative to an operand."""

    delta_key: str
    base: Operand


Operand = Leaf | StepRef | Patched


@dataclass
class StepPlan:
    id: str
    spec: MethodSpec
    base: Operand | None
    models: list[Operand]
    delta_key: str | None
    resolver: ParamResolver | SlicedResolver
    scope: str
    save: Path | None
    spec_step: StepSpec


@dataclass
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # output dtype (safetensors string)
    is_float: bool


@dataclass
class Plan:
    recipe: Recipe
    checkpoints: dict[str, Checkpoint]
    deltas: dict[str, Any]  # key -> DeltaSource
    steps: dict[str, StepPlan]  # topological order
    final: str
    outputs: list[OutputTensor]  # in input-shard order
    out: Path | None
    shard_size: int
    device: torch.device
    seed: int
    force: bool
    copy_from: Checkpoint | None
    vocab_rows: dict[str, int] = field(default_factory=dict)  # tensor -> rows shared by all (vocab mismatch)
    # The output gains an lm_head of its own although its reference checkpoint is tied (an
    # input stores one): its config must then say tie_word_embeddings: false.
    untied_head: bool = False
    tensor_files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # mergekit's tokenizer_source / tokenizer: the output vocabulary the models' rows follow
    vocab: VocabOutcome | None = None

    @property
    def tokenizer_files(self) -> dict[str, bytes]:
        """The output tokenizer's files where the vocabulary edits the copied ones (a union)."""
        return self.vocab.files if self.vocab is not None else {}

    @property
    def global_steps(self) -> list[StepPlan]:
        """The global steps the outputs need (a step that feeds nothing is not run, nor its
        statistics passes), in topological order."""
        return [s for s in step_closure(self, self.output_step_ids) if s.scope == "global"]

    def leaves_of(self, step_id: str) -> tuple[set[str], set[str]]:
        """Checkpoint keys and delta keys that a step's value depends on."""
        ck: set[str] = set()
        dk: set[str] = set()
        step = self.steps[step_id]

        def visit(op: Operand | None) -> None:
            if op is None:
                return
            if isinstance(op, Leaf):
                ck.add(op.key)
            elif isinstance(op, StepRef):
                a, b = self.leaves_of(op.step_id)
                ck.update(a)
                dk.update(b)
            else:
                dk.add(op.delta_key)
                visit(op.base)

        visit(step.base)
        for m in step.models:
            visit(m)
        if step.delta_key:
            dk.add(step.delta_key)
        return ck, dk

    @property
    def output_step_ids(self) -> list[str]:
        """The steps whose results the output pass writes: the final one, then those with `save`."""
        return [self.final] + [s.id for s in self.steps.values() if s.save is not None and s.id != self.final]

    def write_targets(self) -> dict[str, Path]:
        """Where the output pass writes: the final step to the output, each saved step to its save.

        A final step whose `save:` is the output itself is written there once.
        """
        targets = {self.final: self.out} if self.out is not None else {}
        for s in self.steps.values():
            if s.save is not None:
                targets[s.id] = s.save
        return targets

    def inputs_of(self, step_ids: list[str]) -> tuple[set[str], set[str], set[str]]:
        """(checkpoint keys, delta keys, copy keys) the given steps read; copy keys feed non-float tensors."""
        ck: set[str] = set()
        dk: set[str] = set()
        for sid in step_ids:
            a, b = self.leaves_of(sid)
            ck |= a
            dk |= b
        return ck, dk, {self.copy_leaf(s) for s in step_ids}

    def copy_leaf(self, step_id: str) -> str:
        """The checkpoint whose value a non-float tensor takes (the root base)."""
        step = self.steps[step_id]
        op = step.base if step.base is not None else step.models[0]
        while not isinstance(op, Leaf):
            if isinstance(op, StepRef):
                s = self.steps[op.step_id]
                op = s.base if s.base is not None else s.models[0]
            else:
                op = op.base
        return op.key

    def estimate(self) -> dict[str, Any]:
        """Bytes each pass reads, bytes written, shards, and a peak-memory estimate."""
        from .estimate import estimate  # estimate asks the run's own streaming decisions; run imports plan

        return estimate(self)


# ---- building ---------------------------------------------------------------------------
def build_plan(
    recipe: Recipe,
    *,
    out: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    shard_size: int | None = None,
    seed: int | None = None,
    force: bool = False,
    allow_bin: bool = False,
    check_output: bool = True,
) -> Plan:
    """Open inputs, resolve references and check names/shapes, reading headers only.

    Pickle inputs are accepted when either `allow_bin` or the recipe's `options.allow_bin` says so.
    """
    allow_bin = allow_bin or bool(recipe.options.get("allow_bin"))
    recipe_problems: list[MliteError] = []
    ckpt_problems: list[MliteError] = []
    for note in recipe.options.get("notes") or []:
        # what a recipe says and what it does differ (mergekit knobs without effect, ignored
        # parameters): always shown
        log.warning("%s", note)

    # Steps arrive validated and in topological order (the recipe layer checked references,
    # cycles and output.step); what is left needs checkpoint headers.
    step_specs = {s.id: s for s in recipe.steps}
    order = list(step_specs)
    final = recipe.output_step.id

    # Inputs: checkpoints and adapters/deltas.
    used_as_delta = {s.delta for s in recipe.steps if s.delta} | {
        m for s in recipe.steps for m in s.models if m in recipe.inputs and _is_adapter(recipe.inputs[m])
    }
    checkpoints: dict[str, Checkpoint] = {}
    deltas: dict[str, Any] = {}
    stack = recipe.options.get("layer_stack")  # a mergekit layer stack: positions built below
    for key, ref in recipe.inputs.items():
        if key in used_as_delta or (stack is not None and key in stack.virtual):
            continue
        try:
            checkpoints[key] = ck = open_checkpoint(ref, allow_bin=allow_bin)
            kind = patch_kind(ck)
            if kind is not None:  # a multiplier or ΔW merged as a model: well-formed, meaningless
                ckpt_problems.append(CheckpointError(f"{_input_src(recipe, key)}input {key!r}: {not_a_model(ck, kind)}"))
        except MliteError as exc:
            ckpt_problems.append(type(exc)(f"{_input_src(recipe, key)}input {key!r}: {exc}"))
    for step in recipe.steps:
        for key in ([step.delta] if step.delta else []) + [m for m in step.models if m in used_as_delta]:
            if key in deltas or key not in recipe.inputs:
                continue
            old = None
            if step.old_base:
                if step.old_base in checkpoints:
                    old = checkpoints[step.old_base]
                elif step.old_base in recipe.inputs and step.old_base not in used_as_delta:
                    continue  # it failed to open, which is reported above: say nothing more about it
                else:
                    recipe_problems.append(RecipeError(f"step {step.id!r}: old_base {step.old_base!r} is not a checkpoint input"))
            ref = recipe.inputs[key]
            if old is None and not step.old_base and takes_old_base(ref):
                # a full checkpoint as delta is (fine-tune − old base): the recipe must name that base
                recipe_problems.append(RecipeError(
                    f"{step.loc}: step {step.id!r}: delta {key!r} is a full checkpoint, so the step needs "
                    "'old_base: <input>' (the base it was fine-tuned from)"))
                continue
            try:
                deltas[key] = _open_delta(recipe.inputs[key], old, allow_bin)
            except MliteError as exc:
                ckpt_problems.append(type(exc)(f"{_input_src(recipe, key)}input {key!r}: {exc}"))

    if stack is not None:
        views, problems = stacked_checkpoints(stack, checkpoints)
        checkpoints.update(views)
        recipe_problems += [p for p in problems if isinstance(p, RecipeError)]
        ckpt_problems += [p for p in problems if not isinstance(p, RecipeError)]
        recipe_problems += _whole_steps_in_stack(stack, step_specs, checkpoints)

    # Step plans.
    num_layers = _num_layers(checkpoints)  # once: a config that promises more layers is warned about once
    steps: dict[str, StepPlan] = {}
    for sid in order:
        s = step_specs[sid]
        spec = get_method(s.method)
        if spec is None:
            recipe_problems.append(RecipeError(f"step {sid!r}: unknown method {s.method!r}"))
            continue

        def operand(ref: str, base_op: Operand | None, step: StepSpec = s) -> Operand | None:
            if ref in step_specs:
                return StepRef(ref)
            if ref in checkpoints:
                return Leaf(ref)
            if ref in deltas:
                if base_op is None:
                    recipe_problems.append(RecipeError(f"step {step.id!r}: {ref!r} is a patch (an adapter or a stored "
                                                       "delta): used as a model (base + Δ) it needs the step's base"))
                    return None
                return Patched(ref, base_op)
            if ref not in recipe.inputs:
                recipe_problems.append(RecipeError(f"step {step.id!r}: unknown input or step {ref!r}"))
            return None

        base_op = operand(s.base, None) if s.base else None
        maybe_models = [operand(m, base_op) for m in s.models]
        models = [m for m in maybe_models if m is not None]
        if len(models) < len(maybe_models) or (s.base and base_op is None):
            continue
        seen_paths: dict[Path, str] = {}
        for op in models:
            if isinstance(op, Leaf):
                where = checkpoints[op.key].path.resolve()
                if where in seen_paths:
                    recipe_problems.append(RecipeError(
                        f"{s.loc.prefix()}step {sid!r}: inputs {seen_paths[where]!r} and {op.key!r} are the same "
                        f"checkpoint ({where}); "
                        "list it once (give it a larger weight to count it more)"))
                seen_paths.setdefault(where, op.key)
        if base_op is not None and spec.needs_base and base_op in models:
            log.warning("%s: step %r lists its base %r among its models: a zero task vector, which adds nothing but "
                        "still counts in normalize's weight sum and TIES' vote", s.loc, sid, s.base)
        try:
            resolver: ParamResolver | SlicedResolver = (
                SlicedResolver(spec, s, list(s.models), stack) if s.slices and stack is not None
                else ParamResolver(spec, s, list(s.models), num_layers))
            scalars = resolver.scalar_values()
            scope = spec.scope(scalars)
        except MliteError as exc:
            recipe_problems.append(exc)
            continue
        steps[sid] = StepPlan(sid, spec, base_op, models, s.delta if s.delta in deltas else None, resolver, scope,
                              Path(s.save) if s.save else None, s)
    if recipe_problems:
        raise combine(recipe_problems)
    if ckpt_problems:
        raise combine(ckpt_problems)

    dev = resolve_device(device or recipe.device or "cpu")
    out_path = out if out is not None else recipe.output.path
    wanted_dtype = dtype or recipe.output.dtype
    out_dtype = parse_user_dtype(wanted_dtype) if wanted_dtype else None
    plan = Plan(
        recipe=recipe,
        checkpoints=checkpoints,
        deltas=deltas,
        steps=steps,
        final=final,
        outputs=[],
        out=Path(os.path.normpath(os.path.expanduser(out_path))) if out_path else None,  # sub/.. names sub's parent
        shard_size=shard_size or recipe.output.shard_size or DEFAULT_SHARD_SIZE,
        device=dev,
        seed=seed if seed is not None else (recipe.seed if recipe.seed is not None else 0),
        force=force,
        copy_from=None,
    )
    vocab = recipe.options.get("vocab_spec")
    if vocab is not None:
        if vocab.base is None:  # mlite's shape: the output's reference model is the base
            ref = plan.copy_leaf(plan.final)
            vocab = replace(vocab, base=ref, merge_base=ref, source=ref if vocab.source == REFERENCE else vocab.source)
            keys = _chain_keys(plan)
        else:
            keys = _merged_keys(plan)
        plan.vocab = align_vocabularies(vocab, keys, plan.checkpoints)
        _check_adapters_on_moved_rows(plan)
    _check_tensors(plan, out_dtype, ckpt_problems)
    _check_parameters(plan, recipe_problems)
    _load_tensor_files(plan, recipe_problems)
    if recipe_problems:
        raise combine(recipe_problems)
    if ckpt_problems:
        raise combine(ckpt_problems)
    copy_key = recipe.output.copy_tokenizer_from or plan.copy_leaf(final)
    plan.copy_from = checkpoints.get(copy_key)
    if copy_key and plan.copy_from is None:
        raise RecipeError(f"{_src(recipe)}: output.copy_tokenizer_from {copy_key!r} is not a checkpoint input")
    _note_replaced(plan)
    final_save = plan.steps[plan.final].save
    if plan.out is not None and final_save is not None and final_save.expanduser().absolute() != plan.out.expanduser().absolute():
        raise RecipeError(f"{_src(recipe)}: step {plan.final!r} is the output step, written to {plan.out}; its "
                          f"'save: {final_save}' would be a second copy: remove it, or save another step")
    targets = [(f"output {plan.out}", plan.out)] if plan.out is not None else []
    targets += [(f"step {st.id!r}'s save: {st.save}", st.save) for st in plan.steps.values()
                if st.save is not None and st.id != plan.final]
    resolved = [(what, Path(os.path.normpath(t.expanduser().absolute()))) for what, t in targets]
    for i, (what, a) in enumerate(resolved):
        for other, b in resolved[i + 1 :]:
            if a == b or a in b.parents or b in a.parents:
                raise RecipeError(f"{_src(recipe)}: {what} and {other} overlap: one directory would be "
                                  "written twice (or inside the other); give each its own path")
    used = {st.id for st in step_closure(plan, plan.output_step_ids)}
    for sid in plan.steps:
        if sid not in used:
            log.warning("step %r feeds neither the output step %r nor a save: path, so it is not run", sid, plan.final)
    if check_output:
        inputs = input_files(plan)
        for out in [plan.out, *(st.save for st in plan.steps.values())]:
            if out is not None:
                check_output_dir(out, force, inputs)
    return plan


def step_closure(plan: Plan, step_ids: list[str]) -> list[StepPlan]:
    """Every step the given steps depend on (themselves included), in topological order."""
    seen: set[str] = set()

    def visit(sid: str) -> None:
        if sid in seen:
            return
        seen.add(sid)
        st = plan.steps[sid]
        for op in [st.base, *st.models]:
            while isinstance(op, Patched):
                op = op.base
            if isinstance(op, StepRef):
                visit(op.step_id)

    for sid in step_ids:
        visit(sid)
    return [st for st in plan.steps.values() if st.id in seen]


def input_files(plan: Plan) -> list[Path]:
    """Every file the plan reads or the user keeps beside it: the recipe itself, checkpoint
    shards and side files (config, tokenizer), delta sources and tensor files."""
    files = [plan.recipe.source] if plan.recipe.source is not None else []
    files += [f for ck in plan.checkpoints.values() for f in [*ck.shards, *ck.side_files()]]
    files += [f for d in plan.deltas.values() for f in d.files()]
    files += [getattr(t, "path", Path(k)) for k, t in plan.tensor_files.items()]
    return files


def _src(recipe: Recipe) -> str:
    return str(recipe.source) if recipe.source else "recipe"


def _input_src(recipe: Recipe, key: str) -> str:
    """"file:line: " where input `key` was written, or nothing when the recipe is not a file."""
    loc = recipe.input_locs.get(key)
    return loc.prefix() if loc is not None else ""


def step_src(plan: Plan, st: StepPlan) -> str:
    """file:line of the step's entry in its recipe, where known (the recipe file otherwise)."""
    loc = st.spec_step.loc
    return str(loc) if loc.line is not None and loc.file is not None else _src(plan.recipe)


def _is_adapter(ref: str) -> bool:
    """A model reference that is a patch, used as `base + Δ`: an adapter or a stored ΔW."""
    p = Path(ref).expanduser()
    return (p.is_dir() and (p / "adapter_config.json").is_file()) or stored_patch_kind(p) == ADDITIVE


def _open_delta(ref: str, old_base: Checkpoint | None, allow_bin: bool) -> Any:
    from ..io.deltas import open_delta

    return open_delta(ref, old_base=old_base, allow_bin=allow_bin)


def takes_old_base(ref: str) -> bool:
    from ..io.deltas import takes_old_base as needs

    return needs(ref)


def resolve_device(name: str) -> torch.device:
    """A device name checked against this machine: a one-line usage error when it is unknown or absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} requested but there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps":
        raise UsageError(MPS_UNSUPPORTED)
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)")
    return dev


def _whole_steps_in_stack(stack: LayerStack, step_specs: Mapping[str, StepSpec],
                          checkpoints: Mapping[str, Checkpoint]) -> list[MliteError]:
    """A MODEL+LORA place of a layer stack is a step, used as it is: its slices must give all of
    MODEL's layers (the loader checked that they start at 0 and run in order)."""
    problems: list[MliteError] = []
    for j, name in enumerate(stack.positions):
        step = step_specs.get(name)
        if step is None:
            continue
        given = [src for piece in stack.slices if (src := piece.sources[j]) is not None]
        ck = checkpoints.get(step.base) if step.base is not None else None
        held = count_layers(ck.names()) if ck is not None else None
        if len(given) < len(stack.slices) or (held is not None and held != stack.num_layers):
            taken = sum(piece.length for piece in stack.slices if piece.sources[j] is not None)
            problems.append(RecipeError(f"{given[-1].loc}: '{name}' (MODEL+LORA) can only give its "
                                        f"layers whole in a slices recipe: the slices take {taken} of its "
                                        f"{held} layers; merge the adapter into its model first (mlite patch)"))
    return problems


def _num_layers(checkpoints: Mapping[str, Checkpoint]) -> int | None:
    """Layer count for gradients: config.json's num_hidden_layers, else from tensor names."""
    for ck in checkpoints.values():
        value = ck.config.get("num_hidden_layers") if ck.config else None
        if value is None:
            continue
        where = ck.source_dir / "config.json" if ck.source_dir is not None else ck.label
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{where}: num_hidden_layers must be an integer, got {value!r}")
        held = count_layers(ck.names())
        if value < 1 or (held is not None and value < held):
            raise CheckpointError(f"{where}: num_hidden_layers is {value} but the tensors hold "
                                  f"{held if held is not None else 'no'} layers")
        if held is not None and value > held:  # a cut-down checkpoint, or a config of another model
            log.warning("%s: num_hidden_layers is %d but the tensors hold %d layers; layer gradients are spread "
                        "over %d, as mergekit spreads them", where, value, held, value)
        return value
    counts = [n for ck in checkpoints.values() if (n := count_layers(ck.names())) is not None]
    return max(counts) if counts else None


def _shape_of(plan: Plan, op: Operand, name: str) -> tuple[tuple[int, ...], str] | None:
    """(shape, dtype) of an operand's tensor, from headers; None when it lacks the tensor."""
    if isinstance(op, Leaf):
        ck = plan.checkpoints[op.key]
        if name not in ck:
            return None
        info = ck.info(name)
        return info.shape, info.dtype
    if isinstance(op, StepRef):
        st = plan.steps[op.step_id]
        ref = st.base if st.base is not None else st.models[0]
        return _shape_of(plan, ref, name)
    return _shape_of(plan, op.base, name)


def _check_tensors(plan: Plan, out_dtype: str | None, problems: list[MliteError]) -> None:
    """Every tensor of the output present in every operand with a matching shape."""
    final = plan.steps[plan.final]
    ref_op = final.base if final.base is not None else final.models[0]
    ref_ck = plan.checkpoints[plan.copy_leaf(plan.final)]
    vocab_mode = str(plan.recipe.options.get("vocab", "strict"))
    outputs: list[OutputTensor] = []
    names = ref_ck.names()
    if TIED_HEAD not in ref_ck.tensors and TIED_HEAD in ref_ck and (
            any(TIED_HEAD in ck.tensors for k, ck in plan.checkpoints.items() if _is_operand(plan, k))
            or any(TIED_HEAD in d.targets() for d in plan.deltas.values())):
        # A tied reference merged with an untied model (or patched by a delta of lm_head): the
        # merged lm_head is no longer the merged embedding, so the output stores it (as mergekit
        # does), and says so in config.
        names = [*names, TIED_HEAD]
        plan.untied_head = True
    promote = bool(plan.recipe.options.get("promote_dtypes", False))
    for name in names:
        got = _shape_of(plan, ref_op, name)
        if got is None:
            continue
        shape, dtype = got
        info = ref_ck.info(name)
        seen_dtypes = {dtype}
        for st in plan.steps.values():
            ops = ([st.base] if st.base is not None else []) + list(st.models)
            for op in ops:
                other = _shape_of(plan, op, name)
                label = _label(plan, op)
                if other is None and left_out(plan, op, name):
                    continue  # a layer stack's slice with fewer sources: merged without this position
                if other is None:
                    if info.is_float:
                        problems.append(CheckpointError(f"{label}: tensor {name!r} is missing (step {st.id!r})"))
                    continue
                oshape, odtype = other
                seen_dtypes.add(odtype)
                if is_float(odtype) != info.is_float:
                    problems.append(CheckpointError(f"{label}: tensor {name!r} is {odtype}, base has {info.dtype} (step {st.id!r})"))
                    continue
                if oshape != shape:
                    # only a vocabulary tensor (embedding, output head) may differ in rows only
                    rows_differ = (is_vocab_tensor(name) and len(oshape) == len(shape) == 2
                                   and oshape[1:] == shape[1:])
                    if rows_differ and vocab_mode == "shared":
                        plan.vocab_rows[name] = min(plan.vocab_rows.get(name, shape[0]), oshape[0])
                        continue
                    hint = " (different vocabulary sizes: set options.vocab: shared to merge the shared rows)" if rows_differ else ""
                    problems.append(CheckpointError(
                        f"{label}: tensor {name!r} has shape {list(oshape)}, expected {list(shape)} (step {st.id!r}){hint}"))
        for st in plan.steps.values():
            # A saved step is written with the output's tensor list and shapes: with shared
            # vocabularies its own reference may have fewer rows than the output's.
            saved = _shape_of(plan, StepRef(st.id), name) if st.save is not None and st.id != plan.final else None
            if saved is not None and saved[0] != shape:
                problems.append(RecipeError(
                    f"{step_src(plan, st)}: step {st.id!r} is saved, but its tensor {name!r} has shape "
                    f"{list(saved[0])} where the output's has {list(shape)} (different vocabularies); "
                    "save a step whose reference model has the output's vocabulary"))
        od = out_dtype if out_dtype and info.is_float else dtype
        if promote and info.is_float and not out_dtype and len(seen_dtypes) > 1:
            od = promoted_dtype(seen_dtypes, dtype)
        outputs.append(OutputTensor(name, shape, od, info.is_float))
    if not outputs:
        problems.append(CheckpointError(f"{ref_ck.label}: no tensors to write"))
    _check_extra_tensors(plan, ref_ck, set(names), problems)
    plan.outputs = outputs
    base_shapes = {o.name: o.shape for o in outputs}
    allow_growth = bool(plan.recipe.options.get("allow_vocab_growth", False))
    not_float = {o.name: o.dtype for o in outputs if not o.is_float}
    for delta in plan.deltas.values():
        for problem in delta.check(base_shapes, allow_vocab_growth=allow_growth):
            problems.append(CheckpointError(problem))
        for name in sorted(set(delta.targets()) & set(not_float)):
            # the output copies a non-float tensor from the base: the change would be dropped unsaid
            problems.append(CheckpointError(
                f"{delta.label}: changes {name!r}, which the base {ref_ck.label} stores as {not_float[name]} "
                "(not a float tensor, so not patchable)"))


def _note_replaced(plan: Plan) -> None:
    """Warn, before any work, about an adapter's saved tensors (modules_to_save) that replace the
    base's: trained from the old base, they undo the new base's change to those tensors. Not for
    a mergekit MODEL+LORA, whose MODEL is the base the adapter was trained on."""
    merged = set(plan.recipe.options.get("merged_adapters") or ())
    for st in plan.steps.values():
        if st.id in merged:
            continue
        delta = plan.deltas.get(st.delta_key) if st.delta_key is not None else None
        kind = getattr(delta, "kind", None)
        if delta is None or kind is None:
            continue
        replaced = [n for n in delta.targets() if kind(n) == "replace"]
        if replaced:
            where = f"{st.spec_step.loc.prefix()}step {st.id!r}: " if st.spec_step.loc.prefix() else ""
            log.warning("%s%d tensor(s) replaced by the adapter's saved copies, trained from the old base (%s%s); "
                        "give the old base (--old-base, old_base=) to port them as deltas instead",
                        where, len(replaced), replaced[0], ", …" if len(replaced) > 1 else "")


def promoted_dtype(dtypes: set[str], fallback: str) -> str:
    """torch's promotion of float safetensors dtypes (BF16 with F16 gives F32), `fallback` where
    torch has none (the float8 types)."""
    try:
        out = to_torch(fallback)
        for d in dtypes:
            if is_float(d):
                out = torch.promote_types(out, to_torch(d))
        return from_torch(out)
    except (RuntimeError, KeyError, ValueError):
        return fallback


def _check_extra_tensors(plan: Plan, ref_ck: Checkpoint, written: set[str], problems: list[MliteError]) -> None:
    """Float tensors that a merged model has and the output (shaped like `ref_ck`) would not.

    The output holds the reference model's tensors, so another model's extra tensor is not
    merged. For lm_head that loses the model's output head: a reference without one whose
    config says the embeddings are untied is broken, and refused. Other extras (buffers such
    as rotary inv_freq that some exports keep) are reported, not refused.
    """
    extras: dict[str, str] = {}
    for key, ck in plan.checkpoints.items():
        if ck is ref_ck or not _is_operand(plan, key):
            continue
        for name in ck.tensors:
            if name not in written and name not in extras and ck.info(name).is_float:
                extras[name] = ck.label
    if TIED_HEAD in extras:
        problems.append(CheckpointError(
            f"{ref_ck.label}: has no tensor {TIED_HEAD!r} and its config does not tie it to the embeddings, "
            f"while {extras.pop(TIED_HEAD)} has one: the merged output head would be lost"))
    if extras:
        shown = ", ".join(sorted(extras)[:3]) + (f" and {len(extras) - 3} more" if len(extras) > 3 else "")
        log.warning("%s is not in %s, the model whose tensors the output holds: not merged", shown, ref_ck.label)


def _check_parameters(plan: Plan, problems: list[MliteError]) -> None:
    """Each step's `MethodSpec.check` on every float tensor's parameters (the first problem
    per step), and each global step's reducer built from its step-wide parameters (TIES with
    scope: global needs one density for all tensors), so what would fail mid-run fails before
    any tensor is read."""
    stack = plan.recipe.options.get("layer_stack")
    for st in plan.global_steps:
        if stack is not None and stack.uneven:
            problems.append(RecipeError(f"{step_src(plan, st)}: step {st.id!r}: scope global gathers statistics "
                                        "over every model's tensors, and these slices merge different numbers "
                                        "of models: give every slice the same sources, or use scope: tensor"))
            continue
        if st.spec.reducer is None:
            continue
        try:
            header_reducer(st)
        except MliteError as exc:
            problems.append(RecipeError(f"{step_src(plan, st)}: step {st.id!r}: {exc}"))
    for st in plan.steps.values():
        if st.spec.check is None:
            continue
        for o in plan.outputs:
            if not o.is_float:
                continue
            problem = st.spec.check(*for_present(plan, st, o.name, st.resolver.for_tensor(o.name)))
            if problem is not None:
                problems.append(RecipeError(f"{step_src(plan, st)}: step {st.id!r} ({st.spec.name}), "
                                            f"tensor {o.name}: {problem}"))
                break


def header_reducer(st: StepPlan) -> Reducer:
    """The step's reducer from its step-wide parameters, before any tensor file is loaded
    (reducers take those from the first job): to check and estimate a run from headers alone."""
    assert st.spec.reducer is not None
    params = dict(st.resolver.scalar_values())
    for p in st.spec.params:
        if p.kind == "tensor_file":
            params[p.name] = None
    return st.spec.reducer(params, len(st.models))


def _check_adapters_on_moved_rows(plan: Plan) -> None:
    """An adapter (a MODEL+LORA's, or a step's delta) that changes the embeddings or head (a
    LoRA on them, or saved copies) holds rows in its model's own vocabulary, which the lined-up
    models no longer have."""
    if plan.vocab is None or not plan.vocab.lined_up:
        return
    for st in plan.steps.values():
        if st.delta_key is None:
            continue
        moved = sorted(n for n in plan.deltas[st.delta_key].targets() if is_vocab_tensor(n))
        if moved:
            raise RecipeError(f"{step_src(plan, st)}: {st.id!r}: the adapter changes {moved[0]}, whose rows "
                              f"{plan.vocab.setting} moves to the output's vocabulary; merge the adapter into its "
                              "model first (mlite patch), then merge that model")


def _merged_keys(plan: Plan) -> list[str]:
    """The checkpoints a mergekit recipe's step merges, in mergekit's order (its models, then
    its base; a MODEL+LORA operand counts as its MODEL)."""
    final = plan.steps[plan.final]
    keys: list[str] = []
    for op in [*final.models, *([final.base] if final.base is not None else [])]:
        if isinstance(op, Leaf):
            keys.append(op.key)
        elif isinstance(op, StepRef):
            keys.append(plan.copy_leaf(op.step_id))
    return list(dict.fromkeys(keys))


def _chain_keys(plan: Plan) -> list[str]:
    """The checkpoints an mlite recipe's output reads, step by step (each step's models, then
    its base)."""
    keys = [op.key for st in step_closure(plan, [plan.final])
            for op in [*st.models, *([st.base] if st.base is not None else [])] if isinstance(op, Leaf)]
    return list(dict.fromkeys(keys))


def left_out(plan: Plan, op: Operand, name: str) -> bool:
    """Whether tensor `name` merges without operand `op`: a layer stack's position whose slice
    for that tensor has fewer sources than others (mergekit merges each slice's own sources)."""
    return isinstance(op, Leaf) and plan.checkpoints[op.key].lacks(name)


def present(plan: Plan, st: StepPlan, name: str) -> list[int]:
    """The indices of the step's models that tensor `name` merges (all but the left-out ones)."""
    return [i for i, m in enumerate(st.models) if not left_out(plan, m, name)]


def for_present(plan: Plan, st: StepPlan, name: str, params: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """`params` for tensor `name` with the per-model values of left-out models dropped, and the
    number of models it merges."""
    taken = present(plan, st, name)
    if len(taken) == len(st.models):
        return params, len(taken)
    out = {}
    for k, v in params.items():
        p = st.spec.param(k)
        out[k] = tuple(v[i] for i in taken) if p is not None and p.per_model and isinstance(v, tuple) else v
    return out, len(taken)


def _is_operand(plan: Plan, key: str) -> bool:
    """Whether checkpoint `key` is a base or model of some step (not only, say, a tokenizer source)."""
    return any(key in plan.leaves_of(sid)[0] for sid in plan.steps)


def _label(plan: Plan, op: Operand) -> str:
    if isinstance(op, Leaf):
        return plan.checkpoints[op.key].label
    if isinstance(op, StepRef):
        return f"step {op.step_id!r}"
    return plan.deltas[op.delta_key].label


def _load_tensor_files(plan: Plan, problems: list[MliteError]) -> None:
    """Load parameters of kind tensor_file (e.g. a surgery probe) once, before the run."""
    for st in plan.steps.values():
        for p in st.spec.params:
            if p.kind != "tensor_file":
                continue
            value = st.resolver.scalar_values().get(p.name)
            if value is None or value in plan.tensor_files:
                continue
            try:
                plan.tensor_files[value] = load_tensor_file(Path(value), base_dir=plan.recipe.base_dir,
                                                            allow_pickle=bool(plan.recipe.options.get("allow_bin")))
            except MliteError as exc:
                problems.append(exc)


class TensorFile(dict):  # type: ignore[type-arg]
    """A tensor file's tensors (name → tensor) that remember the file they came from, so a
    method that finds them wrong can name the file in its error."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        super().__init__(tensors)
        self.path = path


def load_tensor_file(path: Path, *, base_dir: Path | None = None, allow_pickle: bool = False) -> TensorFile:
    """A small side tensor file (probe, vectors): safetensors, or `.pt` with weights_only."""
    p = path if path.is_absolute() or base_dir is None else base_dir / path
    return TensorFile(_read_tensor_file(p, allow_pickle), p)


def _read_tensor_file(p: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not p.is_file():
        raise RecipeError(f"{p}: file not found")
    if p.suffix == ".safetensors":
        return load_small_file(p)
    if p.suffix in (".pt", ".pth", ".bin"):
        if not allow_pickle:
            raise RecipeError(f"{p}: pickle files can run code when loaded; use safetensors, or opt in with "
                              "options.allow_bin (loaded with weights_only=True)")
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{p}: cannot load with weights_only=True ({exc.__class__.__name__})") from None
        if isinstance(obj, torch.Tensor):
            return {"weight": obj}
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        raise CheckpointError(f"{p}: expected a tensor or a dict of tensors")
    raise RecipeError(f"{p}: expected a .safetensors (or .pt) file")


def scope_numel(plan: Plan) -> int:
    """Entries per model that a global step's statistics see: every float tensor, vocabulary
    tensors trimmed to their shared rows."""
    return sum(plan.vocab_rows.get(o.name, o.shape[0] if o.shape else 1) * numel(o.shape[1:])
               for o in plan.outputs if o.is_float)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
