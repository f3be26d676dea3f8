"""Metrics of :mod:`pipelines.pneumonia.train`: AUROC, a patient-level
bootstrap confidence interval, the Youden operating point, sensitivity and
specificity at a threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["auroc", "bootstrap_ci", "mean_auroc", "sensitivity", "specificity", "youden_threshold"]


# --------------------------------------------------------------------------- metrics


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn). Raises ValueError when ``y``
    has a single class."""
    y = np.asarray(y)
    if y.min() == y.max():
        raise ValueError(f"AUROC undefined: all {len(y)} labels are {y.flat[0]}")
    return float(roc_auc_score(y, score))


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    score: np.ndarray,
    groups: Sequence[str],
    n_resamples: int,
    seed: int,
) -> tuple[float, float, int]:
    """95 % percentile bootstrap interval of ``metric(y, score)``, resampling
    groups (patients) with replacement and keeping all their images.

    Resamples where the metric is undefined (one class only) are skipped.

    Returns
    -------
    ``(low, high, n_valid_resamples)``.
    """
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[g] for g in pick])
        try:
            values.append(metric(y[idx], score[idx]))
        except ValueError:
            continue
    if not values:
        raise ValueError("bootstrap: the metric was undefined in every resample")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high), len(values)


def youden_threshold(y: np.ndarray, score: np.ndarray) -> tuple[float, float, float]:
    """Threshold maximising sensitivity + specificity - 1 (Youden 1950).

    Returns ``(threshold, sensitivity, specificity)``; a score at or above the
    threshold is called positive.
    """
    fpr, tpr, thr = roc_curve(y, score)
    finite = np.isfinite(thr)
    j = np.where(finite, tpr - fpr, -np.inf)
    k = int(np.argmax(j))
    return float(min(thr[k], 1.0)), float(tpr[k]), float(1 - fpr[k])


def sensitivity(y: np.ndarray, s: np.ndarray, t: float) -> float:
    if y.sum() == 0:
        raise ValueError("no positives")
    return float((s[y == 1] >= t).mean())


def specificity(y: np.ndarray, s: np.ndarray, t: float) -> float:
    if (y == 0).sum() == 0:
        raise ValueError("no negatives")
    return float((s[y == 0] < t).mean())



def mean_auroc(y: np.ndarray, p: np.ndarray, mask: np.ndarray) -> float:
    vals = [auroc(y[:, j], p[:, j]) for j in np.flatnonzero(mask) if 0 < y[:, j].sum() < len(y)]
    if not vals:
        raise ValueError("mean AUROC undefined: no finding has both classes")
    return float(np.mean(vals))
