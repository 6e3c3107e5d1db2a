"""The predictions table on storage: schema, the incremental part writer, readers and part rewrites.

Layout: ``{workdir}/predictions/domain=<name>/part-<time>-<id>.parquet``, one row per image. Parts
are written whole and atomically (a killed job keeps every part it finished), each holds the rows of
one domain and one bundle version. The cascade changes rows after they are written: it writes the
part again under the same ``<id>`` with a newer ``<time>`` and then deletes the old file, so a part
id names one set of images for good. A job killed between the two steps leaves two files with one
id: readers take the newer and ``repair`` deletes the older, so no image is ever counted twice.
"""

from __future__ import annotations

import io
import logging
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from near_ray.storage import Storage, join

if TYPE_CHECKING:
    import pandas as pd

    from near_ray.config import RunConfig

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # content hash of the bytes (near_ray.images.image_id)
        ("uri", pa.string()),
        ("domain", pa.string()),
        ("name", pa.string()),  # the answer; null for bad images and abstentions
        ("score", pa.float64()),  # CLIP: the bundle's top probability; MLLM: the share of samples naming it
        ("confidence", pa.float64()),  # calibrated CLIP top probability: what routing compares
        ("top_k_names", pa.list_(pa.string())),  # the CLIP's ranking (Bundle.rank), kept when the MLLM answers
        ("top_k_scores", pa.list_(pa.float32())),
        ("abstained", pa.bool_()),
        ("new_name", pa.bool_()),  # an MLLM name outside the bundle's vocabulary
        ("source", pa.string()),  # clip | mllm | none
        ("model_version", pa.string()),  # the bundle's hash
        ("status", pa.string()),  # ok | bad_image | abstained | routed
        ("error", pa.string()),
        ("mllm_cost_usd", pa.float64()),  # every MLLM request made for this image (label.prices)
    ]
)
COLUMNS = SCHEMA.names
_PART = re.compile(r"part-(\d+)-([0-9a-f]+)\.parquet$")


def predictions_uri(cfg: RunConfig) -> str:
    return cfg.artifact("predictions")


def part_name(part_id: str | None = None) -> str:
    """A new part file name; the same ``part_id`` with a newer time replaces a part."""
    return f"part-{time.time_ns():020d}-{part_id or uuid.uuid4().hex[:8]}.parquet"


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


def as_table(rows: list[dict[str, Any]] | pa.Table) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows.select(COLUMNS).cast(SCHEMA)
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)


class PredictionWriter:
    """Buffers prediction rows per domain and writes them as atomic parquet parts."""

    def __init__(self, uri: str, storage: Storage, part_rows: int, flush_interval_s: float) -> None:
        self.uri, self.storage = uri, storage
        self.part_rows, self.flush_interval_s = part_rows, flush_interval_s
        self._buffers: dict[str, list[pa.Table]] = defaultdict(list)
        self._sizes: Counter[str] = Counter()
        self._last_flush = time.monotonic()
        self.parts_written = 0
        self.rows_written = 0

    def add(self, rows: list[dict[str, Any]] | pa.Table) -> None:
        import pyarrow.compute as pc

        table = as_table(rows)
        if table.num_rows == 0:
            return
        for domain in pc.unique(table["domain"]).to_pylist():
            part = table.filter(pc.equal(table["domain"], domain))
            self._buffers[domain].append(part)
            self._sizes[domain] += part.num_rows
        if any(n >= self.part_rows for n in self._sizes.values()):
            self.flush(only_full=True)
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self, only_full: bool = False) -> None:
        for domain in list(self._buffers):
            if self._sizes[domain] and (not only_full or self._sizes[domain] >= self.part_rows):
                # the rows leave the buffer only once their part is on storage: a failed write keeps
                # them for the next flush (the stage's final one)
                self.write(domain, pa.concat_tables(self._buffers[domain]))
                del self._buffers[domain]
                self._sizes[domain] = 0
        if not only_full:
            self._last_flush = time.monotonic()

    def write(self, domain: str, table: pa.Table, part_id: str | None = None) -> str:
        uri = join(self.uri, f"domain={domain}", part_name(part_id))
        self.storage.write_parquet(uri, table)
        self.parts_written += 1
        self.rows_written += table.num_rows
        log.debug("wrote %d prediction rows for domain %s", table.num_rows, domain)
        return uri


# ------------------------------------------------------------------------------------------ reading
def part_files(uri: str, storage: Storage) -> dict[str, list[tuple[str, str]]]:
    """Per domain folder: [(part id, file URI)], the newest file of each id, oldest part first.

    Only a table that does not exist is empty: any other storage error is raised, never read as "no
    rows" (a resumed run would classify, and the cascade pay for, every image again)."""
    return _newest(_listed(uri, storage))


def _listed(uri: str, storage: Storage) -> list[str]:
    return [o.uri for o in storage.list(uri, suffixes=[".parquet"])] if storage.exists(uri) else []


def _newest(files: list[str]) -> dict[str, list[tuple[str, str]]]:
    newest: dict[tuple[str, str], tuple[str, str]] = {}
    for f in files:
        m = _PART.search(f)
        domain = _domain_of(f)
        if m is None or domain is None:
            continue
        key = (domain, m.group(2))
        if key not in newest or m.group(1) > newest[key][0]:
            newest[key] = (m.group(1), f)
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for (domain, pid), (_stamp, f) in sorted(newest.items(), key=lambda kv: kv[1][0]):
        out[domain].append((pid, f))
    return dict(out)


def _domain_of(uri: str) -> str | None:
    for piece in uri.split("/"):
        if piece.startswith("domain="):
            return piece[len("domain=") :]
    return None


def repair(uri: str, storage: Storage) -> int:
    """Delete the older file of every part written twice (a rewrite killed before its delete)."""
    files = _listed(uri, storage)  # one listing for both: what is there, and the newest of each part
    keep = {f for parts in _newest(files).values() for _, f in parts}
    stale = [f for f in files if _PART.search(f) and f not in keep]
    for f in stale:
        storage.delete(f)
    if stale:
        log.info("classify: removed %d superseded part file(s) under %s", len(stale), uri)
    return len(stale)


def read_part(uri: str, storage: Storage, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)
    return table.cast(pa.schema([SCHEMA.field(c) for c in table.column_names]))


def iter_parts(
    uri: str, storage: Storage, columns: list[str] | None = None, domains: set[str] | None = None
) -> Iterator[tuple[str, str, str, pa.Table]]:
    """(domain, part id, file URI, rows) for every current part, oldest first within a domain."""
    for domain, parts in sorted(part_files(uri, storage).items()):
        if domains is not None and domain not in domains:
            continue
        for pid, f in parts:
            yield domain, pid, f, read_part(f, storage, columns)


def read_predictions(uri: str, storage: Storage | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """The predictions table as a DataFrame: one row per image URI, from its newest part."""
    import pandas as pd

    storage = storage or Storage()
    cols = list(columns or COLUMNS)
    cols += [c for c in ("domain", "uri") if c not in cols]
    frames = [t.to_pandas() for _, _, _, t in iter_parts(uri, storage, cols)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    df = pd.concat(frames, ignore_index=True)
    # parts are oldest first: a URI in two parts (a bundle version being replaced) keeps its newest row
    return df.drop_duplicates(["domain", "uri"], keep="last").sort_values(["domain", "uri"]).reset_index(drop=True)
