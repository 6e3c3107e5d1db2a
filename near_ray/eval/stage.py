"""The evaluation stage: every method on the same test images, the field's metrics, a report.

Methods (``cfg.eval.methods``): the model bundles under ``{workdir}/bundles/<method>`` (near, naive,
near_no_knn, near_no_gmm, zero_shot), each restricted to the domain's vocabulary; and direct_mllm,
the MLLM asked about every test image through the real label stage (its labels live under
``{workdir}/eval/direct_mllm``), whose prediction is the majority name over its samples.

Test images come from each domain's truth table (``data.domains[].truth``: parquet or CSV with
``species`` (or ``class_name``), ``path`` relative to the table's folder or an absolute ``uri``,
optional ``domain`` and ``split``; rows with split == "test" are used).
"""

from __future__ import annotations

import logging
import os
import posixpath
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pandas as pd

from near_ray.chosen import served_method
from near_ray.config import DomainConfig, RunConfig
from near_ray.data.truth import TruthError, truth_table, uri_key
from near_ray.errors import NearRayError
from near_ray.eval.cascade import evaluate_cascade
from near_ray.eval.metrics import SemanticAccuracy, View, by_domain, prediction_spread, registered
from near_ray.eval.plots import write_plots
from near_ray.eval.report import write_report
from near_ray.names import majority_label
from near_ray.storage import Storage, is_s3, join, storage_for
from near_ray.train.methods import DIRECT_MLLM

if TYPE_CHECKING:
    from near_ray.model.bundle import Bundle

log = logging.getLogger(__name__)



class EvaluationError(NearRayError):
    pass


# ------------------------------------------------------------------------------------------ test set
def test_set(domain: DomainConfig, storage: Storage) -> pd.DataFrame:
    """The domain's test images (split == "test"): columns uri, domain, species."""
    try:
        test = truth_table(domain, storage, split="test")
    except TruthError as e:
        raise EvaluationError(str(e)) from e
    if test.empty:
        source = f"truth {domain.truth}" if domain.truth else f"layout {domain.layout} at {domain.uri}"
        raise EvaluationError(f"data.domains[{domain.name}].{source}: no test rows for domain "
                              f"'{domain.name}' (split == 'test')")
    return test


def load_test_sets(cfg: RunConfig, storage: Storage) -> pd.DataFrame:
    frames = [test_set(d, storage) for d in cfg.data.domains if d.has_truth]
    if not frames:
        raise EvaluationError("evaluate: no domain has ground truth (set data.domains[].truth to a truth table)")
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------ images
def image_batches(cfg: RunConfig, uris: list[str], storage: Storage) -> Iterator[tuple[int, list[Any]]]:
    """(offset, [PIL image or NearRayError]) per batch; reads run in threads (object storage is I/O)."""
    from near_ray.images import decode_image

    def load(uri: str) -> Any:
        try:
            return decode_image(storage.read_bytes(uri), uri, cfg.label.image.max_pixels)
        except NearRayError as e:
            return e

    size = cfg.eval.batch_size
    with ThreadPoolExecutor(cfg.eval.read_threads) as pool:
        for start in range(0, len(uris), size):
            yield start, list(pool.map(load, uris[start : start + size]))


# ------------------------------------------------------------------------------------------ CLIP methods
def bundle_predictions(
    cfg: RunConfig, bundles: dict[str, Bundle], test: pd.DataFrame, storage: Storage,
    probs: dict[str, list[Any]] | None = None,
) -> tuple[dict[str, list[str | None]], dict[str, float], list[dict[str, str]]]:
    """Every bundle's predicted name per test image (one pass over the images), seconds spent per
    bundle, and the images that could not be read (predicted as no name by every method). ``probs``:
    for the methods it names, each test image's probability row is kept in it (None: no prediction)."""
    preds: dict[str, list[str | None]] = {m: [None] * len(test) for m in bundles}
    for m in probs or {}:
        probs[m] = [None] * len(test)  # type: ignore[index]
    seconds = dict.fromkeys(bundles, 0.0)
    bad: list[dict[str, str]] = []
    domains = test["domain"].tolist()
    for start, images in image_batches(cfg, test["uri"].tolist(), storage):
        ok = [i for i, im in enumerate(images) if not isinstance(im, Exception)]
        for i, im in enumerate(images):
            if isinstance(im, Exception):
                uri = str(test["uri"].iat[start + i])
                bad.append({"uri": uri, "error": str(im).removeprefix(f"{uri}: ")})
        if not ok:
            continue
        for method, bundle in bundles.items():
            t0 = time.perf_counter()
            emb = bundle.embed([images[i] for i in ok])
            for d in sorted({domains[start + i] for i in ok}):
                rows = [j for j, i in enumerate(ok) if domains[start + i] == d]
                if d not in bundle.domains:
                    continue  # this bundle has no vocabulary for the domain: no name, counted wrong
                p = bundle.probabilities(emb[rows], domain=d)
                for j, k, row in zip(rows, p.argmax(axis=1), p, strict=True):
                    preds[method][start + ok[j]] = bundle.names[k]
                    if probs is not None and method in probs:
                        probs[method][start + ok[j]] = row
            seconds[method] += time.perf_counter() - t0
    return preds, seconds, bad


def batch1_latency_ms(bundle: Bundle, images: list[Any], domain: str) -> float:
    """Median wall time of one image through the classifier (embed + scores), after one warm-up."""
    bundle.probabilities(bundle.embed(images[:1]), domain=domain)
    times = []
    for im in images:
        t0 = time.perf_counter()
        bundle.probabilities(bundle.embed([im]), domain=domain)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _probe_images(cfg: RunConfig, test: pd.DataFrame, storage: Storage) -> tuple[list[Any], str]:
    for _, images in image_batches(cfg, test["uri"].tolist()[: cfg.eval.latency_probes * 2], storage):
        good = [im for im in images if not isinstance(im, Exception)][: cfg.eval.latency_probes]
        return good, str(test["domain"].iat[0])
    return [], ""


# ------------------------------------------------------------------------------------------ direct MLLM
def _common_prefix(uris: list[str]) -> str:
    folders = [u.rsplit("/", 1)[0] for u in uris]
    prefix = (
        posixpath.commonpath(folders)
        if not is_s3(folders[0])
        else "s3://" + posixpath.commonpath([f[len("s3://") :] for f in folders])
    )
    return prefix


def direct_mllm(cfg: RunConfig, test: pd.DataFrame, storage: Storage) -> tuple[list[str | None], dict[str, Any]]:
    """The MLLM names every test image through the label stage; prediction = majority over its samples."""
    import pyarrow as pa

    from near_ray.label.stage import run_label

    label_cfg = cfg.model_copy(deep=True)
    label_cfg.storage.workdir = cfg.paths.direct_mllm
    label_cfg.data.max_images = None
    meta = {d.name: d.meta_class for d in cfg.data.domains}
    domains = []
    for name, rows in test.groupby("domain", sort=True):
        manifest = label_cfg.paths.manifest(name)
        storage.write_parquet(manifest, pa.table({"uri": rows["uri"].tolist()}))
        # The prefix holds the test images (and, in some layouts, more); the manifest says exactly which.
        domains.append(
            DomainConfig(
                name=name, uri=_common_prefix(rows["uri"].tolist()), meta_class=meta.get(name), manifest=manifest
            )
        )
    label_cfg.data.domains = domains
    summary = run_label(label_cfg)
    labels = storage.read_parquet(label_cfg.paths.labels).to_pandas()
    labels["key"] = labels["uri"].map(uri_key)
    labels = labels[labels["key"].isin({uri_key(u) for u in test["uri"]})]
    ok = labels[labels["status"] == "ok"]
    by_uri = ok.groupby("key")["label"].apply(list).to_dict()
    preds = [majority_label(by_uri.get(uri_key(u), [])) for u in test["uri"]]
    usd = cfg.label.prices.mllm_usd(float(labels["input_tokens"].fillna(0).sum()),
                                    float(labels["output_tokens"].fillna(0).sum()), len(labels))
    stats = {
        "cost_per_1k": float(1000 * usd / len(test)),
        "latency_ms": float(1000 * labels["latency_s"].dropna().mean()) if labels["latency_s"].notna().any() else None,
        "requests": int(len(labels)),
        "statuses": {str(k): int(v) for k, v in labels["status"].value_counts().items()},
        "images_without_answer": int(sum(p is None for p in preds)),
        "labels": label_cfg.paths.labels,
        "label_summary": summary,
    }
    return preds, stats


# ------------------------------------------------------------------------------------------ the stage
def _clip_costs(
    cfg: RunConfig, bundles: dict[str, Bundle], test: pd.DataFrame, st: Storage, seconds: dict[str, float], n_read: int
) -> dict[str, dict[str, Any]]:
    """Cost (configured price per 1k images), measured batch-1 latency and throughput of each bundle."""
    probes, probe_domain = _probe_images(cfg, test, st) if bundles else ([], "")
    out = {}
    for method, bundle in bundles.items():
        timed = bool(probes) and probe_domain in bundle.domains
        out[method] = {
            "cost_per_1k": cfg.label.prices.clip_per_1k_images,
            "latency_ms": batch1_latency_ms(bundle, probes, probe_domain) if timed else None,
            "throughput_img_s": n_read / seconds[method] if seconds[method] > 0 else None,
            "bundle": bundle.uri,
            "model_version": bundle.model_version,
        }
    return out


def _load_bundles(cfg: RunConfig, storage: Storage) -> tuple[dict[str, Bundle], dict[str, str]]:
    from near_ray.model.bundle import load_bundle

    bundles, skipped = {}, {}
    for method in cfg.eval.methods:
        if method == DIRECT_MLLM:
            continue
        uri = cfg.paths.bundle(method)
        if not storage.exists(join(uri, "config.json")):
            skipped[method] = f"no bundle at {uri}"
            continue
        bundles[method] = load_bundle(uri, storage)
    return bundles, skipped


def _vocabulary_sizes(bundles: dict[str, Bundle]) -> dict[str, dict[str, int]]:
    return {m: dict(sorted(Counter(b.domains).items())) for m, b in bundles.items()}


def _labeling_summary(cfg: RunConfig, storage: Storage) -> dict[str, Any] | None:
    uri = cfg.paths.label_summary
    return storage.read_json(uri) if storage.exists(uri) else None


def _is_simulated(labeling: dict[str, Any] | None, direct: dict[str, Any] | None) -> bool:
    """Whether the labels (or the direct-MLLM answers) came from the simulated annotator, per the label summaries."""
    return any(bool(s and s.get("simulated")) for s in (labeling, (direct or {}).get("label_summary")))


def run_evaluate(cfg: RunConfig, out: str | None = None) -> dict[str, Any]:
    """Evaluate every configured method on the test split; write report.json, report.md, predictions, plots."""
    st = storage_for(cfg)
    out = out or cfg.paths.report
    test = load_test_sets(cfg, st)
    log.info("evaluate: %d test images in %d domain(s)", len(test), test["domain"].nunique())
    bundles, skipped = _load_bundles(cfg, st)
    served = served_method(cfg, st)  # the run's classifier: its cascade, its confusions
    probs: dict[str, list[Any]] = {served: []} if served in bundles else {}
    preds, seconds, bad = bundle_predictions(cfg, bundles, test, st, probs) if bundles else ({}, {}, [])
    extra = _clip_costs(cfg, bundles, test, st, seconds, len(test) - len(bad))
    if DIRECT_MLLM in cfg.eval.methods:
        preds[DIRECT_MLLM], extra[DIRECT_MLLM] = direct_mllm(cfg, test, st)
    if not preds:
        log.warning("evaluate: no method could be evaluated: %s", skipped)
    sacc = SemanticAccuracy(cfg.eval.sbert_model)
    methods: dict[str, dict[str, Any]] = {}
    domains, truth = test["domain"].tolist(), test["species"].tolist()
    for method in [m for m in cfg.eval.methods if m in preds]:
        methods[method] = {**by_domain(domains, truth, preds[method], sacc), **extra[method],
                           "spread": prediction_spread(domains, truth, preds[method])}
        log.info("evaluate %s: %s", method, " ".join(f"{s.title} {s.text(methods[method].get(s.name))}"
                                                     for s in registered(View.BRIEF)))
    report = _report(cfg, st, test, methods, bundles, skipped, bad, sacc, preds)
    report["served"] = served
    if cfg.train.select and st.exists(choice := cfg.paths.choice):
        report["selection"] = st.read_json(choice)  # the classifier the run chose without labels, and why
    if DIRECT_MLLM in methods and probs:  # the cascade: the CLIP's least confident images to the MLLM
        cascade = evaluate_cascade(cfg, st, test, bundles[served], probs[served],
                                   {**extra[DIRECT_MLLM], **methods[DIRECT_MLLM]}, sacc, out if cfg.eval.plots else None)
        report.update({k: v for k, v in cascade.items() if k != "cascade_plot"})
    _write_predictions(out, st, test, preds)
    if cfg.eval.plots:
        confusion = (served, truth, preds[served]) if served in preds else None
        report["plots"] = write_plots(
            out,
            st,
            methods,
            cfg.paths.candidates,
            {m: b.uri for m, b in bundles.items()},
            confusion,
            cfg.eval.confusion_classes,
        )
        if DIRECT_MLLM in methods and probs:
            report["plots"]["cascade"] = cascade["cascade_plot"]
    report["files"] = write_report(report, out, st)
    return report


def _report(
    cfg: RunConfig,
    st: Storage,
    test: pd.DataFrame,
    methods: dict[str, dict[str, Any]],
    bundles: dict[str, Bundle],
    skipped: dict[str, str],
    bad: list[dict[str, str]],
    sacc: SemanticAccuracy,
    preds: dict[str, list[str | None]],
) -> dict[str, Any]:
    labeling = _labeling_summary(cfg, st)
    meta = {d.name: d.meta_class for d in cfg.data.domains}
    vocab = _vocabulary_sizes(bundles)
    if "direct_mllm" in preds:  # the MLLM's open vocabulary: distinct names it gave per domain
        names = test.assign(pred=preds["direct_mllm"]).dropna(subset=["pred"])
        vocab["direct_mllm"] = {str(d): int(n) for d, n in names.groupby("domain")["pred"].nunique().items()}
    domains = [
        {"name": d, "meta_class": meta.get(d), "test_images": int(len(rows)), "classes": int(rows["species"].nunique())}
        for d, rows in test.groupby("domain", sort=True)
    ]
    return {
        "dataset": cfg.eval.dataset or ", ".join(d["name"] for d in domains),
        "domains": domains,
        "test_images": int(len(test)),
        "methods": methods,
        "vocabulary_sizes": vocab,
        "labeling": labeling,
        "simulated_annotator": _is_simulated(labeling, methods.get(DIRECT_MLLM)),
        "sacc_model": sacc.model,
        # batch-1 latency is a wall-clock measure: what else ran on the machine at the time
        "latency_conditions": {"load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()},
        "skipped": skipped,
        "bad_images": bad,
        "clip_cost_per_1k_source": "label.prices.clip_per_1k_images",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_predictions(out: str, st: Storage, test: pd.DataFrame, preds: dict[str, list[str | None]]) -> None:
    import pyarrow as pa

    columns = {c: test[c].tolist() for c in ("uri", "domain", "species")}
    columns.update({f"pred_{m}": p for m, p in preds.items()})
    st.write_parquet(join(out, "predictions.parquet"), pa.table(columns))
