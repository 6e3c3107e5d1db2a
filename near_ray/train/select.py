"""Choosing the classifier without labels (``train.select``).

A user has no truth, so which of a few classifiers to train cannot be decided by accuracy. With
``train.select`` naming candidate methods, the run holds out a slice of the discovery set
(``train.select_holdout``, stratified by the MLLM's majority name in each domain), trains every
candidate on the rest, and asks each to name the held-out images. Each candidate is scored by its
agreement with the MLLM's own answers about those images, weighted by how consistent the MLLM was
about each one:

    agreement(m) = Σ_i c_i · a_i(m) / Σ_i c_i,

where a_i(m) is the share of image i's parsed answers that name what m predicts and c_i the share
of its answers that name its majority answer (1 when all samples agree, 1/S when none do). An image
the MLLM keeps changing its mind about counts little; an image it answers the same way every time
counts fully. That is ``train.select_rule: names``. With ``grouping`` the names themselves do not have to match:
a candidate scores by how well its predictions group the held-out images as the MLLM's majority
answers do (the best one-to-one matching of its names to those answers in each domain, each image
weighing c_i), as cACC scores clusters rather than names. The candidate with the highest score under
the rule is chosen (ties: the first listed), and the run then trains it on the whole discovery set
as usual. No truth table is read anywhere on this path.

Held-out images are held out of refine's neighbour votes too: the fit slice's candidate sets are
recomputed from refine's graph with the held-out images removed, so a held-out image's own answers
never reach a training target through its neighbours. Everything lives under ``{workdir}/select``:
``refine/`` (the fit slice's refine outputs), ``bundles/<method>`` (each candidate trained on the
fit slice) and ``choice.json`` (the choice, the agreement figures and the slice). See docs/train.md.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any

import numpy as np

from near_ray.config import RunConfig
from near_ray.storage import Storage, join, storage_for

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------ the split
def _rank(seed: int, image_id: str) -> str:
    return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()


def holdout_split(rows: list[dict[str, Any]], fraction: float, seed: int) -> set[str]:
    """The image ids held out: in each (domain, majority name) group, ``round(fraction · n)`` of its
    images, in a seeded order of their ids. Images without own answers (nothing to agree with) and
    names with fewer than two images (a name's only image would leave it unlearnable) stay in the fit
    slice."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.get("own_labels") and r.get("majority_label"):
            groups.setdefault((r["domain"] or "", r["majority_label"]), []).append(r["image_id"])
    out: set[str] = set()
    for ids in groups.values():
        k = int(round(fraction * len(ids)))
        if len(ids) >= 2 and k:
            out.update(sorted(ids, key=lambda i: _rank(seed, i))[: min(k, len(ids) - 1)])
    return out


def consistency(own: list[str]) -> float:
    """c_i: the share of an image's parsed answers naming its most frequent answer (0 without answers)."""
    return Counter(own).most_common(1)[0][1] / len(own) if own else 0.0


def agreement(predicted: dict[str, str | None], own: dict[str, list[str]]) -> dict[str, Any]:
    """The consistency-weighted agreement of one candidate's names with the MLLM's answers over the held-out
    images (``predicted``: image id -> name), and the unweighted share of images whose majority answer
    it names."""
    num = den = 0.0
    plain = 0
    for iid, name in predicted.items():
        answers = own[iid]
        c = consistency(answers)
        num += c * (answers.count(name) / len(answers) if name is not None else 0.0)
        den += c
        plain += int(name is not None and name == Counter(answers).most_common(1)[0][0])
    return {"agreement": round(num / den, 6) if den else 0.0,
            "majority_match": round(plain / len(predicted), 6) if predicted else 0.0, "images": len(predicted)}


def grouping_agreement(predicted: dict[str, str | None], own: dict[str, list[str]], domain: dict[str, str]) -> float:
    """How well a candidate's names *group* the held-out images as the MLLM's majority answers do, whatever
    the names: in each domain, the best one-to-one matching of predicted names to majority answers
    (Hungarian, as cACC matches clusters to classes), each image weighing its consistency c_i; the
    matched weight over the total."""
    from near_ray.eval.metrics import hungarian_match

    matched = total = 0.0
    for d in sorted(set(domain.values())):
        ids = [i for i in predicted if domain[i] == d]
        weights = [consistency(own[i]) for i in ids]
        matched += hungarian_match([Counter(own[i]).most_common(1)[0][0] for i in ids],
                                   [predicted[i] for i in ids], weights)[1]
        total += sum(weights)
    return round(matched / total, 6) if total else 0.0


RULES = ("names", "grouping")  # train.select_rule: which agreement chooses


def choose(scores: dict[str, dict[str, Any]], order: list[str], rule: str = "names") -> str:
    """The candidate with the highest agreement under ``rule`` ("names": ``agreement``, "grouping":
    ``grouping_agreement``); ties go to the one listed first."""
    key = "agreement" if rule == "names" else "grouping"
    return max(order, key=lambda m: (scores[m][key], -order.index(m)))


# ------------------------------------------------------------------------------------------ the fit slice
def fit_refine(cfg: RunConfig, held_out: set[str], st: Storage) -> RunConfig:
    """Refine's outputs for the fit slice under ``{workdir}/select/refine`` (candidate sets recomputed
    without the held-out images' answers, the graph without them); returns the config whose workdir is
    ``{workdir}/select``."""
    import pyarrow as pa

    from near_ray.refine.candidates import candidate_sets

    sel = cfg.model_copy(deep=True)
    sel.storage.workdir = cfg.paths.select
    summary = st.read_json(cfg.paths.refine_summary)
    fingerprint = hashlib.sha256(f"{summary.get('fingerprint')}|{sorted(held_out)}".encode()).hexdigest()[:16]
    done = sel.paths.refine_summary
    if st.exists(done) and st.read_json(done).get("fingerprint") == fingerprint:
        return sel
    cands = st.read_parquet(cfg.paths.candidates).to_pylist()
    by_id = {r["image_id"]: r for r in cands}
    graph = st.read_parquet(cfg.paths.neighbors).to_pylist()
    rows: dict[str, list] = {k: [] for k in ("image_id", "uri", "domain", "own_labels", "majority_label",
                                              "candidates", "confidences")}
    kept_graph: dict[str, list] = {"image_id": [], "domain": [], "neighbors": [], "similarities": []}
    for domain in sorted({g["domain"] for g in graph}):
        mine = [g for g in graph if g["domain"] == domain and g["image_id"] not in held_out]
        local = {g["image_id"]: i for i, g in enumerate(mine)}
        width = max((len(g["neighbors"]) for g in mine), default=0)
        ids = np.full((len(mine), width), -1, dtype=np.int64)
        sims = np.full((len(mine), width), np.nan, dtype=np.float32)
        for r, g in enumerate(mine):
            pairs = [(local[n], s) for n, s in zip(g["neighbors"], g["similarities"], strict=True) if n in local]
            if pairs:
                ids[r, : len(pairs)] = [p for p, _ in pairs]
                sims[r, : len(pairs)] = [s for _, s in pairs]
            kept_graph["image_id"].append(g["image_id"])
            kept_graph["domain"].append(domain)
            kept_graph["neighbors"].append([mine[p]["image_id"] for p, _ in pairs])
            kept_graph["similarities"].append([float(s) for _, s in pairs])
        owns = [list((by_id.get(g["image_id"]) or {}).get("own_labels") or []) for g in mine]
        sets = candidate_sets(owns, ids, sims, cfg.refine.neighbour_weight, cfg.refine.min_neighbour_votes,
                              cfg.refine.neighbour_votes)
        for g, own, cs in zip(mine, owns, sets, strict=True):
            if not cs.candidates or g["image_id"] not in by_id:
                continue
            row = by_id[g["image_id"]]
            for k, v in (("image_id", row["image_id"]), ("uri", row["uri"]), ("domain", domain), ("own_labels", own),
                         ("majority_label", row["majority_label"]), ("candidates", cs.candidates),
                         ("confidences", cs.confidences)):
                rows[k].append(v)
    st.write_parquet(sel.paths.candidates, pa.table({
        **{k: pa.array(rows[k], pa.string()) for k in ("image_id", "uri", "domain", "majority_label")},
        "own_labels": pa.array(rows["own_labels"], pa.list_(pa.string())),
        "candidates": pa.array(rows["candidates"], pa.list_(pa.string())),
        "confidences": pa.array(rows["confidences"], pa.list_(pa.float32()))}))
    st.write_parquet(sel.paths.neighbors, pa.table({
        **{k: pa.array(kept_graph[k], pa.string()) for k in ("image_id", "domain")},
        "neighbors": pa.array(kept_graph["neighbors"], pa.list_(pa.string())),
        "similarities": pa.array(kept_graph["similarities"], pa.list_(pa.float32()))}))
    have, fit = cfg.paths, sel.paths
    for src, dst in ((have.vocabulary, fit.vocabulary), (have.embeddings, fit.embeddings),
                     (have.embeddings_record, fit.embeddings_record)):
        if st.exists(src):
            st.write_bytes(dst, st.read_bytes(src))
    st.write_json(done, {**summary, "fingerprint": fingerprint, "held_out": len(held_out),
                         "fit_images": len(rows["image_id"])})
    return sel


def _held_out_names(bundle: Any, rows: list[dict[str, Any]], images: list[Any]) -> dict[str, str | None]:
    """What a bundle names each held-out image, within its domain (None where it serves no such domain)."""
    emb = bundle.embed(images)
    out: dict[str, str | None] = {}
    for i, r in enumerate(rows):
        d = r["domain"] or ""
        out[r["image_id"]] = (bundle.names[int(bundle.probabilities(emb[i : i + 1], domain=d).argmax())]
                              if d in bundle.domains else None)
    return out


# ------------------------------------------------------------------------------------------ the stage
def run_select(cfg: RunConfig, in_process: bool = False) -> dict[str, Any]:
    """Hold out, train every ``train.select`` candidate on the rest, score each on the held-out images,
    write ``{workdir}/select/choice.json`` and return it (``chosen``: the method to train on everything)."""
    from near_ray.images import decode_image
    from near_ray.model.bundle import load_bundle
    from near_ray.train.stage import run_train

    st = storage_for(cfg)
    order = list(dict.fromkeys(cfg.train.select))
    cands = st.read_parquet(cfg.paths.candidates).to_pylist()
    held_out = holdout_split(cands, cfg.train.select_holdout, cfg.train.seed)
    if not held_out:
        choice = {"chosen": order[0], "candidates": {}, "held_out": 0, "order": order,
                  "why": "no name has two images with answers: nothing to hold out, the first candidate is kept"}
        st.write_json(cfg.paths.choice, choice)
        return choice
    sel = fit_refine(cfg, held_out, st)
    rows = [r for r in cands if r["image_id"] in held_out]
    images = [decode_image(st.read_bytes(r["uri"]), r["uri"]) for r in rows]
    own = {r["image_id"]: list(r["own_labels"]) for r in rows}
    domain = {r["image_id"]: r["domain"] or "" for r in rows}
    scores: dict[str, dict[str, Any]] = {}
    fit_summary = st.read_json(sel.paths.refine_summary)  # read once: every candidate checks it
    for method in order:
        mcfg = sel.model_copy(deep=True)
        mcfg.train.method = method
        bundle_uri = mcfg.paths.bundle(method)
        metrics_uri = join(bundle_uri, "metrics.json")
        if not (st.exists(metrics_uri) and st.read_json(metrics_uri).get("refine_fingerprint") == fit_summary["fingerprint"]):
            run_train(mcfg, in_process=in_process)
        names = _held_out_names(load_bundle(bundle_uri, st), rows, images)
        scores[method] = {**agreement(names, own), "grouping": grouping_agreement(names, own, domain)}
        log.info("select: %s agrees %.3f with the MLLM's names (grouping %.3f) on %d held-out images", method,
                 scores[method]["agreement"], scores[method]["grouping"], len(rows))
    chosen = choose(scores, order, cfg.train.select_rule)
    choice = {"chosen": chosen, "candidates": scores, "order": order, "held_out": len(held_out),
              "fit_images": fit_summary.get("fit_images"),
              "holdout_fraction": cfg.train.select_holdout, "rule": cfg.train.select_rule}
    st.write_json(cfg.paths.choice, choice)
    log.info("select: %s chosen by %s (%s)", chosen, cfg.train.select_rule,
             ", ".join(f"{m} {s['agreement']:.3f}/{s['grouping']:.3f}" for m, s in scores.items()))
    return choice
