"""The output's chat template: mergekit's `chat_template` and mlite's `output.chat_template`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

import mergekit_lite as mlite
from mergekit_lite.errors import RecipeError
from mergekit_lite.io.chat_template import BUILT_IN, resolve, template_of

LITERAL = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def give_template(model: Path, template: str, *, as_file: bool = False) -> None:
    if as_file:
        (model / "chat_template.jinja").write_text(template + "\n")
        return
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))


def written(out: Path) -> tuple[str | None, dict[str, Any]]:
    jinja = out / "chat_template.jinja"
    return (jinja.read_text() if jinja.is_file() else None), json.loads((out / "tokenizer_config.json").read_text())


def test_a_written_template_goes_into_both_files(model_set: Any, tmp_path: Path) -> None:
    recipe = {"merge_method": "linear", "models": [str(m) for m in model_set.finetunes], "chat_template": LITERAL}
    out = mlite.run_recipe(recipe, out=tmp_path / "out").output
    jinja, cfg = written(out)
    assert jinja == LITERAL + "\n" and cfg["chat_template"] == LITERAL
    assert cfg["model_max_length"] == 128  # the copied tokenizer config keeps its other keys


def test_auto_takes_the_template_most_inputs_carry(model_set: Any, tmp_path: Path) -> None:
    other = "{{ 'other template, long enough' }}"
    give_template(model_set.base, other)
    give_template(model_set.finetunes[0], LITERAL)
    give_template(model_set.finetunes[1], LITERAL, as_file=True)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(model_set.base),
              "models": [str(m) for m in model_set.finetunes], "chat_template": "auto"}
    out = mlite.run_recipe(recipe, out=tmp_path / "out").output
    assert written(out)[1]["chat_template"] == LITERAL  # two of three, whatever file holds it
    # the first met among equals
    assert resolve("auto", [model_set.base, model_set.finetunes[0]]) == other


def test_auto_without_any_template_writes_none(model_set: Any, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    recipe = {"merge_method": "linear", "models": [str(m) for m in model_set.finetunes], "chat_template": "auto"}
    with caplog.at_level(logging.WARNING):
        out = mlite.run_recipe(recipe, out=tmp_path / "out").output
    assert "no input model carries a chat template" in caplog.text
    jinja, cfg = written(out)
    assert jinja is None and "chat_template" not in cfg


def test_built_in_formats_render_their_turns(model_set: Any, tmp_path: Path) -> None:
    jinja2 = pytest.importorskip("jinja2")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " yes "}]
    chatml = jinja2.Template(BUILT_IN["chatml"]).render(messages=messages, add_generation_prompt=True)
    assert chatml == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n yes <|im_end|>\n"
                      "<|im_start|>assistant\n")
    llama3 = jinja2.Template(BUILT_IN["llama3"]).render(messages=messages, add_generation_prompt=False,
                                                         bos_token="<|begin_of_text|>")
    assert llama3 == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\nyes<|eot_id|>")
    native = {"inputs": {"a": str(model_set.finetunes[0])},
              "steps": [{"id": "copy", "method": "passthrough", "models": ["a"]}],
              "output": {"path": str(tmp_path / "out"), "chat_template": "llama3"}}
    out = mlite.run_recipe(native).output
    assert template_of(out) == BUILT_IN["llama3"]


@pytest.mark.parametrize(("value", "message"), [
    ("mistral", "chat_template 'mistral' is one of mergekit's built-in formats that mlite does not ship"),
    ("chatlm", "unknown chat_template 'chatlm': use auto (the inputs' most common template), chatml, llama3"),
    (3, "input should be a valid string, got 3 (chat_template)"),
])
def test_bad_settings_are_one_line_errors_naming_the_line(model_set: Any, tmp_path: Path, value: Any,
                                                         message: str) -> None:
    text = (f"merge_method: linear\nmodels:\n  - {model_set.finetunes[0]}\n  - {model_set.finetunes[1]}\n"
            f"chat_template: {value}\n")
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as info:
        mlite.plan_recipe(tmp_path / "r.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'r.yaml'}:5: ") and message in str(info.value)


def test_the_template_given_twice_is_an_error(model_set: Any) -> None:
    with pytest.raises(RecipeError, match=r"the chat template is given twice \('chat_template' and "
                                          r"'output.chat_template'\)"):
        mlite.plan_recipe({"merge_method": "linear", "models": [str(m) for m in model_set.finetunes],
                           "chat_template": "chatml", "output": {"chat_template": "auto"}})
