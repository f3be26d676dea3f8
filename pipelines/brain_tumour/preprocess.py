"""Brain MR preprocessing for BraTS-style tumour segmentation.

The chain (each step one small function below; :func:`preprocess_study`
runs them, times each one and records why a step was skipped)::

    {role: SeriesVolume}  (volume.series_to_image: float32, DICOM geometry)
      1 reorient          sitk.DICOMOrient to one convention (default "LPS")
      2 register          rigid (Euler3D, Mattes MI) T1/T2/FLAIR -> T1c, only
                          where a grid or frame of reference differs
      3 resample          onto the model grid: the T1c field of view at the
                          model's spacing (default 1 x 1 x 1 mm), one
                          interpolation per volume (registration folded in)
      4 N4                bias-field correction estimated on a shrunk image,
                          applied at full resolution (Tustison et al. 2010)
      5 skull-strip       when the input is not already skull-stripped
                          (deepbet, Fisch et al. 2024; morphological fallback)
      6 normalise         z-score over non-zero voxels per channel (MONAI
                          NormalizeIntensity(nonzero=True, channel_wise=True))
    = PreprocessedStudy: (C, D, H, W) float32 + the model grid + transforms
      to_reference(labels on the model grid) -> labels on the reference
      series' own grid and slice order (nearest neighbour)

This follows the BraTS preprocessing (Bakas et al. 2018, arXiv:1811.02629;
Baid et al. 2021, arXiv:2107.02314: co-registration to a common space,
1 mm isotropic resampling, skull stripping) and the input convention of the
MONAI ``brats_mri_segmentation`` bundle (channels T1c, T1, T2, FLAIR;
``NormalizeIntensityd(nonzero=True, channel_wise=True)``; the bundle reads
BraTS NIfTI as stored, without reorientation, and BraTS stores volumes LPS:
x towards the patient's left, y posterior, z superior).

Axis orders, which differ between the libraries:

- ``sitk.Image`` sizes and indices are ``(x, y, z)``.
- ``sitk.GetArrayFromImage`` gives numpy ``(z, y, x)``.
- The model array is ``(C, D, H, W)`` = numpy ``(C, z, y, x)`` of the model
  grid: each channel is ``sitk.GetArrayFromImage`` of its volume. On the
  default "LPS" grid D runs inferior -> superior, H anterior -> posterior, W
  right -> left; a BraTS case is ``(4, 155, 240, 240)``. The MONAI bundle
  reads NIfTI with ``LoadImage``, which yields ``(C, x, y, z)``
  (``(4, 240, 240, 155)``, what its roi 240 x 240 x 160 refers to): that is
  this array with its spatial axes reversed, a permutation the model wrapper
  (``pipelines/brain_tumour/model.py``, card field ``array_axes: "xyz"``)
  applies.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import NormalizeIntensity

from pipelines.base import PipelineInputError
from pipelines.brain_tumour.volume import SeriesVolume
from pipelines.common.resample import labels_onto_grid

__all__ = [
    "DEFAULT_CHANNEL_ORDER",
    "DEFAULT_ORIENTATION",
    "Registration",
    "StripCheck",
    "PreprocessedStudy",
    "reorient",
    "same_grid",
    "register_rigid",
    "model_grid",
    "resample_to_grid",
    "skull_strip_check",
    "foreground_mask",
    "n4_correct",
    "DeepbetExtractor",
    "morphological_brain_mask",
    "to_channels_first",
    "normalize_nonzero",
    "preprocess_study",
    "to_reference",
]

#: Channel order of the MONAI brats_mri_segmentation bundle.
DEFAULT_CHANNEL_ORDER: tuple[str, ...] = ("T1c", "T1", "T2", "FLAIR")
#: Orientation of BraTS volumes as stored (and so as the bundle saw them).
DEFAULT_ORIENTATION = "LPS"

# Grids within these tolerances are the same grid (no registration, no
# resampling): spacing and origin in mm, direction cosines unitless.
_GRID_SPACING_TOL_MM = 1e-3
_GRID_ORIGIN_TOL_MM = 1e-2
_GRID_DIRECTION_TOL = 1e-4

# "Already skull-stripped" (see skull_strip_check).
_STRIPPED_MIN_ZERO_FRACTION = 0.30
_STRIPPED_MAX_FOREGROUND_ML = 2300.0


# --------------------------------------------------------------------------- 1 reorient


def reorient(image: sitk.Image, orientation: str = DEFAULT_ORIENTATION) -> sitk.Image:
    """Permute/flip ``image``'s axes so that its index axes point along
    ``orientation`` (SimpleITK/DICOMOrient code: the direction each index
    axis increases towards, e.g. ``"LPS"``: x -> patient left, y -> posterior,
    z -> superior; ``"RAS"`` is nibabel's canonical orientation).

    Lossless: voxels are moved, never interpolated; physical positions are
    unchanged. For an oblique acquisition the closest axes are chosen and the
    direction stays oblique.

    Raises
    ------
    ValueError
        ``orientation`` is not a valid three-letter code.
    """
    try:
        return sitk.DICOMOrient(image, orientation)
    except RuntimeError as exc:
        raise ValueError(f"orientation {orientation!r} is not a valid code such as 'LPS' or 'RAS': {exc}") from None


def _orientation_code(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


# --------------------------------------------------------------------------- 2 register


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two images share a voxel grid: same size, spacing (1e-3 mm),
    origin (1e-2 mm) and direction (1e-4)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=_GRID_SPACING_TOL_MM)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=_GRID_ORIGIN_TOL_MM)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=_GRID_DIRECTION_TOL)
    )


@dataclass(frozen=True)
class Registration:
    """Result of :func:`register_rigid`.

    Attributes
    ----------
    transform:
        ``sitk.Euler3DTransform`` mapping physical points (LPS mm) of the
        fixed image to the moving image (ITK's convention: resampling the
        moving image with it puts it on the fixed image). Identity when
        ``registered`` is False.
    registered:
        Whether an optimisation ran.
    reason:
        Why it ran or was skipped; for the log.
    metric:
        Final Mattes mutual information (negative; lower is better), or NaN.
    iterations:
        Optimiser iterations at the last level.
    """

    transform: sitk.Euler3DTransform
    registered: bool
    reason: str
    metric: float = math.nan
    iterations: int = 0

    @property
    def rotation_degrees(self) -> tuple[float, float, float]:
        """Euler angles (x, y, z) of :attr:`transform` in degrees."""
        t = self.transform
        return (math.degrees(t.GetAngleX()), math.degrees(t.GetAngleY()), math.degrees(t.GetAngleZ()))

    @property
    def translation_mm(self) -> tuple[float, float, float]:
        """Translation of :attr:`transform` in mm (LPS)."""
        return tuple(self.transform.GetTranslation())


def _centre(image: sitk.Image) -> tuple[float, float, float]:
    return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])


def register_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    same_frame_of_reference: bool = True,
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_sigmas_mm: Sequence[float] = (2.0, 1.0, 0.0),
    samples_per_level: int = 50_000,
    iterations: int = 200,
    min_step_mm: float = 1e-4,
    seed: int = 20240601,
) -> Registration:
    """Rigidly register ``moving`` to ``fixed`` (6 degrees of freedom).

    Mattes mutual information (50 bins; Mattes et al. 2003) with random
    sampling (a fixed ~``samples_per_level`` points per level, seeded, so a
    re-run gives the same transform), regular-step gradient descent with
    scales from physical shift, multi-resolution ``shrink_factors`` /
    ``smoothing_sigmas_mm``, linear interpolation (``sitk.ImageRegistrationMethod``).

    The initial transform is the identity about the fixed image's centre when
    both share a frame of reference (scanner coordinates already agree up to
    patient motion), else a moments alignment
    (``CenteredTransformInitializer(MOMENTS)``).

    Parameters
    ----------
    fixed, moving:
        3-D scalar images (any pixel type; cast to float32), physical space LPS mm.

    Returns
    -------
    :class:`Registration` with ``registered=True``.

    Raises
    ------
    ValueError
        ``shrink_factors`` and ``smoothing_sigmas_mm`` differ in length.
    """
    if len(shrink_factors) != len(smoothing_sigmas_mm):
        raise ValueError("shrink_factors and smoothing_sigmas_mm need one value per level")
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    if same_frame_of_reference:
        transform = sitk.Euler3DTransform()
        transform.SetCenter(_centre(fixed))
        how = "identity start (same frame of reference)"
    else:
        transform = sitk.Euler3DTransform(
            sitk.CenteredTransformInitializer(
                fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
            )
        )
        how = "moments start (different frames of reference)"
    n_voxels = float(np.prod(fixed.GetSize()))
    percentages = [min(1.0, samples_per_level * f**3 / n_voxels) for f in shrink_factors]

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(percentages, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=min_step_mm,
        numberOfIterations=iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(smoothing_sigmas_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return Registration(
        transform=transform,
        registered=True,
        reason=f"Mattes MI, Euler3D, {how}; stop: {method.GetOptimizerStopConditionDescription()}",
        metric=float(method.GetMetricValue()),
        iterations=int(method.GetOptimizerIteration()),
    )


# --------------------------------------------------------------------------- 3 resample


def model_grid(reference: sitk.Image, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> sitk.Image:
    """The model grid: ``reference``'s field of view and direction at ``spacing``.

    The new grid keeps the field-of-view centre, and its extent is the
    reference's rounded to whole voxels: size ``round(n * s / t)`` per axis.
    When ``spacing`` equals the reference's (1e-3 mm) the grid *is* the
    reference grid, so a 1 mm BraTS volume is not resampled at all.

    Parameters
    ----------
    reference:
        The reoriented reference (T1c) volume.
    spacing:
        ``(x, y, z)`` spacing in mm (sitk order).

    Returns
    -------
    uint8 ``sitk.Image`` of zeros carrying the grid (sitk size ``(x, y, z)``).

    Raises
    ------
    ValueError
        ``spacing`` is not three positive finite values.
    """
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive mm values (x, y, z), got {spacing}")
    old_size = np.array(reference.GetSize())
    old_spacing = np.array(reference.GetSpacing())
    if np.allclose(old_spacing, spacing, rtol=0, atol=_GRID_SPACING_TOL_MM):
        size, spacing, origin = old_size, tuple(old_spacing), np.array(reference.GetOrigin())
    else:
        size = np.maximum(1, np.round(old_size * old_spacing / np.array(spacing))).astype(int)
        # Same field-of-view centre: first voxel centre = centre - half the new extent.
        direction = np.array(reference.GetDirection()).reshape(3, 3)
        origin = np.array(_centre(reference)) - direction @ ((size - 1) / 2 * np.array(spacing))
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    grid.SetOrigin(tuple(float(v) for v in origin))
    grid.SetDirection(reference.GetDirection())
    return grid


def resample_to_grid(
    image: sitk.Image,
    grid: sitk.Image,
    transform: sitk.Transform | None = None,
    *,
    interpolator: int = sitk.sitkLinear,
) -> sitk.Image:
    """``image`` sampled on ``grid`` (float32), through ``transform``.

    ``transform`` maps grid points to ``image`` points (a
    :attr:`Registration.transform`); ``None`` is the identity. Outside
    ``image`` the value is 0. Linear interpolation, as the BraTS pipeline
    resamples intensities; pass ``sitk.sitkNearestNeighbor`` for labels.
    """
    return sitk.Resample(
        image,
        grid,
        transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity),
        interpolator,
        0.0,
        sitk.sitkFloat32,
    )


# --------------------------------------------------------------------------- 4 N4


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


def foreground_mask(image: sitk.Image, *, stripped: bool) -> sitk.Image:
    """uint8 mask of the head (1) for N4.

    For a skull-stripped volume the non-zero voxels; otherwise Otsu's
    threshold (Otsu 1979) with holes filled, largest connected component.
    """
    if stripped:
        return sitk.Cast(image != 0, sitk.sitkUInt8)
    mask = sitk.OtsuThreshold(image, 0, 1, 128)
    mask = sitk.BinaryFillhole(mask)
    return _largest_component(mask)


def _largest_component(mask: sitk.Image) -> sitk.Image:
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.Cast(labels == 1, sitk.sitkUInt8)


def n4_correct(
    image: sitk.Image,
    mask: sitk.Image,
    *,
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 50, 50),
    convergence_threshold: float = 1e-3,
) -> sitk.Image:
    """N4 bias-field correction (Tustison et al. 2010, IEEE TMI 29(6):1310).

    The field is estimated on ``image`` and ``mask`` shrunk by
    ``shrink_factor`` (the B-spline field is smooth, so little is lost, and
    the fit is ``shrink_factor**3`` times cheaper), then evaluated at full
    resolution with ``GetLogBiasFieldAsImage(image)`` and divided out:
    ``corrected = image / exp(log_field)``. Voxels that are 0 stay 0.

    Parameters
    ----------
    image:
        3-D float32 ``sitk.Image`` (positive intensities inside ``mask``).
    mask:
        uint8 ``sitk.Image`` on the same grid, 1 where the field is fitted.
    shrink_factor:
        1 fits at full resolution (minutes for a 240 x 240 x 155 volume on two
        cores).
    iterations:
        Maximum iterations per fitting level (the number of levels is its length).

    Returns
    -------
    float32 ``sitk.Image`` on ``image``'s grid.

    Raises
    ------
    ValueError
        ``shrink_factor`` < 1, or ``mask`` is empty.
    """
    if shrink_factor < 1:
        raise ValueError(f"n4 shrink_factor must be >= 1, got {shrink_factor}")
    image = sitk.Cast(image, sitk.sitkFloat32)
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    stats = sitk.StatisticsImageFilter()
    stats.Execute(mask)
    if stats.GetSum() == 0:
        raise ValueError("n4 mask is empty: no foreground to fit the bias field on")
    factors = [shrink_factor] * 3
    small = sitk.Shrink(image, factors) if shrink_factor > 1 else image
    small_mask = sitk.Shrink(mask, factors) if shrink_factor > 1 else mask
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.SetConvergenceThreshold(convergence_threshold)
    corrector.Execute(small, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(image)
    return sitk.Cast(image / sitk.Exp(log_field), sitk.sitkFloat32)


# --------------------------------------------------------------------------- 5 skull-strip


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
        return sitk.DICOMOrient(out, _orientation_code(t1))


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
    brain = _largest_component(opened)
    brain = sitk.BinaryMorphologicalClosing(brain, radius, sitk.sitkBall)
    return sitk.Cast(sitk.BinaryFillhole(brain), sitk.sitkUInt8)


def _default_extractor(device: str) -> tuple[Callable[[sitk.Image], sitk.Image], str]:
    try:
        return DeepbetExtractor(device), "deepbet"
    except ImportError:
        return morphological_brain_mask, "morphological (deepbet not installed)"


# --------------------------------------------------------------------------- 6 normalise


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


# --------------------------------------------------------------------------- the chain


@dataclass
class PreprocessedStudy:
    """What :func:`preprocess_study` gives the model and :func:`to_reference`.

    Attributes
    ----------
    array:
        ``(C, D, H, W)`` float32 network input in ``channel_order``; numpy
        ``(c, z, y, x)`` of ``grid`` (see the module docstring).
    channel_order:
        Role of each channel.
    grid:
        uint8 ``sitk.Image`` on the model grid (sitk size ``(W, H, D)``, spacing,
        origin, direction in LPS mm): 1 inside the brain mask used for
        skull stripping, or inside the non-zero region of the reference channel when the input was
        already stripped.
    reference_role:
        The role whose volume defines the grid (T1c by default).
    series_uids:
        role -> Series Instance UID of its input volume.
    transforms:
        Series Instance UID -> transform mapping model-grid physical points
        to that series' physical points (identity for the reference and for
        series that were not registered).
    registrations:
        role -> :class:`Registration` (skipped ones included, with the reason).
    strip_checks:
        role -> :class:`StripCheck` of its input volume.
    skull_stripped_here:
        The method that stripped the skull in this run (``"deepbet"``,
        ``"morphological (deepbet not installed)"``, or the given extractor's
        ``name``); ``None`` when stripping was skipped.
    timings:
        step -> wall time in seconds.
    cpu_seconds:
        step -> CPU time of the whole process (all threads) in seconds; with
        ``timings`` it shows how much of a step ran in parallel, and it is
        less disturbed than wall time by other work on a shared machine.
    notes:
        What each step did or skipped, in order; also sent to the log.
    """

    array: np.ndarray
    channel_order: tuple[str, ...]
    grid: sitk.Image
    reference_role: str
    series_uids: dict[str, str]
    transforms: dict[str, sitk.Transform]
    registrations: dict[str, Registration]
    strip_checks: dict[str, StripCheck]
    skull_stripped_here: str | None
    timings: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size of :attr:`array` as ``(D, H, W)`` mm (sitk spacing reversed)."""
        x, y, z = self.grid.GetSpacing()
        return (z, y, x)

    @property
    def brain_mask(self) -> np.ndarray:
        """``(D, H, W)`` bool view of :attr:`grid`."""
        return sitk.GetArrayViewFromImage(self.grid) > 0


class _Steps:
    """Times steps and collects notes; sends both to a structlog-style logger."""

    def __init__(self, log: Any | None) -> None:
        self.log = log
        self.timings: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.notes: list[str] = []
        self._step = ""
        self._t0 = 0.0
        self._c0 = 0.0

    def __call__(self, step: str) -> _Steps:
        self._step = step
        return self

    def __enter__(self) -> _Steps:
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self._t0
        self.timings[self._step] = self.timings.get(self._step, 0.0) + seconds
        self.cpu_seconds[self._step] = self.cpu_seconds.get(self._step, 0.0) + time.process_time() - self._c0
        if self.log is not None and exc[0] is None:
            self.log.info("brain_preprocess_step", step=self._step, seconds=round(seconds, 3))

    def note(self, text: str) -> None:
        self.notes.append(f"{self._step}: {text}")
        if self.log is not None:
            self.log.info("brain_preprocess_note", step=self._step, note=text)


def preprocess_study(
    volumes: Mapping[str, SeriesVolume],
    *,
    channel_order: Sequence[str] = DEFAULT_CHANNEL_ORDER,
    reference_role: str = "T1c",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    orientation: str = DEFAULT_ORIENTATION,
    n4: bool = True,
    n4_shrink_factor: int = 4,
    n4_iterations: Sequence[int] = (50, 50, 50, 50),
    n4_workers: int | None = None,
    skull_strip: Literal["auto", "always", "never"] = "auto",
    brain_extractor: Callable[[sitk.Image], sitk.Image] | None = None,
    device: str = "cpu",
    log: Any | None = None,
) -> PreprocessedStudy:
    """Prepare a four-sequence brain MR study for a BraTS-trained network.

    Steps (module docstring): reorient, register (only where grids or frames
    of reference differ), resample to ``spacing`` on the reference-derived
    grid, N4, skull-strip (per ``skull_strip``), z-score over non-zero voxels.

    Parameters
    ----------
    volumes:
        role (``"T1"``, ``"T1c"``, ``"T2"``, ``"FLAIR"``) -> :class:`SeriesVolume`
        from :func:`~pipelines.brain_tumour.volume.series_to_image`.
    channel_order:
        Roles in the network's channel order (the model card's; the MONAI
        bundle's is T1c, T1, T2, FLAIR).
    reference_role:
        The volume the others are registered to and whose field of view and
        direction define the model grid.
    spacing:
        Model grid spacing in mm in sitk order ``(x, y, z)`` (the model
        card's; reverse a ``(D, H, W)`` spacing).
    orientation:
        Axis convention of the model grid (``"LPS"`` = BraTS storage order).
    n4, n4_shrink_factor, n4_iterations:
        Bias-field correction on/off, shrink factor, iterations per level.
    n4_workers:
        Volumes corrected at once (threads; SimpleITK releases the GIL). N4's
        fit is nearly single-threaded, so on two cores two at a time halve
        the step's wall time. ``None``: ``min(volumes, os.cpu_count())``.
    skull_strip:
        ``"auto"``: strip unless every volume passes :func:`skull_strip_check`;
        ``"always"``; ``"never"``.
    brain_extractor:
        Callable T1-weighted ``sitk.Image`` -> uint8 brain mask on its grid;
        ``None`` makes a :class:`DeepbetExtractor` when needed, or falls back
        to :func:`morphological_brain_mask` (noted) when deepbet is absent.
        Pipelines pass one extractor they keep, so the networks load once.
    device:
        torch device for the default extractor.
    log:
        structlog-style logger (``log.info(event, **fields)``) or ``None``.

    Returns
    -------
    :class:`PreprocessedStudy`.

    Raises
    ------
    PipelineInputError (a ValueError)
        A role of ``channel_order`` or ``reference_role`` has no volume; a
        volume is not 3-D.
    ValueError
        Invalid ``spacing``, ``orientation`` or ``skull_strip``.
    """
    if skull_strip not in ("auto", "always", "never"):
        raise ValueError(f"skull_strip must be 'auto', 'always' or 'never', got {skull_strip!r}")
    channel_order = tuple(channel_order)
    roles = list(dict.fromkeys([reference_role, *channel_order]))
    missing = [r for r in roles if r not in volumes]
    if missing:
        raise PipelineInputError(f"no {', '.join(missing)} series: the brain tumour model needs {', '.join(roles)}")
    steps = _Steps(log)
    ref_volume = volumes[reference_role]

    # 1 reorient: one axis convention for every volume (lossless).
    with steps("reorient"):
        images = {r: reorient(volumes[r].image, orientation) for r in roles}
        for r in roles:
            before = _orientation_code(volumes[r].image)
            if before != orientation:
                steps.note(f"{r}: {before} -> {orientation}")
    fixed = images[reference_role]

    # 2 register to the reference where needed.
    registrations: dict[str, Registration] = {}
    with steps("register"):
        for r in roles:
            identity = sitk.Euler3DTransform()
            identity.SetCenter(_centre(fixed))
            same_frame = volumes[r].frame_of_reference_uid == ref_volume.frame_of_reference_uid
            if r == reference_role:
                registrations[r] = Registration(identity, False, "reference volume")
            elif same_frame and same_grid(images[r], fixed):
                why = f"same grid and frame of reference as {reference_role}"
                registrations[r] = Registration(identity, False, why)
                steps.note(f"{r}: skipped, same grid and frame of reference as {reference_role}")
            else:
                why = "different frame of reference" if not same_frame else f"grid differs from {reference_role}"
                registrations[r] = register_rigid(fixed, images[r], same_frame_of_reference=same_frame)
                reg = registrations[r]
                steps.note(
                    f"{r} -> {reference_role} ({why}): rotation "
                    f"{tuple(round(a, 2) for a in reg.rotation_degrees)} deg, translation "
                    f"{tuple(round(t, 2) for t in reg.translation_mm)} mm, MI {reg.metric:.4f}; {reg.reason}"
                )

    # 3 resample onto the model grid, registration folded into one interpolation.
    with steps("resample"):
        grid = model_grid(fixed, spacing)
        for r in roles:
            if not registrations[r].registered and same_grid(images[r], grid):
                images[r] = sitk.Cast(images[r], sitk.sitkFloat32)
            else:
                images[r] = resample_to_grid(images[r], grid, registrations[r].transform)
                steps.note(f"{r}: resampled (linear) to {grid.GetSize()} voxels at {grid.GetSpacing()} mm")
        if same_grid(fixed, grid):
            steps.note(
                f"model grid = the {reference_role} grid {grid.GetSize()} at {grid.GetSpacing()} mm: no resampling"
            )

    # 4 N4 (field fitted on a shrunk image inside the head/brain mask).
    strip_checks = {r: skull_strip_check(volumes[r].image) for r in roles}
    all_stripped = all(c.stripped for c in strip_checks.values())
    with steps("n4"):
        if n4:
            workers = max(1, n4_workers or min(len(roles), os.cpu_count() or 1))

            # The image comes in as an argument: a closure must not read
            # ``images``, which this function deletes once it is normalised.
            def correct(role: str, image: sitk.Image) -> sitk.Image:
                mask = foreground_mask(image, stripped=strip_checks[role].stripped)
                return n4_correct(image, mask, shrink_factor=n4_shrink_factor, iterations=n4_iterations)

            with ThreadPoolExecutor(max_workers=workers) as pool:
                corrected = dict(zip(roles, pool.map(correct, roles, [images[r] for r in roles]), strict=True))
            images.update(corrected)
            del corrected
            steps.note(f"shrink x{n4_shrink_factor}, iterations {tuple(n4_iterations)}, {workers} volume(s) at a time")
        else:
            steps.note("disabled")

    # 5 skull-strip.
    stripped_here: str | None = None
    with steps("skull_strip"):
        for r in roles:
            steps.note(f"{r}: {strip_checks[r].reason}")
        if skull_strip == "never" or (skull_strip == "auto" and all_stripped):
            steps.note("skipped: " + ("skull_strip=never" if skull_strip == "never" else "input already skull-stripped"))
            brain = sitk.Cast(images[reference_role] != 0, sitk.sitkUInt8)
        else:
            if brain_extractor is not None:
                extractor = brain_extractor
                method = getattr(brain_extractor, "name", getattr(brain_extractor, "__name__", "custom"))
            else:
                extractor, method = _default_extractor(device)
            t1w = "T1" if "T1" in images else reference_role
            brain = sitk.Cast(extractor(images[t1w]), sitk.sitkUInt8)
            brain.CopyInformation(grid)
            for r in roles:
                images[r] = sitk.Mask(images[r], brain)
            stripped_here = method
            steps.note(f"brain mask from {t1w} by {method}: {int(sitk.GetArrayViewFromImage(brain).sum())} voxels")

    # 6 z-score over non-zero voxels, channel by channel.
    with steps("normalise"):
        array = normalize_nonzero(to_channels_first(images, channel_order))
    del images

    brain.CopyInformation(grid)
    return PreprocessedStudy(
        array=array,
        channel_order=channel_order,
        grid=brain,
        reference_role=reference_role,
        series_uids={r: volumes[r].series_instance_uid for r in roles},
        transforms={volumes[r].series_instance_uid: registrations[r].transform for r in roles},
        registrations=registrations,
        strip_checks=strip_checks,
        skull_stripped_here=stripped_here,
        timings=steps.timings,
        cpu_seconds=steps.cpu_seconds,
        notes=steps.notes,
    )


def to_reference(labels_on_model_grid: np.ndarray, prep: PreprocessedStudy, reference: SeriesVolume) -> np.ndarray:
    """Labels on the model grid -> labels on a source series' own grid.

    Nearest-neighbour resampling (labels are never averaged) through the
    inverse of the series' registration, onto ``reference.image``'s grid, so
    the SEG lies exactly on the images a radiologist scrolls.

    Parameters
    ----------
    labels_on_model_grid:
        ``(D, H, W)`` integer labels (e.g. BraTS 0/1/2/4), the layout of
        ``prep.array[c]``: numpy ``(z, y, x)`` of ``prep.grid``.
    prep:
        The :class:`PreprocessedStudy` the labels were predicted from.
    reference:
        One of the series given to :func:`preprocess_study` (by default the
        ``settings.reference_role`` one, the T1c).

    Returns
    -------
    ``(n_slices, Rows, Columns)`` uint8 in ``reference``'s slice order:
    ``out[k]`` lies on ``reference.slices[k]`` (its pixel rows and columns).

    Raises
    ------
    ValueError
        ``labels_on_model_grid`` does not have the grid's shape ``(D, H, W)``
        or holds values outside 0..255; ``reference`` was not an input of
        ``prep``.
    """
    expected = tuple(prep.grid.GetSize())[::-1]
    if labels_on_model_grid.shape != expected:
        raise ValueError(
            f"labels_on_model_grid has shape {labels_on_model_grid.shape}, "
            f"expected the model grid's (D, H, W) {expected}"
        )
    if labels_on_model_grid.dtype != np.uint8:
        if labels_on_model_grid.size and (labels_on_model_grid.min() < 0 or labels_on_model_grid.max() > 255):
            raise ValueError("labels_on_model_grid holds values outside 0..255")
        labels_on_model_grid = labels_on_model_grid.astype(np.uint8)
    transform = prep.transforms.get(reference.series_instance_uid)
    if transform is None:
        raise ValueError(
            f"reference series {reference.series_instance_uid} was not an input of preprocess_study "
            f"(inputs: {sorted(prep.transforms)})"
        )
    labels = sitk.GetImageFromArray(np.ascontiguousarray(labels_on_model_grid))
    labels.CopyInformation(prep.grid)
    return labels_onto_grid(labels, reference.image, transform.GetInverse())
