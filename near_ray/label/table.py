"""The labels table on storage: schema, incremental part writer and reader.

Layout: ``{workdir}/labels/domain=<name>/part-<time>-<id>.parquet``, one row per image x sample.
Parts are written whole and atomically, so a job killed half-way leaves only complete parts; part
names sort by write time, so when a re-run adds a row for a key that already has one (a retried
``mllm_error``), the reader keeps the final, newest answer.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from near_ray.errors import NearRayError
from near_ray.storage import Storage, StorageError, join, storage_for

if TYPE_CHECKING:
    import pandas as pd

    from near_ray.config import RunConfig

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("domain", pa.string()),
        ("sample", pa.int32()),
        ("seed", pa.int64()),
        ("raw_answer", pa.string()),
        ("label", pa.string()),
        ("status", pa.string()),  # ok | bad_image | mllm_error | unparsable
        ("error", pa.string()),
        ("model", pa.string()),
        ("prompt_version", pa.string()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("latency_s", pa.float64()),
    ]
)
COLUMNS = SCHEMA.names
FINAL_STATUSES = ("ok", "unparsable", "bad_image")  # never asked again; mllm_error is retried on a re-run
_STATUS_RANK = {"ok": 0, "unparsable": 0, "bad_image": 1, "mllm_error": 2}


class LabelsNotFoundError(NearRayError):
    """No labels table where one was expected."""


def labels_uri(cfg: RunConfig) -> str:
    return cfg.artifact("labels")


class LabelWriter:
    """Buffers label rows per domain and writes them as atomic parquet parts."""

    def __init__(self, uri: str, storage: Storage, part_rows: int, flush_interval_s: float) -> None:
        self.uri = uri
        self.storage = storage
        self.part_rows = part_rows
        self.flush_interval_s = flush_interval_s
        self._buffers: dict[str, list[dict[str, Any]]] = {}
        self._last_flush = time.monotonic()
        self.parts_written = 0
        self.rows_written = 0
        self._by_domain: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._buffers.setdefault(row["domain"], []).append(row)
        if any(len(b) >= self.part_rows for b in self._buffers.values()):
            self.flush(only_full=True)
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self, only_full: bool = False) -> None:
        for domain, rows in list(self._buffers.items()):
            if rows and (not only_full or len(rows) >= self.part_rows):
                self._write(domain, rows)
                self._buffers[domain] = []
        if not only_full:
            self._last_flush = time.monotonic()

    def _write(self, domain: str, rows: list[dict[str, Any]]) -> None:
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)
        self.storage.write_parquet(join(self.uri, f"domain={domain}", name), table)
        self.parts_written += 1
        self.rows_written += len(rows)
        self._by_domain[domain].update(r["status"] for r in rows)
        log.debug("wrote %d label rows for domain %s", len(rows), domain)

    def status_counts(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """Rows written so far: (by status, by domain and status)."""
        total: Counter[str] = Counter()
        for c in self._by_domain.values():
            total.update(c)
        return dict(total), {d: dict(c) for d, c in self._by_domain.items()}


def read_labels_table(uri: str, storage: Storage) -> pa.Table | None:
    """Every row of every part below ``uri`` (None when there is no table yet)."""
    try:
        if not storage.exists(uri):
            return None
        return storage.read_parquet(uri).select(COLUMNS).cast(SCHEMA)
    except StorageError as e:
        if "no parquet files" in str(e):
            return None
        raise


def read_labels(
    cfg_or_uri: RunConfig | str, storage: Storage | None = None, *, all_versions: bool = False
) -> pd.DataFrame:
    """The labels table as a DataFrame: one row per (uri, sample), the final and newest answer.

    Given a RunConfig, only rows of its prompt version and model are returned (unless
    ``all_versions``); given a URI, every version is returned (deduplicated per version and model).
    """
    from near_ray.label.backends import model_name

    if isinstance(cfg_or_uri, str):
        uri, storage = cfg_or_uri, storage or Storage()
        version = model = None
    else:
        uri, storage = labels_uri(cfg_or_uri), storage or storage_for(cfg_or_uri)
        version, model = cfg_or_uri.label.prompt_version, model_name(cfg_or_uri.label)
    table = read_labels_table(uri, storage)
    if table is None:
        raise LabelsNotFoundError(f"{uri}: no labels table (run `near-ray label` first)")
    df = table.to_pandas()
    if version is not None and not all_versions:
        df = df[(df["prompt_version"] == version) & (df["model"] == model)]
    return latest_rows(df)


def latest_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (domain, uri, sample, prompt_version, model): final statuses beat errors, newer beats older."""
    df = df.reset_index(drop=True)
    order = df.assign(_rank=df["status"].map(_STATUS_RANK).fillna(3), _pos=-df.index)
    order = order.sort_values(["_rank", "_pos"], kind="stable")
    keys = ["domain", "uri", "sample", "prompt_version", "model"]
    return order.drop_duplicates(keys).drop(columns=["_rank", "_pos"]).sort_values(["domain", "uri", "sample"])
