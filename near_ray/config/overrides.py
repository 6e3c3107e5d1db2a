"""``--set section.key=value``: overrides applied to a config's data before it is validated.

A value is a YAML scalar or flow collection (``3``, ``0.5``, ``true``, ``null``, ``[a, b]``, ``{k: v}``).
The label backend is one section chosen by its ``type`` (near_ray.config.backends), so its overrides
follow two rules: the type is set first (``label.backend.type=vllm``, or the old ``label.backend=vllm``),
whatever the order on the command line, and a new type starts from its own fields, not the former
type's; the old form's ``label.openai.…``/``label.vllm.…`` set the backend's fields when its type is
that one, and are ignored otherwise, as they always were.
"""

from __future__ import annotations

from typing import Any

import yaml

from near_ray.config.backends import DEFAULT_BACKEND
from near_ray.config.base import ConfigError
from near_ray.config.label import OLD_SECTIONS, migrate_label


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/flow collections: 3, 0.5, true, null, [a, b], {k: v}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source} '{item}': expected section.key=value")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"{source} '{item}': empty key")
        parsed.append((item, parts, parse_value(value)))
    label = data.get("label", {})
    if any(parts[0] == "label" and len(parts) > 1 for _, parts, _ in parsed) and isinstance(label, dict):
        try:  # the backend as one section, whichever form the file has
            data["label"] = migrate_label(label, keep_unused=True)
        except ValueError:
            pass  # the file's own conflict: validation names it
    parsed.sort(key=lambda p: not _sets_backend(p[1]))  # stable: the rest keep their order
    for item, parts, value in parsed:
        parts = _backend_path(data, parts, value)
        if not parts:
            continue
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source} '{item}': '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _sets_backend(parts: list[str]) -> bool:
    """``label.backend=…`` or ``label.backend.type=…``: applied before every other override."""
    return parts[:2] == ["label", "backend"] and parts[2:] in ([], ["type"])


def _backend_path(data: dict[str, Any], parts: list[str], value: Any) -> list[str]:
    """Where an override of the label backend goes (``[]``: done here): a type switch starts the backend
    from the new type's fields; ``label.<old section>.…`` is the backend's own when its type is that one."""
    label = data.get("label")
    backend = label.get("backend") if isinstance(label, dict) else None
    if parts[0] != "label" or len(parts) < 2 or not isinstance(backend, dict):
        return parts
    current = backend.get("type", DEFAULT_BACKEND)
    if _sets_backend(parts) and isinstance(value, str):
        if value != current:
            if current in OLD_SECTIONS:  # kept aside: a later switch back finds it
                label[current] = {k: v for k, v in backend.items() if k != "type"}
            own = label.pop(value, None) if value in OLD_SECTIONS else None
            label["backend"] = {"type": value, **(own if isinstance(own, dict) else {})}
        return []
    if parts[1] in OLD_SECTIONS and parts[1] == current:
        if len(parts) == 2:
            label["backend"] = {"type": current, **value} if isinstance(value, dict) else value
            return []
        return ["label", "backend", *parts[2:]]
    return parts
