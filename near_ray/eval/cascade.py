"""The cascade's cost-accuracy curve on the test split: the fine-tuned CLIP answers, its least confident
test images are answered by the MLLM instead.

For each routed fraction f (``eval.cascade_fractions``), the f·N least confident readable test images
(calibrated confidence, the classify stage's rule) take the direct MLLM's answer, mapped onto the
bundle's vocabulary as the classify stage maps it (an image the MLLM gave no name keeps the CLIP's);
the rest keep the CLIP's. Nothing is asked anew: the MLLM's answers and their costs are the direct-
MLLM baseline's labels table, read back. Cost per 1,000 images = the CLIP's price per 1k plus the
routed images' MLLM cost. The report names the cheapest point whose cACC reaches the direct MLLM's.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from near_ray.classify.calibration import expected_calibration_error, temperature_scale
from near_ray.classify.cascade import mllm_answers
from near_ray.config import RunConfig
from near_ray.data.truth import uri_key
from near_ray.errors import NearRayError
from near_ray.eval.metrics import View, by_domain, hungarian_match, registered
from near_ray.storage import Storage, join

if TYPE_CHECKING:
    import pandas as pd

    from near_ray.eval.metrics import SemanticAccuracy
    from near_ray.model.bundle import Bundle

log = logging.getLogger(__name__)


def evaluate_cascade(
    cfg: RunConfig,
    st: Storage,
    test: pd.DataFrame,
    bundle: Bundle,
    probs: list[np.ndarray | None],
    direct: dict[str, Any],
    sacc: SemanticAccuracy,
    out: str | None = None,
) -> dict[str, Any]:
    """``cascade`` (the curve), ``cascade_best``, ``cascade_calibration`` and, with ``out``, the plot."""
    temperature, calibration = _temperature(cfg, st, bundle)
    readable = [i for i, p in enumerate(probs) if p is not None]
    conf = np.full(len(test), np.inf)  # unreadable images are never routed: the MLLM cannot read them either
    clip: list[str | None] = [None] * len(test)
    for i in readable:
        row = np.asarray(probs[i], dtype=np.float64)[None, :]
        conf[i] = float(temperature_scale(row, temperature).max())
        clip[i] = bundle.names[int(row.argmax())]
    answers = _mllm_answers(cfg, st, test, bundle, direct["labels"])
    keys = [uri_key(u) for u in test["uri"]]
    order = sorted(readable, key=lambda i: (conf[i], i))
    domains, truth = test["domain"].tolist(), test["species"].tolist()
    curve = []
    for f in cfg.eval.cascade_fractions:
        routed = order[: min(len(order), math.floor(f * len(test) + 0.5))]
        names, usd = list(clip), 0.0
        for i in routed:
            a = answers.get((domains[i], keys[i]))
            if a is not None:
                usd += a.cost_usd
                names[i] = a.name or clip[i]
        m = by_domain(domains, truth, names, sacc)
        scores = {s.name: m[s.name] for s in registered(View.BRIEF)}
        curve.append({"routed_fraction": f, "routed": len(routed), **scores,
                      "cost_per_1k": cfg.label.prices.clip_per_1k_images + 1000 * usd / len(test)})  # fmt: skip
    direct_cacc, direct_cost = direct.get("cacc"), direct.get("cost_per_1k")
    calibration.update(_test_ece(domains, truth, clip, conf, readable, bundle, probs))
    result = {"cascade": curve, "cascade_best": _best(curve, direct_cacc, direct_cost),
              "cascade_calibration": calibration, "cascade_method": cfg.train.method}  # fmt: skip
    if out is not None:
        result["cascade_plot"] = _plot(curve, direct_cacc, direct_cost, join(out, "cascade.png"), st)
    return result


def _temperature(cfg: RunConfig, st: Storage, bundle: Bundle) -> tuple[float, dict[str, Any]]:
    """The classify stage's calibration of this bundle (read from storage, or fitted on the discovery set)."""
    from near_ray.classify.stage import calibrate_bundles, resolve_targets

    ccfg = cfg.model_copy(deep=True)
    ccfg.classify.bundle, ccfg.classify.bundles = bundle.uri, {}
    try:
        targets, vocabularies = resolve_targets(ccfg, cfg.data.domains, st)
        record = calibrate_bundles(ccfg, targets, vocabularies, st).get(bundle.uri, {})
    except NearRayError as e:
        record = {"temperature": 1.0, "fitted": False, "reason": str(e)}
    keys = ("temperature", "fitted", "reason", "images", "ece_before", "ece_after")
    return float(record.get("temperature", 1.0)), {k: record[k] for k in keys if k in record}


def _mllm_answers(cfg: RunConfig, st: Storage, test: pd.DataFrame, bundle: Bundle, labels_uri: str) -> dict:
    from near_ray.label.backends import model_name
    from near_ray.label.table import read_labels_table

    table = read_labels_table(labels_uri, st)
    if table is None:
        return {}
    labels = table.to_pandas()
    labels["uri"] = labels["uri"].map(uri_key)
    out = {}
    for domain, rows in labels[labels["uri"].isin({uri_key(u) for u in test["uri"]})].groupby("domain"):
        inner = domain if domain in bundle.domains else None
        found = mllm_answers(rows, bundle.vocabulary, inner, cfg.label.prices,
                             current=(cfg.label.prompt_version, model_name(cfg.label)))
        out.update({(domain, u): a for u, a in found.items()})
    return out


def _test_ece(domains: list[str], truth: list[str], clip: list[str | None], conf: np.ndarray, readable: list[int],
              bundle: Bundle, probs: list[np.ndarray | None]) -> dict[str, Any]:  # fmt: skip
    """ECE of the raw and the calibrated confidence on the test split; an answer is correct when its
    name is matched to the true class by the Hungarian assignment (the one cACC counts)."""
    if not readable:
        return {}
    true = [f"{domains[i]}/{truth[i]}" for i in readable]
    pred = [f"{domains[i]}/{clip[i]}" for i in readable]
    match = hungarian_match(true, pred)[0]
    correct = np.array([match.get(p) == t for p, t in zip(pred, true, strict=True)], dtype=float)
    raw = np.array([float(np.max(probs[i])) for i in readable])
    return {"test_ece_before": round(expected_calibration_error(raw, correct), 6),
            "test_ece_after": round(expected_calibration_error(conf[readable], correct), 6)}  # fmt: skip


def _best(curve: list[dict[str, Any]], direct_cacc: float | None, direct_cost: float | None) -> dict[str, Any] | None:
    if direct_cacc is None:
        return None
    good = [c for c in curve if c["cacc"] >= direct_cacc - 1e-12]
    if not good:
        return None
    best = min(good, key=lambda c: (c["cost_per_1k"], c["routed_fraction"]))
    ratio = best["cost_per_1k"] / direct_cost if direct_cost else None
    return {**best, "direct_mllm_cacc": direct_cacc, "direct_mllm_cost_per_1k": direct_cost, "cost_ratio": ratio}


def _plot(curve: list[dict[str, Any]], direct_cacc: float | None, direct_cost: float | None, uri: str,
          st: Storage) -> str:  # fmt: skip
    from near_ray.eval.plots import _figure, _save

    fig, ax = _figure(6.5, 4.0)
    x = [c["cost_per_1k"] for c in curve]
    for s in [s for s in registered(View.BRIEF) if s.percent]:
        ax.plot(x, [100 * c[s.name] for c in curve], marker="o", label=f"cascade {s.title}")
    for c in curve:
        ax.annotate(f"{100 * c['routed_fraction']:.0f}%", (c["cost_per_1k"], 100 * c["cacc"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 4))  # fmt: skip
    if direct_cacc is not None and direct_cost:
        ax.scatter([direct_cost], [100 * direct_cacc], marker="*", s=140, color="black", label="direct MLLM cACC",
                   zorder=3)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("cost per 1,000 images (USD, log scale)")
    ax.set_ylabel("accuracy on the test split (%)")
    ax.set_title("CLIP → MLLM cascade: routed fraction of the least confident images")
    ax.legend(fontsize=8)
    return _save(fig, uri, st)


def render_cascade(report: dict[str, Any]) -> list[str]:
    """The report.md section (empty when the cascade was not evaluated)."""
    curve = report.get("cascade")
    if not curve:
        return []
    shown = registered(View.BRIEF)
    lines = ["", f"## CLIP → MLLM cascade ({report.get('cascade_method', 'near')} → direct MLLM)", "",
             "| routed | " + "".join(f"{s.title} | " for s in shown) + "cost / 1k images |",
             "|---:|" + "---:|" * (len(shown) + 1)]
    for c in curve:
        cells = "".join(f"{s.text(c.get(s.name), percent=True)} | " for s in shown)
        lines.append(f"| {100 * c['routed_fraction']:.0f}% | {cells}{c['cost_per_1k']:.4f} |")
    best = report.get("cascade_best")
    lines.append("")
    if best:
        ratio = f"{best['cost_ratio']:.3f}" if best.get("cost_ratio") is not None else "–"
        lines.append(f"Cheapest point at least as accurate as the direct MLLM (cACC {100 * best['direct_mllm_cacc']:.1f}): "
                     f"{100 * best['routed_fraction']:.0f}% routed, cACC {100 * best['cacc']:.1f}, "
                     f"{best['cost_per_1k']:.4f} USD per 1k images = {ratio} × the direct MLLM's cost.")  # fmt: skip
    else:
        lines.append("No routed fraction reaches the direct MLLM's cACC.")
    cal = report.get("cascade_calibration") or {}
    if cal:
        where = f"fitted on {cal['images']} discovery images" if cal.get("fitted") else f"not fitted: {cal.get('reason')}"
        ece = ", ".join(f"{k.replace('_', ' ')} {cal[k]:.3f}" for k in ("ece_before", "ece_after", "test_ece_before",
                                                                         "test_ece_after") if cal.get(k) is not None)
        lines.append(f"Routing confidence: temperature {cal.get('temperature', 1.0):.3f} ({where}); {ece}.")
    return lines
