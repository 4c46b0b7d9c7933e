"""Errors a user can cause, each mapped to the exit code the CLI promises.

Everything a user can get wrong (a recipe, a checkpoint, a reference) raises a subclass of
`MliteError`. The CLI prints `str(error)` on one line and exits with `error.exit_code`; the
Python API lets the exception propagate so notebooks see the same message. Anything else is a
bug in mlite and keeps its traceback.
"""

from __future__ import annotations


class MliteError(Exception):
    """Base class: a user-facing problem with a one-line message."""

    exit_code: int = 1

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        self.problems = problems or [message]
        super().__init__(message)


class UsageError(MliteError):
    """Bad command-line usage or API arguments (exit 2)."""

    exit_code = 2


class RecipeError(MliteError):
    """An invalid recipe: YAML, schema, method, parameter or reference (exit 3)."""

    exit_code = 3


class CheckpointError(MliteError):
    """A bad checkpoint: corrupt or truncated file, missing tensor, shape/dtype mismatch (exit 4)."""

    exit_code = 4


class ResolveError(MliteError):
    """A model reference that cannot be resolved (Hub offline, missing path) (exit 5)."""

    exit_code = 5


def combine(errors: list[MliteError]) -> MliteError:
    """Fold several problems into one error that reports all of them at once.

    The exit code is that of the first problem, so a recipe with both a recipe mistake and a
    checkpoint mistake exits with the code of whichever was found first (validation order is
    recipe first, then checkpoints).
    """
    if len(errors) == 1:
        return errors[0]
    problems = [p for e in errors for p in e.problems]
    first = errors[0]
    merged = type(first)("\n".join(problems), problems=problems)
    return merged


def one_line(text: object, limit: int | None = None) -> str:
    """`text` (a third-party message: transformers', PyYAML's, click's) with its whitespace runs,
    newlines included, made single spaces, cut to `limit` characters: user errors are one line."""
    flat = " ".join(str(text).split())
    return flat if limit is None or len(flat) <= limit else flat[: limit - 1] + "…"
