"""Comparing methods across runs: paired differences and their 95% intervals.

Runs of two methods that share a seed share its labels, its training order and its test images, so
their difference per seed removes what the seed does to both: the interval of the mean paired
difference is much tighter than the two methods' separate spreads suggest.

Only independent units count towards an interval. A unit is what is drawn independently (a synthesis
draw × an annotator seed); runs inside a unit that share its MLLM labels (the two starting CLIPs) are a
factor inside it, not more units: ``clustered_difference`` averages them first, and
``bootstrap_difference`` also resamples the test images inside each unit, so the interval carries the
test set's own variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean of a - b over paired runs, with a 95% interval; ``n`` pairs. An interval needs two pairs."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} runs against {len(b)}: a paired difference needs the same runs on both sides")
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n == 0:
        return {"mean_diff": None, "ci95": [None, None], "n": 0}
    mean = sum(diffs) / n
    if n < 2:
        return {"mean_diff": mean, "ci95": [None, None], "n": n}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean_diff": mean, "ci95": [mean - half, mean + half], "n": n}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def clustered_difference(diffs: Mapping[Hashable, Sequence[float]]) -> dict[str, Any]:
    """Mean paired difference over independent units, each unit's runs averaged first (t interval).

    ``diffs`` maps a unit (e.g. (synthesis seed, annotator seed)) to the differences of its runs.
    ``n`` is the number of units, ``runs`` the number of runs.
    """
    per_unit = [sum(v) / len(v) for v in diffs.values() if len(v)]
    out = paired_difference(per_unit, [0.0] * len(per_unit))
    return {**out, "runs": sum(len(v) for v in diffs.values())}


def bootstrap_difference(
    units: Sequence[Sequence[tuple[Sequence[Any], Sequence[Any], Sequence[Any]]]],
    metric: Callable[[Sequence[Any], Sequence[Any]], float],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """metric(A) − metric(B) with a hierarchical bootstrap interval: units, then test images inside each.

    ``units[u]`` lists the runs of unit ``u``, each ``(truth, pred_a, pred_b)`` over the unit's test images
    (runs of one unit share its test images, so one draw of image indices serves all of them). The
    point estimate is the mean over units of the mean over their runs; the interval is the 2.5 and 97.5
    percentiles of that estimate over ``n_boot`` resamples. ``metric(truth, pred)`` is, e.g., cACC.
    """
    import numpy as np

    units = [u for u in units if len(u)]
    if not units:
        return {"mean_diff": None, "ci95": [None, None], "n": 0, "runs": 0}
    arrays = [[tuple(np.asarray(x, dtype=object) for x in run) for run in unit] for unit in units]

    def unit_diff(runs: list, idx: Any) -> float:
        return sum(metric(t[idx], a[idx]) - metric(t[idx], b[idx]) for t, a, b in runs) / len(runs)

    full = [unit_diff(runs, slice(None)) for runs in arrays]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        picked = rng.integers(0, len(arrays), len(arrays))
        total = 0.0
        for u in picked:
            n_images = len(arrays[u][0][0])
            total += unit_diff(arrays[u], rng.integers(0, n_images, n_images))
        draws.append(total / len(picked))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"mean_diff": sum(full) / len(full), "ci95": [float(lo), float(hi)], "n": len(arrays),
            "runs": sum(len(u) for u in arrays), "n_boot": n_boot}
