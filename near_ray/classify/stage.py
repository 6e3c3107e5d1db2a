"""Stage 6, classify: every image of every domain -> the bundle's answer -> the predictions table.

Data flow, per chunk of the listing (the label stage's listing: prefixes or manifests, in chunks)::

    driver: listing chunk --> ray.data.from_items
    Ray Data tasks: read bytes, hash (image_id), ask the ledger what is still to do, decode, resize/crop
    ImageTower actor pool: normalize, encode, rank over the domain's vocabulary (Bundle.rank)
    driver: iter_batches -> predictions parts on storage, written as results stream in

then identical images are copied, parts of an older bundle version are dropped, and the cascade
routes the least confident images to the MLLM. The routing confidence is the bundle's top
probability at a temperature fitted on the discovery set (``calibration``), fitted once per bundle
version and kept in ``{workdir}/classify/calibration/<model_version>.json``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa

from near_ray.classify.calibration import calibration_report, fit_temperature
from near_ray.classify.cascade import routing_enabled, run_cascade
from near_ray.classify.table import (
    copy_identical,
    predictions_table,
    predictions_uri,
    read_predictions,
    resume_rule,
)
from near_ray.classify.tower import Target, tower_dataset
from near_ray.config import DomainConfig, RunConfig
from near_ray.console import Progress
from near_ray.data.collections import check_domains, listing_chunks, listing_size
from near_ray.errors import NearRayError
from near_ray.model.bundle import FORMAT_VERSION, BundleError, domain_in_bundle
from near_ray.model.preprocess import bundle_pixel_spec
from near_ray.parts import ResumeLedger, lost_partition
from near_ray.storage import Storage, join, storage_for

log = logging.getLogger(__name__)

__all__ = ["run_classify", "read_predictions", "calibrate_bundles"]


class ClassifyError(NearRayError):
    pass


# ------------------------------------------------------------------------------------------ bundles
def listing_config(cfg: RunConfig) -> RunConfig:
    """The run config the listing reads: ``classify.domains`` (else ``data.domains``) and ``classify.max_images``."""
    lc = cfg.model_copy(deep=True)
    lc.data.domains = [d.model_copy() for d in (cfg.classify.domains or cfg.data.domains)]
    lc.data.max_images = cfg.classify.max_images
    return lc


def bundle_for(cfg: RunConfig, domain: str) -> str:
    cc = cfg.classify
    if cc.bundles:
        if domain not in cc.bundles:
            raise ClassifyError(f"classify.bundles: no bundle for domain '{domain}' (it maps {sorted(cc.bundles)})")
        return cc.bundles[domain]
    from near_ray.chosen import served_method

    return cc.bundle or cfg.paths.bundle(served_method(cfg))


def resolve_targets(
    cfg: RunConfig, domains: list[DomainConfig], st: Storage
) -> tuple[dict[str, Target], dict[str, list[dict[str, Any]]]]:
    """Per domain, the bundle that names it (from the bundle's config.json, without loading weights),
    and each bundle's vocabulary. Errors name the domain and the bundle before anything runs."""
    configs: dict[str, dict[str, Any]] = {}
    vocabularies: dict[str, list[dict[str, Any]]] = {}
    targets = {}
    for d in domains:
        uri = bundle_for(cfg, d.name)
        if uri not in configs:
            try:
                configs[uri] = st.read_json(join(uri, "config.json"))
                vocabularies[uri] = st.read_json(join(uri, "vocabulary.json"))
            except NearRayError as e:
                raise BundleError(f"classify: domain '{d.name}': {uri} is not a model bundle ({e})") from e
            if configs[uri].get("format_version") != FORMAT_VERSION:
                raise BundleError(f"{uri}: bundle format {configs[uri].get('format_version')} is not {FORMAT_VERSION}")
        config = configs[uri]
        try:
            inner = domain_in_bundle(d.name, [v.get("domain") or "" for v in vocabularies[uri]], uri)
        except BundleError as e:
            raise ClassifyError(f"classify: {e}") from None
        try:
            spec = bundle_pixel_spec(config)
        except NearRayError as e:
            raise BundleError(f"{uri}: config.json: {e}") from e
        targets[d.name] = Target(uri, inner, str(config.get("model_version", "unknown")), spec)
    return targets, vocabularies


# ------------------------------------------------------------------------------------------ calibration
def calibration_uri(cfg: RunConfig, model_version: str) -> str:
    return cfg.paths.calibration(model_version)


def calibrate_bundles(cfg: RunConfig, targets: dict[str, Target], vocabularies: dict[str, list[dict[str, Any]]],
                      st: Storage) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per bundle URI: its fitted temperature and calibration errors, read from storage or fitted now on
    the discovery set (one Ray Data pass over its images with the bundle)."""
    out = {}
    for uri, target in {t.bundle: t for t in targets.values()}.items():
        record_uri = calibration_uri(cfg, target.model_version)
        if st.exists(record_uri):
            out[uri] = st.read_json(record_uri)
            continue
        out[uri] = _fit(cfg, uri, target, vocabularies[uri], st)
        if out[uri]["fitted"]:
            st.write_json(record_uri, out[uri])
        else:
            log.warning("classify: %s: confidences are not calibrated (%s)", uri, out[uri]["reason"])
    return out


def _fit(cfg: RunConfig, uri: str, target: Target, vocabulary: list[dict[str, Any]], st: Storage) -> dict[str, Any]:
    import numpy as np
    import pyarrow.compute as pc

    set_uri = cfg.classify.calibration_set or cfg.paths.candidates
    record: dict[str, Any] = {"bundle": uri, "model_version": target.model_version, "set": set_uri,
                              "temperature": 1.0, "fitted": False}  # fmt: skip
    if not st.exists(set_uri):
        return {**record, "reason": f"no discovery set at {set_uri}"}
    table = st.read_parquet(set_uri).select(["uri", "domain", "majority_label"])
    table = table.filter(pc.is_valid(table["majority_label"]))
    inner_domains = sorted({v.get("domain") or "" for v in vocabulary})
    names = {d: [v["name"] for v in vocabulary if (v.get("domain") or "") == d] for d in inner_domains}
    items, targets, cal = [], [], {}
    for r in table.to_pylist():
        inner = r["domain"] if r["domain"] in names else (inner_domains[0] if len(inner_domains) == 1 else None)
        if inner is None or r["majority_label"] not in names[inner]:
            continue  # a domain this bundle does not name, or a name its vocabulary pruned
        cal.setdefault(r["domain"], Target(uri, inner or None, target.model_version, target.spec))
        items.append({"uri": r["uri"], "domain": r["domain"]})
        targets.append(names[inner].index(r["majority_label"]))
    if not items:
        return {**record, "reason": f"{set_uri}: no image whose majority label is in the bundle's vocabulary"}
    index = {(it["domain"], it["uri"]): t for it, t in zip(items, targets, strict=True)}
    probs, ys = [], []
    for batch in tower_dataset(items, cfg, cal, st, with_probs=True).iter_batches(batch_format="pyarrow",
                                                                                   batch_size=None):  # fmt: skip
        for r in batch.select(["uri", "domain", "status", "probs"]).to_pylist():
            if r["status"] != "bad_image":
                probs.append(r["probs"])
                ys.append(index[(r["domain"], r["uri"])])
    if not ys:
        return {**record, "reason": f"{set_uri}: none of its images could be read"}
    # domains of one bundle have vocabularies of different sizes: zero probabilities pad them exactly
    width = max(len(q) for q in probs)
    p = np.zeros((len(probs), width), dtype=np.float64)
    for i, q in enumerate(probs):
        p[i, : len(q)] = q
    y = np.asarray(ys, dtype=np.int64)
    temperature = fit_temperature(p, y)
    return {**record, "temperature": round(temperature, 6), "fitted": True, "images": int(len(y)),
            **calibration_report(p, y, temperature)}  # fmt: skip


# ------------------------------------------------------------------------------------------ the stage
def run_classify(cfg: RunConfig) -> dict[str, Any]:
    """Name every image of every classify domain; resumable (see the module docstring). Returns the summary."""
    from near_ray.ray_session import ensure_ray

    t0 = time.monotonic()
    st = storage_for(cfg)
    cc = cfg.classify
    lcfg = listing_config(cfg)
    check_domains(lcfg, st)  # before starting anything
    targets, vocabularies = resolve_targets(cfg, lcfg.data.domains, st)
    ensure_ray()
    out = predictions_uri(cfg)
    writer = predictions_table(out, st, cc.part_rows, cc.flush_interval_s)
    repaired = writer.repair()
    timings: dict[str, float] = {}

    t = time.monotonic()
    calibration = calibrate_bundles(cfg, targets, vocabularies, st) if cc.calibrate else {}
    temperatures = {uri: float(c["temperature"]) for uri, c in calibration.items()}
    timings["calibration_s"] = round(time.monotonic() - t, 3)

    t = time.monotonic()
    versions = {d: tg.model_version for d, tg in targets.items()}
    ledger = ResumeLedger.open(writer, resume_rule(versions), cc.ledger_partitions, listing_size(lcfg, st))
    first_row: float | None = None  # start-up (workers, actors, the model) ends here
    try:
        for chunk in listing_chunks(lcfg, st):
            bar = Progress("classify", len(chunk), "images")
            for batch in tower_dataset(chunk, cfg, targets, st, temperatures=temperatures, ledger=ledger).iter_batches(
                batch_format="pyarrow", batch_size=None
            ):
                first_row = first_row or time.monotonic()
                writer.add(batch)
                bar.update(batch.num_rows, f"{writer.rows_written} rows written")
            bar.update(done=len(chunk))  # images already in the table were skipped without a row
            bar.close()
        writer.flush()
        uncopied = 0
        for aliases in ledger.aliases():
            copies, missing = copy_identical(aliases, writer, versions)
            writer.add(copies)
            uncopied += len(missing)
        writer.flush()
        c = ledger.counts()
        counts = {"images_seen": c["images_seen"], "images_skipped": c["images_skipped"],
                  "images_copied": c["samples_copied"], "images_computed": c["samples_asked"]}  # fmt: skip
        stale_parts = ledger.stale_parts
    except Exception as e:  # a node lost with a ledger partition: say so, not Ray Data's trace
        if (lost := lost_partition(e)) is None:
            raise
        raise lost from None
    finally:
        writer.flush()  # on any failure too: answers already computed are kept
        ledger.close()
    timings["classify_s"] = round(time.monotonic() - t, 3)
    timings["first_row_s"] = round(first_row - t, 3) if first_row else None
    if cc.max_images is None:  # every listed image has a row of the current version: older parts go
        for f in stale_parts:
            st.delete(f)
    stale = len(stale_parts) if cc.max_images is None else 0

    written = {"rows_written": writer.rows_written, "parts_written": writer.parts_written}
    t = time.monotonic()
    domains = {d.name: d for d in lcfg.data.domains}
    cascade = run_cascade(cfg, targets, vocabularies, domains, out, writer, st) if routing_enabled(cfg) else None
    if cascade is not None:
        cascade["parts_rewritten"] = writer.parts_written - written["parts_written"]
    timings["cascade_s"] = round(time.monotonic() - t, 3)
    timings["total_s"] = round(time.monotonic() - t0, 3)

    summary = _summary(out, st, targets, {**counts, **written}, calibration, cascade, timings)
    summary.update(repaired_parts=repaired, stale_parts_removed=stale, uncopied_aliases=uncopied)
    st.write_json(join(out, "_summary.json"), summary)
    for d, s in summary["domains"].items():
        log.info("classify %s: %d images, by status %s, by source %s", d, s["images"], s["by_status"], s["by_source"])
    return summary


def _summary(out: str, st: Storage, targets: dict[str, Target], counts: dict[str, int],
             calibration: dict[str, dict[str, Any]], cascade: dict[str, Any] | None,
             timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    # Counted part by part, one part in memory at a time whatever the collection's size: a part holds one
    # bundle version, and the ledger writes one row per image and version. Parts of other versions are
    # deleted after a full run; where some remain (classify.max_images), an image counts once, with
    # its newest row, as before.
    status: dict[str, Counter[str]] = defaultdict(Counter)
    source: dict[str, Counter[str]] = defaultdict(Counter)
    other: Counter[str] = Counter()
    older: dict[str, list[str]] = defaultdict(list)  # part files of other versions, oldest first

    def count(d: str, part: Any) -> None:
        for column, into in (("status", status[d]), ("source", source[d])):
            into.update({str(v["values"]): int(v["counts"]) for v in part[column].value_counts().to_pylist()
                         if v["values"] is not None})

    table = predictions_table(out, st)
    listed = table.part_files()  # listed once
    for d, _, f, part in table.iter_parts(["status", "source", "model_version"], set(targets), listed):
        if part.num_rows and part["model_version"][0].as_py() != targets[d].model_version:
            older[d].append(f)
        else:
            count(d, part)
    for d, files in older.items():  # rare: the URIs of this domain's current rows, to count each image once
        seen = {u for _, _, _, t in table.iter_parts(["uri", "model_version"], {d}, listed)
                if t.num_rows and t["model_version"][0].as_py() == targets[d].model_version
                for u in t["uri"].to_pylist()}  # fmt: skip
        for f in reversed(files):
            part = table.read_part(f, ["uri", "status", "source"])
            keep = [u not in seen for u in part["uri"].to_pylist()]
            seen.update(part["uri"].to_pylist())
            part = part.filter(pa.array(keep, pa.bool_()))
            count(d, part)
            other[d] += part.num_rows
    domains = {}
    for d, tg in sorted(targets.items()):
        domains[d] = {
            "bundle": tg.bundle,
            "model_version": tg.model_version,
            "images": sum(status[d].values()),
            "by_status": dict(sorted(status[d].items())),
            "by_source": dict(sorted(source[d].items())),
            "other_versions": other[d],
        }
    computed = counts.get("images_computed", 0)
    return {
        "predictions": table.uri,
        "domains": domains,
        **counts,
        "images_per_s": round(computed / timings["classify_s"], 3) if timings["classify_s"] > 0 else 0.0,
        "calibration": calibration,
        "cascade": cascade,
        "mllm_calls": (cascade or {}).get("mllm_calls", 0),
        "mllm_spend_usd": (cascade or {}).get("mllm_spend_usd", 0.0),
        "timings_s": timings,
    }
