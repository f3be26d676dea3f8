"""The figures of a validation.

Classification (a probability per case, a 0/1 label): AUROC (scikit-learn
``roc_auc_score``) with a 95 % percentile bootstrap interval that resamples
patients (Patient ID groups, so that a patient's images stay together);
sensitivity, specificity, accuracy, precision and F1 at a threshold
(positive when the probability is at or above it, as the pipelines decide);
a 10-bin calibration table (equal widths on [0, 1]); the ROC curve; the
same per subgroup (sex, age band, view position, manufacturer).

Segmentation (a label map per study): per region (a set of label values,
e.g. the BraTS regions WT = {1, 2, 4}, TC = {1, 4}, ET = {4}) MONAI's
``compute_dice`` and ``compute_hausdorff_distance(percentile=95)`` in mm
(the ground truth's voxel spacing), the prediction resampled onto the
ground truth's grid by nearest neighbour in patient space. Empty masks:

- ground truth and prediction both empty: Dice 1, HD95 not defined;
- exactly one of them empty: Dice 0, HD95 not defined;

an HD95 that is not defined is reported as such and left out of the mean
(the count of defined values is given). Intervals: 95 % percentile
bootstrap over studies; none for n = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BOOTSTRAP = 2000
SEED = 20250101
CALIBRATION_BINS = 10
AGE_BANDS = ((0, 18, "<18"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
SUBGROUPS = ("sex", "age_band", "view", "manufacturer")


def _f(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def age_band(age: str) -> str:
    """The band of a Patient's Age (0010,1010) AS value (``061Y``; days,
    weeks and months count as under 1 year); ``unknown`` when absent or malformed."""
    if len(age) != 4 or not age[:3].isdigit() or age[3] not in "DWMY":
        return "unknown"
    years = int(age[:3]) if age[3] == "Y" else 0
    return next(name for low, high, name in AGE_BANDS if low <= years < high)


def auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Area under the ROC curve, or None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None


def bootstrap_ci(stat: Callable[[np.ndarray], np.ndarray], groups: Sequence[str], n: int = BOOTSTRAP,
                 seed: int = SEED) -> tuple[float | None, float | None, int]:
    """95 % percentile interval of ``stat`` over ``n`` resamples of ``groups``
    (each group's cases drawn together, with replacement).

    ``stat(weights)`` gets a block of resamples as a (resamples, cases) array:
    how many times each case is in each resample, and returns one value per
    resample (NaN where undefined). Weights rather than index lists let the
    statistic run on numpy arrays, block by block, not once per resample in
    Python. Returns (low, high, resamples where ``stat`` was defined);
    (None, None, 0) with one group."""
    names, which = np.unique(np.array([str(x) for x in groups]), return_inverse=True)
    if len(names) < 2:
        return None, None, 0
    rng, g = np.random.default_rng(seed), len(names)
    block = max(1, 2_000_000 // max(g, len(which)))  # bounds the (resamples, cases) arrays to ~16 MB
    values = []
    for start in range(0, n, block):
        rows = min(block, n - start)
        drawn = rng.integers(0, g, (rows, g)) + g * np.arange(rows)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=rows * g).reshape(rows, g).astype(float)
        values.append(np.asarray(stat(counts[:, which]), float))
    v = np.concatenate(values)
    v = v[np.isfinite(v)]
    if not len(v):
        return None, None, 0
    return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)), len(v)


def weighted_auroc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of each row of case ``weights`` (resample counts): the
    Mann-Whitney form, P(p_pos > p_neg) + P(tie) / 2, which is the trapezoidal
    area :func:`sklearn.metrics.roc_auc_score` gives for the resampled cases.
    NaN where a row has no positive or no negative case."""
    order = np.argsort(p, kind="stable")
    ps, ys, w = p[order], y[order] == 1, weights[:, order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # one column per distinct probability
    pos = np.add.reduceat(w * ys, starts, axis=1)
    neg = np.add.reduceat(w * ~ys, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives with a strictly lower probability
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg), np.nan)


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Confusion counts and rates at ``threshold`` (positive when p >= it);
    a rate whose denominator is 0 is None."""
    pred = p >= threshold
    tp, fp = int(np.sum(pred & (y == 1))), int(np.sum(pred & (y == 0)))
    fn, tn = int(np.sum(~pred & (y == 1))), int(np.sum(~pred & (y == 0)))

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    sens, prec = ratio(tp, tp + fn), ratio(tp, tp + fp)
    f1 = 2 * prec * sens / (prec + sens) if sens is not None and prec is not None and prec + sens > 0 else None
    return {"threshold": _f(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "sensitivity": _f(sens),
            "specificity": _f(ratio(tn, tn + fp)), "accuracy": _f(ratio(tp + tn, len(y))), "precision": _f(prec),
            "f1": _f(f1)}


def calibration(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Per equal-width probability bin: count, mean probability, observed positive fraction."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        rows.append({"bin_low": _f(edges[b]), "bin_high": _f(edges[b + 1]), "n": n,
                     "mean_predicted": _f(p[sel].mean()) if n else None,
                     "observed": _f(y[sel].mean()) if n else None, "positives": int(y[sel].sum())})
    return rows


def _auroc_block(y: np.ndarray, p: np.ndarray, groups: Sequence[str]) -> dict:
    low, high, used = bootstrap_ci(lambda w: weighted_auroc(y, p, w), groups)
    return {"value": _f(auroc(y, p)), "ci95_low": _f(low), "ci95_high": _f(high), "resamples_defined": used,
            "ci_method": f"95 % percentile bootstrap, {BOOTSTRAP} resamples of patients (seed {SEED})"}


def classification_scores(y: Sequence[int], p: Sequence[float], patients: Sequence[str],
                          attributes: Mapping[str, Sequence[str]], thresholds: dict[str, float]) -> dict:
    """Every classification figure of the report (JSON-ready).

    ``patients``: the Patient ID of each case (the bootstrap's groups);
    ``attributes``: subgroup name -> each case's value; ``thresholds``:
    name (``card``, ``chosen``) -> probability threshold.

    Raises
    ------
    ValueError
        Lengths differ, or no case.
    """
    y_a, p_a = np.asarray(y, int), np.asarray(p, float)
    if not len(y_a) or len(y_a) != len(p_a) or len(patients) != len(y_a):
        raise ValueError(f"expected as many labels, probabilities and patients, got {len(y_a)}, {len(p_a)}, {len(patients)}")
    from sklearn.metrics import roc_curve

    out: dict[str, Any] = {"n": len(y_a), "n_positive": int(y_a.sum()), "n_patients": len(set(patients)),
           "auroc": _auroc_block(y_a, p_a, patients),
           "operating_points": {name: at_threshold(y_a, p_a, t) for name, t in thresholds.items()},
           "calibration": calibration(y_a, p_a), "roc": None, "subgroups": {}}
    if 0 < y_a.sum() < len(y_a):
        fpr, tpr, thr = roc_curve(y_a, p_a)
        out["roc"] = {"fpr": [_f(v) for v in fpr], "tpr": [_f(v) for v in tpr],
                      "thresholds": [_f(min(v, 1.0)) for v in thr]}
    for name, values in attributes.items():
        rows = []
        for value in sorted(set(values)):
            idx = np.array([i for i, v in enumerate(values) if v == value])
            yi, pi = y_a[idx], p_a[idx]
            rows.append({"value": value, "n": len(idx), "n_positive": int(yi.sum()),
                         "auroc": _auroc_block(yi, pi, [patients[i] for i in idx]),
                         "operating_points": {n: at_threshold(yi, pi, t) for n, t in thresholds.items()}})
        out["subgroups"][name] = rows
    return out


# --------------------------------------------------------------------------- segmentation


def region_metrics(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> dict:
    """Dice and HD95 (mm) of two boolean masks of one grid, with MONAI; the
    empty-mask cases as the module docstring defines them."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    a = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    b = torch.from_numpy(np.ascontiguousarray(truth, dtype=np.float32))[None, None]
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    empty = "both" if not (n_pred or n_truth) else "ground_truth" if not n_truth else "prediction" if not n_pred else None
    if empty:
        dice, hd95 = (1.0 if empty == "both" else 0.0), None
    else:
        dice = float(compute_dice(a, b, include_background=True, ignore_empty=False)[0, 0])
        hd95 = float(compute_hausdorff_distance(a, b, include_background=True, percentile=95,
                                                spacing=[float(s) for s in spacing_mm])[0, 0])
    return {"dice": _f(dice), "hd95_mm": _f(hd95), "pred_voxels": n_pred, "truth_voxels": n_truth, "empty": empty}


def _mean_block(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "ci95_low": None, "ci95_high": None, "n": 0}
    arr = np.asarray(values, float)
    low, high, _ = bootstrap_ci(lambda w: w @ arr / w.sum(axis=1), [str(i) for i in range(len(arr))])
    return {"mean": _f(arr.mean()), "ci95_low": _f(low), "ci95_high": _f(high), "n": len(arr)}


def segmentation_scores(pairs: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[float]]],
                        regions: Mapping[str, Sequence[int]]) -> dict:
    """Per case and region :func:`region_metrics`, and per region the mean
    Dice and mean HD95 (defined values only) with bootstrap intervals over
    studies. ``pairs``: (case key, predicted labels, true labels, spacing in
    mm per array axis), both label maps on the same grid."""
    per_case: dict[str, dict] = {}
    for key, pred, truth, spacing in pairs:
        if pred.shape != truth.shape:
            raise ValueError(f"{key}: prediction {pred.shape} and ground truth {truth.shape} differ in shape")
        per_case[key] = {r: region_metrics(np.isin(pred, list(v)), np.isin(truth, list(v)), spacing)
                         for r, v in regions.items()}
    summary = {}
    for r in regions:
        dice = [c[r]["dice"] for c in per_case.values()]
        hd = [c[r]["hd95_mm"] for c in per_case.values() if c[r]["hd95_mm"] is not None]
        summary[r] = {"dice": _mean_block(dice), "hd95_mm": _mean_block(hd),
                      "hd95_not_defined": len(dice) - len(hd)}
    return {"n": len(per_case), "regions": {r: list(v) for r, v in regions.items()}, "per_region": summary,
            "per_case": per_case, "ci_method": f"95 % percentile bootstrap over studies, {BOOTSTRAP} resamples "
            f"(seed {SEED}); none for n = 1"}


def read_label_map(path: Path, label_of_segment: Callable[[str, int], int]):
    """A label NIfTI file (values as they are) or a DICOM SEG (each segment's
    pixels given ``label_of_segment(segment label, segment number)``) as a
    SimpleITK image in LPS patient space.

    Raises
    ------
    ValueError
        The file is neither NIfTI nor a SEG highdicom reads.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        return sitk.ReadImage(str(path))
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
        volume = seg.get_volume(combine_segments=True)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a SEG with a volume highdicom reads: {exc}") from exc
    lut = np.zeros(int(max(s.SegmentNumber for s in seg.SegmentSequence)) + 1, np.uint8)
    for s in seg.SegmentSequence:
        lut[int(s.SegmentNumber)] = label_of_segment(str(s.SegmentLabel), int(s.SegmentNumber))
    image = sitk.GetImageFromArray(lut[np.asarray(volume.array, int)])
    # highdicom's array axes (i, j, k) are SimpleITK's (z, y, x).
    spacing, direction = np.asarray(volume.spacing, float), np.asarray(volume.direction, float)
    image.SetSpacing([float(spacing[2]), float(spacing[1]), float(spacing[0])])
    image.SetDirection([float(v) for v in direction[:, ::-1].flatten()])
    image.SetOrigin([float(v) for v in volume.position])
    return image


def on_grid(pred, truth):
    """``pred`` resampled onto ``truth``'s grid (nearest neighbour); both as
    arrays with the truth's spacing in mm per array axis."""
    import SimpleITK as sitk

    moved = sitk.Resample(pred, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0, pred.GetPixelID())
    return sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(truth), tuple(reversed(truth.GetSpacing()))
