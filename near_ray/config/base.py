"""The base of every config section: unknown fields refused, assignments validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from near_ray.errors import NearRayError


class ConfigError(NearRayError, ValueError):
    """A config file or override that cannot be used; the message names the file and field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
