"""Step 5 of the brain MR preprocessing: decide whether a volume is already
skull-stripped, and strip it (deepbet, Fisch et al. 2024; morphological
fallback); see :mod:`pipelines.brain_tumour.preprocess`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from pipelines.brain_tumour.bias_field import largest_component
from pipelines.brain_tumour.registration import orientation_code

__all__ = [
    "StripCheck",
    "skull_strip_check",
    "DeepbetExtractor",
    "morphological_brain_mask",
    "default_extractor",
]

# "Already skull-stripped" (see skull_strip_check).
_STRIPPED_MIN_ZERO_FRACTION = 0.30
_STRIPPED_MAX_FOREGROUND_ML = 2300.0


@dataclass(frozen=True)
class StripCheck:
    """Whether a volume is already skull-stripped (:func:`skull_strip_check`).

    Attributes
    ----------
    stripped:
        The verdict.
    zero_fraction:
        Fraction of voxels exactly 0.
    foreground_ml:
        Volume of the non-zero voxels in ml.
    reason:
        The verdict in words, for the log.
    """

    stripped: bool
    zero_fraction: float
    foreground_ml: float
    reason: str


def skull_strip_check(image: sitk.Image) -> StripCheck:
    """Decide whether ``image`` is already skull-stripped.

    A skull-stripped volume (BraTS releases, FSL BET, HD-BET output) has a
    background of exact zeros around the brain; an MR image straight from a
    scanner has Rician noise in the air, so exact zeros are rare there. Some
    scanners do zero the air, so the non-zero region must also be no larger
    than a brain:

    - at least 30 % of the voxels are exactly 0, and
    - the non-zero voxels take at most 2300 ml (adult intracranial volume is
      about 1200-1900 ml; a whole head with scalp and skull is 3500 ml or
      more).

    Limitation: a partial-coverage head scan whose air was zeroed by the
    scanner and whose head volume stays under 2300 ml passes as stripped;
    use ``skull_strip="always"`` for such data.
    """
    array = sitk.GetArrayViewFromImage(image)
    n_zero = int(np.count_nonzero(array == 0))
    zero_fraction = n_zero / array.size
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    foreground_ml = (array.size - n_zero) * voxel_ml
    if zero_fraction < _STRIPPED_MIN_ZERO_FRACTION:
        why = f"only {100 * zero_fraction:.1f} % of voxels are exactly 0 (noise-filled background: not stripped)"
        return StripCheck(False, zero_fraction, foreground_ml, why)
    if foreground_ml > _STRIPPED_MAX_FOREGROUND_ML:
        why = (
            f"zero background, but the non-zero region is {foreground_ml:.0f} ml, larger than a brain "
            f"(> {_STRIPPED_MAX_FOREGROUND_ML:.0f} ml): not stripped"
        )
        return StripCheck(False, zero_fraction, foreground_ml, why)
    why = (
        f"{100 * zero_fraction:.1f} % exact-zero background and a {foreground_ml:.0f} ml non-zero region: "
        "already skull-stripped"
    )
    return StripCheck(True, zero_fraction, foreground_ml, why)


class DeepbetExtractor:
    """Brain extraction with deepbet (Fisch et al. 2024, Comput. Biol. Med.
    182:109079; MIT; PyPI ``deepbet``, whose wheel ships the two TorchScript
    models, so nothing is downloaded at run time).

    deepbet's own inference (``BrainExtraction.run_model`` and
    ``postprocess``: a bounding-box network at 128^3, the mask network at
    256^3 inside the box, threshold, largest component, void filling) is
    called on the array nibabel would give for the volume in RAS canonical
    orientation, which is what deepbet's file interface feeds it.

    It was trained on T1-weighted images of adults; use the native T1 (or
    the T1c) volume. One instance may be shared by worker threads: deepbet
    keeps per-call state (the bounding box), so calls run one at a time.

    Parameters
    ----------
    device:
        ``"cpu"`` or a CUDA device string.
    threshold:
        Probability threshold of the mask network (deepbet's default 0.5).

    Raises
    ------
    ImportError
        deepbet is not installed (``pip install deepbet==1.0.2``).
    """

    name = "deepbet"

    def __init__(self, device: str = "cpu", threshold: float = 0.5) -> None:
        from deepbet import BrainExtraction  # optional dependency: ImportError tells the caller

        with warnings.catch_warnings():
            # deepbet ships TorchScript; torch >= 2.10 warns that jit.load is deprecated.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=DeprecationWarning)
            self._bet = BrainExtraction(no_gpu=device == "cpu")
        self._lock = threading.Lock()
        if device != "cpu":
            self._bet.model.to(device)
            self._bet.bbox_model.to(device)
        self.threshold = threshold

    def __call__(self, t1: sitk.Image) -> sitk.Image:
        """uint8 brain mask (1 = brain) on ``t1``'s grid."""
        ras = sitk.DICOMOrient(sitk.Cast(t1, sitk.sitkFloat32), "RAS")
        # nibabel's array of a RAS image is sitk's (z, y, x) array transposed.
        x = np.ascontiguousarray(sitk.GetArrayViewFromImage(ras).transpose(2, 1, 0))
        with self._lock, torch.inference_mode():
            probability = self._bet.run_model(x)
            mask = self._bet.postprocess(probability > self.threshold)
        out = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8))
        out.CopyInformation(ras)
        return sitk.DICOMOrient(out, orientation_code(t1))


def morphological_brain_mask(image: sitk.Image, *, opening_mm: float = 4.0) -> sitk.Image:
    """Approximate brain mask of a T1-weighted head by thresholding and morphology.

    The fallback when deepbet is not installed: Otsu's threshold over the
    head, a binary opening with a ball of ``opening_mm`` radius (cuts the
    thin bridges between brain and scalp across the dark skull), the largest
    connected component, holes filled. It is coarse: it keeps some dura and
    loses the brain surface where the skull gap is thinner than the ball;
    a learned method (deepbet) is far better on real heads.

    Returns
    -------
    uint8 ``sitk.Image`` on ``image``'s grid.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    tissue = sitk.OtsuThreshold(image, 0, 1, 128)
    radius = [max(1, int(round(opening_mm / s))) for s in image.GetSpacing()]
    opened = sitk.BinaryMorphologicalOpening(tissue, radius, sitk.sitkBall)
    brain = largest_component(opened)
    brain = sitk.BinaryMorphologicalClosing(brain, radius, sitk.sitkBall)
    return sitk.Cast(sitk.BinaryFillhole(brain), sitk.sitkUInt8)


def default_extractor(device: str) -> tuple[Callable[[sitk.Image], sitk.Image], str]:
    """A :class:`DeepbetExtractor` and its name, or the morphological fallback when deepbet is absent."""
    try:
        return DeepbetExtractor(device), "deepbet"
    except ImportError:
        return morphological_brain_mask, "morphological (deepbet not installed)"
