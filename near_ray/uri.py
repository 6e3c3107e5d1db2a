"""Pure URI helpers for ``s3://bucket/key`` and local paths: no I/O, no clients (a leaf module)."""

from __future__ import annotations

import posixpath
from pathlib import Path

from near_ray.errors import NearRayError


class StorageError(NearRayError):
    """A storage operation failed; the message names the URI and what to check."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in S3 URI")
    return bucket, key


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])
    return str(Path(base).joinpath(*parts))


def parent(uri: str) -> str:
    """The folder/prefix holding ``uri``."""
    return posixpath.dirname(uri.rstrip("/")) if is_s3(uri) else str(Path(uri).parent)


def relative(uri: str, base: str) -> str:
    """The part of ``uri`` below ``base`` (posix separators)."""
    if is_s3(uri):
        b = base.rstrip("/") + "/"
        if not uri.startswith(b):
            raise StorageError(f"{uri} is not under {base}")
        return uri[len(b) :]
    return Path(uri).resolve().relative_to(Path(base).resolve()).as_posix()
