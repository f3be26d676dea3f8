"""The input-drift reference of a chest model from a folder of PNG images
(the training data's form: ``images/*.png``, with ChestX-ray14's
``labels.csv`` where present), through the same preprocessing and model
the pipeline runs (:meth:`PneumoniaModel.predict`, as the training command
reads PNGs with :func:`png_to_image`). See :mod:`models.drift_reference`.

What a PNG does not carry comes from ``labels.csv`` when it has the
ChestX-ray14 columns: Patient Age (years), View Position, and the original
image's pixel spacing in mm (``OriginalImagePixelSpacing[x``: what the
modality wrote; the downscaled PNG has none). A PNG is MONOCHROME2 (0 is
black) and its bit depth is its Bits Stored (8 for mode ``L``, 16 for
``I;16``). Manufacturer is unknown and left out of the reference.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from models.drift_reference import DriftFeature, DriftReference, build_reference
from pipelines.pneumonia.model import PneumoniaModel
from pipelines.pneumonia.preprocess import png_to_image

_BITS = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "I;16": 16, "I;16B": 16, "I": 32}


def png_files(data_dir: Path) -> list[Path]:
    """``data_dir/images/*.png``, else ``data_dir/*.png``, sorted."""
    folder = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
    return sorted(folder.glob("*.png"))


def _labels(data_dir: Path) -> dict[str, dict[str, str]]:
    path = data_dir / "labels.csv"
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {row["Image Index"]: row for row in csv.DictReader(f) if row.get("Image Index")}


def png_sample(model: PneumoniaModel, png: Path, row: dict[str, str] | None) -> dict[DriftFeature, str | float]:
    """The drift features of one PNG (module docstring).

    Raises
    ------
    ValueError
        The image is constant or not 2-D (:func:`png_to_image`).
    """
    from PIL import Image

    with Image.open(png) as im:
        mode = im.mode
    prediction = model.predict(png_to_image(png), cam=False)
    sample: dict[DriftFeature, str | float] = {
        DriftFeature.PHOTOMETRIC_INTERPRETATION: "MONOCHROME2",
        DriftFeature.BITS_STORED: str(_BITS.get(mode, 8)),
        DriftFeature.INTENSITY_MEAN: prediction.input_mean,
        DriftFeature.INTENSITY_STD: prediction.input_std,
        DriftFeature.SCORE: prediction.probability,
    }
    if row:
        if row.get("View Position", "").strip():
            sample[DriftFeature.VIEW_POSITION] = row["View Position"].strip()
        for feature, column in ((DriftFeature.PATIENT_AGE, "Patient Age"),
                                (DriftFeature.PIXEL_SPACING, "OriginalImagePixelSpacing[x")):
            try:
                sample[feature] = float(row[column])
            except (KeyError, TypeError, ValueError):
                pass
    return sample


def png_reference(model: PneumoniaModel, data_dir: Path, *, keep: Callable[[Path], bool] = lambda p: True,
                  source: str = "") -> DriftReference:
    """The reference of every PNG of ``data_dir`` that ``keep`` accepts.

    Raises
    ------
    FileNotFoundError
        No PNG in the folder.
    ValueError
        An image cannot be read (the message names it).
    """
    data_dir = Path(data_dir)
    files = [p for p in png_files(data_dir) if keep(p)]
    if not files:
        raise FileNotFoundError(f"{data_dir}: no PNG images (looked in images/ and the folder itself)")
    labels = _labels(data_dir)
    samples = [png_sample(model, p, labels.get(p.name)) for p in files]
    what = f"{len(files)} PNG images of {data_dir.name}" + (" with labels.csv" if labels else "")
    return build_reference(samples, source or f"{what}, preprocessed and scored by {model.card.name} {model.card.version}")
