"""The part table every writing stage keeps its rows in (label, classify), and which of its rows are current.

A part table is a folder of parquet parts, ``{uri}/domain=<name>/part-<time>-<id>.parquet``, each part
holding the rows of one domain. Parts are written whole and atomically (a killed job keeps every part
it finished). A part is replaced by writing it again under the same ``<id>`` with a newer ``<time>`` and
then deleting the old file: a job killed between the two steps leaves two files with one id, readers
take the newer (the newest-part rule) and ``repair`` deletes the older, so no row is counted twice.

``ResumeRule`` says which rows were written by this run's version of the work and which of those are
final; the resume ledger (``near_ray.parts.ledger``) uses it to skip them.
"""

from __future__ import annotations

import io
import logging
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from near_ray.storage import Storage, join

log = logging.getLogger(__name__)

_PART = re.compile(r"part-(\d+)-([0-9a-f]+)\.parquet$")


def part_name(part_id: str | None = None) -> str:
    """A new part file name; the same ``part_id`` with a newer time replaces a part."""
    return f"part-{time.time_ns():020d}-{part_id or uuid.uuid4().hex[:8]}.parquet"


def domain_of(uri: str) -> str | None:
    """The domain a part file belongs to (its ``domain=<name>`` folder)."""
    for piece in uri.split("/"):
        if piece.startswith("domain="):
            return piece[len("domain=") :]
    return None


class PartTable:
    """A part table: buffered, atomic part writes per domain, and the readers that apply the newest-part rule."""

    def __init__(self, uri: str, storage: Storage, schema: pa.Schema, part_rows: int = 5000,
                 flush_interval_s: float = 30.0) -> None:  # fmt: skip
        self.uri, self.storage, self.schema = uri, storage, schema
        self.part_rows, self.flush_interval_s = part_rows, flush_interval_s
        self._buffers: dict[str, list[pa.Table]] = defaultdict(list)
        self._sizes: Counter[str] = Counter()
        self._last_flush = time.monotonic()
        self.parts_written = 0
        self.rows_written = 0
        self._statuses: dict[str, Counter[str]] = defaultdict(Counter)

    # ------------------------------------------------------------------------------------ writing
    def as_table(self, rows: list[dict[str, Any]] | pa.Table) -> pa.Table:
        """Rows in the table's schema (the row contract): missing columns are null, extra ones dropped."""
        if isinstance(rows, pa.Table):
            return rows.select(self.schema.names).cast(self.schema)
        return pa.Table.from_pylist([{c: r.get(c) for c in self.schema.names} for r in rows], schema=self.schema)

    def add(self, rows: list[dict[str, Any]] | pa.Table) -> None:
        """Buffer rows; a domain's part is written once it holds ``part_rows``, every domain's at least
        every ``flush_interval_s``."""
        import pyarrow.compute as pc

        table = self.as_table(rows)
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
        """Write one part now (atomically); with ``part_id``, the newer file of that part. Returns its URI."""
        uri = join(self.uri, f"domain={domain}", part_name(part_id))
        self.storage.write_parquet(uri, table)
        self.parts_written += 1
        self.rows_written += table.num_rows
        if "status" in table.column_names:
            self._statuses[domain].update(s for s in table["status"].to_pylist() if s is not None)
        log.debug("wrote %d rows for domain %s under %s", table.num_rows, domain, self.uri)
        return uri

    def status_counts(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """Rows written so far: (by status, by domain and status)."""
        total: Counter[str] = Counter()
        for c in self._statuses.values():
            total.update(c)
        return dict(total), {d: dict(c) for d, c in self._statuses.items()}

    # ------------------------------------------------------------------------------------ reading
    def listing(self) -> list[str]:
        """Every parquet file below the table. Only a table that does not exist is empty: any other storage
        error is raised, never read as "no rows" (a resumed run would compute, and pay for, everything again)."""
        return [o.uri for o in self.storage.list(self.uri, suffixes=[".parquet"])] if self.storage.exists(self.uri) else []

    def part_files(self, files: list[str] | None = None) -> dict[str, list[tuple[str, str]]]:
        """Per domain: [(part id, file URI)], the newest file of each id, oldest part first."""
        newest: dict[tuple[str, str], tuple[str, str]] = {}
        for f in self.listing() if files is None else files:
            m, domain = _PART.search(f), domain_of(f)
            if m is None or domain is None:
                continue
            key = (domain, m.group(2))
            if key not in newest or m.group(1) > newest[key][0]:
                newest[key] = (m.group(1), f)
        out: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for (domain, pid), (_stamp, f) in sorted(newest.items(), key=lambda kv: kv[1][0]):
            out[domain].append((pid, f))
        return dict(out)

    def repair(self) -> int:
        """Delete the older file of every part written twice (a rewrite killed before its delete)."""
        files = self.listing()  # one listing for both: what is there, and the newest of each part
        keep = {f for parts in self.part_files(files).values() for _, f in parts}
        stale = [f for f in files if _PART.search(f) and f not in keep]
        for f in stale:
            self.storage.delete(f)
        if stale:
            log.info("removed %d superseded part file(s) under %s", len(stale), self.uri)
        return len(stale)

    def read_part(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(self.storage.read_bytes(uri)), columns=columns)
        return table.cast(pa.schema([self.schema.field(c) for c in table.column_names]))

    def iter_parts(self, columns: list[str] | None = None, domains: set[str] | None = None,
                   files: dict[str, list[tuple[str, str]]] | None = None) -> Iterator[tuple[str, str, str, pa.Table]]:  # fmt: skip
        """(domain, part id, file URI, rows) for every current part, oldest first within a domain; one part
        in memory at a time."""
        for domain, parts in sorted((self.part_files() if files is None else files).items()):
            if domains is not None and domain not in domains:
                continue
            for pid, f in parts:
                yield domain, pid, f, self.read_part(f, columns)

    def read(self, columns: list[str] | None = None) -> pa.Table | None:
        """Every current row (None when the table has no part yet); oldest part first within a domain."""
        tables = [t for _, _, _, t in self.iter_parts(columns)]
        if not tables:
            return None
        return pa.concat_tables([t.select(columns or self.schema.names) for t in tables])


# ------------------------------------------------------------------------------------------ resume rule
@dataclass(frozen=True)
class ResumeRule:
    """Which rows of a table were written by this run's version of the work (``current``), and of those,
    which are final (a re-run never computes them again; the others, such as failed MLLM requests, are)."""

    equal: dict[str, str] = field(default_factory=dict)  # columns every current row matches (label: prompt, model)
    version_column: str | None = None  # a per-domain version (classify: the bundle's model_version)
    versions: dict[str, str] | None = None  # domain -> its current version; the domains the run covers
    final_statuses: tuple[str, ...] | None = None  # None: every current row is final
    sample_column: str | None = None  # rows are per (image, sample) (label); else one per image

    def columns(self) -> list[str]:
        cols = ["uri", "image_id", *self.equal, self.version_column, self.sample_column,
                "status" if self.final_statuses else None]  # fmt: skip
        return list(dict.fromkeys(c for c in cols if c))

    def covers(self, domain: str) -> bool:
        return self.versions is None or domain in self.versions

    def current(self, domain: str, table: pa.Table) -> np.ndarray:
        keep = np.ones(table.num_rows, dtype=bool)
        for column, value in self.equal.items():
            keep &= np.asarray(table[column].to_numpy(zero_copy_only=False) == value, dtype=bool)
        if self.version_column is not None:
            want = (self.versions or {}).get(domain)
            keep &= np.asarray(table[self.version_column].to_numpy(zero_copy_only=False) == want, dtype=bool)
        return keep

    def final(self, domain: str, table: pa.Table) -> np.ndarray:
        keep = self.current(domain, table)
        if self.final_statuses is not None:
            keep &= np.isin(table["status"].to_numpy(zero_copy_only=False), list(self.final_statuses))
        return keep

    def samples(self, table: pa.Table) -> np.ndarray:
        if self.sample_column is None:
            return np.zeros(table.num_rows, dtype=np.int64)
        return table[self.sample_column].to_numpy(zero_copy_only=False).astype(np.int64)


def best_rows(table: PartTable, rule: ResumeRule, wanted: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict]:
    """For the (domain, image_id, sample) of each ``wanted`` row: the best current row the table holds for
    those bytes (a final row beats a failed one, a newer beats an older). One part in memory at a time."""
    import pyarrow.compute as pc

    ids: dict[str, set[str]] = defaultdict(set)
    for w in wanted:
        ids[w["domain"]].add(w["image_id"])
    source: dict[tuple[str, str, int], tuple[dict[str, Any], bool]] = {}
    for domain, _, _, part in table.iter_parts(domains=set(ids)):
        mask = rule.current(domain, part) & np.asarray(
            pc.is_in(part["image_id"], value_set=pa.array(sorted(ids[domain]), pa.string())), dtype=bool)
        if not mask.any():
            continue
        final = rule.final(domain, part)[mask]
        part = part.filter(pa.array(mask))
        for row, is_final, s in zip(part.to_pylist(), final, rule.samples(part), strict=True):
            key = (domain, row["image_id"], int(s))
            if key not in source or is_final or not source[key][1]:
                source[key] = (row, bool(is_final))
    return {k: row for k, (row, _) in source.items()}
