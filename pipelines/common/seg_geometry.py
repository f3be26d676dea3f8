"""What a SEG says about its pixel grid, where highdicom leaves it to us.

For a SEG on a projection radiograph (no Frame of Reference) highdicom
writes the Derivation Image tie to the source, and nothing a viewer needs to
draw the frame: :func:`segmentation_source` hides the source geometry from
highdicom, :func:`add_pixel_grid_geometry` writes Pixel Measures and Plane
Orientation from the source's own pixel grid (:func:`valid_pixel_spacing`),
and :func:`add_patient_orientation` writes Patient Orientation (PS3.3
C.7.6.1). docs/architecture.md, "Chest radiograph SEG and SR", records
the decision.

Why :func:`add_pixel_grid_geometry` writes shared Pixel Measures and Plane
Orientation: OHIF 3.13.2 (cornerstone3D adapters) cannot open a SEG without
them (``Cannot destructure property 'SpacingBetweenSlices' of
'PixelMeasures'``, then no Image Orientation); it checks the SEG's
orientation against the one it uses for the source image and draws the
frame on the source only when they agree.

What the values say:

- Pixel Measures (PS3.3 C.7.6.16.2.1): Pixel Spacing = the source's own
  valid Pixel Spacing, else its Imager Pixel Spacing
  (:func:`valid_pixel_spacing`): the SEG frame is the source's pixel
  grid, so its pixel size is the source's. No Slice Thickness: a
  projection radiograph has none. If the source states no valid spacing,
  nothing is added (a spacing is never invented) and the SEG keeps only
  its Derivation Image tie; OHIF 3.13.2 then cannot open it.
- Plane Orientation (Patient) (C.7.6.16.2.4): the source's own Image
  Orientation (Patient) if it has a valid one, else
  :data:`PIXEL_GRID_ORIENTATION`, ``1\\0\\0\\0\\1\\0``. With no
  Frame of Reference there is no patient coordinate system for these
  direction cosines to be in (C.7.6.2.1.1 defines them relative to the
  Frame of Reference); the only frame the SEG has is the source's pixel
  grid, reached through Derivation Image (A.51.5.1: each SEG pixel is the
  referenced image's pixel). In that frame the value is the identity: the
  SEG's rows and columns run exactly as the source's stored rows and
  columns, no flip, rotation or transpose. It is also the orientation
  viewers assume for an image without one (cornerstone3D's image plane
  default), so the SEG lands on the source. It is not a statement about
  anatomy; the anatomy is in Patient Orientation (Type 2C, copied from
  the source by :func:`add_patient_orientation`). An orientation derived
  from Patient Orientation (``L\\F`` would give ``1\\0\\0\\0\\0\\-1``)
  would claim a patient-relative plane the source does not state, and
  OHIF 3.13.2 refuses it as "orthogonal to the acquisition plane of the
  source data" (tests/test_ohif.py checks this).

Standard: PS3.3 (2024c) Table A.51-2 makes Pixel Measures and Plane
Orientation (Patient) "Required if Derivation Image Functional Group is
not present and the Frame of Reference is defined in the patient-relative
Reference Coordinate System. May be present otherwise if the Frame of
Reference is defined in the patient-relative Reference Coordinate
System". A SEG without Frame of Reference meets neither clause, so the
current text does not grant them; earlier editions said only "May be
present otherwise", which dicom3tools (dciodvfy 1.00~20220618) still
checks and accepts. We write them for the viewer, with values that add no
geometry beyond the Derivation Image tie; docs/architecture.md records
the decision. Plane Position (Patient) is not written: without a Frame
of Reference there is no position to give, and OHIF does not need it.
"""

from __future__ import annotations

import copy
import math

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DS

from pipelines.common.seg_frames import check_segmentation

__all__ = [
    "PIXEL_GRID_ORIENTATION",
    "add_patient_orientation",
    "add_pixel_grid_geometry",
    "segmentation_source",
    "valid_pixel_spacing",
]

def segmentation_source(source: Dataset) -> Dataset:
    """The sanitised ``source`` as highdicom should see it when it builds a SEG.

    For a source without Frame of Reference highdicom 0.28 copies Pixel
    Spacing, and Slice Thickness if present, into the SEG's Pixel Measures,
    and nothing else of the geometry. The returned copy has neither (nor
    Spacing Between Slices), so that :func:`add_pixel_grid_geometry` alone
    decides what such a SEG says about its pixel grid, from Pixel Spacing or
    Imager Pixel Spacing, and never a Slice Thickness that a projection
    radiograph does not have. The SEG is tied to the source pixel by pixel
    through its Derivation Image references either way. With a Frame of
    Reference ``source`` is returned as is.
    """
    if "FrameOfReferenceUID" in source:
        return source
    # Not copy.copy: a shallow copy of a pydicom Dataset shares its elements'
    # dict, and deleting from it would delete from ``source`` too.
    clean = copy.deepcopy(source)
    for keyword in ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"):
        if keyword in clean:
            del clean[keyword]
    return clean


#: Image Orientation (Patient) values of a frame whose rows and columns run as
#: its source's stored pixel grid: row direction = increasing column index,
#: column direction = increasing row index. See :func:`add_pixel_grid_geometry`.
PIXEL_GRID_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def valid_pixel_spacing(source: Dataset) -> tuple[tuple[float, float], str] | None:
    """The source's pixel size, where it states a usable one.

    Pixel Spacing (0028,0030), else Imager Pixel Spacing (0018,1164): the
    first that holds two finite values > 0 (PS3.3 10.7.1.3: row spacing,
    then column spacing, in mm). Nothing is invented: ``0\\0``, one value,
    text or an absent attribute give ``None``.

    Returns
    -------
    ((row spacing, column spacing), keyword) or None
        Millimetres, and the attribute they came from.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value in (None, ""):
            continue
        try:
            numbers = [float(v) for v in (value if isinstance(value, (MultiValue, list, tuple)) else [value])]
        except (TypeError, ValueError):
            continue
        if len(numbers) == 2 and all(math.isfinite(v) and v > 0 for v in numbers):
            return (numbers[0], numbers[1]), keyword
    return None


def add_pixel_grid_geometry(seg: Dataset, source: Dataset) -> str | None:
    """Give a SEG without Frame of Reference the two functional groups that
    viewers need to draw it: shared Pixel Measures and Plane Orientation.

    Pixel Spacing is the source's own valid Pixel Spacing, else its Imager
    Pixel Spacing (:func:`valid_pixel_spacing`), with no Slice Thickness;
    Image Orientation (Patient) is the source's own valid one, else
    :data:`PIXEL_GRID_ORIENTATION`. Without a valid spacing nothing is added.
    The module docstring says why and what these values mean.

    Parameters
    ----------
    seg:
        A Segmentation without Frame of Reference UID, as highdicom built it
        (Derivation Image in its functional groups); changed in place.
    source:
        The sanitised source image the SEG was derived from.

    Returns
    -------
    str or None
        The source attribute the spacing came from (``"PixelSpacing"`` or
        ``"ImagerPixelSpacing"``), or ``None`` when nothing was added.

    Raises
    ------
    ValueError
        ``seg`` is not a Segmentation, has a Frame of Reference UID (its
        geometry is then highdicom's, in that frame), or already has Pixel
        Measures or Plane Orientation in a functional group.
    """
    check_segmentation(seg)
    if "FrameOfReferenceUID" in seg:
        raise ValueError(
            "FrameOfReferenceUID of seg is present: its Pixel Measures and Plane Orientation belong to that "
            "frame, not to the source's pixel grid"
        )
    shared = seg.SharedFunctionalGroupsSequence[0]
    groups = [shared, *seg.get("PerFrameFunctionalGroupsSequence", [])]
    for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if any(keyword in group for group in groups):
            raise ValueError(f"{keyword} of seg is present already")
    spacing = valid_pixel_spacing(source)
    if spacing is None:
        return None
    (row_spacing, column_spacing), keyword = spacing
    measures = Dataset()
    measures.PixelSpacing = [DS(row_spacing, auto_format=True), DS(column_spacing, auto_format=True)]
    orientation = Dataset()
    stated = source.get("ImageOrientationPatient")
    values = [float(v) for v in stated] if stated and len(stated) == 6 else PIXEL_GRID_ORIENTATION
    orientation.ImageOrientationPatient = [DS(v, auto_format=True) for v in values]
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    return keyword


def add_patient_orientation(derived: Dataset, source: Dataset) -> None:
    """Write Patient Orientation (0020,0020) into a derived image.

    General Image module (PS3.3 C.7.6.1): Patient Orientation is Type 2C,
    required when the image has no Image Orientation (Patient), which is the
    case for a SEG on a projection radiograph (no Frame of Reference).
    highdicom does not write it. The derived frame lies on the source's pixel
    grid, so the source's (sanitised) value applies; without a valid one it
    is written empty, which Type 2 allows. A derived object in a Frame of
    Reference is left as it is.
    """
    if "FrameOfReferenceUID" in derived:
        return
    derived.PatientOrientation = source.get("PatientOrientation") or None
