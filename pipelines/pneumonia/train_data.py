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
from models.intended_use import IntendedUseRule, RuleRange

__all__ = ["NIH_FINDINGS", "intended_use_rules", "read_labels", "split_by_patient"]

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


# --------------------------------------------------------------------------- intended use

#: Bits per sample of a PNG by its PIL mode (what a DICOM wrapping stores as Bits Stored).
_PNG_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "I;16": 16, "I;16B": 16, "I": 32}
#: The adult rule's age, and the share of training images of adults above which it applies.
ADULT_YEARS, ADULT_SHARE = 18, 0.95
#: Detector pixel spacings (mm) always in the envelope: whole-chest radiographs, which the
#: pipeline resamples to square pixels and downscales to the network size.
SPACING_FLOOR_MM, SPACING_CEILING_MM = 0.1, 1.0


def intended_use_rules(data_dir: Path, image_ids: Sequence[str], modalities: Sequence[str]) -> list[IntendedUseRule]:
    """The model card's ``intended_use_rules`` (:mod:`node.guard`): the
    envelope of the training images ``image_ids``, read from ``labels.csv``
    (View Position, Patient Age, OriginalImagePixelSpacing) and the PNG
    headers (bit depth), as the shipped demo card declares it: a CR/DX chest
    image, the views seen, adults (when at least ``ADULT_SHARE`` of the
    images are; else the youngest age seen), the detector spacings seen
    (within at least 0.1-1.0 mm), the bit depths seen, grey scale.

    Raises
    ------
    FileNotFoundError
        ``labels.csv`` or an image is missing.
    """
    from PIL import Image

    wanted = set(image_ids)
    rows = [r for r in csv.DictReader((Path(data_dir) / "labels.csv").open(newline="", encoding="utf-8"))
            if r["Image Index"] in wanted]
    views = sorted({r["View Position"].strip().upper() for r in rows if r.get("View Position", "").strip()})
    ages = [int(r["Patient Age"]) for r in rows if str(r.get("Patient Age", "")).strip().isdigit()]
    # The header "OriginalImagePixelSpacing[x,y]" is unquoted: csv reads it as two columns.
    spacings = [float(r[k]) for r in rows for k in ("OriginalImagePixelSpacing[x", "y]") if (r.get(k) or "").strip()]
    bits = set()
    for name in sorted(wanted):
        with Image.open(Path(data_dir) / "images" / name) as im:  # the header only
            bits.add(_PNG_BITS.get(im.mode, 8))
    n = len(rows)
    adult = sum(a >= ADULT_YEARS for a in ages)
    min_age = ADULT_YEARS if ages and adult >= ADULT_SHARE * len(ages) else min(ages, default=0)
    low = min([SPACING_FLOOR_MM, *spacings])
    high = max([SPACING_CEILING_MM, *spacings])
    seen_spacing = f"{min(spacings):.3f}-{max(spacings):.3f} mm" if spacings else "not recorded"
    return [
        IntendedUseRule(name="chest_radiograph", description=f"a chest radiograph ({' or '.join(modalities)}, Body "
                        "Part Examined CHEST or absent), as the ChestX-ray14 training images",
                        match={"Modality": list(modalities), "BodyPartExamined": ["CHEST", ""]}),
        IntendedUseRule(name="frontal_view", description=f"a frontal view (View Position {' or '.join(views)}), never "
                        f"a lateral one: the {n} training images were {' and '.join(views)} only",
                        match={"ViewPosition": views or ["PA", "AP"]}),
        IntendedUseRule(name="adult", description=f"Patient's Age {min_age:g} years or more, when given: {adult} of "
                        f"the {len(ages)} training images were of adults (ages {min(ages, default=0)}-"
                        f"{max(ages, default=0)})", match={"PatientAgeInYears": RuleRange(min=min_age)},
                        absent="in_scope"),
        IntendedUseRule(name="pixel_spacing", description=f"Pixel Spacing or Imager Pixel Spacing {low:g} to {high:g} mm, "
                        f"when given (training originals: {seen_spacing}); the pipeline resamples to square pixels "
                        "and downscales to the network size", match={"PixelSpacingMm": RuleRange(min=low, max=high)},
                        absent="in_scope"),
        IntendedUseRule(name="bit_depth", description=f"Bits Stored {' or '.join(map(str, sorted(bits)))}: the training "
                        "images were PNGs of that depth, downscaled from ChestX-ray14",
                        match={"BitsStored": [str(b) for b in sorted(bits)]}),
        IntendedUseRule(name="grey_scale", description="a grey-scale image (Photometric Interpretation MONOCHROME2, as "
                        "the grey-scale training PNGs, or MONOCHROME1, which the pipeline inverts)",
                        match={"PhotometricInterpretation": ["MONOCHROME2", "MONOCHROME1"]}),
    ]
