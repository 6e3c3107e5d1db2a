"""The resume ledger: which (image, sample) pairs of a listing still need computing (an MLLM request, a
forward pass), and which are identical bytes to copy instead. Used by the label and classify stages.

It knows, per domain,

- the final rows the table already holds (``ResumeRule``): such a (domain, uri, image_id, sample) is
  skipped, so a re-run computes nothing twice;
- which image_ids already have a final row (from the table, or claimed by another URI in this run): a
  URI whose bytes are identical gets that row copied at the end of the run, without computing it.

Everything is per domain: a prompt names the domain's meta-class, so an image that two domains list is
computed once under each, and copied only within its domain. The state is rebuilt from the table on
every run, so a killed run loses nothing but its unwritten rows.

Scale: the state is split over ``partitions`` Ray actors by the hash of (domain, image_id), so that
everything about one image lives in one partition and no process holds more than its share; keys are
128-bit hashes in sorted numpy runs (``keys.py``, 16-24 bytes an entry). Loading reads each part once,
in parallel Ray tasks that send every partition its keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

import near_ray.parts.keys as K
from near_ray.errors import NearRayError
from near_ray.parts.table import PartTable, ResumeRule

ROWS_PER_PARTITION = 10_000_000  # ~0.5 GB of keys (done, answered, claims) per partition actor
FILES_PER_LOAD_TASK = 64


LOST = ("the resume ledger lost a partition (its node left the cluster): run the stage again; what it wrote is "
        "kept and not asked or computed again")


class LedgerLostError(NearRayError):
    """A partition of the ledger is gone with its node: the stage stops; a rerun resumes from the table."""


def lost_partition(error: BaseException) -> LedgerLostError | None:
    """The ``LedgerLostError`` behind ``error``: a read task raised it, and Ray Data wraps what a task raises (across
    processes the chain of causes does not travel, only the remote traceback's text does)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, LedgerLostError) or f"{LedgerLostError.__name__}: " in str(error):
            return LedgerLostError(LOST)
        error = getattr(error, "cause", None) or error.__cause__
    return None


@dataclass
class LedgerCounts:
    images_seen: int = 0
    images_skipped: int = 0  # every sample already final
    samples_skipped: int = 0
    samples_asked: int = 0  # to compute in this run
    samples_copied: int = 0  # identical bytes to another URI of the domain
    bad_images: int = 0


class LedgerPartition:
    """One partition's state. Plain class (wrapped by ``ray.remote``) so it can be used and tested in-process."""

    def __init__(self) -> None:
        self._done = K.KeySet()  # (domain, uri, image_id, sample) with a final row
        self._answered = K.KeySet()  # (domain, image_id, sample) with a final row somewhere
        self._claimed = K.KeySet(with_values=True)  # (domain, image_id) -> the URI computing it in this run
        self._aliases: list[dict[str, Any]] = []
        self._bad_rows: list[dict[str, Any]] = []
        self.counts = LedgerCounts()
        self._stopped = False

    def load(self, keys: tuple[np.ndarray, np.ndarray]) -> int:
        """Keys of final rows: (done, answered), from ``load_keys``."""
        done, answered = keys
        self._done.add(done)
        self._answered.add(answered)
        return len(done)

    def ready(self) -> dict[str, int]:
        self._done.compact()
        self._answered.compact()
        return {"done": len(self._done), "answered": len(self._answered), "bytes": self.nbytes()}

    def nbytes(self) -> int:
        return self._done.nbytes() + self._answered.nbytes() + self._claimed.nbytes()

    def plan(self, items: list[tuple[str, str, str]], samples: int, image_keys: np.ndarray,
             row_keys: np.ndarray) -> list[list[int]]:  # fmt: skip
        """For each (uri, domain, image_id): the samples to compute; records skips and copies."""
        if self._stopped:  # the job is stopping: nothing new, what is in flight still lands
            return [[] for _ in items]
        n = len(items)
        s = np.tile(np.arange(samples), n)
        done = self._done.get(K.with_sample(np.repeat(row_keys, samples, axis=0), s))[0].reshape(n, samples)
        answered = self._answered.get(K.with_sample(np.repeat(image_keys, samples, axis=0), s))[0].reshape(n, samples)
        open_ = np.flatnonzero(~done.all(axis=1))
        keys, me = image_keys[open_], row_keys[open_, 1]  # a URI is its (domain, uri, image_id) key
        known, owner = self._claimed.get(keys)
        # claimed by this batch: the first URI of the batch with those bytes (in the batch's order)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        owner = np.where(known, owner, me[first][inverse.reshape(-1)])
        new = first[~known[first]]
        self._claimed.add(keys[new], me[new])
        mine = (owner == me)[:, None] & ~answered[open_] & ~done[open_]
        out: list[list[int]] = [[] for _ in items]
        for j, k in zip(*np.nonzero(mine), strict=True):  # row-major: each image's samples in order
            out[open_[j]].append(int(k))
        for j, k in zip(*np.nonzero(~done[open_] & ~mine), strict=True):  # identical bytes: copied at the end
            uri, domain, iid = items[open_[j]]
            self._aliases.append({"uri": uri, "domain": domain, "image_id": iid, "sample": int(k)})
            self.counts.samples_copied += 1
        skipped = done.sum(axis=1)
        self.counts.images_seen += n
        self.counts.images_skipped += int((skipped == samples).sum())
        self.counts.samples_skipped += int(skipped.sum())
        self.counts.samples_asked += sum(len(a) for a in out)
        return out

    def stop_asking(self) -> None:
        self._stopped = True

    def add_bad(self, rows: list[dict[str, Any]]) -> None:
        self._bad_rows.extend(rows)
        self.counts.bad_images += len({(r["domain"], r["uri"]) for r in rows})

    def drain_bad(self) -> list[dict[str, Any]]:
        rows, self._bad_rows = self._bad_rows, []
        return rows

    def take_aliases(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` of the copies recorded (and forgets them): the driver writes them in batches."""
        out, self._aliases = self._aliases[:limit], self._aliases[limit:]
        return out

    def get_counts(self) -> dict[str, int]:
        return asdict(self.counts)


def load_keys(files: list[tuple[str, str]], table: PartTable, rule: ResumeRule, partitions: int) -> list[Any]:
    """Keys of the final rows of some parts, split by partition: [(done, answered)] * partitions + [stale
    part files] (parts of another version: every part holds one)."""
    done: list[list[np.ndarray]] = [[] for _ in range(partitions)]
    answered: list[list[np.ndarray]] = [[] for _ in range(partitions)]
    stale = []
    for domain, f in files:
        part = table.read_part(f, rule.columns())
        if not part.num_rows:
            continue
        current = rule.current(domain, part)
        if rule.version_column is not None and not current[0]:
            stale.append(f)
        final = rule.final(domain, part)
        if not final.any():
            continue
        import pyarrow as pa

        part = part.filter(pa.array(final))
        ids, samples = part["image_id"].to_pylist(), rule.samples(part)
        images = K.image_keys([domain] * len(ids), ids)
        rows = K.row_keys([domain] * len(ids), part["uri"].to_pylist(), ids)
        where = K.partition_of(images, partitions)
        images, rows = K.with_sample(images, samples), K.with_sample(rows, samples)
        for p in range(partitions):
            m = where == p
            done[p].append(rows[m])
            answered[p].append(images[m])
    empty = np.empty((0, 2), dtype=np.uint64)
    return [(np.concatenate(d or [empty]), np.concatenate(a or [empty])) for d, a in zip(done, answered, strict=True)
            ] + [stale]  # fmt: skip


class ResumeLedger:
    """The ledger's partitions (Ray actors, or plain objects in-process) and the routing to them.
    Picklable: the read tasks hold one."""

    def __init__(self, actors: list[Any], remote: bool = True) -> None:
        self.actors, self.remote = actors, remote
        self.stale_parts: list[str] = []  # driver side: part files of an older version (classify)
        self.loaded: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"actors": self.actors, "remote": self.remote, "stale_parts": [], "loaded": {}}

    @classmethod
    def open(cls, table: PartTable, rule: ResumeRule, partitions: int | None = None, expected_rows: int = 0,
             local: bool = False) -> ResumeLedger:  # fmt: skip
        """Start the partitions and load them from ``table`` (listed once). ``partitions`` None: one per
        ``ROWS_PER_PARTITION`` rows the table may hold (its parts x ``part_rows``) or the run may compute
        (``expected_rows``, when the listing's size is known). ``local``: no Ray, one process (tests, tools)."""
        files = [(d, f) for d, parts in sorted(table.part_files().items()) if rule.covers(d) for _, f in parts]
        reader = PartTable(table.uri, table.storage, table.schema)  # what the load tasks get: no buffered rows
        n = partitions or max(1, math.ceil(max(len(files) * table.part_rows, expected_rows) / ROWS_PER_PARTITION))
        if local:
            ledger = cls([_InProcess(LedgerPartition()) for _ in range(n)], remote=False)
            keys = load_keys(files, reader, rule, n)
            for a, pair in zip(ledger.actors, keys[:n], strict=True):
                a.load.remote(pair)
            ledger.stale_parts = keys[n]
        else:
            import ray

            ledger = cls([ray.remote(LedgerPartition).options(num_cpus=0).remote() for _ in range(n)])
            task = ray.remote(load_keys).options(num_returns=n + 1)
            pending = [task.remote(files[i : i + FILES_PER_LOAD_TASK], reader, rule, n)
                       for i in range(0, len(files), FILES_PER_LOAD_TASK)]  # fmt: skip
            for i, refs in enumerate(pending):  # parallel tasks; the partitions take one output at a time
                ray.get([a.load.remote(ref) for a, ref in zip(ledger.actors, refs[:n], strict=True)])
                ledger.stale_parts.extend(ray.get(refs[n]))
                pending[i] = refs = []  # the output leaves the object store once the partitions hold it
        states = ledger._get([a.ready.remote() for a in ledger.actors])
        ledger.loaded = {"partitions": n, "parts": len(files), "final_rows": sum(s["done"] for s in states),
                         "state_bytes": sum(s["bytes"] for s in states)}  # fmt: skip
        return ledger

    def _get(self, refs: list[Any]) -> list[Any]:
        if not self.remote:
            return refs
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as e:  # a partition lived on a node that is gone
            raise LedgerLostError(f"{LOST} ({type(e).__name__})") from None

    def plan(self, items: list[tuple[str, str, str]], samples: int = 1) -> list[list[int]]:
        """For each (uri, domain, image_id): the samples still to compute (``[]``: skipped or copied)."""
        if not items:
            return []
        uris, domains, ids = (list(c) for c in zip(*items, strict=True))
        images, rows = K.image_keys(domains, ids), K.row_keys(domains, uris, ids)
        where = K.partition_of(images, len(self.actors))
        asked = {p: (idx, self.actors[p].plan.remote([items[i] for i in idx], samples, images[idx], rows[idx]))
                 for p in range(len(self.actors)) if len(idx := np.flatnonzero(where == p))}  # fmt: skip
        out: list[list[int]] = [[] for _ in items]
        for idx, plans in zip([a[0] for a in asked.values()], self._get([a[1] for a in asked.values()]), strict=True):
            for i, plan in zip(idx, plans, strict=True):
                out[i] = plan
        return out

    def add_bad(self, rows: list[dict[str, Any]]) -> None:
        """Rows for images that cannot be used: kept until the driver drains them (``drain_bad``)."""
        where = K.partition_of(K.image_keys([r["domain"] for r in rows], [r["image_id"] for r in rows]),
                               len(self.actors))  # fmt: skip
        self._get([a.add_bad.remote([r for r, w in zip(rows, where, strict=True) if w == p])
                 for p, a in enumerate(self.actors) if (where == p).any()])  # fmt: skip

    def drain_bad(self) -> list[dict[str, Any]]:
        return [r for rows in self._get([a.drain_bad.remote() for a in self.actors]) for r in rows]

    def stop_asking(self) -> None:
        self._get([a.stop_asking.remote() for a in self.actors])

    def aliases(self, batch: int = 100_000) -> Iterator[list[dict[str, Any]]]:
        """The copies recorded in this run, in batches (the driver never holds them all)."""
        for a in self.actors:
            while rows := self._get([a.take_aliases.remote(batch)])[0]:
                yield rows

    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for c in self._get([a.get_counts.remote() for a in self.actors]):
            for k, v in c.items():
                total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        if not self.remote:
            return
        import ray

        for a in self.actors:
            ray.kill(a)


class _InProcess:
    """An actor handle's shape over a plain object: ``handle.method.remote(...)`` calls it at once."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Call(getattr(self._obj, name))


@dataclass(frozen=True)
class _Call:
    remote: Any
