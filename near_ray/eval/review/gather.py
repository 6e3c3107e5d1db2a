"""What the review page shows, read from a run's artifacts: no model is loaded, no image classified.

Read per domain: the labels table (the MLLM's answers), refine's ``vocabulary.json``, ``merges.json``,
``candidates.parquet`` and ``neighbors.parquet``, the bundle that names the domain (its
``vocabulary.json`` and ``metrics.json``: the names training pruned; never its weights), the
predictions table when classify ran, and the truth table when the config names one. Only the labels
table and refine's vocabulary and candidates are required: the page of a run that stopped after
refine is complete for what that run did.

An image's name on the page is the run's answer for it: the predictions table's name where classify
named it, else its most confident candidate among the names the bundle kept (refine's vocabulary
when there is no bundle yet).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from near_ray.classify.table import predictions_uri, read_predictions
from near_ray.data.truth import TruthError, truth_table, uri_key
from near_ray.errors import NearRayError
from near_ray.label.parse import _is_refusal  # the label stage's own rule for "the answer declines to name"
from near_ray.label.table import LabelsNotFoundError, read_labels
from near_ray.names import clean_surface, name_key
from near_ray.storage import Storage, join

if TYPE_CHECKING:
    import pandas as pd

    from near_ray.config import RunConfig

log = logging.getLogger(__name__)

_PRED_COLUMNS = ["uri", "domain", "name", "score", "top_k_names", "top_k_scores", "source", "status", "mllm_cost_usd"]


class ReviewError(NearRayError):
    pass


@dataclass
class ImageView:
    """One image as the review sees it: what each view of it says, and the name the run gives it."""

    uri: str
    said: list[str] = field(default_factory=list)  # per parsed MLLM sample: refine's name for it (pruned ones too)
    surfaces: list[str] = field(default_factory=list)  # per parsed MLLM sample: the name as the parser read it
    answers: list[str] = field(default_factory=list)  # the raw answers, verbatim
    candidates: dict[str, float] = field(default_factory=dict)  # refine's candidate set and confidences
    clip: dict[str, float] = field(default_factory=dict)  # classify's top-k: the CLIP's ranking
    mllm: dict[str, float] = field(default_factory=dict)  # the cascade's MLLM answer (name -> share of samples)
    neighbours: list[tuple[str, float]] = field(default_factory=list)  # (uri, cosine) within the domain
    name: str | None = None
    named_by: str = ""  # "classify" (the predictions table) | "candidates" (refine) | "" (no name)
    truth: str | None = None
    # filled by near_ray.eval.review.evidence
    evidence: dict[str, dict[str, float]] = field(default_factory=dict)
    agreement: float | None = None
    suggestion: str | None = None


@dataclass
class DomainData:
    name: str
    meta_class: str | None
    names: list[str]  # the names images can get: the bundle's vocabulary, else refine's
    vocabulary: list[dict[str, Any]]  # refine's entries of this domain
    merges: dict[str, Any]  # refine's merges.json record of this domain
    train_pruned: list[dict[str, Any]]  # the bundle's pruned_names of this domain
    bundle: str | None  # the bundle URI whose vocabulary ``names`` is
    images: dict[str, ImageView]  # uri -> view
    surfaces: dict[str, Counter]  # refine name -> surface form -> parsed samples
    raw_examples: dict[str, list[str]]  # refine name -> a few raw answers that became it
    label_facts: dict[str, Any]
    cascade: dict[str, Any] | None
    has_truth: bool


# ------------------------------------------------------------------------------------------ reading
def _read_json(st: Storage, uri: str, default: Any = None) -> Any:
    return st.read_json(uri) if st.exists(uri) else default


def _bundle_uri(cfg: RunConfig, domain: str) -> str:
    # classify's routing rule (near_ray.classify.stage.bundle_for), without importing that stage's Ray code
    cc = cfg.classify
    from near_ray.chosen import served_method

    return cc.bundles.get(domain) or cc.bundle or cfg.paths.bundle(served_method(cfg))


def _bundle(cfg: RunConfig, st: Storage, domain: str) -> tuple[str | None, list[str] | None, list[dict[str, Any]]]:
    """(bundle URI, its names for ``domain``, its pruned names of ``domain``); (None, None, []) without a bundle."""
    uri = _bundle_uri(cfg, domain)
    if not st.exists(join(uri, "config.json")):
        return None, None, []
    vocabulary = st.read_json(join(uri, "vocabulary.json"))
    metrics = _read_json(st, join(uri, "metrics.json"), {}) or {}
    domains = {v.get("domain") or "" for v in vocabulary}
    single = len(domains) == 1  # a one-domain bundle names any domain it is given (classify's rule)
    names = [v["name"] for v in vocabulary if single or (v.get("domain") or "") == domain]
    pruned = [p for p in metrics.get("pruned_names", []) if single or (p.get("domain") or "") == domain]
    return uri, names, pruned


def read_truth(cfg: RunConfig, st: Storage) -> dict[str, dict[str, str]]:
    """Per domain with a truth table: uri key -> true class, every split (the discovery images are "train")."""
    out: dict[str, dict[str, str]] = {}
    for d in cfg.data.domains:
        if d.has_truth:
            try:
                table = truth_table(d, st)
            except TruthError as e:
                raise ReviewError(str(e)) from e
            out[d.name] = {uri_key(u): s for u, s in zip(table["uri"], table["species"], strict=True)}
    return out


def _labels(cfg: RunConfig, st: Storage) -> pd.DataFrame:
    try:
        return read_labels(cfg, st)
    except LabelsNotFoundError as e:
        raise ReviewError(f"review: {e}") from e


def _refine(cfg: RunConfig, st: Storage) -> tuple[list[dict[str, Any]], dict[str, Any], pd.DataFrame, pd.DataFrame | None]:
    vocab_uri, cand_uri = cfg.paths.vocabulary, cfg.paths.candidates
    missing = [u for u in (vocab_uri, cand_uri) if not st.exists(u)]
    if missing:
        raise ReviewError(f"review: {', '.join(missing)} not found: run `near-ray refine` first")
    vocabulary = st.read_json(vocab_uri)
    merges = _read_json(st, cfg.paths.merges, {}) or {}
    candidates = st.read_parquet(cand_uri).to_pandas()
    nb_uri = cfg.paths.neighbors
    neighbors = st.read_parquet(nb_uri).to_pandas() if st.exists(nb_uri) else None
    return vocabulary, merges, candidates, neighbors


def _predictions(cfg: RunConfig, st: Storage) -> pd.DataFrame | None:
    uri = predictions_uri(cfg)
    if not st.exists(uri):
        return None
    df = read_predictions(uri, st, _PRED_COLUMNS)
    return df if len(df) else None


# ------------------------------------------------------------------------------------------ one domain
def _name_of_key(vocabulary: list[dict[str, Any]], merges: dict[str, Any]) -> dict[str, str]:
    """Surface key -> refine's name for it: kept names and pruned ones (whose images the page follows)."""
    out: dict[str, str] = {}
    for e in vocabulary:
        for s in [e["name"], *e.get("synonyms", [])]:
            if (k := name_key(s)) is not None:
                out.setdefault(k, e["name"])
    for p in merges.get("pruned", []):
        for s in [p["name"], *p.get("synonyms", [])]:
            if (k := name_key(s)) is not None:
                out.setdefault(k, p["name"])
    return out


def _label_facts(cfg: RunConfig, rows: pd.DataFrame) -> dict[str, Any]:
    statuses = rows["status"].value_counts()
    unparsable = rows[rows["status"] == "unparsable"]
    tin, tout = float(rows["input_tokens"].fillna(0).sum()), float(rows["output_tokens"].fillna(0).sum())
    # a request was made when it used tokens or took time (bad images never reach the MLLM)
    asked = int(((rows["input_tokens"].fillna(0) > 0) | (rows["output_tokens"].fillna(0) > 0)
                 | (rows["latency_s"].fillna(0) > 0)).sum())  # fmt: skip
    return {
        "images": int(rows["uri"].nunique()),
        "answers": int(len(rows)),
        "named": int(statuses.get("ok", 0)),
        "unparsable": int(len(unparsable)),
        "refusals": int(sum(_is_refusal(str(a)) for a in unparsable["raw_answer"].fillna(""))),
        "mllm_errors": int(statuses.get("mllm_error", 0)),
        "bad_images": int(rows.loc[rows["status"] == "bad_image", "uri"].nunique()),
        "requests": asked,
        "input_tokens": int(tin),
        "output_tokens": int(tout),
        "cost_usd": round(float(cfg.label.prices.mllm_usd(tin, tout, asked)), 6),
        "model": str(rows["model"].iloc[0]) if len(rows) else None,
    }


def _cascade_facts(rows: pd.DataFrame | None) -> dict[str, Any] | None:
    if rows is None or rows.empty:
        return None
    routed = rows["status"].eq("routed") | rows["source"].eq("mllm")
    return {
        "images": int(len(rows)),
        "by_source": {str(k): int(v) for k, v in rows["source"].value_counts().items()},
        "routed": int(routed.sum()),
        "named_by_mllm": int(rows["source"].eq("mllm").sum()),
        "spend_usd": round(float(rows["mllm_cost_usd"].fillna(0).sum()), 6),
    }


def domain_data(cfg: RunConfig, domain: str, labels: pd.DataFrame, refine: tuple, predictions: pd.DataFrame | None,
                truth: dict[str, str] | None, st: Storage) -> DomainData:  # fmt: skip
    vocab_all, merges_all, candidates, neighbors = refine
    vocabulary = [e for e in vocab_all if e["domain"] == domain]
    merges = merges_all.get(domain, {})
    bundle, bundle_names, train_pruned = _bundle(cfg, st, domain)
    names = bundle_names if bundle_names is not None else [e["name"] for e in vocabulary]
    known = set(names)
    key_name = _name_of_key(vocabulary, merges)
    images: dict[str, ImageView] = {}
    surfaces: dict[str, Counter] = {}
    raw_examples: dict[str, list[str]] = {}

    rows = labels[labels["domain"] == domain]
    for uri, label, status, raw in zip(rows["uri"], rows["label"], rows["status"], rows["raw_answer"], strict=True):
        view = images.setdefault(uri, ImageView(uri))
        if raw is not None and status in ("ok", "unparsable"):
            view.answers.append(str(raw))
        name = key_name.get(name_key(label) or "") if status == "ok" else None
        if name is None:
            continue
        view.said.append(name)
        surface = clean_surface(label) or label  # the form refine's vocabulary and merges.json list
        view.surfaces.append(surface)
        surfaces.setdefault(name, Counter())[surface] += 1
        examples = raw_examples.setdefault(name, [])
        if raw and raw.strip() != label and raw not in examples and len(examples) < 3:
            examples.append(raw)  # format noise the parser removed: what the MLLM really wrote

    for r in candidates[candidates["domain"] == domain].itertuples(index=False):
        view = images.setdefault(r.uri, ImageView(r.uri))
        view.candidates = {str(n): float(c) for n, c in zip(r.candidates, r.confidences, strict=True)}
        view.name = next((n for n in view.candidates if n in known), None)
        view.named_by = "candidates" if view.name else ""

    pred_rows = predictions[predictions["domain"] == domain] if predictions is not None else None
    if pred_rows is not None:
        for r in pred_rows.itertuples(index=False):
            view = images.setdefault(r.uri, ImageView(r.uri))
            view.clip = {str(n): float(s) for n, s in zip(r.top_k_names if r.top_k_names is not None else [],
                                                           r.top_k_scores if r.top_k_scores is not None else [],
                                                           strict=True)}  # fmt: skip
            if r.source == "mllm" and r.name is not None:
                view.mllm = {str(r.name): float(r.score or 0.0)}
            view.name = None if r.name is None else str(r.name)
            view.named_by = "classify" if view.name else ""

    if neighbors is not None:
        uri_of = dict(zip(rows["image_id"], rows["uri"], strict=True))
        for r in neighbors[neighbors["domain"] == domain].itertuples(index=False):
            if (uri := uri_of.get(r.image_id)) in images:
                images[uri].neighbours = [(uri_of[j], float(s)) for j, s in zip(r.neighbors, r.similarities, strict=True)
                                          if j in uri_of]  # fmt: skip

    if truth is not None:
        for view in images.values():
            view.truth = truth.get(uri_key(view.uri))

    meta = next((d.meta_class for d in cfg.data.domains if d.name == domain), None)
    return DomainData(domain, meta, names, vocabulary, merges, train_pruned, bundle, images, surfaces, raw_examples,
                      _label_facts(cfg, rows), _cascade_facts(pred_rows), truth is not None)


def gather(cfg: RunConfig, st: Storage) -> tuple[list[DomainData], dict[str, Any]]:
    """Every domain the run touched, in config order, and the run-wide facts (label and classify summaries)."""
    labels = _labels(cfg, st)
    refine = _refine(cfg, st)
    predictions = _predictions(cfg, st)
    truth = read_truth(cfg, st)
    order = [d.name for d in [*cfg.data.domains, *cfg.classify.domains]]
    present = set(labels["domain"].dropna()) | (set(predictions["domain"]) if predictions is not None else set())
    domains = [d for d in dict.fromkeys(order) if d in present] + sorted(present - set(order))
    out = [domain_data(cfg, d, labels, refine, predictions, truth.get(d), st) for d in domains]
    run = {
        "workdir": cfg.storage.workdir,
        "label_summary": _read_json(st, cfg.paths.label_summary),
        "classify_summary": _read_json(st, join(predictions_uri(cfg), "_summary.json")),
        "refine_summary": _read_json(st, cfg.paths.refine_summary),
    }
    return out, run
