"""Whatever shape a recipe has, reading it ends in a recipe or in one-line errors (an MliteError),
never in another exception: a user's mistake must not become a traceback. Structures are drawn
from the keys each shape knows (and a few it does not), with values of every YAML kind."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_lite.errors import MliteError
from mergekit_lite.recipe import load_recipe

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(-2, 2, allow_nan=False),
                    st.sampled_from(["a", "b", "./m", "", "linear", "ties", "slerp", "passthrough", "base", "auto",
                                     "chatml", "bfloat16", "{% x %} long enough template", "5GB", "x+y"]))


def values(keys: list[str]) -> st.SearchStrategy[Any]:
    return st.recursive(SCALARS, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(keys), inner, max_size=4)), max_leaves=12)


MERGEKIT_KEYS = ["merge_method", "base_model", "models", "model", "parameters", "weight", "density", "t",
                 "slices", "sources", "layer_range", "filter", "value", "dtype", "out_dtype", "tokenizer_source",
                 "tokenizer", "source", "tokens", "kind", "force", "token", "token_id", "pad_to_multiple_of",
                 "chat_template", "output", "path", "options", "seed", "x"]
NATIVE_KEYS = ["inputs", "steps", "id", "method", "base", "models", "delta", "old_base", "parameters", "save",
               "output", "path", "dtype", "step", "copy_tokenizer_from", "chat_template", "match", "value", "y"]


def slice_source() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {"model": st.sampled_from(["a", "b", "c", "a+l"]),
         "layer_range": st.one_of(st.lists(st.integers(-1, 6), min_size=0, max_size=3), SCALARS)},
        optional={"parameters": values(MERGEKIT_KEYS)})


TOKEN_SOURCE = st.one_of(SCALARS, st.fixed_dictionaries(
    {"kind": st.one_of(st.sampled_from(["zero", "model_token", "other"]), SCALARS)},
    optional={"model": st.one_of(st.sampled_from(["a", "b", "zzz"]), SCALARS), "token": SCALARS,
              "token_id": SCALARS}))
TOKENIZER = st.one_of(values(MERGEKIT_KEYS), st.fixed_dictionaries({}, optional={
    "source": st.one_of(st.sampled_from(["union", "base", "a", "b", "zzz"]), SCALARS),
    "pad_to_multiple_of": SCALARS,
    "tokens": st.one_of(SCALARS, st.dictionaries(st.sampled_from(["<x>", "a", ""]), st.one_of(SCALARS, st.fixed_dictionaries(
        {}, optional={"source": TOKEN_SOURCE, "force": SCALARS})), max_size=3))}))
MERGEKIT = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(["linear", "ties", "slerp", "passthrough", "task_arithmetic", "nuslerp", "x"])},
    optional={"base_model": st.one_of(st.sampled_from(["a", "b", "base"]), SCALARS),
              "slices": st.one_of(st.lists(st.fixed_dictionaries(
                  {"sources": st.one_of(st.lists(slice_source(), max_size=3), SCALARS)},
                  optional={"parameters": values(MERGEKIT_KEYS), "base_model": SCALARS}), max_size=3), SCALARS),
              "models": values(MERGEKIT_KEYS), "parameters": values(MERGEKIT_KEYS),
              "chat_template": SCALARS, "tokenizer_source": SCALARS, "tokenizer": TOKENIZER, "dtype": SCALARS,
              "output": values(MERGEKIT_KEYS)})
NATIVE = st.fixed_dictionaries({"inputs": values(NATIVE_KEYS), "steps": values(NATIVE_KEYS)},
                               optional={"output": values(NATIVE_KEYS), "seed": SCALARS, "tokenizer": TOKENIZER})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=st.one_of(MERGEKIT, NATIVE, st.dictionaries(st.sampled_from(MERGEKIT_KEYS + NATIVE_KEYS),
                                                          values(MERGEKIT_KEYS + NATIVE_KEYS), max_size=5)))
def test_reading_any_recipe_ends_in_a_recipe_or_one_line_errors(recipe: Any) -> None:
    """(A recipe given as a Python mapping, as the API and a YAML file's top level give it.)"""
    try:
        load_recipe(recipe)
    except MliteError as exc:
        assert str(exc) and all(line.strip() for line in str(exc).splitlines())
