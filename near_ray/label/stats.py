"""What a label run did: counts, tokens, spend and pace, written as ``labels/_summary.json``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from near_ray.label.backends import model_name

if TYPE_CHECKING:
    import pyarrow as pa

    from near_ray.config import RunConfig
    from near_ray.parts import PartTable


class LabelStats:
    """Counts what this run did (calls, tokens, pace) for the run summary."""

    def __init__(self, drain_every: int) -> None:
        self.start = time.monotonic()
        self.drain_every = drain_every
        self.batches = 0
        self.calls = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.first_answer: float | None = None  # start-up (workers, actors) ends here
        self.fingerprints: set[str] = set()  # system_fingerprint values the endpoint answered with

    def add_calls(self, rows: list[dict[str, Any]], batch: pa.Table | None = None) -> None:
        if self.first_answer is None and rows:
            self.first_answer = time.monotonic()
        if batch is not None and "system_fingerprint" in batch.column_names:
            self.fingerprints.update(f for f in batch.column("system_fingerprint").to_pylist() if f)
        self.batches += 1
        self.calls += len(rows)
        self.tokens_in += sum(int(r["input_tokens"]) for r in rows)
        self.tokens_out += sum(int(r["output_tokens"]) for r in rows)

    def due(self) -> bool:
        """Time to write the bad-image rows the ledger collected (every ``label.bad_rows_every_batches``)."""
        return self.batches % self.drain_every == 0

    def summary(self, cfg: RunConfig, counts: dict[str, int], writer: PartTable) -> dict[str, Any]:
        wall = time.monotonic() - self.start
        cost = cfg.label.prices.mllm_usd(self.tokens_in, self.tokens_out, self.calls)
        by_status, by_domain = writer.status_counts()
        labeled = counts["images_seen"] - counts["images_skipped"]
        return {
            "labels": writer.uri,
            "backend": cfg.label.backend.type,
            "model": model_name(cfg.label),
            "prompt_version": cfg.label.prompt_version,
            "samples": cfg.label.samples,
            "system_fingerprints": sorted(self.fingerprints),
            # the simulated annotator says so in every answer: reports over its labels are marked
            "simulated": "simulated" in self.fingerprints,
            "rows_written": writer.rows_written,
            "parts_written": writer.parts_written,
            "by_status": by_status,
            "by_domain": by_domain,
            "mllm_calls": self.calls,
            "input_tokens": self.tokens_in,
            "output_tokens": self.tokens_out,
            "estimated_cost_usd": round(cost, 6),
            **counts,
            "images_labeled": labeled,
            "wall_s": round(wall, 3),
            "first_answer_s": round(self.first_answer - self.start, 3) if self.first_answer else None,
            "images_per_s": round(labeled / wall, 3) if wall > 0 else 0.0,
        }
