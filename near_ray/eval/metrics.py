"""The field's metrics for vocabulary-free recognition (FineR, ICLR 2024; used by NeaR).

- cACC (``cluster_accuracy``): predicted names are clusters; the best one-to-one matching of
  clusters to true classes (Hungarian) decides which predictions count as correct.
- sACC (``SemanticAccuracy``): mean raw cosine between the Sentence-BERT embeddings of the predicted
  name and the true class name; FineR leaves the (cos+1)/2 mapping out, so do we.
- NMI and ARI (scikit-learn) on the same cluster assignment.

Predictions may be ``None`` (no name: an unparsable MLLM answer). For the clustering metrics all
``None`` predictions form one cluster; for sACC a missing name scores 0.

Every metric is one ``Metric`` record in a registry (``register_metric``): its key in the result JSON,
its column title, its format and the views that show it. ``by_domain`` computes every registered metric,
and the report, the cascade, the evaluate log line, the job's summary and the demo's table list the
registered ones: adding a metric is one registration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from near_ray.model.sentence import DEFAULT_SBERT, load_sentence_encoder

log = logging.getLogger(__name__)

NO_PREDICTION = "<none>"


def contingency(y_true: Sequence[Any], y_pred: Sequence[Any],
                weights: Sequence[float] | None = None) -> tuple[np.ndarray, list, list]:
    """Counts [n_pred, n_true] (or summed ``weights``) and the label lists of both axes (labels may be strings)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    pred_labels, pi = np.unique(np.array([_key(p) for p in y_pred], dtype=object), return_inverse=True)
    true_labels, ti = np.unique(np.array([_key(t) for t in y_true], dtype=object), return_inverse=True)
    counts = np.zeros((len(pred_labels), len(true_labels)), dtype=np.int64 if weights is None else np.float64)
    np.add.at(counts, (pi, ti), 1 if weights is None else np.asarray(weights, dtype=np.float64))
    return counts, list(pred_labels), list(true_labels)


def hungarian(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Hungarian matching, the one definition (scipy's ``linear_sum_assignment``, maximizing): rows and
    columns of the one-to-one assignment of predicted to true labels that covers the most of ``counts``
    [n_pred, n_true]. Rectangular matrices are fine."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(counts, maximize=True)


def hungarian_match(y_true: Sequence[Any], y_pred: Sequence[Any],
                    weights: Sequence[float] | None = None) -> tuple[dict[str, str], float]:
    """cACC's matching: the one-to-one assignment of predicted labels to true ones that covers the most images
    (or weight). Returns predicted -> true for the pairs sharing at least one image, and the matched count."""
    if len(y_true) == 0:
        return {}, 0.0
    counts, pred, true = contingency(y_true, y_pred, weights)
    rows, cols = hungarian(counts)
    return ({str(pred[r]): str(true[c]) for r, c in zip(rows, cols, strict=True) if counts[r, c] > 0},
            float(counts[rows, cols].sum()))


def _key(label: Any) -> str:
    return NO_PREDICTION if label is None else str(label)


def cluster_accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """cACC: matched images / N under the Hungarian one-to-one assignment of predicted names to classes."""
    if len(y_true) == 0:
        return float("nan")
    return hungarian_match(y_true, y_pred)[1] / len(y_true)


def nmi(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score([_key(t) for t in y_true], [_key(p) for p in y_pred]))


def ari(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score([_key(t) for t in y_true], [_key(p) for p in y_pred]))


class SemanticAccuracy:
    """sACC with one cached encoder; ``model`` names what was used, for the report."""

    def __init__(self, model: str = DEFAULT_SBERT, encoder: Any | None = None) -> None:
        self.model = model
        self._encoder = encoder

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            self._encoder = load_sentence_encoder(self.model)
        return self._encoder

    def embed(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """L2-normalized embedding of each distinct name (no prompt: FineR encodes the bare name)."""
        unique = sorted(set(names))
        if not unique:
            return {}
        vecs = np.asarray(self.encoder.encode(unique, batch_size=256, convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return dict(zip(unique, vecs, strict=True))

    def similarities(self, pred_names: Sequence[str | None], true_names: Sequence[str]) -> np.ndarray:
        """Per-image cosine between predicted and true name; 0 where there is no prediction."""
        if len(pred_names) != len(true_names):
            raise ValueError(f"{len(true_names)} true names but {len(pred_names)} predictions")
        emb = self.embed([n for n in pred_names if n is not None] + list(true_names))
        return np.array(
            [0.0 if p is None else float(emb[p] @ emb[t]) for p, t in zip(pred_names, true_names, strict=True)],
            dtype=np.float64,
        )

    def __call__(self, pred_names: Sequence[str | None], true_names: Sequence[str]) -> float:
        if len(true_names) == 0:
            return float("nan")
        return float(self.similarities(pred_names, true_names).mean())


def semantic_accuracy(
    pred_names: Sequence[str | None], true_names: Sequence[str], model: str | SemanticAccuracy = DEFAULT_SBERT
) -> float:
    """sACC: mean raw cosine of the Sentence-BERT embeddings of predicted and true names."""
    scorer = model if isinstance(model, SemanticAccuracy) else SemanticAccuracy(model)
    return scorer(pred_names, true_names)


# ------------------------------------------------------------------------------------------ the registry
class View(IntEnum):
    """Where a metric is shown; a view shows every metric whose ``view`` is at most its own."""

    SUMMARY = 0  # the one-line summaries: the job's last line, the run's closing block
    BRIEF = 1  # the narrow tables: per domain, the cascade, the accuracy plots, the evaluate log line
    TABLE = 2  # the report's table and the demo's table (a new metric's default)
    JSON = 3  # the result JSON only


@dataclass(frozen=True)
class Metric:
    """One metric. ``name``: its key in the result JSON; ``title``: its column header; ``fmt``: its
    plain-text format (the demo's table, the summaries); ``percent``: report.md shows it as 100× with one
    decimal; ``view``: the briefest view that shows it. ``compute(y_true, y_pred) -> float`` scores the
    labels as clusters (overall on domain-qualified labels); a ``semantic`` metric's
    ``compute(true_names, pred_names, scorer)`` returns per-image scores of the bare names by the sentence
    encoder (a ``SemanticAccuracy``), and its value is their mean; it is computed only with a scorer."""

    name: str
    title: str
    compute: Callable[..., Any]
    fmt: str = "{:.3f}"
    percent: bool = True
    higher_is_better: bool = True
    view: View = View.TABLE
    semantic: bool = False

    def text(self, value: Any, percent: bool = False) -> str:
        """A table cell: "–" where there is no value; percent (report.md): None and NaN are "–"."""
        if percent and self.percent:
            none = value is None or (isinstance(value, float) and math.isnan(value))
            return "–" if none else f"{100 * float(value):.1f}"
        return self.fmt.format(value) if isinstance(value, (int, float)) else "–"


_REGISTRY: dict[str, Metric] = {}
_RESERVED = {"n", "domains"}  # the other keys ``by_domain`` writes


def register_metric(metric: Metric) -> Metric:
    """Add a metric: every registered metric is computed by ``by_domain`` and listed by the views its
    ``view`` reaches, after those already registered. The registry is per process: register on import."""
    if metric.name in _REGISTRY or metric.name in _RESERVED:
        raise ValueError(f"a metric named {metric.name!r} is already registered (or the name is reserved)")
    _REGISTRY[metric.name] = metric
    return metric


def unregister_metric(name: str) -> Metric:
    return _REGISTRY.pop(name)


def registered(view: View = View.JSON) -> list[Metric]:
    """The metrics ``view`` shows, in registration order (the column order)."""
    return [m for m in _REGISTRY.values() if m.view <= view]


for _metric in (
    Metric("cacc", "cACC", cluster_accuracy, view=View.SUMMARY),
    Metric("sacc", "sACC", lambda t, p, scorer: scorer.similarities(p, t), view=View.BRIEF, semantic=True),
    Metric("nmi", "NMI", nmi),
    Metric("ari", "ARI", ari),
):
    register_metric(_metric)


def _mean(scores: np.ndarray) -> float:
    return float(scores.mean()) if len(scores) else float("nan")


def all_metrics(
    true_names: Sequence[str], pred_names: Sequence[str | None], sacc: SemanticAccuracy | None = None
) -> dict[str, float]:
    """N and every registered metric for one set of predictions: the clustering ones in registration
    order, then the semantic ones (sACC) when a scorer is given."""
    out: dict[str, Any] = {"n": len(true_names)}
    for m in registered():
        if not m.semantic:
            out[m.name] = m.compute(true_names, pred_names) if len(true_names) else float("nan")
    for m in [m for m in registered() if m.semantic] if sacc is not None else []:
        out[m.name] = _mean(np.asarray(m.compute(true_names, pred_names, sacc), dtype=np.float64))
    return out


def by_domain(
    domains: Sequence[str],
    true_names: Sequence[str],
    pred_names: Sequence[str | None],
    sacc: SemanticAccuracy | None = None,
) -> dict[str, Any]:
    """Metrics overall and per domain. Overall clustering metrics qualify every label with its domain,
    so that a name predicted in two domains is two clusters (the classifier is restricted per domain)."""
    overall_true = [f"{d}/{t}" for d, t in zip(domains, true_names, strict=True)]
    overall_pred = [None if p is None else f"{d}/{p}" for d, p in zip(domains, pred_names, strict=True)]
    result = all_metrics(overall_true, overall_pred)
    # the semantic metrics score the bare names, once: each domain's value is the mean over its rows
    semantic = [m for m in registered() if m.semantic] if sacc is not None else []
    scores = {m.name: np.asarray(m.compute(true_names, pred_names, sacc), dtype=np.float64) for m in semantic}
    result.update({k: _mean(v) for k, v in scores.items()})
    per = {}
    idx: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        idx.setdefault(d, []).append(i)
    for d, rows in sorted(idx.items()):
        per[d] = all_metrics([true_names[i] for i in rows], [pred_names[i] for i in rows])
        per[d].update({k: float(v[rows].mean()) for k, v in scores.items()})
    result["domains"] = per
    return result


def prediction_spread(
    domains: Sequence[str], true_names: Sequence[str], pred_names: Sequence[str | None]
) -> dict[str, dict[str, Any]]:
    """Per domain: how many distinct names a method predicts against how many classes there are, and
    the largest share of the test images one name takes. A method that collapses onto one or two names
    can still score a high sACC when those names share words with the true names."""
    out: dict[str, dict[str, Any]] = {}
    for d in sorted(set(domains)):
        rows = [i for i, x in enumerate(domains) if x == d]
        preds = [pred_names[i] for i in rows if pred_names[i] is not None]
        classes = len({true_names[i] for i in rows})
        counts: dict[str, int] = {}
        for p in preds:
            counts[p] = counts.get(p, 0) + 1
        top = max(counts, key=lambda n: (counts[n], n)) if counts else None
        share = counts[top] / len(rows) if top else 0.0
        out[d] = {"classes": classes, "distinct_names": len(counts), "top_name": top, "top_share": round(share, 4),
                  "collapsed": bool(classes >= 3 and (len(counts) <= classes / 2 or share >= max(3 / classes, 0.2)))}
    return out
