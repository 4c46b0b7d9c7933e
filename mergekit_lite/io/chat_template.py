"""The output's chat template: mergekit's `chat_template` (and mlite's `output.chat_template`).

A merge of a base model with chat fine-tunes, or of fine-tunes trained on different formats,
copies the tokenizer files of one model; the chat template users need may be another model's,
or a standard one. The setting is `auto` (the template most of the input models carry), a
built-in format by name, or a Jinja template written out. It is written both ways transformers
reads it: the `chat_template` key of tokenizer_config.json and a `chat_template.jinja` file
(newer versions prefer the file).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# mlite's own renderings of two widespread formats (role headers, end-of-turn tokens and the
# generation prompt as their model families define them). chatml renders as mergekit's does;
# llama3 follows Meta's template (no newline after <|eot_id|>, which mergekit's adds).
BUILT_IN: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}
AUTO = "auto"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# what makes an output folder hold a tokenizer (the files transformers builds one from)
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG, "tokenizer.model", "vocab.json", "vocab.txt")
# mergekit's other built-in names: not shipped here (say so rather than "unknown")
NOT_SHIPPED = ("alpaca", "mistral", "exaone")


def setting_problem(value: Any) -> str | None:
    """Why a `chat_template` setting cannot be used, None when it can."""
    if not isinstance(value, str):
        return f"chat_template must be text ({AUTO}, a format name or a Jinja template), got {value!r}"
    if value == AUTO or value in BUILT_IN or ("{" in value and len(value) >= 20):
        return None
    if value in NOT_SHIPPED:
        return (f"chat_template '{value}' is one of mergekit's built-in formats that mlite does not ship; "
                f"write the template out, or use {AUTO}, {', '.join(BUILT_IN)}")
    return (f"unknown chat_template {value!r}: use {AUTO} (the inputs' most common template), "
            f"{', '.join(BUILT_IN)}, or a Jinja template")


def template_of(folder: Path | None) -> str | None:
    """The chat template a model's tokenizer files carry (chat_template.jinja first, then
    tokenizer_config.json's key: a string, or the 'default' one of several), None if none."""
    if folder is None:
        return None
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    cfg = _read_json(folder / TOKENIZER_CONFIG)
    value = cfg.get("chat_template") if cfg else None
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    elif isinstance(value, dict):
        value = value.get("default")
    return (value.strip() or None) if isinstance(value, str) else None


def resolve(setting: str, folders: Iterable[Path | None]) -> str | None:
    """The template text a setting names; for `auto`, the one most inputs carry (the first
    met among equals, in the recipe's order), None when no input has one."""
    if setting in BUILT_IN:
        return BUILT_IN[setting]
    if setting != AUTO:
        return setting
    found = [t for t in (template_of(f) for f in dict.fromkeys(folders)) if t is not None]
    return Counter(found).most_common(1)[0][0] if found else None


def template_files(template: str, tokenizer_dir: Path | None, config: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The files that carry `template` in an output whose tokenizer files come from
    `tokenizer_dir`: its tokenizer_config.json (or `config`, when the output's is an edited
    one) with the key set, and chat_template.jinja."""
    files = {TEMPLATE_FILE: (template.rstrip("\n") + "\n").encode()}
    cfg = config if config is not None else (_read_json(tokenizer_dir / TOKENIZER_CONFIG) if tokenizer_dir is not None else None)
    if cfg is not None:
        files[TOKENIZER_CONFIG] = (json.dumps({**cfg, "chat_template": template}, indent=2,
                                              ensure_ascii=False) + "\n").encode()
    return files


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
