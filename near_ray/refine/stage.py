"""The refine stage: labels table -> vocabulary, CLIP embeddings, kNN graph, candidate label sets.

Writes under ``{workdir}/refine/``: vocabulary.json, merges.json, embeddings.parquet,
neighbors.parquet, candidates.parquet and, last, _summary.json. The summary carries fingerprints of
the inputs (labels content, model, refine config, the vocabulary edits), so a re-run with unchanged
inputs does nothing, a re-run that only changes vocabulary or kNN settings reuses the embeddings
already on storage, and one that only changes the vocabulary (edits, merging) or candidate-set
settings reuses the kNN graph too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from near_ray.config.base import result_fields
from near_ray.errors import NearRayError
from near_ray.model.preprocess import precision
from near_ray.names import majority_label
from near_ray.refine.candidates import candidate_sets
from near_ray.refine.edits import Edits, check, read_edits
from near_ray.refine.edits import resolve as resolve_edits
from near_ray.refine.embed import Embeddings, embed_images, embeddings_table, read_embeddings, unique_images
from near_ray.refine.knn import choose_index, knn_for_config, resolve
from near_ray.refine.vocabulary import Vocabulary, answers, build_vocabulary, text_encoder
from near_ray.storage import Storage, storage_for

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from near_ray.config import RunConfig

log = logging.getLogger(__name__)

OUTPUTS = ("vocabulary.json", "merges.json", "embeddings.parquet", "neighbors.parquet", "candidates.parquet")
_MAX_LISTED_FAILURES = 100


class RefineError(NearRayError):
    pass


# ------------------------------------------------------------------------------------------ fingerprints
def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def fingerprints(labels: pd.DataFrame, cfg: RunConfig, edits: Edits | None = None) -> dict[str, str]:
    """Content fingerprints of what each output depends on (not of file names or write times)."""
    import pandas as pd

    cols = ["image_id", "uri", "domain", "sample", "label", "status"]
    table = labels[cols].sort_values(["domain", "uri", "sample"]).astype(str)
    labels_fp = _sha(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    images = sorted(zip(labels["image_id"].astype(str), labels["uri"].astype(str), strict=True))
    # embedders on GPUs encode at another precision than on CPUs (near_ray.model.preprocess.precision):
    # other embeddings, so another fingerprint (only the GPU's adds a part: CPU fingerprints stay what they were)
    half = [precision("cuda")] if cfg.refine.embed_gpus > 0 else []
    embeddings_fp = _sha(sorted(set(images)), cfg.model.model_dump(), cfg.label.image.max_pixels, *half)
    # where and with what the work runs (fields marked WHERE_IT_RUNS) is not what it computes; the edits file's
    # name neither (its edits count below, by what they do)
    refine_cfg = {k: v for k, v in result_fields(cfg.refine).items() if k != "edits"}
    knn_fp = _sha(embeddings_fp, cfg.refine.k, cfg.refine.index, cfg.refine.exact_max_n)
    # the edits count by what they do, not by the file's name (no edits: the fingerprint of a run without)
    edited = [edits.fingerprint] if edits is not None else []
    return {"labels": labels_fp, "embeddings": embeddings_fp, "knn": knn_fp,
            "all": _sha(labels_fp, embeddings_fp, refine_cfg, *edited)}


def _previous_summary(st: Storage, cfg: RunConfig) -> dict[str, Any] | None:
    uri = cfg.paths.refine_summary
    try:
        return st.read_json(uri) if st.exists(uri) else None
    except NearRayError as e:
        log.warning("refine: ignoring unreadable %s (%s); recomputing", uri, e)
        return None


# ------------------------------------------------------------------------------------------ steps
def _read_labels(cfg: RunConfig, st: Storage) -> pd.DataFrame:
    from near_ray.label.table import read_labels

    labels = read_labels(cfg, st)
    missing = {"image_id", "uri", "domain", "sample", "label", "status"} - set(labels.columns)
    if missing:
        raise RefineError(f"{cfg.paths.labels}: labels table lacks columns {sorted(missing)}")
    if labels.empty:
        raise RefineError(
            f"{cfg.paths.labels}: no label rows for model/prompt_version of this config; run `near-ray label`"
        )
    return labels.reset_index(drop=True)


def _embeddings(cfg: RunConfig, st: Storage, labels: pd.DataFrame, fp: dict[str, str]) -> tuple[Embeddings, bool]:
    """(embeddings, reused): the ones on storage when their inputs are unchanged, else a fresh Ray Data run.

    A small record beside the parquet says which inputs it was computed from, so embeddings survive
    a run that failed after computing them (they are the expensive part).
    """
    uri, record_uri = cfg.paths.embeddings, cfg.paths.embeddings_record
    record = st.read_json(record_uri) if st.exists(record_uri) else {}
    if record.get("fingerprint") == fp["embeddings"] and st.exists(uri):
        emb = read_embeddings(uri, st)
        emb.failures = record.get("bad_images", [])
        log.info("refine: embeddings unchanged, reusing %s", uri)
        return emb, True
    from near_ray.ray_session import ensure_ray

    ensure_ray()
    emb = embed_images(unique_images(labels), cfg, st)
    st.write_parquet(uri, embeddings_table(emb))
    st.write_json(record_uri, {"fingerprint": fp["embeddings"], "bad_images": emb.failures})
    return emb, False


Graph = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # domain -> (row positions, local kNN ids, sims)


def _neighbours(cfg: RunConfig, st: Storage, emb: Embeddings, fp: dict[str, str]) -> tuple[Graph, bool]:
    """kNN within each domain, written as neighbors.parquet; returns the graph in local row indices and
    whether it was reused: the graph on storage when the embeddings and kNN settings are unchanged (a
    re-run after vocabulary edits or candidate-set settings searches nothing again)."""
    uri, record_uri = cfg.paths.neighbors, cfg.paths.neighbors_record
    record = st.read_json(record_uri) if st.exists(record_uri) else {}
    if record.get("fingerprint") == fp["knn"] and st.exists(uri):
        graph = _graph_from_table(st.read_parquet(uri), emb)
        if graph is not None:
            log.info("refine: embeddings and kNN settings unchanged, reusing %s", uri)
            return graph, True
    table, graph = _search(cfg, emb)
    st.write_parquet(uri, table)
    st.write_json(record_uri, {"fingerprint": fp["knn"]})
    return graph, False


def _positions(emb: Embeddings) -> dict[str, np.ndarray]:
    domains = emb.meta["domain"].to_numpy()
    return {d: np.nonzero(domains == d)[0] for d in sorted(set(domains.tolist()))}


def _graph_from_table(table: pa.Table, emb: Embeddings) -> Graph | None:
    """The graph of a neighbors table (rows of valid neighbours, most similar first); None when it does not
    cover these embeddings. Missing slots pad as the search pads them: index -1, similarity NaN."""
    ids = emb.meta["image_id"].to_numpy()
    rows = {r["image_id"]: r for r in table.to_pylist()}
    if set(rows) != set(ids.tolist()):
        return None
    graph: Graph = {}
    for domain, pos in _positions(emb).items():
        local = {ids[p]: r for r, p in enumerate(pos)}
        width = max((len(rows[ids[p]]["neighbors"]) for p in pos), default=0)
        local_i = np.full((len(pos), width), -1, dtype=np.int64)
        sims = np.full((len(pos), width), np.nan, dtype=np.float32)
        for r, p in enumerate(pos):
            row = rows[ids[p]]
            local_i[r, : len(row["neighbors"])] = [local[n] for n in row["neighbors"]]
            sims[r, : len(row["similarities"])] = row["similarities"]
        graph[domain] = (pos, local_i, sims)
    return graph


def _search(cfg: RunConfig, emb: Embeddings) -> tuple[pa.Table, Graph]:
    """kNN within each domain: the neighbors table and, per domain, the graph in local row indices."""
    import pyarrow as pa

    rc = cfg.refine
    ids = emb.meta["image_id"].to_numpy()
    graph: Graph = {}
    rows: dict[str, list] = {"image_id": [], "domain": [], "neighbors": [], "similarities": []}
    positions = _positions(emb)
    # Every domain's search is submitted before any is awaited: with knn_gpus they run side by side.
    pending = {d: knn_for_config(emb.vectors[pos], rc) for d, pos in positions.items()}
    for domain, pos in positions.items():
        local_i, sims = resolve(pending[domain])
        nbr = np.where(local_i >= 0, pos[np.clip(local_i, 0, None)], -1)
        graph[domain] = (pos, local_i, sims)
        for r, p in enumerate(pos):
            valid = nbr[r] >= 0
            rows["image_id"].append(ids[p])
            rows["domain"].append(domain)
            rows["neighbors"].append(ids[nbr[r][valid]].tolist())
            rows["similarities"].append(sims[r][valid].astype(np.float32).tolist())
    table = pa.table({
        "image_id": pa.array(rows["image_id"], pa.string()),
        "domain": pa.array(rows["domain"], pa.string()),
        "neighbors": pa.array(rows["neighbors"], pa.list_(pa.string())),
        "similarities": pa.array(rows["similarities"], pa.list_(pa.float32())),
    })
    return table, graph


def own_labels(labels: pd.DataFrame, vocab: Vocabulary) -> dict[str, list[str]]:
    """Per image_id: the vocabulary names of its parsed samples (pruned and unknown names dropped)."""
    ok = labels[(labels["status"] == "ok") & labels["label"].notna()].sort_values(["image_id", "uri", "sample"])
    names = {pair: vocab.canonical(*pair) for pair in set(zip(ok["domain"], ok["label"], strict=True))}
    out: dict[str, list[str]] = {}
    for image_id, domain, label in zip(ok["image_id"], ok["domain"], ok["label"], strict=True):
        name = names[(domain, label)]
        if name is not None:
            out.setdefault(image_id, []).append(name)
    return out


def _candidates(cfg: RunConfig, emb: Embeddings, own: dict[str, list[str]], vocab: Vocabulary,
                graph: Graph) -> tuple[pa.Table, dict[str, dict[str, Any]]]:
    import pyarrow as pa

    meta = emb.meta
    support = vocab.support()
    cols: dict[str, list] = {c: [] for c in ("image_id", "uri", "domain", "own_labels", "majority_label",
                                             "candidates", "confidences")}
    stats: dict[str, dict[str, Any]] = {}
    for domain, (pos, local_i, sims) in graph.items():
        owns = [own.get(image_id, []) for image_id in meta["image_id"].to_numpy()[pos]]
        sets = candidate_sets(owns, local_i, sims, cfg.refine.neighbour_weight, cfg.refine.min_neighbour_votes,
                              cfg.refine.neighbour_votes)
        domain_support = {name: n for (d, name), n in support.items() if d == domain}
        kept = 0
        for r, (p, cs) in enumerate(zip(pos, sets, strict=True)):
            if not cs.candidates:
                continue
            kept += 1
            cols["image_id"].append(meta["image_id"].iat[p])
            cols["uri"].append(meta["uri"].iat[p])
            cols["domain"].append(domain)
            cols["own_labels"].append(owns[r])
            cols["majority_label"].append(majority_label(owns[r], domain_support))
            cols["candidates"].append(cs.candidates)
            cols["confidences"].append(cs.confidences)
        sizes = [len(s.candidates) for s in sets if s.candidates]
        stats[domain] = {"images": int(len(pos)), "candidate_rows": kept, "no_candidates": int(len(pos)) - kept,
                         "mean_candidates": round(float(np.mean(sizes)), 3) if sizes else 0.0,
                         "mean_top_confidence": round(float(np.mean([s.confidences[0] for s in sets if s.candidates]
                                                                     or [0.0])), 4)}
    table = pa.table({
        "image_id": pa.array(cols["image_id"], pa.string()),
        "uri": pa.array(cols["uri"], pa.string()),
        "domain": pa.array(cols["domain"], pa.string()),
        "own_labels": pa.array(cols["own_labels"], pa.list_(pa.string())),
        "majority_label": pa.array(cols["majority_label"], pa.string()),
        "candidates": pa.array(cols["candidates"], pa.list_(pa.string())),
        "confidences": pa.array(cols["confidences"], pa.list_(pa.float32())),
    })
    return table, stats


# ------------------------------------------------------------------------------------------ the stage
def load_edits(cfg: RunConfig, st: Storage) -> Edits | None:
    """``refine.edits`` read and checked on its own and against the run's domains (None: no edits)."""
    if not cfg.refine.edits:
        return None
    edits = read_edits(cfg.refine.edits, st)
    check(edits, [d.name for d in cfg.data.domains])
    return edits


def check_edits(cfg: RunConfig) -> Edits | None:
    """The edits before any slow work: the file, and its names against the labels table when there is one
    (a re-run after the review); before the first labels, refine checks the names when it runs."""
    st = storage_for(cfg)
    edits = load_edits(cfg, st)
    if edits is not None and st.exists(cfg.paths.labels):
        try:
            labels = _read_labels(cfg, st)
        except NearRayError:
            return edits
        resolve_edits(edits, answers(labels))
    return edits


def run_refine(cfg: RunConfig) -> dict[str, Any]:
    """Vocabulary, embeddings, kNN and candidate sets for the labels table of ``cfg``; returns the summary."""
    st = storage_for(cfg)
    t0 = time.monotonic()
    edits = load_edits(cfg, st)
    labels = _read_labels(cfg, st)
    if edits is not None:  # every name the edits use is an answer here: checked before any model loads
        resolve_edits(edits, answers(labels))
    fp = fingerprints(labels, cfg, edits)
    prev = _previous_summary(st, cfg)
    if prev and prev.get("fingerprint") == fp["all"] and all(st.exists(cfg.paths.refine_file(n)) for n in OUTPUTS):
        log.info("refine: inputs unchanged since the last run, outputs on storage kept")
        return {**prev, "skipped": True}
    timings: dict[str, float] = {}

    t = time.monotonic()
    rc = cfg.refine
    vocab = build_vocabulary(labels, text_encoder(cfg, st), rc.merge_threshold, min_support=rc.min_support,
                             lexical_guard=rc.merge_lexical_guard, min_shared=rc.merge_min_shared, edits=edits)
    st.write_json(cfg.paths.vocabulary, vocab.to_json())
    st.write_json(cfg.paths.merges, vocab.merges)
    timings["vocabulary_s"] = round(time.monotonic() - t, 3)

    t = time.monotonic()
    emb, reused = _embeddings(cfg, st, labels, fp)
    timings["embeddings_s"] = round(time.monotonic() - t, 3)

    t = time.monotonic()
    graph, knn_reused = _neighbours(cfg, st, emb, fp)
    timings["knn_s"] = round(time.monotonic() - t, 3)

    t = time.monotonic()
    candidates, stats = _candidates(cfg, emb, own_labels(labels, vocab), vocab, graph)
    st.write_parquet(cfg.paths.candidates, candidates)
    timings["candidates_s"] = round(time.monotonic() - t, 3)

    summary = _summary(cfg, labels, vocab, emb, reused, stats, fp, timings, time.monotonic() - t0)
    summary["knn_reused"] = knn_reused
    summary["edits"] = edits_record(edits, vocab)
    st.write_json(cfg.paths.refine_summary, summary)  # last: its presence means the outputs are whole
    return summary


def edits_record(edits: Edits | None, vocab: Vocabulary) -> dict[str, Any] | None:
    """What the run records of the edits: the file, their fingerprint, and each one applied, per domain,
    with the name it shaped and its images (train copies it into the bundle's metrics)."""
    if edits is None:
        return None
    applied = [a for m in vocab.merges.values() for a in m.get("edits", [])]
    return {**edits.record(), "applied": applied, "not_applied": sorted({e.line for e in edits.edits}
                                                                      - {a["line"] for a in applied})}


def _summary(cfg: RunConfig, labels: pd.DataFrame, vocab: Vocabulary, emb: Embeddings, reused: bool,
             stats: dict[str, dict[str, Any]], fp: dict[str, str], timings: dict[str, float],
             total_s: float) -> dict[str, Any]:
    n_images = int(labels["image_id"].nunique())
    embed_s = timings.get("embeddings_s", 0.0)
    domains = {}
    for domain in sorted(labels["domain"].dropna().unique().tolist()):
        merges = vocab.merges.get(domain, {})
        domains[domain] = {
            "names_seen": merges.get("names_seen", 0),
            "vocabulary_size": merges.get("vocabulary_size", 0),
            "merged_groups": len(merges.get("merged", [])),
            "pruned": len(merges.get("pruned", [])),
            **stats.get(domain, {"images": 0, "candidate_rows": 0, "no_candidates": 0}),
        }
    return {
        "fingerprint": fp["all"],
        "fingerprints": fp,
        "images": n_images,
        "embedded": int(len(emb.meta)),
        "embeddings_reused": reused,
        "embed_images_per_s": None if reused or not embed_s else round(len(emb.meta) / embed_s, 2),
        # the actor pool's start-up (processes, imports, model) until its first batch; None when reused
        "embed_first_batch_s": None if reused else emb.first_batch_s,
        "bad_image_count": len(emb.failures),
        "bad_images": emb.failures[:_MAX_LISTED_FAILURES],
        "vocabulary_size": len(vocab.entries),
        "merge_encoder": cfg.refine.merge_encoder,
        "merge_threshold": cfg.refine.merge_threshold,
        "k": cfg.refine.k,
        "index": {d: choose_index(s.get("images", 0), cfg.refine.index, cfg.refine.exact_max_n)
                  for d, s in stats.items()},
        "domains": domains,
        "timings_s": {**timings, "total_s": round(total_s, 3)},
        "outputs": {n: cfg.paths.refine_file(n) for n in OUTPUTS},
        "skipped": False,
    }
