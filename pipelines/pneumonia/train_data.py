"""Training data of :mod:`pipelines.pneumonia.train`: the ChestX-ray14 label
file and the split by patient.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from models.densenet import XRV_LABELS

__all__ = ["NIH_FINDINGS", "read_labels", "split_by_patient"]

#: The 14 ChestX-ray14 findings (``Finding Labels``); all are torchxrayvision labels.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Records:
    image_ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray  # (N, 18) float32, 0/1
    label_mask: np.ndarray  # (18,) bool: outputs supervised by NIH labels


def read_labels(data_dir: Path, limit: int | None = None) -> _Records:
    """Read ``labels.csv`` (NIH ``Image Index``, ``Finding Labels``, ``Patient ID``).

    Returns image ids, patient ids, and a ``(N, 18)`` float32 target matrix in
    torchxrayvision's output order (:data:`models.densenet.XRV_LABELS`), with
    the mask of the 14 outputs that NIH labels supervise.

    Raises
    ------
    FileNotFoundError
        ``labels.csv`` or an image is missing.
    ValueError
        An unknown finding label.
    """
    rows = list(csv.DictReader((Path(data_dir) / "labels.csv").open(newline="", encoding="utf-8")))
    rows.sort(key=lambda r: r["Image Index"])
    if limit is not None:
        pos = [r for r in rows if "Pneumonia" in r["Finding Labels"].split("|")]
        neg = [r for r in rows if "Pneumonia" not in r["Finding Labels"].split("|")]
        n_pos = min(len(pos), max(4, limit // 3))
        rows = pos[:n_pos] + neg[: limit - n_pos]
    labels = np.zeros((len(rows), len(XRV_LABELS)), np.float32)
    for i, r in enumerate(rows):
        for finding in r["Finding Labels"].split("|"):
            if finding == "No Finding":
                continue
            if finding not in NIH_FINDINGS:
                raise ValueError(f"labels.csv: unknown finding {finding!r} for {r['Image Index']}")
            labels[i, XRV_LABELS.index(finding)] = 1.0
        if not (Path(data_dir) / "images" / r["Image Index"]).is_file():
            raise FileNotFoundError(Path(data_dir) / "images" / r["Image Index"])
    mask = np.array([lab in NIH_FINDINGS for lab in XRV_LABELS])
    return _Records([r["Image Index"] for r in rows], [r["Patient ID"] for r in rows], labels, mask)


def split_by_patient(
    patient_ids: Sequence[str], positive: Sequence[bool] | np.ndarray, test_fraction: float, val_fraction: float,
    seed: int,
) -> dict[str, list[str]]:
    """Split patients into ``train``/``val``/``test``, stratified on whether a
    patient has any positive image (scikit-learn ``train_test_split``).

    Returns split name -> sorted patient ids; every patient is in exactly one.
    """
    patients = sorted(set(patient_ids))
    pos = {p: False for p in patients}
    for p, y in zip(patient_ids, positive, strict=True):
        pos[p] = pos[p] or bool(y)
    strat = [pos[p] for p in patients]
    rest, test = train_test_split(patients, test_size=test_fraction, stratify=strat, random_state=seed)
    strat_rest = [pos[p] for p in rest]
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=strat_rest, random_state=seed + 1
    )
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
