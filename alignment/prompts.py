"""Prompt templates: Jinja files in ``prompts/``, each declaring the variables it needs.

A template starts with a Jinja comment naming its variables::

    {# vars: question, response #}

Loading checks that the declared variables are exactly the ones the template uses, and
rendering checks that the caller passed all of them (StrictUndefined), so a renamed variable
fails in a unit test instead of silently rendering an empty string into a judge prompt.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jinja2
from jinja2 import meta

# In a checkout (and an editable install) the templates are the repository's ``prompts/``; a wheel
# carries the same files as the package data ``alignment/prompt_templates/`` (pyproject.toml maps
# that package to ``prompts/``).
PACKAGED_DIR = Path(__file__).resolve().parent / "prompt_templates"
CHECKOUT_DIR = Path(__file__).resolve().parent.parent / "prompts"
PROMPTS_DIR = PACKAGED_DIR if PACKAGED_DIR.is_dir() else CHECKOUT_DIR
_VARS_RE = re.compile(r"\{#\s*vars:\s*([^#]*)#\}")

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(PROMPTS_DIR)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=False,
    autoescape=False,  # prompts are plain text for a model, not HTML
)


class TemplateError(ValueError):
    pass


@functools.lru_cache(maxsize=None)
def declared_variables(name: str) -> frozenset[str]:
    """The variables template ``name`` declares in its ``{# vars: ... #}`` header."""
    path = PROMPTS_DIR / f"{name}.jinja"
    if not path.is_file():
        raise TemplateError(f"no prompt template {path}")
    source = path.read_text(encoding="utf-8")
    m = _VARS_RE.search(source)
    if not m:
        raise TemplateError(f"{path}: missing '{{# vars: ... #}}' header")
    declared = frozenset(v.strip() for v in m.group(1).split(",") if v.strip())
    used = meta.find_undeclared_variables(_env.parse(source))
    if used != declared:
        raise TemplateError(
            f"{path}: declares {sorted(declared)} but uses {sorted(used)}"
        )
    return declared


def render(name: str, **variables: object) -> str:
    """Render ``prompts/<name>.jinja`` with exactly its declared variables."""
    declared = declared_variables(name)
    missing = declared - variables.keys()
    extra = variables.keys() - declared
    if missing or extra:
        raise TemplateError(
            f"prompt {name!r}: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    return _env.get_template(f"{name}.jinja").render(**variables).strip()


def available() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.jinja"))
