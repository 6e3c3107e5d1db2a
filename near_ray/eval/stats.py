"""Comparing methods across seeds: a paired difference and its 95% interval (Student's t).

Runs of two methods that share a seed share its labels, its training order and its test images, so
their difference per seed removes what the seed does to both: the interval of the mean paired
difference is much tighter than the two methods' separate spreads suggest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
