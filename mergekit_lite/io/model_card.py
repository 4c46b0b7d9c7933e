"""The README.md model card written beside every output, so a checkpoint says how it was made."""

from __future__ import annotations

from collections.abc import Sequence

from .. import __version__


def model_card(*, base_models: Sequence[str], title: str, what: str, recipe_yaml: str | None = None) -> str:
    """A Hugging Face model card: YAML front matter, then what was done and the recipe."""
    lines = ["---"]
    bases = [b for b in dict.fromkeys(base_models) if b]
    if len(bases) == 1:
        lines.append(f"base_model: {_quote(bases[0])}")
    elif bases:
        lines.append("base_model:")
        lines += [f"- {_quote(b)}" for b in bases]
    lines += ["library_name: transformers", "tags:", "- merge", "- mergekit-lite", "---", "", f"# {title}", "",
              what.strip(), "", f"Made with mergekit_lite {__version__}."]
    if recipe_yaml:
        lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _quote(s: str) -> str:
    return s if all(c.isalnum() or c in "-_./@" for c in s) else '"' + s.replace('"', '\\"') + '"'
