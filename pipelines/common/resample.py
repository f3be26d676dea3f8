"""Label maps between voxel grids, by nearest neighbour.

A segmentation network predicts on its own grid (resampled, reoriented);
the SEG must lie on the source series' own grid, the images a radiologist
scrolls. Labels are never interpolated: each voxel of the target grid takes
the label of the source voxel nearest to its centre (SimpleITK
``sitkNearestNeighbor``), 0 outside the source grid.

Affines here are 4 x 4 matrices mapping a voxel index ``(x, y, z)`` =
``(column, row, slice)`` to DICOM patient coordinates (LPS, mm), as the
Image Plane module defines them (PS3.3 C.7.6.2.1.1): columns 0-2 are the
row direction x column spacing, the column direction x row spacing and the
slice step; column 3 is Image Position (Patient) of the first voxel.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["LPS_TO_RAS", "affine_lps", "image_from_affine", "labels_onto_grid"]

#: Flips x and y: DICOM LPS <-> RAS (NIfTI, MONAI ``space = RAS``); its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def affine_lps(image: sitk.Image) -> np.ndarray:
    """The 4 x 4 index -> LPS affine of a 3-D ``image`` (direction x spacing, origin)."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    return affine


def image_from_affine(array_zyx: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of ``array_zyx`` (numpy ``(z, y, x)``) placed by ``affine``.

    Raises
    ------
    ValueError
        ``array_zyx`` is not 3-D, ``affine`` is not a finite 4 x 4 matrix, or
        its axes are not orthogonal (a sheared grid has no SimpleITK
        direction).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if array_zyx.ndim != 3:
        raise ValueError(f"array_zyx must be 3-D (z, y, x), got shape {array_zyx.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4 x 4 matrix, got {affine!r}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length axis: spacing {spacing.tolist()}")
    direction = affine[:3, :3] / spacing
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > 1e-4:
        raise ValueError("affine's axes are not orthogonal: a sheared grid cannot be resampled here")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def labels_onto_grid(labels: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None) -> np.ndarray:
    """``labels`` sampled on ``grid`` by nearest neighbour.

    Parameters
    ----------
    labels:
        Integer labels 0..255 on their own grid.
    grid:
        The target grid (only its size, spacing, origin and direction are used).
    transform:
        Maps points of ``grid`` to points of ``labels`` (SimpleITK's
        convention); ``None`` is the identity: both grids are in the same
        patient space.

    Returns
    -------
    ``(z, y, x)`` uint8 array on ``grid``; 0 where ``grid`` lies outside ``labels``.
    """
    out = sitk.Resample(
        labels,
        grid,
        transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity),
        sitk.sitkNearestNeighbor,
        0,
        sitk.sitkUInt8,
    )
    return sitk.GetArrayFromImage(out)
