"""The recipe's shape (pydantic v2): which keys exist, their types, nothing about meaning.

Two shapes are accepted: mlite's multi-step recipe (`inputs` + `steps`) and mergekit's
single-step configuration (`merge_method` + `models`). Unknown keys are errors (a typo must
never be silently ignored). Meaning — methods, parameters, references — is checked afterwards
in `validate.py`; this module only turns pydantic's errors into `file:line: message (key)`.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .model import Loc
from .problems import Problems, did_you_mean
from .yaml_lines import LineDict, LineList, line_of


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


def _model_entry(value: Any) -> Any:
    return {"model": value} if isinstance(value, str) else value


class ModelEntry(_Strict):
    """One model of a step: a reference, with optional per-model parameters (mergekit style)."""

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


class _ModelsAndParameters(_Strict):
    """Shared by steps and mergekit recipes: `models` may be bare strings, `parameters` null."""

    @field_validator("models", mode="before", check_fields=False)
    @classmethod
    def _strings_are_models(cls, v: Any) -> Any:
        return [_model_entry(x) for x in v] if isinstance(v, list) else v

    @field_validator("parameters", mode="before", check_fields=False)
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


class StepModel(_ModelsAndParameters):
    id: str | None = None
    method: str = Field(validation_alias=AliasChoices("method", "merge_method"))
    base: str | None = Field(default=None, validation_alias=AliasChoices("base", "base_model"))
    models: list[ModelEntry] = Field(default_factory=list)
    delta: str | None = None
    old_base: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    save: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for a, b in (("method", "merge_method"), ("base", "base_model")):
                if a in data and b in data:
                    raise ValueError(f"give '{a}' or '{b}', not both")
        return data


class OutputModel(_Strict):
    path: str | None = None
    dtype: str | None = None
    shard_size: Any = None  # "5GB", 500000000; parsed in validate.py
    copy_tokenizer_from: str | None = None
    chat_template: str | None = None  # auto, a built-in format's name, or a Jinja template
    step: str | None = None


class OptionsModel(_Strict):
    """Run options that are part of the recipe (they change what is accepted, not the maths)."""

    allow_bin: bool = False  # accept .bin/.pt checkpoints (pickles) as inputs
    vocab: Literal["strict", "shared"] = "strict"  # "shared": merge only the rows all vocabularies share
    allow_vocab_growth: bool = False  # a delta may add embedding rows beyond the base's vocabulary


class ZeroEmbedding(_Strict):
    """`{kind: zero}`: a token's row is zeros."""

    kind: Literal["zero"]


class ModelTokenEmbedding(_Strict):
    """`{kind: model_token, model: M, token: T | token_id: I}`: another token's row of model M."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' and 'token_id'")
        return self


class TokenEmbedding(_Strict):
    """One entry of `tokenizer.tokens`: the token's row source (a model, or one of the kinds)."""

    source: str | ZeroEmbedding | ModelTokenEmbedding | None = None
    force: bool = False

    @field_validator("source", mode="wrap")
    @classmethod
    def _by_kind(cls, v: Any, handler: Any) -> Any:
        """A mapping is read as the kind it names, so an error speaks of that kind alone
        (pydantic would list every member of the union)."""
        if not isinstance(v, dict):
            if v is not None and not isinstance(v, str):
                raise ValueError(f"a token's source is a model, {{kind: zero}} or {{kind: model_token, ...}}, got {v!r}")
            return v
        kinds: dict[str, type[_Strict]] = {"zero": ZeroEmbedding, "model_token": ModelTokenEmbedding}
        kind = v.get("kind")
        if kind not in kinds:
            raise ValueError(f"unknown source kind {kind!r}: use zero or model_token (or name a model)")
        try:
            return kinds[kind].model_validate(v)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = str(first["msg"]).removeprefix("Value error, ")
            raise ValueError(f"{where + ': ' if where else ''}{msg[:1].lower()}{msg[1:]}") from None


class TokenizerBlock(_Strict):
    """mergekit's `tokenizer:` block: the output tokenizer and how embedding rows follow it."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class NativeRecipe(_Strict):
    """mlite's shape: named inputs, a chain of steps, one output."""

    description: str | None = None
    inputs: dict[str, str]
    steps: list[StepModel] = Field(min_length=1)
    output: OutputModel = Field(default_factory=OutputModel)
    tokenizer: TokenizerBlock | None = None
    device: str | None = None
    seed: int | None = Field(default=None, ge=0)
    options: OptionsModel = Field(default_factory=OptionsModel)


class MergekitRecipe(_ModelsAndParameters):
    """mergekit's single-step shape, plus mlite's `output`/`device`/`seed`/`options`."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerBlock | None = None
    chat_template: str | None = None
    description: str | None = None
    output: OutputModel = Field(default_factory=OutputModel)
    device: str | None = None
    seed: int | None = Field(default=None, ge=0)
    options: OptionsModel = Field(default_factory=OptionsModel)


# mergekit features that change the result and that mlite does not implement: refuse clearly.
MERGEKIT_UNSUPPORTED: dict[str, str] = {
    "modules": "mergekit 'modules' recipes are not supported; merge whole models with 'models:'",
}


# ---------------------------------------------------------------------------------------------
# pydantic errors → problems with lines


def _unwrap(annotation: Any) -> Any:
    """Strip Optional[...] / list[...] / dict[str, ...] down to the model class, if any."""
    while True:
        origin = typing.get_origin(annotation)
        if origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else args[0]
        elif origin in (list, tuple):
            annotation = typing.get_args(annotation)[0]
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return annotation


def _model_at(root: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    cls: Any = root
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(part)
        if field is None:
            field = next((f for f in cls.model_fields.values()
                          if isinstance(f.validation_alias, AliasChoices) and part in f.validation_alias.choices), None)
        if field is None:
            return None
        cls = _unwrap(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _field_names(cls: type[BaseModel]) -> list[str]:
    names: list[str] = []
    for name, f in cls.model_fields.items():
        names.append(name)
        if isinstance(f.validation_alias, AliasChoices):
            names += [c for c in f.validation_alias.choices if isinstance(c, str)]
    return names


def key_path(path: tuple[Any, ...], prefix: str = "") -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _locate(raw: Any, path: tuple[Any, ...]) -> int | None:
    """The line of the deepest part of `path` that exists in the raw YAML tree."""
    line = raw.line if isinstance(raw, (LineDict, LineList)) else None
    node = raw
    for part in path:
        if isinstance(node, dict) and part in node:
            line = line_of(node, part) or line
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            line = line_of(node, part) or line
            node = node[part]
        else:
            break
    return line


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_shape(cls: type[BaseModel], raw: Any, file: str | None, problems: Problems) -> Any:
    """Validate `raw` against `cls`; on failure add one problem per pydantic error."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            path = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
            # Union members appear as extra loc parts ("str", "int"): drop them from the key.
            path = tuple(p for p in path if not (isinstance(p, str) and p in ("str", "int", "float", "bool")))
            loc = Loc(file, _locate(raw, path))
            kind = err["type"]
            if kind == "extra_forbidden":
                owner = _model_at(cls, path[:-1])
                hint = did_you_mean(str(path[-1]), _field_names(owner)) if owner else ""
                message = f"unknown key '{path[-1]}'{hint}"
            elif kind == "missing":
                message = f"missing required key '{path[-1]}'"
            elif kind in ("value_error", "assertion_error"):
                message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            else:
                msg = err["msg"]
                message = f"{msg[0].lower()}{msg[1:]}, got {_describe(err.get('input'))}"
            problems.add(loc, message, key_path(path))
        return None
