"""From a file or dict to a validated `Recipe`: parse, check the shape, convert, check meaning.

Problems are collected, not raised one by one: a user fixing a recipe sees every mistake of a
stage in one run. Shape errors stop before meaning is checked (meaning needs a sound shape).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .model import Loc, Recipe
from .problems import Problems
from .raw import Item, RawModel, RawRecipe, RawSlice, RawStep
from .schema import (
    MERGEKIT_UNSUPPORTED,
    MergekitRecipe,
    ModelEntry,
    ModelTokenEmbedding,
    NativeRecipe,
    TokenizerBlock,
    validate_shape,
)
from .slices import DraftSlice, Positions, assign_positions, read_slices
from .stack import LayerStack, StackSlice, StackSource
from .validate import validate
from .vocab import REFERENCE, UNION, TokenChoice, VocabSpec
from .yaml_lines import LineDict, YamlSyntaxError, line_of, parse_yaml, plain, start_line


def _python_numbers(value: Any) -> Any:
    """A recipe built in Python, with numpy (or other registered) numbers as the int, float and
    bool a YAML file would give: np.float32(0.5) was refused as "expected a number"."""
    if isinstance(value, Mapping):
        return {k: _python_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_python_numbers(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if type(value).__name__ == "bool_":  # numpy's bool is no numbers.Integral
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def load(source: str | Path | Mapping[str, Any]) -> Recipe:
    problems = Problems()
    if isinstance(source, Mapping):
        raw: Any = _python_numbers(source)
        file = None
        path = None
        base_dir = Path.cwd()
    else:
        path = Path(source)
        file = str(source)
        if path.is_dir():
            raise UsageError(f"{source}: is a directory; give the recipe's YAML file")
        if not path.is_file():
            raise UsageError(f"recipe file not found: {source}")
        base_dir = path.resolve().parent
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"cannot read recipe {source}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise UsageError(f"cannot read recipe {source}: {exc.strerror or exc}") from None
        try:
            raw, duplicates = parse_yaml(text)
        except YamlSyntaxError as exc:
            problems.add(Loc(file, exc.line), str(exc))
            problems.raise_if_any()
        for dup in duplicates:
            problems.add(Loc(file, dup.line), str(dup), str(dup.key))

    if raw is None:
        problems.add(Loc(file, 1 if file else None), "the recipe is empty")
        problems.raise_if_any()
    if not isinstance(raw, dict):
        problems.add(Loc(file, start_line(raw) or (1 if file else None)),
                     "a recipe must be a mapping with 'steps' (mlite) or 'merge_method' (mergekit)")
        problems.raise_if_any()

    if "merge_method" in raw and "steps" in raw:
        problems.add(Loc(file, line_of(raw, "merge_method")),
                     "a recipe has either 'steps' (mlite) or 'merge_method' (mergekit), not both", "merge_method")
        problems.raise_if_any()
    if "merge_method" in raw:
        recipe = _from_mergekit(raw, file, problems)
    elif "steps" in raw:
        recipe = _from_native(raw, file, problems)
    else:
        problems.add(Loc(file, start_line(raw) or (1 if file else None)),
                     "a recipe needs 'steps' (mlite) or 'merge_method' (mergekit)")
        recipe = None
    problems.raise_if_any()
    assert recipe is not None
    result = validate(recipe, base_dir, problems)
    problems.raise_if_any()
    assert result is not None
    result.source = path.resolve() if path is not None else None
    return result


def _item(container: Any, key: Any, value: Any, key_path: str, file: str | None) -> Item:
    raw = container.get(key) if isinstance(container, dict) else None
    return Item(value, Loc(file, line_of(container, key)), key_path, raw)


def _params(raw_params: Any, prefix: str, file: str | None) -> dict[str, Item]:
    if not isinstance(raw_params, dict):
        return {}
    return {str(k): _item(raw_params, k, plain(v), f"{prefix}.{k}", file) for k, v in raw_params.items()}


def _models(raw_models: Any, entries: list[ModelEntry], prefix: str, file: str | None) -> list[RawModel]:
    out = []
    for j, entry in enumerate(entries):
        raw_entry = raw_models[j] if isinstance(raw_models, list) else None
        if isinstance(raw_entry, dict):
            ref = _item(raw_entry, "model", entry.model, f"{prefix}[{j}].model", file)
            params = _params(raw_entry.get("parameters"), f"{prefix}[{j}].parameters", file)
        else:
            ref = Item(entry.model, Loc(file, line_of(raw_models, j)), f"{prefix}[{j}]")
            params = {}
        out.append(RawModel(ref, params))
    return out


def _first_key(container: Any, *keys: str) -> str:
    return next((k for k in keys if isinstance(container, dict) and k in container), keys[0])


def _output(raw: Any, file: str | None, prefix: str = "output") -> dict[str, Item]:
    raw_out = raw.get("output") if isinstance(raw, dict) else None
    if not isinstance(raw_out, dict):
        return {}
    return {k: _item(raw_out, k, plain(v), f"{prefix}.{k}", file) for k, v in raw_out.items() if v is not None}


def _common(raw: Any, model: NativeRecipe | MergekitRecipe, file: str | None) -> dict[str, Any]:
    return {
        "device": _item(raw, "device", model.device, "device", file) if model.device is not None else None,
        "seed": model.seed,
        "options": {**model.options.model_dump(), "description": model.description},
        "file": file,
    }


def _from_native(raw: Any, file: str | None, problems: Problems) -> RawRecipe | None:
    model = validate_shape(NativeRecipe, raw, file, problems)
    if model is None:
        return None
    raw_inputs = raw["inputs"]
    inputs = {name: _item(raw_inputs, name, value, f"inputs.{name}", file) for name, value in model.inputs.items()}
    raw_steps = raw["steps"]
    steps = []
    for i, step in enumerate(model.steps):
        rs = raw_steps[i]
        prefix = f"steps[{i}]"
        loc = Loc(file, line_of(raw_steps, i))
        step_id = step.id if step.id is not None else f"step{i + 1}"
        id_item = _item(rs, "id", step_id, f"{prefix}.id", file) if step.id is not None else Item(step_id, loc, prefix)
        mkey = _first_key(rs, "method", "merge_method")
        bkey = _first_key(rs, "base", "base_model")

        def opt(key: str, value: Any, rs: Any = rs, prefix: str = prefix) -> Item | None:
            return None if value is None else _item(rs, key, value, f"{prefix}.{key}", file)

        steps.append(RawStep(
            id=id_item,
            method=_item(rs, mkey, step.method, f"{prefix}.{mkey}", file),
            base=opt(bkey, step.base),
            models=_models(rs.get("models"), step.models, f"{prefix}.models", file),
            delta=opt("delta", step.delta),
            old_base=opt("old_base", step.old_base),
            parameters=_params(rs.get("parameters"), f"{prefix}.parameters", file),
            save=opt("save", step.save),
            loc=loc,
            key=prefix,
        ))
    recipe = RawRecipe("mlite", inputs, steps, _output(raw, file), **_common(raw, model, file))
    if model.tokenizer is not None:
        vocab = _native_vocab_spec(raw, model.tokenizer, file, problems, recipe.output, set(inputs))
        if vocab is not None:
            recipe.options["vocab_spec"] = vocab
    return recipe


def _native_vocab_spec(raw: Any, block: TokenizerBlock, file: str | None, problems: Problems,
                       output: dict[str, Item], inputs: set[str]) -> VocabSpec | None:
    """mlite's `tokenizer:` block (mergekit's, with inputs named as in `inputs`): `base` is the
    input of that name, else the output's reference model (the base its chain starts from),
    which the plan puts in; every other model the output reads is lined up with it too."""
    item = _item(raw, "tokenizer", block.source, "tokenizer", file)
    if "copy_tokenizer_from" in output:
        problems.add(output["copy_tokenizer_from"].loc, "the tokenizer source is given twice ('tokenizer' and "
                     "'output.copy_tokenizer_from')", "output.copy_tokenizer_from")
        return None
    if block.source == UNION:
        source = UNION
    elif block.source in inputs:
        source = block.source
        output["copy_tokenizer_from"] = Item(source, item.loc, item.key)
    elif block.source == "base":
        source = REFERENCE
    else:
        problems.add(item.loc, f"tokenizer.source {block.source!r} is not an input: use union, base or an input's "
                     f"name ({', '.join(sorted(inputs))})", "tokenizer.source")
        return None
    def named(ref: str, where: Item) -> str | None:
        if ref in inputs:
            return ref
        problems.add(where.loc, f"{ref!r} is not an input: a token's row comes from an input checkpoint", where.key)
        return None

    tokens = _token_choices(raw, block, file, named)
    return VocabSpec(source=source, base=None, merge_base=None, loc=item.loc, written=f"tokenizer: {block.source}",
                     tokens=tokens, pad_to_multiple_of=block.pad_to_multiple_of)


def _input_name(ref: str, taken: dict[str, str]) -> str:
    """A readable input name for a mergekit model reference: the last path part, made unique."""
    stem = ref.split("@", 1)[0].rstrip("/\\") or ref
    name = Path(stem).name or stem
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    candidate, n = name, 2
    while candidate in taken and taken[candidate] != ref:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def _stack_as_models(raw: Any, file: str | None, problems: Problems) -> tuple[Any, list[DraftSlice], Positions] | None:
    """A layer-stacking `slices:` recipe as a `models:` recipe over its positions (`stack.base`,
    `stack.1`, …; see slices.py), with the slices to wire them, or None after problems."""
    from ..methods.registry import get_method

    drafts = read_slices(raw, file, problems)
    if drafts is None:
        return None
    method = raw.get("merge_method")
    spec = get_method(method) if isinstance(method, str) else None
    written = raw.get("base_model")
    base = (Item(written, Loc(file, line_of(raw, "base_model")), "base_model")
            if isinstance(written, str) and written.strip() else None)
    takes_base = spec is not None and (spec.needs_base or spec.optional_base)
    positions = assign_positions(drafts, base, str(method), takes_base=takes_base,
                                 ordered=spec is not None and spec.ordered, problems=problems)
    if positions is None:
        return None
    if all(name == positions.base for name in positions.names):
        problems.add(Loc(file, line_of(raw, "slices")), f"every slice's only source is the base model "
                     f"'{base.value if base else positions.base}': '{method}' merges models into it, so give each "
                     "slice at least one other source", "slices")
        return None
    out = LineDict({k: v for k, v in raw.items() if k not in ("slices", "base_model")})
    out.line = getattr(raw, "line", None)
    out.key_lines = {k: n for k, n in getattr(raw, "key_lines", {}).items() if k in out}
    out["models"] = [{"model": n} for n in positions.names if n != positions.base]
    _keep_line(out, "models", line_of(raw, "slices"))
    if positions.base is not None:
        out["base_model"] = positions.base
        _keep_line(out, "base_model", line_of(raw, "base_model"))
    elif base is not None and raw.get("tokenizer_source") == "base":
        out["tokenizer_source"] = base.value  # the base is no position: its own files
    elif base is not None and isinstance(raw.get("tokenizer"), dict) and raw["tokenizer"].get("source") == "base":
        out["tokenizer"] = {**raw["tokenizer"], "source": base.value}
    return out, drafts, positions


def _vocab_spec(raw: Any, model: MergekitRecipe, file: str | None, problems: Problems, output: dict[str, Item],
                base_name: str | None, model_names: list[str], lora_steps: Mapping[str, RawStep],
                by_ref: Mapping[str, str], positions: set[str], add_input: Callable[[str, Item], str]) -> VocabSpec | None:
    """`tokenizer_source` or the `tokenizer:` block as a `VocabSpec`, models named as inputs; the
    tokenizer files are copied from the source (for `union`, from the base, then edited)."""
    block = model.tokenizer
    if block is None and model.tokenizer_source is None:
        return None
    key = "tokenizer" if block is not None else "tokenizer_source"
    written = block.source if block is not None else model.tokenizer_source
    assert written is not None
    item = _item(raw, key, written, key, file)
    if block is not None and model.tokenizer_source is not None:
        problems.add(item.loc, "give 'tokenizer_source' or a 'tokenizer' block, not both (mergekit refuses both)", key)
        return None
    if "copy_tokenizer_from" in output:
        problems.add(output["copy_tokenizer_from"].loc, f"the tokenizer source is given twice ('{key}' and "
                     "'output.copy_tokenizer_from')", "output.copy_tokenizer_from")
        return None

    def leaf(name: str) -> str:  # a MODEL+LORA model's files and vocabulary are MODEL's
        step = lora_steps.get(name)
        return step.base.value if step is not None and step.base is not None else name

    first = base_name if base_name is not None else (model_names[0] if model_names else None)
    if written == "base" and base_name is None:
        problems.add(item.loc, f"'{key}: base' needs a base_model", key)
        return None
    if written == UNION or written == "base":
        source = UNION if written == UNION else leaf(base_name or "")
    else:  # a model, maybe one the merge does not use (its tokenizer only)
        source = leaf(written) if written in lora_steps else (
            written if written in positions else add_input(written.split("+")[0], item))
    files_from = leaf(first) if source == UNION and first is not None else source
    if files_from != UNION:
        output["copy_tokenizer_from"] = Item(files_from, item.loc, item.key)

    def merged(ref: str, where: Item) -> str | None:
        name = ref if ref in lora_steps or ref in positions else by_ref.get(ref)
        if name is None or name not in [*model_names, base_name]:
            problems.add(where.loc, f"{ref!r} is not a model of this merge: a token's row can only come from one",
                         where.key)
            return None
        return leaf(name)

    tokens = _token_choices(raw, block, file, merged) if block is not None else {}
    return VocabSpec(source=source, base=leaf(first) if first is not None else None,
                     merge_base=leaf(base_name) if base_name is not None else None, loc=item.loc,
                     written=f"{key}: {written}", tokens=tokens,
                     pad_to_multiple_of=block.pad_to_multiple_of if block is not None else None)


def _token_choices(raw: Any, block: TokenizerBlock, file: str | None,
                   model: Callable[[str, Item], str | None]) -> dict[str, TokenChoice]:
    """`tokenizer.tokens` as TokenChoices, each model reference turned into an input name by
    `model` (which reports a reference it cannot name and gives None: the entry is dropped)."""
    tokens: dict[str, TokenChoice] = {}
    raw_tokens = raw.get("tokenizer", {}).get("tokens")
    for text, entry in (block.tokens or {}).items():
        where = _item(raw_tokens, text, text, f"tokenizer.tokens.{text}", file)
        src = entry.source
        if src is None:
            tokens[text] = TokenChoice("default", where.loc, force=entry.force)
        elif isinstance(src, str):
            if (name := model(src, where)) is not None:
                tokens[text] = TokenChoice("model", where.loc, model=name, force=entry.force)
        elif isinstance(src, ModelTokenEmbedding):
            if (name := model(src.model, where)) is not None:
                tokens[text] = TokenChoice("model_token", where.loc, model=name, token=src.token,
                                           token_id=src.token_id, force=entry.force)
        else:  # {kind: zero}
            tokens[text] = TokenChoice("zero", where.loc, force=entry.force)
    return tokens


def _keep_line(container: LineDict, key: str, line: int | None) -> None:
    if line is not None:
        container.key_lines[key] = line


def _from_mergekit(raw: Any, file: str | None, problems: Problems) -> RawRecipe | None:
    stacked = None
    if "slices" in raw:  # layer ranges: read as `models:` over the stack's positions
        stacked = _stack_as_models(raw, file, problems)
        if stacked is None:
            return None
        raw = stacked[0]
    unsupported = False
    for key, message in MERGEKIT_UNSUPPORTED.items():
        if key in raw:
            problems.add(Loc(file, line_of(raw, key)), message, key)
            unsupported = True
    if unsupported:
        return None
    model = validate_shape(MergekitRecipe, raw, file, problems)
    if model is None:
        return None

    from ..methods.registry import get_method

    names: dict[str, str] = {}  # input name → reference as written
    by_ref: dict[str, str] = {}  # reference → input name
    inputs: dict[str, Item] = {}
    notes: list[str] = []

    def add_input(ref: str, item: Item) -> str:
        if ref in by_ref:
            return by_ref[ref]
        name = _input_name(ref, names)
        names[name] = ref
        by_ref[ref] = name
        inputs[name] = Item(ref, item.loc, item.key)
        return name

    lora_steps: dict[str, RawStep] = {}

    if stacked is not None:
        for name in stacked[2].virtual:  # the stack's own positions, named before any input can take their names
            names[name] = name

    def add_model(ref: str, item: Item) -> str:
        """An input's name; for mergekit's `MODEL+LORA`, the id of a step that merges the LoRA
        into the model first (as mergekit does with peft's merge_and_unload): the reference as
        written, so per-model mappings keyed by it find it. A layer stack's position is an input
        the plan builds from the slices' sources."""
        if stacked is not None and ref in stacked[2].virtual:
            inputs[ref] = Item(ref, item.loc, item.key)
            return ref
        parts = ref.split("+")
        if len(parts) == 1:
            return add_input(ref, item)
        if len(parts) != 2 or not all(p.strip() for p in parts):
            problems.add(item.loc, f"cannot read model reference {ref!r}: mergekit's form is MODEL or MODEL+LORA",
                         item.key)
            return ref
        if ref not in lora_steps:
            base, lora = (Item(add_input(p, item), item.loc, item.key) for p in parts)
            lora_steps[ref] = RawStep(id=Item(ref, item.loc, item.key), method=Item("portllm", item.loc, item.key),
                                      base=base, models=[], delta=lora, old_base=None, parameters={}, save=None,
                                      loc=item.loc, key=item.key)
        return ref

    base_item = _item(raw, "base_model", model.base_model, "base_model", file) if model.base_model else None
    base_name = add_model(model.base_model, base_item) if base_item and model.base_model else None
    models = _models(raw["models"], model.models, "models", file)
    for m in models:
        m.ref = Item(add_model(m.ref.value, m.ref), m.ref.loc, m.ref.key, m.ref.raw)

    method_item = _item(raw, "merge_method", model.merge_method, "merge_method", file)
    spec = get_method(model.merge_method)
    step_base = None
    if base_name is not None and base_item is not None:
        base_ref = Item(base_name, base_item.loc, base_item.key)
        listed = [m for m in models if m.ref.value == base_name]
        if spec is None or spec.needs_base or spec.optional_base:
            # mergekit lists the base among the models; it is θ₀, not a task vector.
            with_params = [m for m in listed if m.parameters]
            if with_params:
                where = with_params[0].ref.loc.prefix()
                notes.append(f"{where}the parameters given to base model '{model.base_model}' are ignored, as in mergekit")
            models = [m for m in models if m.ref.value != base_name]
            step_base = base_ref
        elif listed:
            if spec.ordered:
                models = listed + [m for m in models if m.ref.value != base_name]
        elif spec.ordered:
            # mergekit adds base_model to the inputs even when 'models' leaves it out (slerp's
            # base + one model); an ordered method takes it as its first endpoint.
            models = [RawModel(ref=base_ref), *models]
        elif spec.base_joins_models:
            # mergekit appends base_model to the inputs, and a method without a base averages it in
            notes.append(f"{base_item.loc.prefix()}base_model '{model.base_model}' is not among 'models': "
                         f"'{spec.name}' merges it as one more model (the last), as mergekit does")
            models = [*models, RawModel(ref=base_ref)]
        else:
            problems.add(base_item.loc, f"method '{spec.name}' takes no base model and base_model "
                         f"'{model.base_model}' is not among 'models': list it there or remove it", "base_model")

    step = RawStep(
        id=Item("merge", method_item.loc, "merge_method"),
        method=method_item,
        base=step_base,
        models=models,
        delta=None,
        old_base=None,
        parameters=_params(raw.get("parameters"), "parameters", file),
        save=None,
        loc=method_item.loc,
        key="",
    )
    layer_stack = None
    if stacked is not None:
        _, drafts, positions = stacked
        notes += positions.notes
        step.slices, layer_stack = _wire_stack(drafts, positions, add_input, problems)

    output = _output(raw, file)
    if model.dtype is not None or model.out_dtype is not None:
        key = "out_dtype" if model.out_dtype is not None else "dtype"
        if "dtype" in output:
            problems.add(output["dtype"].loc, f"the output dtype is given twice ('{key}' and 'output.dtype')",
                         "output.dtype")
        output["dtype"] = _item(raw, key, model.out_dtype or model.dtype, key, file)
        if model.dtype is not None:
            notes.append(f"{Loc(file, line_of(raw, 'dtype')).prefix()}mergekit's 'dtype' is the compute dtype there; "
                         "mlite computes in float32 and writes the output in out_dtype, else dtype")
    if model.chat_template is not None:
        item = _item(raw, "chat_template", model.chat_template, "chat_template", file)
        if "chat_template" in output:
            problems.add(output["chat_template"].loc, "the chat template is given twice ('chat_template' and "
                         "'output.chat_template')", "output.chat_template")
        output["chat_template"] = item
    vocab = _vocab_spec(raw, model, file, problems, output, base_name, [m.ref.value for m in models],
                        lora_steps, by_ref, set(stacked[2].virtual) if stacked is not None else set(), add_input)

    recipe = RawRecipe("mergekit", inputs, [*lora_steps.values(), step], output, notes=notes,
                       **_common(raw, model, file))
    if layer_stack is not None:
        recipe.options["layer_stack"] = layer_stack  # the plan builds the positions' checkpoints from it
    if lora_steps:
        # MODEL+LORA: the adapter merged into the model it was trained on, as peft's
        # merge_and_unload does: its saved modules replace MODEL's by design, no old base to give
        recipe.options["merged_adapters"] = list(lora_steps)
    if vocab is not None:
        recipe.options["vocab_spec"] = vocab  # the plan lines the models' embedding rows up with it
    if model.dtype is None and model.out_dtype is None:
        # mergekit computes in the tensors' own dtypes, so torch promotes mixed inputs (bf16 and
        # fp16 give float32): the written dtype is the promoted one, not the base's
        recipe.options["promote_dtypes"] = True
    return recipe


def _wire_stack(drafts: list[DraftSlice], positions: Positions, add_input: Callable[[str, Item], str],
                problems: Problems) -> tuple[list[RawSlice], LayerStack]:
    """Per slice, the parameters of the step's models (each position's source's own, a base
    position's left out: the base takes none), and the layout with the sources' input names."""
    inputs_of = {name: name if name in positions.virtual or "+" in name else add_input(name, Item(name, Loc(), ""))
                 for name in positions.names}
    raw_slices: list[RawSlice] = []
    slices: list[StackSlice] = []
    start = 0
    for piece, sources in zip(drafts, positions.per_slice, strict=True):
        models = [RawModel(Item(inputs_of[name], src.ref.loc, src.ref.key), src.parameters)
                  for name, src in zip(positions.names, sources, strict=True)
                  if name != positions.base and src is not None]
        raw_slices.append(RawSlice(piece.parameters, models, piece.loc, piece.key))
        wired: list[StackSource | None] = []
        for name, src in zip(positions.names, sources, strict=True):
            if src is None:
                wired.append(None)
                continue
            if "+" not in src.ref.value:
                wired.append(StackSource(add_input(src.ref.value, src.ref), src.start, src.loc))
                continue
            # MODEL+LORA is a step (the adapter merged in), not a checkpoint: it can only be
            # given whole, in order (the plan checks its layer count)
            if name in positions.virtual or src.start != start:
                problems.add(src.ref.loc, f"'{src.ref.value}': a MODEL+LORA source can only give its layers whole "
                             "and in order in a slices recipe; merge the adapter into its model first "
                             "(mlite patch) to stack its layers", src.ref.key)
            wired.append(StackSource(src.ref.value, src.start, src.loc))
        slices.append(StackSlice(start, piece.length, tuple(wired), piece.loc))
        start += piece.length
    return raw_slices, LayerStack(tuple(inputs_of[n] for n in positions.names), tuple(slices),
                                  frozenset(positions.virtual))
