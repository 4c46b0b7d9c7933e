"""The meaning of a recipe: methods, parameters, references, arity and cycles.

Works on the shape-independent `RawRecipe`, adds every problem it finds (so the user sees all of
them at once), and builds the engine's `Recipe` when there are none. Nothing here reads a
checkpoint: header checks (names, shapes, dtypes) belong to the engine's planner.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..dtypes import parse_user_dtype
from ..errors import UsageError
from ..io.chat_template import setting_problem as chat_template_problem
from ..methods.registry import MethodSpec, Param, get_method, method_names
from ..units import parse_size
from .model import Loc, OutputSpec, Recipe, SliceParams, StepSpec, absolute_path, resolve_input_path
from .problems import Problems, choices_hint, did_you_mean
from .raw import Item, RawModel, RawRecipe, RawSlice, RawStep
from .settings import SettingError, has_gradient, is_rule_mapping, leaves, parse_setting, varies
from .slices import slice_first
from .yaml_lines import line_of

# mergekit knobs that never change the output: accepted (with a note) when a method lacks them.
NO_EFFECT_PARAMS: dict[str, str] = {
    "int8_mask": "mergekit's 'int8_mask' only saves memory there (the output is identical); ignored",
}

# Parameter names some mergekit method reads. mergekit ignores any of them given to a method
# that does not read it (published recipes carry `weight` on model_stock, `normalize` on
# slerp), so a mergekit-shaped recipe gets the same: ignored, with a note. Other unknown names
# are still errors (a typo is not silently dropped).
MERGEKIT_PARAM_NAMES = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "int8_mask", "rescale", "t",
    "filter_wise", "select_topk", "eps", "max_iter", "tol", "nuslerp_flatten", "nuslerp_row_wise",
    "normalize_weights",
    "scale",  # passthrough
    "r", "alpha",  # ramplus_tl
})

# Parameters mergekit applies for a method where mlite does not implement them: ignoring them
# would give other tensors than mergekit, so a value that changes the result is an error.
MERGEKIT_UNSUPPORTED: dict[str, dict[str, str]] = {
    "ties": {"rescale": "mergekit L1-rescales the trimmed task vectors; use dare_ties or della for a rescaled drop"},
    "breadcrumbs": {"rescale": "mergekit L1-rescales the kept entries; use dare_linear or della_linear for a "
                               "rescaled drop"},
    "breadcrumbs_ties": {"rescale": "mergekit L1-rescales the kept entries; use dare_ties or della for a rescaled "
                                    "drop"},
}

# mergekit booleans for parameters mlite spells as choices: {param: {bool: choice}}.
BOOL_SPELLINGS: dict[str, dict[bool, str]] = {
    "rescale": {True: "l1", False: "none"},  # mergekit rescales DARE/DELLA to the L1 norm
}

_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")
# Refused up front rather than run untested: a run would fail on its first float64 buffer.
MPS_UNSUPPORTED = ("device 'mps' is not supported: TIES' sign election, model_stock, slerp, PCB and the l1 "
                   "rescale compute in float64, which Apple's MPS lacks; use cpu")


def validate(raw: RawRecipe, base_dir: Path, problems: Problems) -> Recipe | None:
    notes = list(raw.notes)
    inputs: dict[str, str] = {}
    for name, item in raw.inputs.items():
        if not str(name).strip():
            problems.add(item.loc, "an input name cannot be empty", item.key)
        if not item.value.strip():
            problems.add(item.loc, f"input '{name}' has an empty path", item.key)
            continue
        inputs[name] = resolve_input_path(item.value, base_dir)

    # For mergekit-shaped recipes users know models by reference, not by our derived names.
    ref_alias = {item.value: name for name, item in raw.inputs.items()} if raw.shape == "mergekit" else {}

    ids: dict[str, RawStep] = {}
    for step in raw.steps:
        sid = step.id.value
        if not sid.strip():
            problems.add(step.id.loc, "a step id cannot be empty", step.id.key)
        elif sid in ids:
            problems.add(step.id.loc, f"duplicate step id '{sid}' (first used at {ids[sid].id.loc})", step.id.key)
        elif sid in raw.inputs:
            problems.add(step.id.loc, f"step id '{sid}' is also the name of an input", step.id.key)
        else:
            ids[sid] = step
    known_refs = [*raw.inputs, *ids]

    specs: list[StepSpec] = []
    for step in raw.steps:
        spec = _method(step, problems)
        _references(step, known_refs, problems)
        if spec is not None:
            _arity(step, spec, raw.shape, problems)
        refs = [m.ref.value for m in step.models]
        params: dict[str, Any] = {}
        slices: list[SliceParams] = []
        model_params: dict[str, dict[str, Any]] = {}
        if step.save is not None and not str(step.save.value).strip():
            problems.add(step.save.loc, "save: the path is empty (it would mean the recipe's own folder)", step.save.key)
        if spec is not None:
            checker = _ParamChecker(spec, refs, ref_alias, base_dir, problems, notes, mergekit=raw.shape == "mergekit")
            params = checker.step_params(step.parameters)
            model_params = checker.model_params(step.models)
            if step.slices:  # a layer stack: each slice's settings go before the recipe's
                for piece in step.slices:
                    own = slice_first(checker.step_params(piece.parameters), params)
                    per_model = checker.model_params(piece.models)
                    checker.required(step, own, per_model, piece)
                    checker.exclusive(step, own, per_model)
                    slices.append(SliceParams(own, per_model))
            else:
                checker.required(step, params, model_params)
                checker.exclusive(step, params, model_params)
        specs.append(StepSpec(
            id=step.id.value,
            method=spec.name if spec is not None else step.method.value,
            base=step.base.value if step.base else None,
            models=refs,
            delta=step.delta.value if step.delta else None,
            old_base=step.old_base.value if step.old_base else None,
            parameters=params,
            model_parameters=model_params,
            slices=slices,
            save=_local_path(step.save.value, base_dir) if step.save else None,
            loc=step.loc,
        ))

    ordered = _order(specs, raw.steps, set(ids), problems)
    output = _output(raw, inputs, ids, base_dir, problems)
    device = None
    if raw.device is not None:
        device = raw.device.value
        if device == "mps":
            problems.add(raw.device.loc, MPS_UNSUPPORTED, "device")
        elif not _DEVICE.fullmatch(device):
            problems.add(raw.device.loc, f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)", "device")
    if problems or ordered is None or output is None:
        return None
    options = {**raw.options, "notes": notes}
    return Recipe(inputs=inputs, steps=ordered, output=output, device=device, seed=raw.seed,
                  options=options, base_dir=base_dir,
                  input_locs={name: item.loc for name, item in raw.inputs.items() if name in inputs})


def _local_path(value: str, base_dir: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p) if p.is_absolute() else absolute_path(base_dir / p)


def _method(step: RawStep, problems: Problems) -> MethodSpec | None:
    name = step.method.value
    spec = get_method(name)
    if spec is None:
        names = method_names()
        hint = did_you_mean(name, names) or choices_hint(names)
        problems.add(step.method.loc, f"unknown method '{name}'{hint}", step.method.key)
    return spec


def _references(step: RawStep, known: list[str], problems: Problems) -> None:
    items: list[tuple[str, Item]] = []
    if step.base:
        items.append(("base", step.base))
    items += [("model", m.ref) for m in step.models]
    items += [(what, it) for what, it in (("delta", step.delta), ("old_base", step.old_base)) if it]
    for what, item in items:
        ref = item.value
        if ref == step.id.value:
            problems.add(item.loc, f"step '{ref}' uses its own result as {what}", item.key)
        elif ref not in known:
            hint = did_you_mean(ref, known) or choices_hint(known)
            problems.add(item.loc, f"{what} '{ref}' is neither an input nor a step id{hint}", item.key)
    seen: set[str] = set()
    for m in step.models:
        if m.ref.value in seen:
            problems.add(m.ref.loc, f"model '{m.ref.value}' is listed twice in this step", m.ref.key)
        seen.add(m.ref.value)


def _sub(step: RawStep, key: str) -> str:
    return f"{step.key}.{key}" if step.key else key


def _arity(step: RawStep, spec: MethodSpec, shape: str, problems: Problems) -> None:
    what = f"method '{spec.name}'"
    # a layer stack's models are each slice's sources (a slice may have fewer): check each slice
    counts = ([(piece.loc, f"{piece.key}.sources", len(piece.models)) for piece in step.slices] if step.slices
              else [(step.loc, _sub(step, "models"), len(step.models))])
    per = " per slice" if step.slices else ""
    before = len(problems)
    for loc, key, n in counts:
        if n < spec.min_models:
            problems.add(loc, f"{what} needs at least {spec.min_models} model(s){per}, got {n}", key)
        elif n + (step.base is not None) < spec.min_inputs:
            problems.add(loc, f"{what} needs {spec.min_inputs} inputs{per} (models, or a base and models), got {n}", key)
        if spec.max_models is not None and n > spec.max_models:
            problems.add(loc, f"{what} takes at most {spec.max_models} model(s){per}, got {n}", key)
        if len(problems) > before:
            break  # one slice's count says it
    base_key = "base_model" if shape == "mergekit" else "base"
    if spec.needs_base and step.base is None:
        problems.add(step.loc, f"{what} needs a base model ('{base_key}:')", _sub(step, base_key))
    if not spec.needs_base and not spec.optional_base and step.base is not None:
        problems.add(step.base.loc, f"{what} takes no base model", step.base.key)
    if spec.uses_delta and step.delta is None:
        problems.add(step.loc, f"{what} needs a delta ('delta:': a PEFT adapter or a fine-tuned model)",
                     _sub(step, "delta"))
    if not spec.uses_delta and step.delta is not None:
        problems.add(step.delta.loc, f"{what} takes no delta", step.delta.key)
    if step.old_base is not None and step.delta is None:
        problems.add(step.old_base.loc, "'old_base' is only used together with 'delta'", step.old_base.key)


def _quoted_numbers(value: Any) -> Any:
    """`value` with its quoted numbers ("0.5", "1e-3") read as numbers, as mergekit's pydantic
    models read them, wherever a setting holds a value: a scalar, a gradient's entries, a rule's
    `value` (never its `filter` or `match`)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and value.strip().lstrip("+-").isdigit() else number
    if isinstance(value, list):
        return [_quoted_numbers(v) for v in value]
    if is_rule_mapping(value):
        return {**value, "value": _quoted_numbers(value["value"])}
    return value


class _ParamChecker:
    """Checks one step's parameters against its method and returns them under canonical names."""

    def __init__(self, spec: MethodSpec, refs: list[str], ref_alias: dict[str, str], base_dir: Path,
                 problems: Problems, notes: list[str], *, mergekit: bool = False) -> None:
        self.spec = spec
        self.mergekit = mergekit  # a mergekit-shaped recipe: mergekit's leniencies apply
        self.refs = refs
        self.ref_alias = ref_alias
        self.base_dir = base_dir
        self.problems = problems
        self.notes = notes
        self.names = [n for p in spec.params for n in (p.name, *p.aliases)]

    def _param(self, name: str, item: Item) -> Param | None:
        p = self.spec.param(name)
        if p is None:
            if name in NO_EFFECT_PARAMS:
                self._note(NO_EFFECT_PARAMS[name], item.loc)
                return None
            why = MERGEKIT_UNSUPPORTED.get(self.spec.name, {}).get(name)
            if self.mergekit and why is not None and item.value not in (False, None):
                shown = str(item.value).lower() if isinstance(item.value, bool) else item.value  # as YAML spells it
                self.problems.add(item.loc, f"'{name}: {shown}' is not supported for method "
                                  f"'{self.spec.name}' ({why})", item.key)
                return None
            if self.mergekit and name in MERGEKIT_PARAM_NAMES:
                self._note(f"'{name}' is not a parameter of '{self.spec.name}'; ignored, as mergekit ignores it",
                           item.loc)
                return None
            hint = did_you_mean(name, self.names) or choices_hint(self.names)
            self.problems.add(item.loc, f"unknown parameter '{name}' for method '{self.spec.name}'{hint}", item.key)
        return p

    def _note(self, note: str, loc: Loc) -> None:
        """A warning for a setting that does not do what it seems to, with its file:line."""
        text = loc.prefix() + note
        if text not in self.notes:
            self.notes.append(text)

    def _setting(self, p: Param, value: Any, raw: Any, key: str, loc: Loc) -> Any:
        """Check one setting; return it (file paths resolved) or None when it has problems."""
        spelled = BOOL_SPELLINGS.get(p.name, {})
        if isinstance(value, bool) and p.kind == "str" and p.choices and spelled.get(value) in p.choices:
            self._note(f"mergekit's '{p.name}: {str(value).lower()}' is read as '{p.name}: {spelled[value]}'", loc)
            value = spelled[value]
        if self.mergekit and p.kind in ("float", "int"):
            read = _quoted_numbers(value)
            if read != value:
                self._note(f"mergekit reads the quoted numbers of '{p.name}' as numbers: {read!r}", loc)
                value = read
        try:
            setting = parse_setting(value)
        except SettingError as exc:
            line = line_of(raw, exc.index) if exc.index is not None else None
            self.problems.add(Loc(loc.file, line or loc.line), f"parameter '{p.name}': {exc}", key + exc.path)
            return None
        ok = True
        if varies(setting) and not p.per_tensor:
            self.problems.add(loc, f"parameter '{p.name}' of method '{self.spec.name}' is the same for every "
                              "tensor: per-tensor rules and layer gradients are not allowed", key)
            ok = False
        if has_gradient(setting) and p.kind in ("int", "tensor_file"):
            self.problems.add(loc, f"parameter '{p.name}' is {'an integer' if p.kind == 'int' else 'a file'}: "
                              "a layer gradient is not allowed", key)
            ok = False
        for leaf in leaves(setting):
            msg = p.check(leaf)
            if msg is not None:
                self.problems.add(loc, f"parameter '{p.name}' of method '{self.spec.name}': {msg}", key)
                ok = False
                break
        if not ok:
            return None
        if p.kind == "tensor_file" and isinstance(value, str):
            return _local_path(value, self.base_dir)
        return value

    def step_params(self, parameters: dict[str, Item]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        written_as: dict[str, str] = {}
        for name, item in parameters.items():
            p = self._param(name, item)
            if p is None:
                continue
            if p.name in written_as:
                self.problems.add(item.loc, f"parameter '{p.name}' is given twice (as '{written_as[p.name]}' "
                                  f"and '{name}')", item.key)
                continue
            written_as[p.name] = name
            value = item.value
            if isinstance(value, dict) and value and not is_rule_mapping(value):
                value = self._per_model(p, item)
            else:
                value = self._setting(p, value, item.raw, item.key, item.loc)
            if value is not None:
                out[p.name] = value
        return out

    def _per_model(self, p: Param, item: Item) -> dict[str, Any] | None:
        if not p.per_model:
            self.problems.add(item.loc, f"parameter '{p.name}' of method '{self.spec.name}' takes one value for "
                              "all models, not one per model", item.key)
            return None
        out: dict[str, Any] = {}
        for ref, value in item.value.items():
            ref_s = self.ref_alias.get(str(ref), str(ref))
            loc = Loc(item.loc.file, line_of(item.raw, ref) or item.loc.line)
            key = f"{item.key}.{ref}"
            if ref_s not in self.refs:
                hint = did_you_mean(str(ref), self.refs) or choices_hint(self.refs)
                self.problems.add(loc, f"parameter '{p.name}' names '{ref}', which is not a model of this step{hint}",
                                  key)
                continue
            raw = item.raw.get(ref) if isinstance(item.raw, dict) else None
            checked = self._setting(p, value, raw, key, loc)
            if checked is not None:
                out[ref_s] = checked
        return out if len(out) == len(item.value) else None

    def model_params(self, models: list[RawModel]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        shared: dict[str, tuple[Any, Item]] = {}  # non-per-model params written per model
        for m in models:
            values: dict[str, Any] = {}
            for name, item in m.parameters.items():
                p = self._param(name, item)
                if p is None:
                    continue
                if p.name in values:
                    self.problems.add(item.loc, f"parameter '{p.name}' is given twice for model '{m.ref.value}'",
                                      item.key)
                    continue
                if self.mergekit and not p.per_model:
                    # mergekit reads a step-wide parameter (lambda, normalize, t) only under
                    # `parameters:`; one given for a model has no effect there, nor here.
                    self._note(f"'{p.name}' given for model '{m.ref.value}' is ignored, as in mergekit: "
                               "it is read only under the step's 'parameters'", item.loc)
                    continue
                checked = self._setting(p, item.value, item.raw, item.key, item.loc)
                if checked is None:
                    continue
                if not p.per_model:
                    first = shared.setdefault(p.name, (checked, item))
                    if first[0] != checked:
                        self.problems.add(item.loc, f"parameter '{p.name}' of method '{self.spec.name}' takes one "
                                          f"value for all models, but models give different values "
                                          f"(see {first[1].loc})", item.key)
                        continue
                values[p.name] = checked
            if values:
                out[m.ref.value] = values
        return out

    def exclusive(self, step: RawStep, params: dict[str, Any], model_params: dict[str, dict[str, Any]]) -> None:
        given = set(params) | {name for values in model_params.values() for name in values}
        for a, b in self.spec.exclusive:
            if a in given and b in given:
                self.problems.add(step.loc, f"method '{self.spec.name}' takes '{a}' or '{b}', not both",
                                  _sub(step, "parameters"))

    def required(self, step: RawStep, params: dict[str, Any], model_params: dict[str, dict[str, Any]],
                 piece: RawSlice | None = None) -> None:
        """Every required parameter has a value (for each model, when per model); for a layer
        stack, in each slice (`piece`), which the message then names."""
        loc, key = (piece.loc, piece.key) if piece is not None else (step.loc, _sub(step, "parameters"))
        where = f"{piece.key}: " if piece is not None else ""
        for p in self.spec.params:
            if not p.required:
                continue
            step_value = params.get(p.name)
            if p.per_model:
                for ref in self.refs:
                    has_step = step_value is not None and (not isinstance(step_value, dict) or is_rule_mapping(
                        step_value) or ref in step_value)
                    if not has_step and p.name not in model_params.get(ref, {}):
                        self.problems.add(loc, f"{where}method '{self.spec.name}' needs parameter '{p.name}' "
                                          f"for model '{ref}'", key)
            elif step_value is None and not any(p.name in v for v in model_params.values()):
                self.problems.add(loc, f"{where}method '{self.spec.name}' needs parameter '{p.name}'", key)


def _order(specs: list[StepSpec], raws: list[RawStep], ids: set[str], problems: Problems) -> list[StepSpec] | None:
    """Steps in an order where each comes after the steps it reads (stable); None on a cycle."""
    by_id = {s.id: s for s in specs}
    deps = {s.id: [r for r in dict.fromkeys(s.references()) if r in ids and r != s.id] for s in specs}
    state: dict[str, int] = {}  # 1 = in progress, 2 = done
    order: list[StepSpec] = []
    reported: set[frozenset[str]] = set()
    ok = True

    def visit(sid: str, trail: list[str]) -> None:
        nonlocal ok
        if state.get(sid) == 2:
            return
        if state.get(sid) == 1:
            cycle = trail[trail.index(sid):] + [sid]
            if frozenset(cycle) not in reported:
                reported.add(frozenset(cycle))
                raw = raws[[s.id for s in specs].index(cycle[0])]
                problems.add(raw.id.loc, "steps form a cycle: " + " -> ".join(cycle), raw.id.key)
            ok = False
            return
        state[sid] = 1
        for d in deps[sid]:
            visit(d, trail + [sid])
        state[sid] = 2
        order.append(by_id[sid])

    for s in specs:
        if s.id in by_id and by_id[s.id] is s:
            visit(s.id, [])
    return order if ok else None


def _output(raw: RawRecipe, inputs: dict[str, str], ids: dict[str, RawStep], base_dir: Path,
            problems: Problems) -> OutputSpec | None:
    out = OutputSpec()
    o = raw.output
    before = len(problems)
    if "step" in o:
        step = o["step"].value
        if step not in ids:
            hint = did_you_mean(str(step), list(ids)) or choices_hint(list(ids))
            problems.add(o["step"].loc, f"output step '{step}' is not a step id{hint}", o["step"].key)
        out.step = step
    elif raw.steps:
        out.step = raw.steps[-1].id.value
    if "path" in o:
        if not str(o["path"].value).strip():
            problems.add(o["path"].loc, "output.path is empty (it would mean the recipe's own folder); "
                         "name the output directory", o["path"].key)
        else:
            out.path = _local_path(o["path"].value, base_dir)
    if "dtype" in o:
        try:
            out.dtype = parse_user_dtype(o["dtype"].value)
        except UsageError as exc:
            problems.add(o["dtype"].loc, str(exc), o["dtype"].key)
    if "shard_size" in o:
        value = o["shard_size"].value
        try:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise UsageError(f"cannot read size {value!r} (examples: 5GB, 500M, 2000000)")
            out.shard_size = parse_size(value)
        except UsageError as exc:
            problems.add(o["shard_size"].loc, str(exc), o["shard_size"].key)
    if "copy_tokenizer_from" in o:
        src = o["copy_tokenizer_from"].value
        if src not in inputs and src not in raw.inputs:
            hint = did_you_mean(str(src), list(raw.inputs)) or choices_hint(list(raw.inputs))
            problems.add(o["copy_tokenizer_from"].loc, f"copy_tokenizer_from '{src}' is not an input{hint}",
                         o["copy_tokenizer_from"].key)
        out.copy_tokenizer_from = src
    if "chat_template" in o:
        problem = chat_template_problem(o["chat_template"].value)
        if problem is not None:
            problems.add(o["chat_template"].loc, problem, o["chat_template"].key)
        out.chat_template = o["chat_template"].value
    return out if len(problems) == before else None
