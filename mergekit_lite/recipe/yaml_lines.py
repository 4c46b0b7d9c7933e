"""YAML parsing that remembers the line of every mapping key and list item.

PyYAML's composer knows where each node starts; its default constructor throws that away. This
loader builds `LineDict`/`LineList` (plain dict/list subclasses) that keep the 1-based line of
each key and item, so a schema error deep in a recipe can say `recipe.yaml:12`. It also reports
duplicate keys (plain PyYAML silently keeps the last one) and reads `1e-3` as a float (YAML 1.1
needs a dot, which surprises everyone writing a small density or learning rate).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..errors import one_line


class LineDict(dict):
    """A dict that knows its own start line and the line of each key."""

    line: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_lines: dict[Any, int] = {}


class LineList(list):
    """A list that knows its own start line and the line of each item."""

    line: int | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines: list[int] = []


class DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r} (first written at line {first_line})")
        self.key = key
        self.line = line


class _LineLoader(yaml.SafeLoader):
    duplicates: list[DuplicateKey]


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found an unhashable key", key_node.start_mark
            ) from None
        line = key_node.start_mark.line + 1
        if key in result:
            loader.duplicates.append(DuplicateKey(key, line, result.key_lines[key]))
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class YamlSyntaxError(Exception):
    """A YAML problem with the 1-based line it was found at (None when unknown)."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


def parse_yaml(text: str) -> tuple[Any, list[DuplicateKey]]:
    """Parse one YAML document into LineDict/LineList trees; raise YamlSyntaxError."""
    try:
        # The reader checks the characters as it is made: NUL and other control characters fail here.
        loader = _LineLoader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character
        code = ord(char) if isinstance(char, str) else int(char)
        raise YamlSyntaxError(f"YAML syntax error: control character U+{code:04X} is not allowed in YAML", line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"YAML syntax error: {one_line(exc)}", _error_line(exc)) from None
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        what = " ".join(s for s in (exc.context, exc.problem) if s)
        raise YamlSyntaxError(f"YAML syntax error: {what or one_line(exc)}", _error_line(exc)) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"YAML syntax error: {one_line(exc)}", _error_line(exc)) from None
    except RecursionError:
        raise YamlSyntaxError("YAML syntax error: nested too deeply", None) from None
    finally:
        loader.dispose()
    return data, loader.duplicates


def _error_line(exc: yaml.YAMLError) -> int | None:
    """The 1-based line of a YAML error, when PyYAML knows it."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return mark.line + 1
    return None


def line_of(container: Any, key: Any) -> int | None:
    """The line of `key` (or list index) inside `container`, or None when unknown."""
    if isinstance(container, LineDict):
        return container.key_lines.get(key, container.line)
    if isinstance(container, LineList):
        if isinstance(key, int) and 0 <= key < len(container.item_lines):
            return container.item_lines[key]
        return container.line
    return None


def start_line(value: Any) -> int | None:
    return value.line if isinstance(value, (LineDict, LineList)) else None


def plain(value: Any) -> Any:
    """Strip line bookkeeping: LineDict/LineList → dict/list, recursively."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
