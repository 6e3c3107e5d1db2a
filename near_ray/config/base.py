"""The base of every config section (unknown fields refused, assignments validated), which of its fields
affect results, and how a section's validation errors read: one line, fields by path, list items by name,
"did you mean" for a typo."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from near_ray.errors import NearRayError


class ConfigError(NearRayError, ValueError):
    """A config file or override that cannot be used; the message names the file and field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def section_for(cls, data: Any) -> type[Section]:
        """The section that validates ``data`` given to a field of this type: itself, or for a section
        chosen by its ``type`` (near_ray.config.backends), the chosen one."""
        return cls


# ``Field(json_schema_extra=WHERE_IT_RUNS)``: a setting of where and with what the work runs (workers, CPUs,
# GPUs, batch sizes), not of what it computes. Outputs' fingerprints and training run names leave it out
# (``result_fields``), so changing it reuses what is already computed; the reference says so beside it.
WHERE_IT_RUNS: dict[str, Any] = {"affects_results": False}


def affects_results(field: FieldInfo) -> bool:
    """False for a field marked ``WHERE_IT_RUNS``."""
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("affects_results") is False)


def result_fields(section: BaseModel, **dump: Any) -> dict[str, Any]:
    """``section.model_dump(**dump)`` without the fields that do not affect results (``WHERE_IT_RUNS``), in
    nested sections too: what a fingerprint of the section's outputs hashes."""
    data = section.model_dump(**dump)
    out = {}
    for name, field in type(section).model_fields.items():
        if affects_results(field):
            value = getattr(section, name)
            out[name] = result_fields(value, **dump) if isinstance(value, Section) else data[name]
    return out


def format_errors(err: ValidationError, source: str, data: Any = None, schema: type[BaseModel] | None = None) -> str:
    """One line (the CLI prints it as is): the file, then each bad field with what is wrong; a list item
    with a name (a domain) is named by it, and an unknown field gets the nearest known one."""
    fields = []
    for e in err.errors():
        path = _field_path(e["loc"], data) or "<root>"
        hint = _did_you_mean(schema, e["loc"], data) if e["type"] == "extra_forbidden" and schema else ""
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


def _did_you_mean(schema: type[BaseModel], loc: tuple[Any, ...], data: Any = None) -> str:
    """`` (did you mean 'samples'?)`` for an unknown field: the closest field of its section, if any is close."""
    import difflib
    import typing

    section: Any = schema
    for part in loc[:-1]:
        if isinstance(part, int):
            data = data[part] if isinstance(data, list) and part < len(data) else None
            continue
        data = data.get(part) if isinstance(data, dict) else None
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
        section = section.section_for(data)
    fields = getattr(section, "model_fields", {})
    for name, field in fields.items():  # a former name given beside the field's own (RENAMED)
        if isinstance(field.validation_alias, AliasChoices) and loc[-1] in field.validation_alias.choices[1:]:
            return f" (the former name of '{name}', given too: keep one)"
    close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.6)
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
