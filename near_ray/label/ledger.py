"""Which (image, sample) pairs still need an MLLM request (the label stage's resume and dedup memory),
and the rows of identical images, copied from the answers already paid for.

One small Ray actor per run, consulted by the read/decode tasks once per batch. It knows

- the rows already final in the labels table (``ok``, ``unparsable``, ``bad_image``) for this
  prompt version and model: such a (domain, uri, image_id, sample) is skipped, so a re-run asks nothing;
- which image_ids of a domain already have an answer (from the table, or claimed by another URI in
  this run): a URI whose bytes are identical gets the answer copied at the end of the run, without a
  request.

Everything is per domain: the prompt names the domain's meta-class, so an image that two domains'
manifests list is asked once under each, and an answer is copied only within its domain (listed
folders cannot nest: the config refuses it).

``mllm_error`` rows are not final: a re-run asks again. The state is rebuilt from the table on every
run, so a killed run loses nothing but its unwritten rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from near_ray.label.table import FINAL_STATUSES, read_labels_table
from near_ray.storage import Storage

ASK, COPY = "ask", "copy"


@dataclass
class LedgerCounts:
    images_seen: int = 0
    images_skipped: int = 0  # every sample already final
    samples_skipped: int = 0
    samples_asked: int = 0
    samples_copied: int = 0
    bad_images: int = 0


class LabelLedger:
    """Plain class (wrapped by ``ray.remote`` in the stage) so it can also be used and tested in-process."""

    def __init__(self, labels_uri: str, storage: Storage, prompt_version: str, model: str) -> None:
        self._done: set[tuple[str, str, str, int]] = set()  # (domain, uri, image_id, sample) final
        self._answered: set[tuple[str, str, int]] = set()  # (domain, image_id, sample) with a final row somewhere
        self._claimed: dict[tuple[str, str], str] = {}  # (domain, image_id) -> the URI asking for it in this run
        self._aliases: list[dict[str, Any]] = []
        self._bad_rows: list[dict[str, Any]] = []
        self.counts = LedgerCounts()
        self._stopped = False
        table = read_labels_table(labels_uri, storage)
        if table is not None:
            cols = table.select(["domain", "uri", "image_id", "sample", "status", "prompt_version", "model"]).to_pydict()
            for domain, uri, iid, s, status, pv, m in zip(*cols.values(), strict=True):
                if status in FINAL_STATUSES and pv == prompt_version and m == model:
                    self._done.add((domain, uri, iid, s))
                    self._answered.add((domain, iid, s))

    def plan(self, items: list[tuple[str, str, str]], samples: int) -> list[list[int]]:
        """For each (uri, domain, image_id): the samples to ask about; records skips and copies."""
        if self._stopped:  # the job is stopping: ask nothing new, the answers in flight still land
            return [[] for _ in items]
        out = []
        for uri, domain, iid in items:
            self.counts.images_seen += 1
            owner = self._claimed.setdefault((domain, iid), uri)
            ask, skipped = [], 0
            for s in range(samples):
                if (domain, uri, iid, s) in self._done:
                    skipped += 1
                elif owner != uri or (domain, iid, s) in self._answered:
                    self._aliases.append({"uri": uri, "domain": domain, "image_id": iid, "sample": s})
                else:
                    ask.append(s)
            self.counts.samples_skipped += skipped
            self.counts.images_skipped += skipped == samples
            self.counts.samples_asked += len(ask)
            self.counts.samples_copied += samples - skipped - len(ask)
            out.append(ask)
        return out

    def stop_asking(self) -> None:
        self._stopped = True

    def add_bad(self, rows: list[dict[str, Any]]) -> None:
        self._bad_rows.extend(rows)
        self.counts.bad_images += len({r["uri"] for r in rows})

    def drain_bad(self) -> list[dict[str, Any]]:
        """The bad-image rows recorded since the last call (the driver writes them)."""
        rows, self._bad_rows = self._bad_rows, []
        return rows

    def aliases(self) -> list[dict[str, Any]]:
        return list(self._aliases)

    def get_counts(self) -> dict[str, int]:
        return asdict(self.counts)


def copy_identical(
    aliases: list[dict[str, Any]], uri: str, storage: Storage, prompt_version: str, model: str
) -> list[dict[str, Any]]:
    """Rows for URIs whose bytes equal an image already asked about: its answers, copied at no cost."""
    if not aliases:
        return []
    source = _answers_for({a["image_id"] for a in aliases}, uri, storage, prompt_version, model)
    rows = []
    for a in aliases:
        src = source.get((a["domain"], a["image_id"], a["sample"]))
        if src is None:  # the original was never answered: a re-run asks again
            src = {"status": "mllm_error", "error": f"{a['uri']}: no answer for identical image {a['image_id']}"}
            src.update(raw_answer=None, label=None, seed=None, uri=a["uri"])
        error = src.get("error")
        rows.append(
            {
                **src,
                **a,
                "error": error.replace(src["uri"], a["uri"]) if isinstance(error, str) else error,
                "model": model,
                "prompt_version": prompt_version,
                "input_tokens": 0,
                "output_tokens": 0,
                "latency_s": 0.0,
            }
        )
    return rows


def _answers_for(
    ids: set[str], uri: str, storage: Storage, prompt_version: str, model: str
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The best existing row per (domain, image_id, sample) for these images: final answers beat errors."""
    import pyarrow.compute as pc

    table = read_labels_table(uri, storage)
    if table is None:
        return {}
    mask = pc.and_(
        pc.is_in(table["image_id"], value_set=pa.array(sorted(ids), pa.string())),
        pc.and_(pc.equal(table["prompt_version"], prompt_version), pc.equal(table["model"], model)),
    )
    source: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in table.filter(mask).to_pylist():
        key = (r["domain"], r["image_id"], r["sample"])
        if key not in source or source[key]["status"] == "mllm_error":
            source[key] = r
    return source
