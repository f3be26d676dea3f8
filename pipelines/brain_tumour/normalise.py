"""Step 6 of the brain MR preprocessing: the channels-first model array and
its z-score over non-zero voxels (see :mod:`pipelines.brain_tumour.preprocess`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import NormalizeIntensity

__all__ = ["to_channels_first", "normalize_nonzero"]


def to_channels_first(images: Mapping[str, sitk.Image], order: Sequence[str]) -> np.ndarray:
    """Stack images of one grid as the model array.

    Returns
    -------
    ``(C, D, H, W)`` float32, C-contiguous: channel ``c`` is
    ``sitk.GetArrayViewFromImage(images[order[c]])``, numpy ``(z, y, x)``.

    Raises
    ------
    ValueError
        A role of ``order`` is missing, or the images differ in size.
    """
    missing = [r for r in order if r not in images]
    if missing:
        raise ValueError(f"channel_order names {missing}, which are not among the volumes {sorted(images)}")
    sizes = {images[r].GetSize() for r in order}
    if len(sizes) != 1:
        raise ValueError(f"channels are on different grids: sizes {sorted(sizes)}")
    x, y, z = sizes.pop()
    out = np.empty((len(order), z, y, x), dtype=np.float32)
    for c, role in enumerate(order):
        out[c] = sitk.GetArrayViewFromImage(images[role])
    return out


def normalize_nonzero(array: np.ndarray) -> np.ndarray:
    """Z-score each channel over its non-zero voxels; zeros stay 0.

    MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``, as the
    MONAI brats_mri_segmentation bundle (and nnU-Net for BraTS) normalises.

    Parameters
    ----------
    array:
        ``(C, ...)`` float32.

    Returns
    -------
    ``(C, ...)`` float32 numpy array.
    """
    # MONAI annotates dtype as a numpy DtypeLike; it takes (and documents) torch dtypes too.
    normalise = NormalizeIntensity(nonzero=True, channel_wise=True, dtype=torch.float32)  # type: ignore[arg-type]
    out = normalise(torch.from_numpy(array))
    return out.as_tensor().numpy() if hasattr(out, "as_tensor") else np.asarray(out)
