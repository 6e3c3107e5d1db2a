"""Which images still need the image tower (the classify stage's resume and dedup memory), and the
rows of identical images, copied from the predictions already written.

One small Ray actor per run, consulted by the read tasks once per batch. It knows the rows of the
predictions table written with each domain's current bundle version: such a (uri, image_id) is
skipped, so a re-run over the same bundle computes nothing; a new bundle version has no rows yet, so
everything is computed again. An image whose bytes (image_id) another URI of the domain already has,
or claimed in this run, is copied at the end of the run instead of computed. The state is rebuilt
from the table on every run, so a killed run loses only its unwritten rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from near_ray.classify.table import as_table, iter_parts
from near_ray.storage import Storage

SKIP, COPY, COMPUTE = "skip", "copy", "compute"


@dataclass
class LedgerCounts:
    images_seen: int = 0
    images_skipped: int = 0  # a row for this bundle version is already in the table
    images_copied: int = 0  # identical bytes to another URI of the domain
    images_computed: int = 0


class ClassifyLedger:
    """Plain class (wrapped by ``ray.remote`` in the stage) so it can also be used and tested in-process."""

    def __init__(self, predictions_uri: str, storage: Storage, versions: dict[str, str]) -> None:
        self._done: set[tuple[str, str, str]] = set()  # (domain, uri, image_id) with a current row
        self._answered: set[tuple[str, str]] = set()  # (domain, image_id) with a current row somewhere
        self._claimed: dict[tuple[str, str], str] = {}  # (domain, image_id) -> the URI computing it in this run
        self._aliases: list[dict[str, str]] = []
        self.counts = LedgerCounts()
        self._stale: list[str] = []  # part files of older bundle versions (every part holds one version)
        columns = ["uri", "domain", "image_id", "model_version"]
        for domain, _, f, table in iter_parts(predictions_uri, storage, columns, domains=set(versions)):
            current = versions[domain]
            for uri, iid, version in zip(*table.select(["uri", "image_id", "model_version"]).to_pydict().values(),
                                         strict=True):
                if version == current:
                    self._done.add((domain, uri, iid))
                    self._answered.add((domain, iid))
            if table.num_rows and table["model_version"][0].as_py() != current:
                self._stale.append(f)

    def plan(self, items: list[tuple[str, str, str]]) -> list[str]:
        """For each (uri, domain, image_id): skip, copy or compute; records the copies."""
        out = []
        for uri, domain, iid in items:
            self.counts.images_seen += 1
            if (domain, uri, iid) in self._done:
                self.counts.images_skipped += 1
                out.append(SKIP)
                continue
            owner = self._claimed.setdefault((domain, iid), uri)
            if owner != uri or (domain, iid) in self._answered:
                self._aliases.append({"uri": uri, "domain": domain, "image_id": iid})
                self.counts.images_copied += 1
                out.append(COPY)
            else:
                self.counts.images_computed += 1
                out.append(COMPUTE)
        return out

    def aliases(self) -> list[dict[str, str]]:
        return list(self._aliases)

    def stale_parts(self) -> list[str]:
        return list(self._stale)

    def get_counts(self) -> dict[str, int]:
        return asdict(self.counts)


def copy_identical(
    aliases: list[dict[str, str]], predictions_uri: str, storage: Storage, versions: dict[str, str]
) -> tuple[pa.Table, list[dict[str, str]]]:
    """Rows for URIs whose bytes equal an image already classified (its row, with this URI), and the
    aliases whose original has no row yet (a failed run: the next run computes them)."""
    import pyarrow.compute as pc

    if not aliases:
        return as_table([]), []
    wanted = {(a["domain"], a["image_id"]) for a in aliases}
    source: dict[tuple[str, str], dict[str, Any]] = {}
    ids = pa.array(sorted({i for _, i in wanted}), pa.string())
    for domain, _, _, table in iter_parts(predictions_uri, storage, domains={d for d, _ in wanted}):
        mask = pc.and_(pc.is_in(table["image_id"], value_set=ids), pc.equal(table["model_version"], versions[domain]))
        for row in table.filter(mask).to_pylist():
            source.setdefault((domain, row["image_id"]), row)
    rows, missing = [], []
    for a in aliases:
        src = source.get((a["domain"], a["image_id"]))
        if src is None:
            missing.append(a)
            continue
        error = src.get("error")
        rows.append({**src, "uri": a["uri"], "error": error.replace(src["uri"], a["uri"]) if error else error,
                     "mllm_cost_usd": 0.0})  # fmt: skip
    return as_table(rows), missing
