"""Listing, reads and atomic writes on S3 (``s3://bucket/key``) and local paths.

One ``Storage`` object carries how to reach object storage (endpoint, region); credentials come from
the standard AWS environment variables or profile, never from a config file. It pickles without
its clients, so Ray tasks and actors can carry it.

Atomic writes: a local file is written to a temporary name in the same folder and renamed; an S3
object becomes visible only when its PUT completes, so a reader never sees half an object under
its final name.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from near_ray.uri import StorageError, is_s3, join, parent, relative, split_s3

__all__ = ["ObjectInfo", "Storage", "StorageError", "inside", "is_s3", "join", "parent", "relative", "split_s3",
           "storage_for"]

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from near_ray.config import StorageConfig


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    etag: str | None = None  # S3 ETag (quotes stripped) or local mtime_ns; part of an image's identity


class Storage:
    def __init__(self, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.endpoint_url = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self._s3: Any = None
        self._pafs: Any = None

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Storage:
        return cls(endpoint_url=cfg.endpoint_url, region=cfg.region)

    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "region": self.region}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Storage(endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    # ----------------------------------------------------------------------------------- clients
    @property
    def s3(self) -> Any:
        if self._s3 is None:
            import boto3
            from botocore.config import Config

            self._s3 = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                config=Config(retries={"max_attempts": 5, "mode": "adaptive"}, max_pool_connections=64),
            )
        return self._s3

    def pa_filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem (for Ray Data's ``filesystem=`` and parquet)."""
        if self._pafs is None:
            import pyarrow.fs as pafs

            kwargs: dict[str, Any] = {"region": self.region}
            if self.endpoint_url:
                scheme, _, host = self.endpoint_url.partition("://")
                kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            self._pafs = pafs.S3FileSystem(**kwargs)
        return self._pafs

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, path within it) for ``uri``."""
        import pyarrow.fs as pafs

        if is_s3(uri):
            return self.pa_filesystem(), uri[len("s3://") :]
        return pafs.LocalFileSystem(), str(Path(uri).resolve())

    # ----------------------------------------------------------------------------------- errors
    def _s3_error(self, uri: str, err: Exception) -> StorageError:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        hints = {
            "NoSuchBucket": "the bucket does not exist",
            "InvalidAccessKeyId": "the AWS access key is not valid (check AWS_ACCESS_KEY_ID / AWS_PROFILE)",
            "SignatureDoesNotMatch": "the AWS secret key is wrong (check AWS_SECRET_ACCESS_KEY)",
            "AccessDenied": "access denied (check the credentials' permissions)",
            "NoSuchKey": "no such object",
            "404": "no such object",
        }
        if code in hints:
            return StorageError(f"{uri}: {hints[code]}")
        if type(err).__name__ == "NoCredentialsError":
            return StorageError(f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
        if type(err).__name__ == "EndpointConnectionError":
            return StorageError(f"{uri}: cannot reach the S3 endpoint {self.endpoint_url or 'AWS'}")
        return StorageError(f"{uri}: {type(err).__name__}: {err}")

    # ----------------------------------------------------------------------------------- listing
    def list(self, uri: str, suffixes: list[str] | tuple[str, ...] | None = None) -> Iterator[ObjectInfo]:
        """Every object under the prefix ``uri``, streamed page by page (never all in memory).

        Hidden names (starting with '.' or '_'), and everything in a hidden folder below the prefix,
        are skipped on S3 as locally. Order: lexicographic by key on S3, sorted per folder locally, so
        listings are deterministic.
        """
        sfx = tuple(s.lower() for s in suffixes) if suffixes else None

        def keep(name: str) -> bool:
            if any(piece.startswith((".", "_")) for piece in name.split("/")):
                return False
            return sfx is None or name.lower().endswith(sfx)

        if is_s3(uri):
            bucket, prefix = split_s3(uri)
            if prefix and not prefix.endswith("/"):
                prefix += "/"
            try:
                pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for page in pages:
                    for obj in page.get("Contents", []):
                        if keep(obj["Key"][len(prefix):]) and not obj["Key"].endswith("/"):
                            yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Size"], obj["ETag"].strip('"'))
            except StorageError:
                raise
            except Exception as e:  # botocore errors: name the URI
                raise self._s3_error(uri, e) from e
            return
        root = Path(uri)
        if not root.exists():
            raise StorageError(f"{uri}: no such folder")
        if root.is_file():
            st = root.stat()
            yield ObjectInfo(str(root), st.st_size, str(st.st_mtime_ns))
            return
        # A symbolic link is followed only when its target stays inside the listed folder: a link to a
        # system file or another collection is never listed, so its bytes are never read; each folder is
        # listed once, so a link back up the tree cannot loop.
        real_root = os.path.realpath(root)
        seen, outside, stack = {real_root}, 0, [root]
        while stack:
            folder = stack.pop()
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
            for e in entries:
                if e.name.startswith((".", "_")):
                    continue
                if e.is_symlink() and not inside(e.path, real_root):
                    outside += 1
                    continue
                if e.is_dir(follow_symlinks=True):
                    real = os.path.realpath(e.path)
                    if real not in seen:
                        seen.add(real)
                        stack.append(Path(e.path))
                elif keep(e.name):
                    st = e.stat()
                    yield ObjectInfo(e.path, st.st_size, str(st.st_mtime_ns))
        if outside:
            log.warning("%s: skipped %d symbolic link%s leading out of the folder (a listing never leaves it)",
                        uri, outside, "" if outside == 1 else "s")

    # ----------------------------------------------------------------------------------- objects
    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self.s3.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as e:
                code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
                if code in ("404", "NoSuchKey", "NotFound"):
                    # A "folder" exists when something lies below it.
                    resp = self.s3.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
                    return resp.get("KeyCount", 0) > 0
                raise self._s3_error(uri, e) from e
        return Path(uri).exists()

    def info(self, uri: str) -> ObjectInfo | None:
        """One object's size and ETag (local: mtime_ns); None when there is no such object."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                head = self.s3.head_object(Bucket=bucket, Key=key)
            except Exception as e:
                if getattr(e, "response", {}).get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise self._s3_error(uri, e) from e
            return ObjectInfo(uri, int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))
        path = Path(uri)
        if not path.is_file():
            return None
        st = path.stat()
        return ObjectInfo(uri, st.st_size, str(st.st_mtime_ns))

    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except Exception as e:
                raise self._s3_error(uri, e) from e
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{uri}: no such file") from None
        except OSError as e:
            raise StorageError(f"{uri}: cannot read: {e}") from e

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write atomically: the object appears whole under ``uri`` or not at all."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self.s3.put_object(Bucket=bucket, Key=key, Body=data)
            except Exception as e:
                raise self._s3_error(uri, e) from e
            return
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, uri: str) -> None:
        """Delete an object, or everything below a prefix/folder."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self.s3.delete_object(Bucket=bucket, Key=key)
            for obj in list(self.list(uri)):
                b, k = split_s3(obj.uri)
                self.s3.delete_object(Bucket=b, Key=k)
            return
        p = Path(uri)
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------------- formats
    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def read_json(self, uri: str) -> Any:
        try:
            return json.loads(self.read_text(uri))
        except json.JSONDecodeError as e:
            raise StorageError(f"{uri}: not valid JSON: {e}") from e

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def read_parquet(self, uri: str) -> pa.Table:
        """A parquet file, or every parquet file below a folder/prefix, as one table."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if not uri.endswith(".parquet"):
                files = [o.uri for o in self.list(uri, suffixes=[".parquet"])]
                if not files:
                    raise StorageError(f"{uri}: no parquet files")
                return pa.concat_tables(
                    [pq.read_table(io.BytesIO(self.read_bytes(f))) for f in files], promote_options="default"
                )
            return pq.read_table(io.BytesIO(self.read_bytes(uri)))
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"{uri}: not a readable parquet table: {e}") from e

    def write_parquet(self, uri: str, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(uri, buf.getvalue())


def inside(path: str, root: str) -> bool:
    """Whether local ``path``, every symbolic link on the way resolved, lies inside folder ``root``."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def storage_for(cfg: Any) -> Storage:
    """A Storage for a RunConfig or StorageConfig."""
    return Storage.from_config(getattr(cfg, "storage", cfg))
