"""The voxel grid of a stack of parallel image planes, read from DICOM.

A volumetric pipeline's label map lies on the grid of a reference series:
one plane per single-frame image (MR/CT Image Storage), or one plane per
frame of an enhanced multi-frame image (Enhanced/Legacy Converted Enhanced
MR or CT, whose geometry sits in the Multi-frame Functional Groups, PS3.3
C.7.6.16). :func:`slice_stack` reads that grid once, checks that it is one
regular stack in the given order, and gives the numbers a writer needs:
pixel spacing, the spacing between planes measured from the positions, and
the voxel volume.

Geometry is taken from the Image Plane module (PS3.3 C.7.6.2): Image
Position (Patient) is the centre of the first transmitted pixel, Image
Orientation (Patient) the direction cosines of the first row and the first
column, and Pixel Spacing the distance between the centres of adjacent rows,
then adjacent columns, in mm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset

__all__ = ["ORIENTATION_TOLERANCE", "POSITION_TOLERANCE_MM", "SPACING_TOLERANCE", "SliceStack", "slice_stack"]

# Tolerances for "the same orientation", "the same position" and "regular
# spacing", shared with the brain pipeline's series reader
# (pipelines/brain_tumour/volume.py), so what it accepts, the writers accept.
# DS values are decimal strings of at most 16 characters; scanners round
# positions and cosines to 1e-3..1e-6, so an exact comparison would refuse
# real series.

#: Largest difference between the direction cosines of two planes of one
#: stack (and between a cosine vector's length and 1, and the dot product of
#: the row and column vectors) that still counts as the same orientation.
#: DS values carry at most 16 characters, so real scanners round cosines to
#: about 1e-6; 1e-3 (0.06 degrees) accepts that and refuses real changes.
#: Also the largest difference in mm between the Pixel Spacing of two planes.
ORIENTATION_TOLERANCE = 1e-3

#: Largest relative deviation of any gap between consecutive planes from the
#: median gap (1 %, highdicom's default for "regularly spaced"). A missing
#: slice doubles one gap and is refused; DS rounding of positions is far
#: below it.
SPACING_TOLERANCE = 0.01

#: Two planes closer than this along the normal (mm) occupy the same position;
#: (in the series reader) slices whose in-plane offset from the stack axis
#: exceeds it are sheared (gantry tilt) and refused.
POSITION_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class SliceStack:
    """A regular stack of parallel planes: the grid of a reference series.

    Attributes
    ----------
    rows, columns:
        Rows (0028,0010) and Columns (0028,0011) of every plane.
    pixel_spacing:
        Pixel Spacing (0028,0030): (between rows, between columns), mm, > 0.
    slice_spacing:
        Distance in mm between the centres of adjacent planes, measured along
        the plane normal from Image Position (Patient) (the mean gap); > 0.
        For a single
        plane: Spacing Between Slices (0018,0088), else Slice Thickness
        (0018,0050).
    orientation:
        Image Orientation (Patient) (0020,0037): row then column direction
        cosines.
    positions:
        ``float64`` array ``(number_of_planes, 3)``: Image Position (Patient)
        of each plane in the given order, mm.
    frame_of_reference_uid:
        Frame of Reference UID (0020,0052) of the stack.
    """

    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    orientation: tuple[float, float, float, float, float, float]
    positions: np.ndarray
    frame_of_reference_uid: str

    @property
    def number_of_planes(self) -> int:
        return int(self.positions.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(planes, rows, columns)``: the shape of a label map on this grid."""
        return (self.number_of_planes, self.rows, self.columns)

    @property
    def voxel_volume_mm3(self) -> float:
        """Pixel Spacing (row) x Pixel Spacing (column) x slice spacing, mm^3."""
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the planes: row direction x column direction."""
        row, column = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        normal = np.cross(row, column)
        return normal / np.linalg.norm(normal)


def slice_stack(reference: Sequence[Dataset]) -> SliceStack:
    """Read and check the grid of ``reference``.

    Parameters
    ----------
    reference:
        Either the single-frame images of one series in plane order, or one
        enhanced multi-frame image whose frames are the planes in order
        (Plane Position/Orientation (Patient) and Pixel Measures in its
        Shared or Per-Frame Functional Groups).

    Returns
    -------
    SliceStack
        The grid; planes in the order given.

    Raises
    ------
    ValueError
        Naming the attribute: ``reference`` is empty; images of different
        series, Frames of Reference, Rows/Columns, orientation or Pixel
        Spacing; a missing or invalid Image Position/Orientation (Patient) or
        Pixel Spacing; two planes at the same position (within 0.01 mm);
        planes not in order along the normal, or irregularly spaced (a gap
        more than 1 % from the median gap: no single voxel volume); a single
        plane without Spacing Between Slices or Slice Thickness.
    """
    if not reference:
        raise ValueError("reference is empty: a stack needs at least one image")
    if any(not isinstance(ds, Dataset) for ds in reference):
        raise ValueError("reference must hold pydicom Datasets")
    first = reference[0]
    frames = int(first.get("NumberOfFrames") or 1)
    multiframe = "PerFrameFunctionalGroupsSequence" in first or frames > 1
    if multiframe and len(reference) > 1:
        raise ValueError(
            f"reference holds {len(reference)} datasets and the first is multi-frame; "
            "give one enhanced multi-frame image, or the single-frame images of one series"
        )
    frame_of_reference = str(first.get("FrameOfReferenceUID") or "")
    if not frame_of_reference:
        raise ValueError("FrameOfReferenceUID of the reference is missing: it has no patient coordinate system")
    rows, columns = _positive_int(first, "Rows"), _positive_int(first, "Columns")

    if multiframe:
        orientation, spacing, positions, single_spacing = _multiframe_geometry(first, frames)
    else:
        orientation, spacing, positions, single_spacing = _series_geometry(reference, rows, columns)

    normal = np.cross(np.array(orientation[:3]), np.array(orientation[3:]))
    distances = positions @ normal
    if len(distances) == 1:
        if single_spacing is None:
            raise ValueError(
                "a single plane needs SpacingBetweenSlices or SliceThickness > 0 mm to have a voxel volume"
            )
        slice_spacing = single_spacing
    else:
        steps = np.diff(distances)
        if np.any(np.abs(steps) < POSITION_TOLERANCE_MM):
            index = int(np.argmin(np.abs(steps)))
            raise ValueError(
                f"ImagePositionPatient of planes {index} and {index + 1} lie in the same plane: "
                "the reference holds duplicates or more than one stack"
            )
        if not (np.all(steps > 0) or np.all(steps < 0)):
            raise ValueError(
                "ImagePositionPatient of the reference is not in plane order along the normal; "
                "give the images sorted by position"
            )
        gaps = np.abs(steps)
        median = float(np.median(gaps))
        if float(np.max(np.abs(gaps - median))) > SPACING_TOLERANCE * median:
            raise ValueError(
                f"ImagePositionPatient of the reference is irregularly spaced (steps of "
                f"{float(np.min(np.abs(steps))):.4f} to {float(np.max(np.abs(steps))):.4f} mm): "
                "no single voxel volume; missing slices?"
            )
        # The mean gap: the stack's extent over its gaps, rounding averaged out.
        slice_spacing = float(np.mean(gaps))
    return SliceStack(
        rows=rows,
        columns=columns,
        pixel_spacing=spacing,
        slice_spacing=slice_spacing,
        orientation=orientation,
        positions=positions,
        frame_of_reference_uid=frame_of_reference,
    )


def _series_geometry(reference: Sequence[Dataset], rows: int, columns: int):
    first = reference[0]
    series = first.get("SeriesInstanceUID")
    frame_of_reference = first.get("FrameOfReferenceUID")
    orientation = _orientation(first.get("ImageOrientationPatient"), "ImageOrientationPatient of reference[0]")
    spacing = _spacing(first.get("PixelSpacing"), "PixelSpacing of reference[0]")
    positions = np.empty((len(reference), 3))
    for index, ds in enumerate(reference):
        where = f"reference[{index}]"
        if int(ds.get("NumberOfFrames") or 1) != 1:
            raise ValueError(f"NumberOfFrames of {where} is {ds.NumberOfFrames}; a series stack is single-frame images")
        for keyword, expected in (("SeriesInstanceUID", series), ("FrameOfReferenceUID", frame_of_reference)):
            if ds.get(keyword) != expected:
                raise ValueError(f"{keyword} of {where} is {ds.get(keyword)!r}, reference[0] has {expected!r}")
        if (ds.get("Rows"), ds.get("Columns")) != (rows, columns):
            raise ValueError(f"Rows/Columns of {where} differ from reference[0]'s {rows}x{columns}")
        if index:
            other = _orientation(ds.get("ImageOrientationPatient"), f"ImageOrientationPatient of {where}")
            if max(abs(a - b) for a, b in zip(other, orientation, strict=True)) > ORIENTATION_TOLERANCE:
                raise ValueError(f"ImageOrientationPatient of {where} differs from reference[0]'s")
            other_spacing = _spacing(ds.get("PixelSpacing"), f"PixelSpacing of {where}")
            if max(abs(a - b) for a, b in zip(other_spacing, spacing, strict=True)) > ORIENTATION_TOLERANCE:
                raise ValueError(f"PixelSpacing of {where} differs from reference[0]'s")
        positions[index] = _position(ds.get("ImagePositionPatient"), f"ImagePositionPatient of {where}")
    return orientation, spacing, positions, _single_plane_spacing(first)


def _multiframe_geometry(image: Dataset, frames: int):
    shared = (image.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = image.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        raise ValueError(
            f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for NumberOfFrames {frames}"
        )

    def group(index: int, keyword: str) -> Dataset:
        item = per_frame[index].get(keyword) or shared.get(keyword)
        if not item:
            raise ValueError(f"{keyword} of frame {index + 1} is missing (Shared and Per-Frame Functional Groups)")
        return item[0]

    orientation = _orientation(
        group(0, "PlaneOrientationSequence").get("ImageOrientationPatient"),
        "PlaneOrientationSequence.ImageOrientationPatient of frame 1",
    )
    measures = group(0, "PixelMeasuresSequence")
    spacing = _spacing(measures.get("PixelSpacing"), "PixelMeasuresSequence.PixelSpacing of frame 1")
    positions = np.empty((frames, 3))
    for index in range(frames):
        where = f"frame {index + 1}"
        other = _orientation(
            group(index, "PlaneOrientationSequence").get("ImageOrientationPatient"),
            f"PlaneOrientationSequence.ImageOrientationPatient of {where}",
        )
        if max(abs(a - b) for a, b in zip(other, orientation, strict=True)) > ORIENTATION_TOLERANCE:
            raise ValueError(f"PlaneOrientationSequence.ImageOrientationPatient of {where} differs from frame 1's")
        other_spacing = _spacing(
            group(index, "PixelMeasuresSequence").get("PixelSpacing"), f"PixelMeasuresSequence.PixelSpacing of {where}"
        )
        if max(abs(a - b) for a, b in zip(other_spacing, spacing, strict=True)) > ORIENTATION_TOLERANCE:
            raise ValueError(f"PixelMeasuresSequence.PixelSpacing of {where} differs from frame 1's")
        positions[index] = _position(
            group(index, "PlanePositionSequence").get("ImagePositionPatient"),
            f"PlanePositionSequence.ImagePositionPatient of {where}",
        )
    return orientation, spacing, positions, _single_plane_spacing(measures)


def _positive_int(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{keyword} of the reference is {value!r}; expected a positive integer")
    return value


def _numbers(value: Any, count: int, attribute: str) -> list[float]:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{attribute} is {value!r}; expected {count} numbers") from None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{attribute} is {value!r}; expected {count} finite numbers")
    return numbers


def _orientation(value: object, attribute: str) -> tuple[float, float, float, float, float, float]:
    numbers = _numbers(value, 6, attribute)
    row, column = np.array(numbers[:3]), np.array(numbers[3:])
    if (
        abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(column) - 1) > ORIENTATION_TOLERANCE
        or abs(float(row @ column)) > ORIENTATION_TOLERANCE
    ):
        raise ValueError(f"{attribute} must hold two orthogonal unit vectors (PS3.3 C.7.6.2.1.1)")
    return tuple(numbers)  # type: ignore[return-value]


def _spacing(value: object, attribute: str) -> tuple[float, float]:
    numbers = _numbers(value, 2, attribute)
    if not all(v > 0 for v in numbers):
        raise ValueError(f"{attribute} is {value!r}; both values must be > 0 mm (PS3.3 10.7.1.3)")
    return (numbers[0], numbers[1])


def _position(value: object, attribute: str) -> np.ndarray:
    return np.array(_numbers(value, 3, attribute))


def _single_plane_spacing(ds: Dataset) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number) and number > 0:
            return number
    return None
