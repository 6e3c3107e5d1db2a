"""The configuration reference (docs/config-reference.md), written from the pydantic models.

Every field's description lives in its ``Field(description=…)``, so the reference cannot say something the
models do not; tests/config/test_config.py checks that the committed file is what this module writes.
Regenerate with ``python -m near_ray.config.reference > docs/config-reference.md``.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from near_ray.config import RunConfig, Section
from near_ray.config.backends import BACKENDS, BackendConfig
from near_ray.config.base import affects_results

HEADER = """# Configuration reference

Generated from the pydantic models in `near_ray/config/`; do not edit by hand. Regenerate with
`python -m near_ray.config.reference > docs/config-reference.md` (a test checks that this file is current).
How configs are loaded, overridden and checked: [configuration.md](configuration.md).
"""


def _section_of(annotation: Any) -> type[Section] | None:
    """The section a field holds, itself or as the items of a list (``data.domains``)."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, Section):
            return t
    return None


def sections(root: type[BaseModel] = RunConfig) -> list[tuple[str, type[Section]]]:
    """Every section below ``root`` by its dotted path (``label.image``, ``data.domains[]``), depth first in
    declaration order: the order of the reference. A section chosen by its ``type`` (``label.backend``) is
    listed, then each registered type as ``label.backend (type: vllm)``."""
    out: list[tuple[str, type[Section]]] = []

    def visit(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            section = _section_of(field.annotation)
            if section is not None:
                path = f"{prefix}{name}" + ("" if section is field.annotation else "[]")
                out.append((path, section))
                visit(f"{path}.", section)
                if section is BackendConfig:
                    out.extend((_variant(path, kind), cls) for kind, cls in BACKENDS.items())

    visit("", root)
    return out


def type_name(annotation: Any) -> str:
    """A field's type as a reader writes it in YAML: ``int or null``, ``"auto" | "flat"``, ``list[str]``."""
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "section"
    if origin is not None:
        inner = ", ".join(type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo, path: str) -> str:
    """The default as YAML would write it; a section's default is its own table, linked."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return f"[{path}](#{_anchor(path)})"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _cell(text: str) -> str:
    """Table-cell text: one line, a literal ``|`` escaped so it does not end the cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _table(path: str, model: type[BaseModel], prefix: str | None = None) -> list[str]:
    """One section's heading, its docstring and its fields; ``prefix`` of the fields' paths (default ``path.``)."""
    prefix = f"{path}." if prefix is None else prefix
    lines = [f"## {path}", ""]
    doc = model.__dict__.get("__doc__")
    if doc:
        lines += [" ".join(inspect.cleandoc(doc).split()).replace("``", "`"), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = (field.description or "") + ("" if affects_results(field) else " (does not affect results)")
        row = [f"`{name}`", type_name(field.annotation), default_text(field, prefix + name), description]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return [*lines, ""]


def reference_markdown() -> str:
    """docs/config-reference.md: the top-level sections, then a table per section, each listed once (a
    section used at a second path, like ``classify.domains[]``, points to the first)."""
    lines = [HEADER, *_table("sections", RunConfig, prefix="")]
    first: dict[type[Section], str] = {}
    for path, model in sections():
        if model in first:
            lines += [f"## {path}", "", f"The same fields as [{first[model]}](#{_anchor(first[model])}).", ""]
            continue
        first[model] = path
        if model is BackendConfig:
            choices = ", ".join(f"[{kind}](#{_anchor(_variant(path, kind))})" for kind in BACKENDS)
            lines += [f"## {path}", "", f"One section whose `type` picks the backend and its fields: {choices}.", ""]
            continue
        lines += _table(path, model)
    return "\n".join(lines).rstrip() + "\n"


def _variant(path: str, kind: str) -> str:
    """The heading of one type of a section chosen by its ``type``: ``label.backend (type: vllm)``."""
    return f"{path} (type: {kind})"


def _anchor(path: str) -> str:
    """GitHub's heading anchor: lower case, spaces as hyphens, other punctuation dropped."""
    return "".join("-" if c == " " else c for c in path.lower() if c.isalnum() or c in "-_ ")


if __name__ == "__main__":
    print(reference_markdown(), end="")
