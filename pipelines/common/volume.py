"""DICOM CT or MR series -> a 3-D SimpleITK image with its real patient geometry.

:func:`series_to_image` takes the pydicom datasets of one series (pixel data
included) and returns a :class:`SeriesVolume`: a float32 ``sitk.Image`` whose
origin, spacing and direction come from the Image Plane attributes, plus the
source (instance, frame) of every slice, so that a SEG can be written per
source frame and lie exactly on the images a radiologist scrolls.

Both storage forms are read:

- single-frame CT or MR Image Storage (and any single-frame image with the Image
  Plane module, PS3.3 C.7.6.2): Image Position (Patient) (0020,0032), Image
  Orientation (Patient) (0020,0037), Pixel Spacing (0028,0030), Rescale
  Slope/Intercept (0028,1053)/(0028,1052) where present;
- multi-frame Enhanced CT/MR Image Storage and Legacy Converted Enhanced CT/MR
  (PS3.3 C.7.6.16): per-frame or shared functional groups Plane Position
  (Patient), Plane Orientation (Patient), Pixel Measures and Pixel Value
  Transformation (C.7.6.16.2.1-3, C.7.6.16.2.9).

Axis conventions (they differ, so every docstring says which it means):

- SimpleITK indexes ``(x, y, z)`` = ``(column, row, slice)``; the image's
  x axis is the DICOM row direction (first three values of Image Orientation
  (Patient)), y the column direction (last three values), z the slice normal
  ``row x column``. Physical space is DICOM patient space (LPS, mm).
- numpy arrays from ``sitk.GetArrayFromImage`` are ``(z, y, x)`` =
  ``(slice, row, column)``: ``array[k]`` is the pixel array of slice ``k``
  exactly as stored in its DICOM instance/frame.

Slices are ordered by their position along the slice normal (ascending
``ImagePositionPatient . normal``), never by Instance Number, which scanners
number in acquisition or any other order.

highdicom (``get_series_volume_positions``) can sort and check positions too,
but it answers ``None`` without a reason; the node must tell a PACS
administrator *which* attribute made a series unusable, so the checks are
done here, each with its own :class:`~pipelines.base.PipelineInputError` (a
``ValueError``) naming the attribute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset

from pipelines.base import PipelineInputError
from pipelines.common.geometry import ORIENTATION_TOLERANCE, POSITION_TOLERANCE_MM, SPACING_TOLERANCE

__all__ = [
    "SliceSource",
    "SeriesVolume",
    "series_to_image",
]


@dataclass(frozen=True)
class SliceSource:
    """Where one slice of a :class:`SeriesVolume` comes from.

    Attributes
    ----------
    dataset:
        The source instance.
    frame_number:
        1-based frame number (PS3.3 C.7.6.6, Number of Frames (0028,0008))
        within a multi-frame ``dataset``; ``None`` for a single-frame instance.
    """

    dataset: Dataset
    frame_number: int | None = None

    @property
    def sop_instance_uid(self) -> str:
        """SOP Instance UID (0008,0018) of the source instance."""
        return str(self.dataset.SOPInstanceUID)


@dataclass(frozen=True)
class SeriesVolume:
    """One DICOM series as a 3-D image.

    Attributes
    ----------
    image:
        float32 ``sitk.Image``, size ``(Columns, Rows, n_slices)`` (sitk
        ``x, y, z`` order), spacing in mm, origin = Image Position (Patient) of
        slice 0, direction columns = row cosines, column cosines, slice normal
        (LPS patient space). Stored values have the modality rescale applied.
    slices:
        ``slices[k]`` is the source of image slice ``k`` (numpy
        ``sitk.GetArrayViewFromImage(image)[k]``).
    series_instance_uid:
        Series Instance UID (0020,000E).
    frame_of_reference_uid:
        Frame of Reference UID (0020,0052), ``None`` when the series has none.
    """

    image: sitk.Image
    slices: tuple[SliceSource, ...]
    series_instance_uid: str
    frame_of_reference_uid: str | None

    def __post_init__(self) -> None:
        if self.image.GetDimension() != 3 or self.image.GetSize()[2] != len(self.slices):
            raise ValueError(
                f"SeriesVolume.image has size {self.image.GetSize()} but {len(self.slices)} slice sources"
            )

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        """The distinct source instances in slice order (first appearance).

        For a single-frame series ``datasets[k]`` is the instance of slice
        ``k``; for one multi-frame instance it is ``(that instance,)``.
        """
        seen: dict[int, Dataset] = {}
        for s in self.slices:
            seen.setdefault(id(s.dataset), s.dataset)
        return tuple(seen.values())

    @property
    def frame_numbers(self) -> tuple[int | None, ...]:
        """1-based frame number of each slice, ``None`` for single-frame slices."""
        return tuple(s.frame_number for s in self.slices)

    @property
    def is_multiframe(self) -> bool:
        """Whether the slices are frames of multi-frame instances."""
        return any(s.frame_number is not None for s in self.slices)

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy shape ``(n_slices, Rows, Columns)``."""
        x, y, z = self.image.GetSize()
        return (z, y, x)

    def to_source_frames(self, array: np.ndarray) -> np.ndarray:
        """Reorder a ``(n_slices, Rows, Columns)`` array in slice order into
        the frame order of the one multi-frame source instance.

        Returns
        -------
        ``(NumberOfFrames, Rows, Columns)`` array of ``array``'s dtype: frame
        ``f`` (0-based) holds the slice whose :attr:`SliceSource.frame_number`
        is ``f + 1``; frames that are not part of the volume stay 0.

        Raises
        ------
        ValueError
            The volume is not made of frames of exactly one instance, or
            ``array`` does not have :attr:`shape`.
        """
        if array.shape != self.shape:
            raise ValueError(f"array has shape {array.shape}, expected {self.shape} (slices, rows, columns)")
        datasets = self.datasets
        if not self.is_multiframe or len(datasets) != 1:
            raise ValueError("to_source_frames needs a volume made of the frames of one multi-frame instance")
        n_frames = int(datasets[0].NumberOfFrames)
        out = np.zeros((n_frames, *array.shape[1:]), dtype=array.dtype)
        for k, s in enumerate(self.slices):
            assert s.frame_number is not None  # every slice is a frame of the one multi-frame instance
            out[s.frame_number - 1] = array[k]
        return out


# --------------------------------------------------------------------------- attribute parsing


def _where(ds: Dataset, frame: int | None) -> str:
    uid = ds.get("SOPInstanceUID", "?")
    return f"instance {uid}" + ("" if frame is None else f" frame {frame}")


def _floats(value, keyword: str, n: int, where: str) -> np.ndarray:
    if value is None or value == "":
        raise PipelineInputError(f"{keyword} is missing in {where}")
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise PipelineInputError(f"{keyword} {value!r} is not numeric in {where}") from None
    if out.shape != (n,):
        raise PipelineInputError(f"{keyword} has {out.size} values in {where}, expected {n}")
    if not np.all(np.isfinite(out)):
        raise PipelineInputError(f"{keyword} {out.tolist()} is not finite in {where}")
    return out


def _functional_group_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` for frame ``frame_index``
    (0-based): per-frame first, then shared (PS3.3 C.7.6.16)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        item = per_frame[frame_index]
        if sequence in item and len(item[sequence].value) > 0:
            return item[sequence].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        item = shared[0]
        if sequence in item and len(item[sequence].value) > 0:
            return item[sequence].value[0]
    return None


@dataclass(frozen=True)
class _SliceGeometry:
    source: SliceSource
    position: np.ndarray  # (3,) mm, LPS
    orientation: np.ndarray  # (6,) direction cosines
    pixel_spacing: np.ndarray  # (2,) mm: (row spacing, column spacing)
    slope: float
    intercept: float
    rows: int
    columns: int


def _image_size(ds: Dataset, where: str) -> tuple[int, int]:
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise PipelineInputError(f"Rows/Columns are missing in {where}")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise PipelineInputError(
            f"SamplesPerPixel is {ds.SamplesPerPixel} in {where}; a volume needs grey-scale (1 sample)"
        )
    return int(rows), int(columns)


def _rescale(item: Dataset | None, where: str) -> tuple[float, float]:
    if item is None or "RescaleSlope" not in item:
        return 1.0, 0.0
    slope = float(item.RescaleSlope)
    intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0.0:
        raise PipelineInputError(f"RescaleSlope/RescaleIntercept {slope}/{intercept} unusable in {where}")
    return slope, intercept


def _single_frame_geometry(ds: Dataset) -> _SliceGeometry:
    where = _where(ds, None)
    rows, columns = _image_size(ds, where)
    slope, intercept = _rescale(ds, where)
    return _SliceGeometry(
        source=SliceSource(ds, None),
        position=_floats(ds.get("ImagePositionPatient"), "ImagePositionPatient (0020,0032)", 3, where),
        orientation=_floats(ds.get("ImageOrientationPatient"), "ImageOrientationPatient (0020,0037)", 6, where),
        pixel_spacing=_floats(ds.get("PixelSpacing"), "PixelSpacing (0028,0030)", 2, where),
        slope=slope,
        intercept=intercept,
        rows=rows,
        columns=columns,
    )


def _multi_frame_geometry(ds: Dataset) -> list[_SliceGeometry]:
    rows, columns = _image_size(ds, _where(ds, None))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    out = []
    for f in range(n_frames):
        where = _where(ds, f + 1)
        position = _functional_group_item(ds, f, "PlanePositionSequence")
        orientation = _functional_group_item(ds, f, "PlaneOrientationSequence")
        measures = _functional_group_item(ds, f, "PixelMeasuresSequence")
        if position is None:
            raise PipelineInputError(
                f"PlanePositionSequence (0020,9113) with ImagePositionPatient is missing in {where} "
                "(neither per-frame nor shared functional groups)"
            )
        if orientation is None:
            raise PipelineInputError(
                f"PlaneOrientationSequence (0020,9116) with ImageOrientationPatient is missing in {where}"
            )
        if measures is None:
            raise PipelineInputError(f"PixelMeasuresSequence (0028,9110) with PixelSpacing is missing in {where}")
        slope, intercept = _rescale(_functional_group_item(ds, f, "PixelValueTransformationSequence"), where)
        out.append(
            _SliceGeometry(
                source=SliceSource(ds, f + 1),
                position=_floats(position.get("ImagePositionPatient"), "ImagePositionPatient (0020,0032)", 3, where),
                orientation=_floats(
                    orientation.get("ImageOrientationPatient"), "ImageOrientationPatient (0020,0037)", 6, where
                ),
                pixel_spacing=_floats(measures.get("PixelSpacing"), "PixelSpacing (0028,0030)", 2, where),
                slope=slope,
                intercept=intercept,
                rows=rows,
                columns=columns,
            )
        )
    return out


def _is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds or (
        int(ds.get("NumberOfFrames", 1) or 1) > 1
    )


# --------------------------------------------------------------------------- checks


def _check_orientation(geoms: Sequence[_SliceGeometry], tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    first = geoms[0]
    row, col = first.orientation[:3], first.orientation[3:]
    where = _where(first.source.dataset, first.source.frame_number)
    if abs(np.linalg.norm(row) - 1) > tolerance or abs(np.linalg.norm(col) - 1) > tolerance:
        raise PipelineInputError(
            f"ImageOrientationPatient (0020,0037) {first.orientation.tolist()} in {where} "
            "is not made of two unit vectors"
        )
    if abs(float(row @ col)) > tolerance:
        raise PipelineInputError(
            f"ImageOrientationPatient (0020,0037) {first.orientation.tolist()} in {where}: "
            "row and column directions are not orthogonal"
        )
    for g in geoms[1:]:
        if np.max(np.abs(g.orientation - first.orientation)) > tolerance:
            raise PipelineInputError(
                "ImageOrientationPatient (0020,0037) differs within the series: "
                f"{first.orientation.tolist()} in {where} but {g.orientation.tolist()} in "
                f"{_where(g.source.dataset, g.source.frame_number)} (tolerance {tolerance}); "
                "a localiser or a second stack is mixed in"
            )
    # Re-orthonormalise: DS rounding leaves |row| slightly off 1.
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    return row, col


def _check_in_plane(geoms: Sequence[_SliceGeometry]) -> None:
    first = geoms[0]
    for keyword, values in (
        ("Rows/Columns", lambda g: np.array([g.rows, g.columns], dtype=float)),
        ("PixelSpacing (0028,0030)", lambda g: g.pixel_spacing),
    ):
        ref = values(first)
        for g in geoms[1:]:
            if not np.allclose(values(g), ref, rtol=1e-4, atol=1e-6):
                raise PipelineInputError(
                    f"{keyword} differs within the series: {ref.tolist()} in "
                    f"{_where(first.source.dataset, first.source.frame_number)} but {values(g).tolist()} in "
                    f"{_where(g.source.dataset, g.source.frame_number)}"
                )
    if np.any(first.pixel_spacing <= 0):
        raise PipelineInputError(
            f"PixelSpacing (0028,0030) {first.pixel_spacing.tolist()} is zero or negative in "
            f"{_where(first.source.dataset, first.source.frame_number)}"
        )


def _sort_along_normal(
    geoms: Sequence[_SliceGeometry], normal: np.ndarray, spacing_tolerance: float
) -> tuple[list[_SliceGeometry], float]:
    distances = np.array([g.position @ normal for g in geoms])
    order = np.argsort(distances, kind="stable")
    geoms = [geoms[i] for i in order]
    distances = distances[order]
    gaps = np.diff(distances)
    for i, gap in enumerate(gaps):
        if gap < POSITION_TOLERANCE_MM:
            a, b = geoms[i].source, geoms[i + 1].source
            raise PipelineInputError(
                f"ImagePositionPatient (0020,0032): {_where(a.dataset, a.frame_number)} and "
                f"{_where(b.dataset, b.frame_number)} lie at the same position "
                f"({geoms[i].position.tolist()}); several echoes, repetitions or stacks in one series"
            )
    # In-plane offset from the stack axis: sheared stacks (gantry tilt) do
    # not form a rectilinear grid.
    origin = geoms[0].position
    for g, d in zip(geoms, distances, strict=True):
        off = (g.position - origin) - (d - distances[0]) * normal
        if np.linalg.norm(off) > max(POSITION_TOLERANCE_MM, 0.05 * float(np.min(g.pixel_spacing))):
            raise PipelineInputError(
                f"ImagePositionPatient (0020,0032) of {_where(g.source.dataset, g.source.frame_number)} is "
                f"{np.linalg.norm(off):.3f} mm off the slice normal through the first slice: the stack is "
                "sheared (gantry tilt) and is not a rectilinear volume"
            )
    if len(gaps) == 0:
        first = geoms[0].source.dataset
        spacing = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        return geoms, float(spacing)
    median = float(np.median(gaps))
    worst = float(np.max(np.abs(gaps - median)))
    if worst > spacing_tolerance * median:
        raise PipelineInputError(
            "ImagePositionPatient (0020,0032): slice spacing is not uniform: gaps between consecutive "
            f"slices range {gaps.min():.4f}-{gaps.max():.4f} mm around a median of {median:.4f} mm "
            f"(allowed: +/-{100 * spacing_tolerance:g} % of the median); missing or extra slices?"
        )
    return geoms, median


def _check_series(datasets: Sequence[Dataset]) -> tuple[str, str | None]:
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1 or "" in series:
        raise PipelineInputError(
            f"SeriesInstanceUID (0020,000E): the datasets belong to {len(series)} series "
            f"({sorted(series)}); series_to_image reads one series"
        )
    frames = {str(ds.FrameOfReferenceUID) for ds in datasets if ds.get("FrameOfReferenceUID")}
    if len(frames) > 1:
        raise PipelineInputError(
            f"FrameOfReferenceUID (0020,0052): the series has {len(frames)} frames of reference "
            f"({sorted(frames)}); its slices do not share one patient coordinate system"
        )
    return series.pop(), (frames.pop() if frames else None)


# --------------------------------------------------------------------------- pixel data


def _pixels(ds: Dataset) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PipelineInputError(f"PixelData (7FE0,0010) is missing in {_where(ds, None)}")
    try:
        return ds.pixel_array
    except Exception as exc:  # the decoders raise many types; report which instance
        raise PipelineInputError(f"PixelData (7FE0,0010) of {_where(ds, None)} cannot be decoded: {exc}") from exc


def series_to_image(
    datasets: Sequence[Dataset],
    *,
    spacing_tolerance: float = SPACING_TOLERANCE,
    orientation_tolerance: float = ORIENTATION_TOLERANCE,
) -> SeriesVolume:
    """Build a 3-D image with real geometry from one DICOM series.

    Parameters
    ----------
    datasets:
        pydicom datasets of one series, with pixel data, in any order: either
        single-frame instances (one slice each) or multi-frame instances
        (Enhanced / Legacy Converted Enhanced CT or MR; one slice per frame), or a
        mix.
    spacing_tolerance:
        Largest allowed relative deviation of a gap between consecutive
        slices from the median gap (default 1 %).
    orientation_tolerance:
        Largest allowed difference between direction cosines of two slices.

    Returns
    -------
    :class:`SeriesVolume`: ``image`` float32, size ``(Columns, Rows,
    n_slices)`` (sitk x, y, z), spacing ``(column spacing, row spacing, slice
    gap)`` in mm (Pixel Spacing's second value is the column spacing, PS3.3
    10.7.1.3), origin and direction in LPS patient space; slices sorted by
    ascending position along the normal ``row x column``, with the modality
    rescale (slope/intercept) applied in float32.

    Raises
    ------
    PipelineInputError (a ValueError)
        Naming the attribute: no datasets; several SeriesInstanceUIDs; several
        FrameOfReferenceUIDs; missing or malformed ImagePositionPatient,
        ImageOrientationPatient, PixelSpacing (or their functional groups);
        orientation, Rows/Columns or PixelSpacing differing between slices;
        two slices at one position; a sheared stack; slice gaps deviating
        more than ``spacing_tolerance``; undecodable PixelData.
    """
    if not datasets:
        raise PipelineInputError("series_to_image got no datasets")
    series_uid, frame_uid = _check_series(datasets)
    geoms: list[_SliceGeometry] = []
    for ds in datasets:
        geoms.extend(_multi_frame_geometry(ds) if _is_multiframe(ds) else [_single_frame_geometry(ds)])
    _check_in_plane(geoms)
    row, col = _check_orientation(geoms, orientation_tolerance)
    normal = np.cross(row, col)
    geoms, slice_gap = _sort_along_normal(geoms, normal, spacing_tolerance)

    first = geoms[0]
    volume = np.empty((len(geoms), first.rows, first.columns), dtype=np.float32)
    decoded: dict[int, np.ndarray] = {}
    for k, g in enumerate(geoms):
        ds = g.source.dataset
        if g.source.frame_number is None:
            pixels = _pixels(ds)
        else:
            # Decode each multi-frame instance once, not once per frame.
            if id(ds) not in decoded:
                arr = _pixels(ds)
                decoded[id(ds)] = arr[None] if arr.ndim == 2 else arr
            pixels = decoded[id(ds)][g.source.frame_number - 1]
        if pixels.shape != (first.rows, first.columns):
            raise PipelineInputError(
                f"PixelData of {_where(ds, g.source.frame_number)} has shape {pixels.shape}, "
                f"expected Rows x Columns {(first.rows, first.columns)}"
            )
        np.multiply(pixels, np.float32(g.slope), out=volume[k], casting="unsafe")
        if g.intercept:
            volume[k] += np.float32(g.intercept)
    decoded.clear()

    image = sitk.GetImageFromArray(volume)
    del volume
    image.SetSpacing((float(first.pixel_spacing[1]), float(first.pixel_spacing[0]), slice_gap))
    image.SetOrigin(tuple(float(v) for v in first.position))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    return SeriesVolume(
        image=image,
        slices=tuple(g.source for g in geoms),
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_uid,
    )
