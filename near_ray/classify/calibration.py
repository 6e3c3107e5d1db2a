"""A routing confidence that means what it says: temperature scaling and the expected calibration error.

The bundle's probabilities are a softmax of ``logit_scale · cos``; a fine-tuned CLIP is usually over-
or under-confident, so "route everything below 0.5" would not send the images that are wrong half of
the time. Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fitted to
minimize the negative log-likelihood of reference labels; it never changes an image's top name.
Here the reference is the discovery set: each training image's MLLM majority label (refine's
``candidates.parquet``), the only labels a vocabulary-free run has. Those images were trained on, so
the fitted T corrects the model's confidence on labels it has seen; the evaluation reports the
calibration error again on the test split, against ground truth, where it exists.

Softmax of ``log p / T`` equals softmax of ``logits / T`` (the two differ by a constant per row), so
everything here works from the probabilities the bundle gives; entries with probability 0 (outside
the domain, or padding) stay 0 at every temperature.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
_T_RANGE = (0.02, 50.0)
_TINY = 1e-38  # a probability that underflowed to 0 inside the domain: very unlikely, not impossible


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rows of probabilities -> the same rows at temperature T (T > 1 softens, T < 1 sharpens)."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return p
    with np.errstate(divide="ignore"):
        z = np.log(p) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``targets`` (indices) under the rows at temperature T."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        z = np.log(p) / temperature  # 0 stays -inf: padding and other domains carry no mass at any T
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    z_target = np.log(np.maximum(p[np.arange(len(targets)), targets], _TINY)) / temperature
    return float(np.mean(log_norm - z_target))


def fit_temperature(probs: np.ndarray, targets: np.ndarray) -> float:
    """The T minimizing the NLL of ``targets`` (1.0 when there is nothing to fit on)."""
    from scipy.optimize import minimize_scalar

    if len(targets) == 0:
        return 1.0
    lo, hi = np.log(_T_RANGE[0]), np.log(_T_RANGE[1])
    res = minimize_scalar(lambda log_t: nll(probs, targets, float(np.exp(log_t))), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-4})  # fmt: skip
    return float(np.exp(res.x))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: Σ_bins |bin| / N · |accuracy(bin) − mean confidence(bin)|, equal-width bins over [0, 1]."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return float("nan")
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total / len(confidence))


def calibration_report(probs: np.ndarray, targets: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE and NLL before (T = 1) and after scaling, on the rows it was given."""
    correct = probs.argmax(axis=1) == targets  # scaling never changes the argmax
    scaled = temperature_scale(probs, temperature)
    return {
        "ece_before": round(expected_calibration_error(probs.max(axis=1), correct), 6),
        "ece_after": round(expected_calibration_error(scaled.max(axis=1), correct), 6),
        "nll_before": round(nll(probs, targets, 1.0), 6),
        "nll_after": round(nll(probs, targets, temperature), 6),
        "accuracy": round(float(correct.mean()), 6) if len(correct) else float("nan"),
    }
