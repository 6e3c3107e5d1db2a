"""Stage 1, label: images on storage -> MLLM answers -> the labels table.

Data flow, per chunk of the listing::

    driver: Storage.list (streamed)  --chunks of label.listing_chunk URIs-->  ray.data.from_items
    Ray Data tasks: read bytes, hash (image_id), ask the ledger what is still to do,
                    decode/validate/resize, build one request row per (image, sample)
    backend actor pool (label_dataset seam): one MLLM request per row
    driver: iter_batches -> parse -> labels parts on storage, written as results stream in

Why listing chunks through ``from_items`` rather than ``read_binary_files``: the driver never holds
more than one chunk of URIs, our listing rules (extensions, hidden names) stay in one place
(Storage.list), and bytes are fetched by the task that decodes them, so they cross the network once
and compressed. Which images a capped run (``data.max_images``) asks about is
near_ray.label.select's: ``label.select``. Failures never stop the run: unreadable or invalid images become
``bad_image`` rows, failed requests ``mllm_error`` rows, answers without a name ``unparsable``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from near_ray.config import LabelConfig, RunConfig
from near_ray.console import Progress
from near_ray.data.collections import check_domains, listing_size
from near_ray.images import ImageError, fetch
from near_ray.label.backends import REQUEST_SCHEMA, get_backend, model_name
from near_ray.label.images import prepare_image
from near_ray.label.parse import parse_answer
from near_ray.label.prompts import prompt_for, sample_seed, schema_text
from near_ray.label.select import check_select, selected_chunks
from near_ray.label.stats import LabelStats
from near_ray.label.table import copy_identical, labels_table, labels_uri, read_labels, resume_rule
from near_ray.parts import ResumeLedger, lost_partition
from near_ray.storage import Storage, storage_for

if TYPE_CHECKING:
    import ray.data

__all__ = ["run_label", "read_labels"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RequestSpec:
    """How the request-building tasks ask: the label section, each domain's prompts, the answer schema."""

    label: LabelConfig
    prompts: dict[str, tuple[str, str]]  # domain -> (system prompt, user prompt)
    json_schema: str  # "" = free-text answers
    model: str  # as recorded in the labels table


# ------------------------------------------------------------------------------------------ the stage
def run_label(cfg: RunConfig) -> dict[str, Any]:
    """Label every image of every domain; resumable, see the module docstring. Returns the run summary."""
    from near_ray.ray_session import ensure_ray
    from near_ray.stopping import StopSignal, stoppable

    storage = storage_for(cfg)
    check_domains(cfg, storage)  # before starting anything
    check_select(cfg)
    ensure_ray()
    label_dataset = get_backend(cfg.label.backend)
    out_uri = labels_uri(cfg)
    model = model_name(cfg.label)
    writer = labels_table(out_uri, storage, cfg.label.part_rows, cfg.label.flush_interval_s)
    ledger = ResumeLedger.open(writer, resume_rule(cfg.label.prompt_version, model), cfg.label.ledger_partitions,
                               expected_rows=listing_size(cfg, storage) * cfg.label.samples)  # fmt: skip
    stats = LabelStats(cfg.label.bad_rows_every_batches)
    stopping = False  # a stop was requested (`ray job stop`): the answers in flight land, nothing new is asked
    try:
        with stoppable() as stop:
            # One dataset over the whole listing, so one labeler pipeline: its engines (vLLM) or clients
            # start once, not once per listing chunk (ten cold starts and pool drains at 1 M images).
            items, listed = listing_dataset(cfg, storage)
            if items is not None:
                # Ray Data builds requests ahead of the labelers; on a stop the labelers drop what
                # they have not sent, so the stop pays for the requests in flight only.
                with StopSignal().following(stop) as signal:
                    answers = label_dataset(request_dataset(items, cfg, ledger, storage), cfg.label, signal)
                    bar = Progress("label", listed * cfg.label.samples, "answers")
                    for batch in answers.iter_batches(batch_format="pyarrow", batch_size=None):
                        if stop.requested and not stopping:
                            ledger.stop_asking()
                            stopping = True
                            log.info("label: stopping: no new requests; writing the answers to those in flight")
                        rows = label_rows(batch, cfg.label.prompt_version, model)
                        stats.add_calls(rows, batch)
                        writer.add(rows)
                        bar.update(len(rows), f"{stats.calls} MLLM calls, {writer.rows_written} rows written")
                        if stats.due():
                            writer.add(ledger.drain_bad())
                    bar.close()
                if stop.requested:
                    writer.add(ledger.drain_bad())
                    raise KeyboardInterrupt("label: stopped; every answer received is on storage")
        writer.add(ledger.drain_bad())
        writer.flush()
        for aliases in ledger.aliases():
            writer.add(copy_identical(aliases, writer, cfg.label.prompt_version, model))
        counts = ledger.counts()
    except Exception as e:  # a node lost with a ledger partition: say so, not Ray Data's trace
        if (lost := lost_partition(e)) is None:
            raise
        raise lost from None
    finally:
        writer.flush()  # on any failure too: answers already paid for are kept
        ledger.close()
    summary_uri = cfg.paths.label_summary
    if storage.exists(summary_uri):  # a resumed run that asked nothing still knows who answered before
        stats.fingerprints.update(storage.read_json(summary_uri).get("system_fingerprints") or [])
    summary = stats.summary(cfg, counts, writer)
    storage.write_json(summary_uri, summary)
    log.info("label: %s", {k: summary[k] for k in ("rows_written", "by_status", "mllm_calls", "images_per_s")})
    return summary


# ------------------------------------------------------------------------------------------ requests
def listing_dataset(cfg: RunConfig, storage: Storage) -> tuple[ray.data.Dataset | None, int]:
    """The whole listing (under ``data.max_images``: the images ``label.select`` chose) as one dataset of
    {uri, domain} rows, and its size (None, 0 when empty). The driver holds one listing chunk
    (``label.listing_chunk``) at a time: each goes to the object store as its own blocks, and the chunks
    are joined. One block = the images of about one labeler batch:
    blocks flow to the actors (and answers back to the driver, which writes them) a batch at a time."""
    import ray.data

    per_block = max(1, cfg.label.batch_size // cfg.label.samples)
    parts, listed = [], 0
    for chunk in selected_chunks(cfg, storage):
        parts.append(ray.data.from_items(chunk, override_num_blocks=math.ceil(len(chunk) / per_block)))
        listed += len(chunk)
    if not parts:
        return None, 0
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), listed


def request_dataset(
    items: list[dict[str, str]] | ray.data.Dataset, cfg: RunConfig, ledger: ResumeLedger, storage: Storage
) -> ray.data.Dataset:
    """URIs ({uri, domain} rows, or a list of them) -> request rows (the backend seam's input), built in
    Ray Data tasks."""
    import ray.data

    lc = cfg.label
    spec = RequestSpec(
        label=lc,
        prompts={d.name: prompt_for(d.meta_class, lc.prompt_version) for d in cfg.data.domains},
        json_schema=schema_text(lc.backend.structured),
        model=model_name(lc),
    )
    if isinstance(items, list):
        per_block = max(1, lc.batch_size // lc.samples)
        items = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_block))
    return items.map_batches(
        build_requests,
        fn_kwargs={"ledger": ledger, "storage": storage, "spec": spec},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=lc.prepare_cpus,
        # Decoding may hold a max_pixels RGBA canvas. Requesting that memory also keeps this a task
        # operator of its own (not fused into the labeler actors), so decoding scales with the cluster.
        memory=min(4 * lc.image.max_pixels, 2**30),
    )


def build_requests(
    batch: pa.Table,
    *,
    ledger: ResumeLedger,
    storage: Storage,
    spec: RequestSpec,
) -> pa.Table:
    """Read, hash, plan, decode: request rows for what is still to do; bad images go to the ledger."""
    items = batch.select(["uri", "domain"]).to_pylist()
    fetched = fetch(storage, [it["uri"] for it in items])
    plans = ledger.plan([(it["uri"], it["domain"], i) for it, (_, i) in zip(items, fetched, strict=True)],
                        spec.label.samples)  # fmt: skip
    requests: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    for it, (blob, iid), ask in zip(items, fetched, plans, strict=True):
        if not ask:
            continue
        if not isinstance(blob, bytes):
            bad.extend(_bad_rows(it, iid, ask, f"{it['uri']}: {blob}", spec))
            continue
        try:
            prepared = prepare_image(blob, spec.label.image, what=it["uri"])
        except ImageError as e:  # recorded as a bad_image row
            bad.extend(_bad_rows(it, iid, ask, str(e), spec))
            continue
        system, user = spec.prompts[it["domain"]]
        for s in ask:
            requests.append(
                {
                    "image_id": iid,
                    "uri": it["uri"],
                    "domain": it["domain"],
                    "sample": s,
                    "seed": sample_seed(spec.label.seed, iid, s),
                    "temperature": spec.label.temperature,
                    "system_prompt": system,
                    "user_prompt": user,
                    "json_schema": spec.json_schema,
                    "image": prepared.data,
                    "mime": prepared.mime,
                }
            )
    if bad:
        ledger.add_bad(bad)  # recorded before this task's output counts as done
    return pa.Table.from_pylist(requests, schema=REQUEST_SCHEMA)


def _bad_rows(item: dict[str, str], iid: str, samples: list[int], error: str, spec: RequestSpec) -> list[dict]:
    return [
        {
            "image_id": iid,
            "uri": item["uri"],
            "domain": item["domain"],
            "sample": s,
            "seed": sample_seed(spec.label.seed, iid, s),
            "raw_answer": None,
            "label": None,
            "status": "bad_image",
            "error": error,
            "model": spec.model,
            "prompt_version": spec.label.prompt_version,
            "input_tokens": 0,
            "output_tokens": 0,
            "latency_s": 0.0,
        }
        for s in samples
    ]


# ------------------------------------------------------------------------------------------ answers
def label_rows(batch: pa.Table, prompt_version: str, model: str) -> list[dict[str, Any]]:
    """Backend output rows -> labels-table rows: parse each answer, mark answers without a name."""
    rows = []
    for r in batch.to_pylist():
        label = parse_answer(r["raw_answer"]) if r["status"] == "ok" else None
        status, error = r["status"], r.get("error")
        if status == "ok" and label is None:
            status, error = "unparsable", f"{r['uri']}: sample {r['sample']}: the answer names nothing"
        rows.append(
            {
                **{k: r.get(k) for k in ("image_id", "uri", "domain", "sample", "seed", "raw_answer")},
                "label": label,
                "status": status,
                "error": error,
                # The configured model, not the endpoint's alias for it: it is part of the resume key.
                "model": model,
                "prompt_version": prompt_version,
                "input_tokens": r.get("input_tokens") or 0,
                "output_tokens": r.get("output_tokens") or 0,
                "latency_s": r.get("latency_s") or 0.0,
            }
        )
    return rows
