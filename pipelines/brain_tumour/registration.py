"""Steps 1-3 of the brain MR preprocessing: reorient, rigid registration,
resampling onto the model grid (see :mod:`pipelines.brain_tumour.preprocess`).

Physical space is LPS mm; ``sitk.Image`` sizes and indices are ``(x, y, z)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

__all__ = [
    "DEFAULT_ORIENTATION",
    "Registration",
    "reorient",
    "orientation_code",
    "image_centre",
    "same_grid",
    "register_rigid",
    "model_grid",
    "resample_to_grid",
]

#: Orientation of BraTS volumes as stored (and so as the bundle saw them).
DEFAULT_ORIENTATION = "LPS"

# Grids within these tolerances are the same grid (no registration, no
# resampling): spacing and origin in mm, direction cosines unitless.
_GRID_SPACING_TOL_MM = 1e-3
_GRID_ORIGIN_TOL_MM = 1e-2
_GRID_DIRECTION_TOL = 1e-4


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


def orientation_code(image: sitk.Image) -> str:
    """The DICOMOrient code (e.g. ``"LPS"``) of ``image``'s direction cosines."""
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


def image_centre(image: sitk.Image) -> tuple[float, float, float]:
    """Physical point (LPS mm) of ``image``'s voxel-grid centre."""
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
        transform.SetCenter(image_centre(fixed))
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
        origin = np.array(image_centre(reference)) - direction @ ((size - 1) / 2 * np.array(spacing))
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
