"""The base of every config section (unknown fields refused, assignments validated), and how a section's
validation errors read: one line, fields by path, list items by name, "did you mean" for a typo."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from near_ray.errors import NearRayError


class ConfigError(NearRayError, ValueError):
    """A config file or override that cannot be used; the message names the file and field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_errors(err: ValidationError, source: str, data: Any = None, schema: type[BaseModel] | None = None) -> str:
    """One line (the CLI prints it as is): the file, then each bad field with what is wrong; a list item
    with a name (a domain) is named by it, and an unknown field gets the nearest known one."""
    fields = []
    for e in err.errors():
        path = _field_path(e["loc"], data) or "<root>"
        hint = _did_you_mean(schema, e["loc"]) if e["type"] == "extra_forbidden" and schema else ""
        fields.append(f"field '{path}': {e['msg']}{hint}")
    return f"{source}: " + "; ".join(fields)


def _field_path(loc: tuple[Any, ...], data: Any) -> str:
    """``data.domains[birds].uri`` for pydantic's ``("data", "domains", 0, "uri")``."""
    out, node = "", data
    for part in loc:
        item = node[part] if isinstance(node, (list, tuple)) and isinstance(part, int) and part < len(node) else None
        if isinstance(part, int):
            name = item.get("name") if isinstance(item, dict) else None
            out += f"[{name if isinstance(name, str) and name else part}]"
        else:
            out += f".{part}" if out else str(part)
            item = node.get(part) if isinstance(node, dict) else None
        node = item
    return out


def _did_you_mean(schema: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """`` (did you mean 'samples'?)`` for an unknown field: the closest field of its section, if any is close."""
    import difflib
    import typing

    section: Any = schema
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(section, "model_fields", {}).get(part)
        if field is None:
            return ""
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, Section)), None)
        if section is None:  # a list of sections (data.domains): the item type
            inner = [a for c in candidates for a in typing.get_args(c)]
            section = next((c for c in inner if isinstance(c, type) and issubclass(c, Section)), None)
        if section is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(getattr(section, "model_fields", {})), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_SECRET_WORDS = ("key", "token", "secret", "password", "passwd", "credential")


def mask_secrets(data: Any, name: str = "") -> Any:
    """A dumped config with secret values masked: fields and environment variables named like a key, token
    or password (the ``*_env`` fields hold a variable's *name*, which is shown, and whether it is set), and
    the password of a URL (``https://user:pass@host``)."""
    import os
    import re

    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if str(k).endswith("_env") and isinstance(v, str):  # a name: show it, and whether it holds a value
                value = os.environ.get(v)
                out[k] = f"{v} (set: {_masked(value)})" if value else f"{v} (not set)"
            else:
                out[k] = mask_secrets(v, str(k))
        return out
    if isinstance(data, list):
        return [mask_secrets(v, name) for v in data]
    if isinstance(data, str):
        if any(w in name.lower() for w in _SECRET_WORDS) and data:
            return _masked(data)
        return re.sub(r"(://[^/:@\s]+:)[^@/\s]+@", r"\1****@", data)
    return data


def _masked(value: str) -> str:
    """``****wxyz``: enough to tell two keys apart, never enough to use one."""
    return "****" + (value[-4:] if len(value) >= 16 else "")
