"""The report's figures (matplotlib, Agg backend), written as PNG through ``Storage``.

Each plot reads what it needs; a missing input skips that plot with a note instead of failing the report.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from near_ray.errors import NearRayError
from near_ray.eval.metrics import View, registered
from near_ray.storage import Storage, join

log = logging.getLogger(__name__)


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=110)


def _save(fig: Any, uri: str, storage: Storage) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def accuracy_by_method(methods: dict[str, dict[str, Any]], uri: str, storage: Storage) -> str:
    """Grouped bars: the brief percent metrics (cACC and sACC) of every evaluated method."""
    names = list(methods)
    shown = [s for s in registered(View.BRIEF) if s.percent]
    width = 0.8 / len(shown)
    fig, ax = _figure()
    x = np.arange(len(names))
    for i, s in enumerate(shown):
        values = [100 * float(methods[m].get(s.name) or 0.0) for m in names]
        bars = ax.bar(x + (i - (len(shown) - 1) / 2) * width, values, width=width, label=s.title)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("accuracy on the test split (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Accuracy by method")
    ax.legend()
    return _save(fig, uri, storage)


def candidate_set_sizes(sizes: Sequence[int], uri: str, storage: Storage) -> str:
    fig, ax = _figure(6, 3.5)
    top = max(sizes)
    ax.hist(sizes, bins=np.arange(0.5, top + 1.5, 1.0), edgecolor="black")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.yaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("candidate labels per image")
    ax.set_ylabel("images")
    ax.set_title(f"Candidate-set sizes (n={len(sizes)}, mean {np.mean(sizes):.2f})")
    return _save(fig, uri, storage)


def clean_fraction(curves: dict[str, list[tuple[int, float]]], uri: str, storage: Storage) -> str:
    fig, ax = _figure(6, 3.5)
    for method, points in curves.items():
        epochs, values = zip(*points, strict=True)
        ax.plot(epochs, [100 * v for v in values], marker="o", label=method)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("epoch")
    ax.set_ylabel("samples judged clean by the GMM (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Clean fraction over epochs")
    ax.legend()
    return _save(fig, uri, storage)


def confusions(
    true_names: Sequence[str], pred_names: Sequence[str | None], uri: str, storage: Storage, top: int = 15
) -> str:
    """True class × predicted name counts among the ``top`` true classes with the most errors."""
    pred = ["<none>" if p is None else p for p in pred_names]
    errors = Counter(t for t, p in zip(true_names, pred, strict=True) if t != p)
    classes = [c for c, _ in errors.most_common(top)] or sorted(set(true_names))[:top]
    rows = [i for i, t in enumerate(true_names) if t in set(classes)]
    columns = [c for c, _ in Counter(pred[i] for i in rows).most_common(top)]
    matrix = np.zeros((len(classes), len(columns)), dtype=int)
    for i in rows:
        if pred[i] in columns:
            matrix[classes.index(true_names[i]), columns.index(pred[i])] += 1
    fig, ax = _figure(max(5.0, 2.5 + 0.45 * len(columns)), max(3.5, 2.0 + 0.4 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    for (r, c), v in np.ndenumerate(matrix):
        if v:
            ax.text(
                c, r, str(v), ha="center", va="center", fontsize=7, color="white" if v > matrix.max() / 2 else "black"
            )
    ax.set_xticks(range(len(columns)), [_short(c) for c in columns], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), [_short(c) for c in classes], fontsize=7)
    ax.set_xlabel("predicted name")
    ax.set_ylabel("true class")
    ax.set_title("Most confused classes")
    return _save(fig, uri, storage)


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


# ------------------------------------------------------------------------------------------ inputs
def _candidate_sizes(uri: str, storage: Storage) -> list[int]:
    table = storage.read_parquet(uri)
    return [len(c or []) for c in table.column("candidates").to_pylist()]


def _clean_curves(bundle_uris: dict[str, str], storage: Storage) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for method, bundle in bundle_uris.items():
        try:
            epochs = storage.read_json(join(bundle, "metrics.json")).get("epochs") or []
        except NearRayError:
            continue
        points = [(int(e["epoch"]), float(e["clean_fraction"])) for e in epochs if e.get("clean_fraction") is not None]
        if points:
            curves[method] = points
    return curves


def write_plots(
    out: str,
    storage: Storage,
    methods: dict[str, dict[str, Any]],
    candidates_uri: str,
    bundle_uris: dict[str, str],
    confusion_input: tuple[str, list[str], list[str | None]] | None,
    top_classes: int = 15,
) -> dict[str, str]:
    """Every plot whose input exists: {plot name: PNG URI, or 'skipped: why'}."""
    result: dict[str, str] = {}

    def attempt(name: str, make: Any) -> None:
        try:
            result[name] = make()
        except _Skip as e:
            result[name] = f"skipped: {e}"
        except NearRayError as e:
            result[name] = f"skipped: {e}"
        log.info("plot %s: %s", name, result[name])

    def accuracy() -> str:
        if not methods:
            raise _Skip("no method was evaluated")
        return accuracy_by_method(methods, join(out, "accuracy_by_method.png"), storage)

    def candidates() -> str:
        if not storage.exists(candidates_uri):
            raise _Skip(f"no candidate sets at {candidates_uri}")
        sizes = _candidate_sizes(candidates_uri, storage)
        if not sizes:
            raise _Skip(f"{candidates_uri} is empty")
        return candidate_set_sizes(sizes, join(out, "candidate_set_sizes.png"), storage)

    def clean() -> str:
        curves = _clean_curves(bundle_uris, storage)
        if not curves:
            raise _Skip("no bundle's metrics.json has epochs with clean_fraction")
        return clean_fraction(curves, join(out, "clean_fraction.png"), storage)

    def confusion() -> str:  # the served method's (``confusion_input``: its name, truth, predictions)
        if confusion_input is None:
            raise _Skip("the served method was not evaluated")
        method, truth, preds = confusion_input
        return confusions(truth, preds, join(out, f"confusions_{method}.png"), storage, top=top_classes)

    attempt("accuracy_by_method", accuracy)
    attempt("candidate_set_sizes", candidates)
    attempt("clean_fraction", clean)
    attempt("confusions", confusion)
    return result


class _Skip(Exception):
    pass
