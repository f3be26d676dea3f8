"""What every derived DICOM object of every pipeline needs.

A pipeline's writers (``pipelines/<task>/write.py``) build their SEG and SR
with highdicom and take from here:

- :class:`AlgorithmDescription`: the model as it is named in the objects;
- :func:`derived_uids`: Series and SOP Instance UIDs that a re-run repeats,
  so the PACS replaces an earlier result instead of storing a duplicate;
- :func:`sanitize_source` / :func:`sanitize_sources` (from
  :mod:`pipelines.common.sanitize`): source metadata with invalid values
  repaired or dropped, and the list of what changed;
- :func:`series_description`, :func:`fit_long_string`: labels that name the
  pipeline, model and version and say "NOT FOR DIAGNOSTIC USE" within the 64
  characters of LO;
- :func:`add_patient_orientation`, :func:`add_pixel_grid_geometry`,
  :func:`image_library`, :func:`insert_image_library`,
  :func:`ensure_valid_values`: the pieces of the General Image module, the
  SEG functional groups and TID 1600 that highdicom leaves to the caller for
  projection radiographs, and a last check of the finished object;
- :func:`region_outline`, :func:`image_outline`: closed SCOORD polylines on a
  source image (TID 1410 Image Region), for planar results;
- for volumes (series of slices): :func:`sanitize_series` (fast source
  proxies for a SEG), :func:`reference_proxies` (evidence),
  :func:`series_image_library` (TID 1600 with one group per series),
  :func:`segment_voxel_counts` (what a SEG holds, for volumes) and
  :func:`device_observation_context` (TID 1002/1004 for the model).
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DS
from scipy import ndimage
from skimage import measure
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_ROOT_UID, UID, SegmentationStorage, generate_uid

from pipelines.common.sanitize import (
    TYPE2_IN_DERIVED,
    Repair,
    find_invalid_values,
    reference_proxies,
    reference_proxy,
    sanitize_series,
    sanitize_source,
    sanitize_sources,
)

__all__ = [
    "NOT_FOR_DIAGNOSTIC_USE",
    "PIXEL_GRID_ORIENTATION",
    "AlgorithmDescription",
    "DerivedUIDs",
    "Repair",
    "TYPE2_IN_DERIVED",
    "add_patient_orientation",
    "add_pixel_grid_geometry",
    "check_long_string",
    "derived_uid",
    "derived_uids",
    "device_observation_context",
    "device_uid",
    "ensure_valid_values",
    "fit_long_string",
    "image_library",
    "image_outline",
    "insert_image_library",
    "reference_proxies",
    "reference_proxy",
    "referenced_segmentation_frame",
    "region_outline",
    "sanitize_series",
    "sanitize_source",
    "sanitize_sources",
    "segment_frame_numbers",
    "segment_voxel_counts",
    "segmentation_source",
    "series_description",
    "series_image_library",
    "valid_pixel_spacing",
]

#: Said by the Series Description of every derived object (and by the SEG's
#: Content Description): the node's results support review, not diagnosis.
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

# Mixed into every UID's entropy so the node's UIDs never collide with those
# of another application hashing the same source UIDs under pydicom's root.
_UID_NAMESPACE = "dicom-ai-node"

# LO (PS3.5 6.2): 64 characters of the default repertoire, no backslash, no
# control characters. Our own strings are kept to printable ASCII so that
# they encode under any Specific Character Set a source may declare.
_LO_CHARACTERS = re.compile(r"[\x20-\x5b\x5d-\x7e]*")
_LO_MAX = 64

_PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})


def check_long_string(value: object, attribute: str, *, required: bool = True) -> str:
    """Check that ``value`` can be written as an LO value of our own.

    Raises
    ------
    ValueError
        Not a string, empty (when ``required``), longer than 64 characters, or
        holding a backslash or a character outside printable ASCII. The
        message names ``attribute``.
    """
    if not isinstance(value, str):
        raise ValueError(f"{attribute} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{attribute} is empty")
    if len(value) > _LO_MAX:
        raise ValueError(f"{attribute} is {len(value)} characters; LO allows {_LO_MAX} (PS3.5 6.2)")
    if not _LO_CHARACTERS.fullmatch(value):
        raise ValueError(f"{attribute} {value!r} must be printable ASCII without backslash (LO, PS3.5 6.2)")
    return value


@dataclass(frozen=True)
class AlgorithmDescription:
    """The model that produced a derived object, as the objects name it.

    It fills the SEG's Segmentation Algorithm Identification Sequence
    (PS3.3 C.8.20.2, Algorithm Identification Macro 10.16), the SR's TID 4019
    Algorithm Identification and TID 1004 Device Observer, and the Series
    Description of both.

    Attributes
    ----------
    name:
        Algorithm Name (0066,0036), LO: the model card's name, e.g.
        ``"pneumonia-densenet121-demo"``.
    version:
        Algorithm Version (0066,0031), LO, e.g. ``"1.0.0"``.
    source:
        Algorithm Source (0066,0032), LO, optional: where the model comes
        from, e.g. ``"torchxrayvision densenet121-res224-rsna"``.
    family:
        Algorithm Family Code (0066,002F) from CID 7162; default
        ``codes.cid7162.ArtificialIntelligence`` (DCM 123110).
    parameters:
        Algorithm Parameters (0066,0032 LT as ``name=value,...``; one TID 4019
        row each): name -> value of the settings the model ran with, e.g.
        ``{"cam_threshold": "0.5"}``.

    Raises
    ------
    ValueError
        On construction, naming the attribute: an empty or over-long string,
        a character LO does not allow, a parameter name holding ``=`` or
        ``,`` or a value holding ``,``.
    TypeError
        ``family`` is not a :class:`pydicom.sr.coding.Code` or
        :class:`highdicom.sr.CodedConcept`.
    """

    name: str
    version: str
    source: str | None = None
    family: Code | CodedConcept = codes.cid7162.ArtificialIntelligence
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_long_string(self.name, "AlgorithmDescription.name")
        check_long_string(self.version, "AlgorithmDescription.version")
        if self.source is not None:
            check_long_string(self.source, "AlgorithmDescription.source")
        if not isinstance(self.family, (Code, CodedConcept)):
            raise TypeError(
                f"AlgorithmDescription.family must be a Code from CID 7162, got {type(self.family).__name__}"
            )
        parameters = dict(self.parameters)
        for key, value in parameters.items():
            attribute = f"AlgorithmDescription.parameters[{key!r}]"
            check_long_string(key, attribute)
            check_long_string(value, attribute)
            # Written as "name=value,name=value" (highdicom, 0066,0032).
            if "=" in key or "," in key or "," in value:
                raise ValueError(f"{attribute} must not hold ',' (nor '=' in the name)")
        object.__setattr__(self, "parameters", MappingProxyType(parameters))

    @property
    def label(self) -> str:
        """``"<name> <version>"``, as written where a single text names the model."""
        return f"{self.name} {self.version}"

    def segmentation_identification(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification Sequence for a SEG segment (PS3.3 10.16)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=self.family,
            version=self.version,
            source=self.source,
            parameters=dict(self.parameters) or None,
        )

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification for an SR measurement group."""
        return hd.sr.AlgorithmIdentification(
            name=self.name,
            version=self.version,
            parameters=[f"{key}={value}" for key, value in self.parameters.items()] or None,
            family=self.family,
        )


@dataclass(frozen=True)
class DerivedUIDs:
    """Series Instance UID and SOP Instance UID of one derived object."""

    series_instance_uid: UID
    sop_instance_uid: UID


def derived_uid(prefix: str | None, *parts: str) -> UID:
    """A UID that is a function of ``parts`` only (PS3.5 9.1; under an
    organisation root, PS3.5 B.1).

    ``pydicom.uid.generate_uid(prefix, entropy_srcs=[...])`` hashes the parts
    (SHA-512) under ``prefix``; the same parts always give the same UID.

    Parameters
    ----------
    prefix:
        Organisation root ending in ``"."`` (``PipelineContext.uid_prefix``);
        ``None`` uses pydicom's root ``1.2.826.0.1.3680043.8.498.`` (pydicom's
        own ``prefix=None`` would ignore the entropy and return a random
        ``2.25.`` UUID UID, which would defeat the purpose).
    parts:
        Strings that identify what the UID names; at least one.

    Raises
    ------
    ValueError
        ``prefix`` is not a valid UID root (names ``uid_prefix``), or no
        part is given.
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part to derive from")
    # generate_uid concatenates its sources; a separator keeps ("ab", "c")
    # and ("a", "bc") apart.
    entropy = "\x1f".join((_UID_NAMESPACE, *parts))
    try:
        return generate_uid(PYDICOM_ROOT_UID if prefix is None else prefix, entropy_srcs=[entropy])
    except ValueError as exc:
        raise ValueError(f"uid_prefix {prefix!r} is not a valid UID root: {exc}") from None


def derived_uids(
    sources: Sequence[Dataset],
    *,
    pipeline: str,
    algorithm: AlgorithmDescription,
    kind: str,
    prefix: str | None,
) -> DerivedUIDs:
    """Deterministic UIDs of a derived object.

    The Series Instance UID derives from the sorted source Series Instance
    UIDs, the SOP Instance UID from the sorted source SOP Instance UIDs; both
    also from ``pipeline``, the model's name and version and ``kind``. A
    re-run gives the same UIDs (the PACS replaces the earlier object); another
    model version, another kind or other sources give other UIDs. Order of
    ``sources`` does not matter.

    Parameters
    ----------
    sources:
        The source images (datasets or sanitised copies).
    pipeline:
        Routing name of the pipeline, e.g. ``"pneumonia"``.
    algorithm:
        The model.
    kind:
        What the object is, e.g. ``"SEG"`` or ``"SR"``: a SEG and an SR of
        the same run are in different series (a series has one Modality).
    prefix:
        ``PipelineContext.uid_prefix``.

    Raises
    ------
    ValueError
        ``sources`` is empty, ``pipeline`` or ``kind`` is empty, a source
        lacks its UIDs, or ``prefix`` is invalid.
    """
    if not sources:
        raise ValueError("sources is empty: a derived object needs at least one source image")
    check_long_string(pipeline, "pipeline")
    check_long_string(kind, "kind")
    try:
        series = sorted({str(ds.SeriesInstanceUID) for ds in sources})
        instances = sorted({str(ds.SOPInstanceUID) for ds in sources})
    except AttributeError as exc:
        raise ValueError(f"a source image lacks its UIDs: {exc}") from None
    identity = (pipeline, algorithm.name, algorithm.version, kind)
    return DerivedUIDs(
        series_instance_uid=derived_uid(prefix, "series", *identity, *series),
        sop_instance_uid=derived_uid(prefix, "instance", *identity, *instances),
    )


def device_uid(algorithm: AlgorithmDescription, prefix: str | None) -> UID:
    """UID of the node running ``algorithm``, as a device (TID 1004 Device
    Observer UID in the SR; also written as the SEG's Device Serial Number, so
    both objects name the same device). Same model and version, same UID.

    Raises
    ------
    ValueError
        ``prefix`` is invalid.
    """
    return derived_uid(prefix, "device", algorithm.name, algorithm.version)


def fit_long_string(candidates: Sequence[str], attribute: str, *, limit: int = _LO_MAX) -> str:
    """The first of ``candidates`` (most to least complete) that fits LO.

    Raises
    ------
    ValueError
        None fits in ``limit`` characters, or one holds a character LO does
        not allow; the message names ``attribute``.
    """
    if not candidates:
        raise ValueError(f"{attribute}: no text to write")
    for text in candidates:
        check_long_string(text[:limit], attribute)
        if len(text) <= limit:
            return text
    raise ValueError(
        f"{attribute}: even the shortest form {candidates[-1]!r} is {len(candidates[-1])} characters, "
        f"LO allows {limit} (PS3.5 6.2); shorten the model's name or version"
    )


def series_description(pipeline: str, algorithm: AlgorithmDescription, kind: str) -> str:
    """Series Description (0008,103E) of a derived series.

    Names the pipeline, the object kind, the model's name and version, and
    says "NOT FOR DIAGNOSTIC USE", shortened (model name first, then
    pipeline) to fit the 64 characters of LO; the version and the warning
    always stay. The full name and version also go where the IOD has room.

    Raises
    ------
    ValueError
        Even ``"<kind> <version> NOT FOR DIAGNOSTIC USE"`` is over 64
        characters.
    """
    check_long_string(pipeline, "pipeline")
    check_long_string(kind, "kind")
    name, version = algorithm.name, algorithm.version
    return fit_long_string(
        [
            f"{pipeline} {kind} {name} {version} - {NOT_FOR_DIAGNOSTIC_USE}",
            f"{name} {version} {kind} - {NOT_FOR_DIAGNOSTIC_USE}",
            f"{pipeline} {kind} {version} - {NOT_FOR_DIAGNOSTIC_USE}",
            f"{kind} {version} {NOT_FOR_DIAGNOSTIC_USE}",
        ],
        "SeriesDescription",
    )


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

    Why: OHIF 3.13.2 (cornerstone3D adapters) cannot open a SEG without them
    (``Cannot destructure property 'SpacingBetweenSlices' of
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
    if seg.get("SOPClassUID") != SegmentationStorage:
        raise ValueError("seg must be a Segmentation (SOP Class 1.2.840.10008.5.1.4.1.1.66.4)")
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


@functools.lru_cache(maxsize=64)
def _modality_code(modality: str) -> Code | None:
    """The CID 33 (Modality) or CID 29 code whose value is ``modality``."""
    for collection in (codes.cid33, codes.cid29):
        for code in collection.concepts.values():
            if code.value == modality:
                return code
    return None


def image_library(images: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library naming the source images of an SR.

    highdicom's ``ImageLibrary`` needs Patient Orientation and Imager Pixel
    Spacing on every projection radiograph and fails without them (a
    Secondary Capture of a chest film has neither); here each TID 1602/1603
    descriptor is written only where its source value is present and valid:
    Modality (from the Modality attribute, CID 33), Frame of Reference UID,
    Pixel Data Rows/Columns, Patient Orientation Row/Column, and Horizontal/
    Vertical Pixel Spacing (Imager Pixel Spacing for projection images, Pixel
    Spacing for others).

    Parameters
    ----------
    images:
        Sanitised source images (from :func:`sanitize_source`).

    Raises
    ------
    ValueError
        ``images`` is empty.
    """
    if not images:
        raise ValueError("images is empty: an image library names at least one image")
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = CodedConcept("{pixels}", "UCUM", "Pixels")
    groups: dict[tuple[str, str | None], list[hd.sr.ImageContentItem]] = {}
    for image in images:
        item = hd.sr.ImageContentItem(
            name=CodedConcept("260753009", "SCT", "Source"),
            referenced_sop_class_uid=image.SOPClassUID,
            referenced_sop_instance_uid=image.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        descriptors = hd.sr.ContentSequence()

        def number(name: Code, value: float, unit: Code | CodedConcept) -> None:
            descriptors.append(hd.sr.NumContentItem(name, value, unit, relationship_type=acq))

        number(codes.DCM.PixelDataRows, int(image.Rows), pixels)
        number(codes.DCM.PixelDataColumns, int(image.Columns), pixels)
        orientation = image.get("PatientOrientation")
        if orientation and len(orientation) == 2:
            descriptors.append(hd.sr.TextContentItem(codes.DCM.PatientOrientationRow, orientation[0], acq))
            descriptors.append(hd.sr.TextContentItem(codes.DCM.PatientOrientationColumn, orientation[1], acq))
        projection = image.Modality in _PROJECTION_MODALITIES
        spacing = image.get("ImagerPixelSpacing" if projection else "PixelSpacing")
        if spacing and len(spacing) == 2 and all(math.isfinite(float(v)) and float(v) > 0 for v in spacing):
            number(codes.DCM.HorizontalPixelSpacing, float(spacing[1]), codes.UCUM.Millimeter)
            number(codes.DCM.VerticalPixelSpacing, float(spacing[0]), codes.UCUM.Millimeter)
        item.ContentSequence = descriptors
        key = (str(image.Modality), str(image.FrameOfReferenceUID) if "FrameOfReferenceUID" in image else None)
        groups.setdefault(key, []).append(item)

    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence()
    for (modality, frame_of_reference), items in groups.items():
        group = hd.sr.ContainerContentItem(
            name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        group.ContentSequence = hd.sr.ContentSequence()
        code = _modality_code(modality)
        if code is not None:
            group.ContentSequence.append(hd.sr.CodeContentItem(codes.DCM.Modality, code, acq))
        if frame_of_reference is not None:
            group.ContentSequence.append(
                hd.sr.UIDRefContentItem(codes.DCM.FrameOfReferenceUID, frame_of_reference, acq)
            )
        group.ContentSequence.extend(items)
        library.ContentSequence.append(group)
    return library


def insert_image_library(report: hd.sr.MeasurementReport, library: hd.sr.ContainerContentItem) -> None:
    """Put ``library`` into a TID 1500 report at its row: after Procedure
    Reported, before Imaging Measurements (PS3.16 TID 1500 rows 4-6)."""
    content = report[0].ContentSequence
    for index, item in enumerate(content):
        if item.name == codes.DCM.ImagingMeasurements:
            content.insert(index, library)
            return
    raise ValueError("report has no Imaging Measurements container to put the Image Library before")


def segment_frame_numbers(seg: Dataset, segment_number: int) -> list[int]:
    """1-based numbers of the frames of ``seg`` that hold ``segment_number``.

    The Segment Identification Sequence is read from each frame's item of
    the Per-Frame Functional Groups, or from the Shared Functional Groups
    where highdicom puts it for a single-frame SEG (PS3.3 C.7.6.16).
    """
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    frames = []
    for number in range(1, int(seg.get("NumberOfFrames", 1)) + 1):
        item = per_frame[number - 1] if len(per_frame) >= number else Dataset()
        identification = item.get("SegmentIdentificationSequence") or shared.get("SegmentIdentificationSequence")
        if identification and int(identification[0].ReferencedSegmentNumber) == segment_number:
            frames.append(number)
    return frames


def referenced_segmentation_frame(
    seg: Dataset, segment_number: int, source: Dataset
) -> hd.sr.ReferencedSegmentationFrame:
    """TID 1410 row 7 reference to segment ``segment_number`` of a planar
    ``seg`` made from the single-frame ``source``: an IMAGE item "Referenced
    Segmentation Frame" (DCM 121214) and ``source`` as "Source Image for
    Segmentation" (DCM 121233).

    The reference names the segment by Referenced Segment Number
    (0062,000B) and carries no Referenced Frame Number (0008,1160): in the
    Image SOP Instance Reference Macro (PS3.3 Table 10-3) the two exclude
    each other, and the frame number is required only when no segment number
    is given (dciodvfy: "Shall not be present when ReferencedFrameNumber is
    present"). highdicom writes both, and its ``from_segmentation`` reads the
    Segment Identification only from Per-Frame Functional Groups, so it fails
    on the single-frame SEGs highdicom itself writes; hence this function.

    Raises
    ------
    ValueError
        The segment is on no frame of ``seg`` or on several (a volume: use
        TID 1411 ``hd.sr.ReferencedSegment`` instead).
    """
    frames = segment_frame_numbers(seg, segment_number)
    if len(frames) != 1:
        raise ValueError(
            f"segment {segment_number} of the SEG is on {len(frames)} frames; a planar reference needs exactly one"
        )
    reference = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        frame_number=frames[0],
        segment_number=segment_number,
        source_image=hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID),
    )
    del reference[0].ReferencedSOPSequence[0].ReferencedFrameNumber
    return reference


def region_outline(mask: np.ndarray, *, tolerance: float = 0.5) -> tuple[np.ndarray, int]:
    """Outline of the largest region of a planar mask, as SCOORD Graphic Data.

    The region is the largest 4-connected component of ``mask`` (ties: the
    first in row-major order) with its holes filled; its boundary is traced
    with ``skimage.measure.find_contours`` at level 0.5 (on the mask padded
    by one pixel, so a region touching the image edge closes along it) and
    simplified by Douglas-Peucker (``skimage.measure.approximate_polygon``)
    within ``tolerance`` pixels.

    Coordinates follow PS3.3 Table C.18.6-1 (Graphic Data): (column, row)
    pairs, column first, with 0.0\\0.0 the top left corner of the top left
    pixel and Columns\\Rows the bottom right corner of the bottom right
    pixel, so the centre of pixel ``mask[r, c]`` is ``(c + 0.5, r + 0.5)``.
    The last point repeats the first: a closed POLYLINE (C.18.6.1.1). The
    traced boundary passes half way between the centres of region and
    background pixels, so every region pixel's centre is inside it.

    Parameters
    ----------
    mask:
        ``bool`` array of shape ``(Rows, Columns)``.
    tolerance:
        Largest distance, in pixels, of the simplified outline from the
        traced one; 0 keeps every vertex.

    Returns
    -------
    outline, regions:
        ``float32`` array of shape ``(n, 2)``, ``n >= 4``, of (column, row)
        points with ``outline[0] == outline[-1]``; and how many 4-connected
        regions ``mask`` has (the outline is of one of them).

    Raises
    ------
    TypeError
        ``mask`` is not a boolean ``numpy.ndarray``.
    ValueError
        ``mask`` is not 2-D, or has no pixel set; ``tolerance`` is negative.
    """
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise TypeError("mask must be a numpy.ndarray of dtype bool")
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (Rows, Columns), got shape {mask.shape}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0 pixels, got {tolerance}")
    labels, regions = ndimage.label(mask)  # default structure: 4-connected
    if regions == 0:
        raise ValueError("mask has no pixel set: there is no region to outline")
    sizes = np.bincount(labels.ravel())[1:]
    region = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    padded = np.pad(region, 1).astype(np.uint8)
    # fully_connected="low": background pixels touching only at a corner are
    # joined, so the foreground is traced 4-connected, as it was labelled.
    contours = measure.find_contours(padded, 0.5, fully_connected="low")
    # One closed contour: the region is 4-connected and has no holes.
    (contour,) = contours
    if tolerance > 0:
        contour = measure.approximate_polygon(contour, tolerance)
    # (padded row, padded column) -> (column, row): the padding shifts by one
    # pixel, the pixel centre is half a pixel from its corner.
    outline = np.column_stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5]).astype(np.float32)
    if not np.array_equal(outline[0], outline[-1]):
        outline = np.vstack([outline, outline[:1]])
    return outline, regions


def image_outline(rows: int, columns: int) -> np.ndarray:
    """The border of a whole ``rows`` x ``columns`` image as a closed POLYLINE
    in SCOORD coordinates (PS3.3 Table C.18.6-1: (column, row), from the top
    left corner 0\\0 to the bottom right corner Columns\\Rows).

    Returns
    -------
    numpy.ndarray
        ``float32``, shape ``(5, 2)``, clockwise on screen from the top left
        corner, last point = first.

    Raises
    ------
    ValueError
        ``rows`` or ``columns`` is not a positive integer.
    """
    for name, value in (("rows", rows), ("columns", columns)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    c, r = float(columns), float(rows)
    return np.array([[0, 0], [c, 0], [c, r], [0, r], [0, 0]], dtype=np.float32)


def ensure_valid_values(dataset: Dataset, what: str) -> None:
    """Last guard before a derived object leaves the writer.

    Raises
    ------
    ValueError
        A value of ``dataset`` breaks its VR or VM (see
        :func:`pipelines.common.sanitize.find_invalid_values`); the message
        starts with ``what`` and lists them.
    """
    problems = find_invalid_values(dataset)
    if problems:
        raise ValueError(f"{what} would carry invalid values: " + "; ".join(problems))


def device_observation_context(
    algorithm: AlgorithmDescription, *, manufacturer: str, prefix: str | None
) -> hd.sr.ObservationContext:
    """TID 1001 Observation Context whose observer is the model as a device
    (TID 1004): Device Observer UID :func:`device_uid`, name
    ``algorithm.label``, model name ``algorithm.name``, ``manufacturer``.

    Raises
    ------
    ValueError
        ``manufacturer`` does not fit LO, or ``prefix`` is invalid.
    """
    check_long_string(manufacturer, "PipelineContext.manufacturer")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm, prefix),
        name=algorithm.label,
        manufacturer_name=manufacturer,
        model_name=algorithm.name,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _library_descriptors(image: Dataset) -> dict[str, tuple[str, str, object]]:
    """TID 1602 descriptors of ``image`` that its values support, by key:
    ``(value type, concept name keyword in codes.DCM, value)``, with plain
    hashable values (comparing highdicom codes is slow)."""
    found: dict[str, tuple[str, str, object]] = {}
    modality = str(image.get("Modality", ""))
    if _modality_code(modality) is not None:
        found["modality"] = ("CODE", "Modality", modality)
    if "FrameOfReferenceUID" in image:
        found["frame"] = ("UIDREF", "FrameOfReferenceUID", str(image.FrameOfReferenceUID))
    found["rows"] = ("PIXELS", "PixelDataRows", int(image.Rows))
    found["columns"] = ("PIXELS", "PixelDataColumns", int(image.Columns))
    projection = modality in _PROJECTION_MODALITIES
    spacing = image.get("ImagerPixelSpacing" if projection else "PixelSpacing")
    if spacing and len(spacing) == 2 and all(math.isfinite(float(v)) and float(v) > 0 for v in spacing):
        found["horizontal"] = ("MM", "HorizontalPixelSpacing", float(spacing[1]))
        found["vertical"] = ("MM", "VerticalPixelSpacing", float(spacing[0]))
    return found


def _descriptor_item(value_type: str, name: str, value: object) -> hd.sr.ContentItem:
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    concept = getattr(codes.DCM, name)
    if value_type == "CODE":
        return hd.sr.CodeContentItem(concept, _modality_code(value), acq)
    if value_type == "UIDREF":
        return hd.sr.UIDRefContentItem(concept, value, acq)
    unit = CodedConcept("{pixels}", "UCUM", "Pixels") if value_type == "PIXELS" else codes.UCUM.Millimeter
    return hd.sr.NumContentItem(concept, value, unit, relationship_type=acq)


def series_image_library(series: Sequence[Sequence[Dataset]]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one Image Library Group per series.

    For volumes: four MR series of 155 slices are 620 images. The TID 1602
    descriptors that all images of a series share (Modality, Frame of
    Reference UID, Pixel Data Rows/Columns, Horizontal/Vertical Pixel
    Spacing) are written once, on the group (PS3.16 TID 1600: group
    descriptors apply to every entry of the group); an entry carries only
    those in which its image differs. Each entry is the image reference
    (TID 1601).

    Parameters
    ----------
    series:
        The images of each series, as :func:`reference_proxies` or
        :func:`sanitize_source` returns them; each inner sequence is one
        group, in the order given.

    Raises
    ------
    ValueError
        ``series`` or one of its series is empty.
    """
    if not series or any(not images for images in series):
        raise ValueError("series is empty, or holds an empty series: an image library names at least one image")
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = hd.sr.ContentSequence()
    for images in series:
        descriptors = [_library_descriptors(image) for image in images]
        shared = {
            key: value
            for key, value in descriptors[0].items()
            if all(other.get(key) == value for other in descriptors[1:])
        }
        group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=contains)
        group.ContentSequence = hd.sr.ContentSequence([_descriptor_item(*value) for value in shared.values()])
        for image, own in zip(images, descriptors):
            entry = hd.sr.ImageContentItem(
                name=CodedConcept("260753009", "SCT", "Source"),
                referenced_sop_class_uid=image.SOPClassUID,
                referenced_sop_instance_uid=image.SOPInstanceUID,
                relationship_type=contains,
            )
            rest = [_descriptor_item(*value) for key, value in own.items() if key not in shared]
            if rest:
                entry.ContentSequence = hd.sr.ContentSequence(rest)
            group.ContentSequence.append(entry)
        library.ContentSequence.append(group)
    return library


def _frame_segment_numbers(seg: Dataset) -> list[int | None]:
    """Referenced Segment Number of each frame of ``seg`` (``None``: none)."""
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    shared_identification = shared.get("SegmentIdentificationSequence")
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    numbers: list[int | None] = []
    for index in range(int(seg.get("NumberOfFrames", 1))):
        item = per_frame[index] if len(per_frame) > index else Dataset()
        identification = item.get("SegmentIdentificationSequence") or shared_identification
        numbers.append(int(identification[0].ReferencedSegmentNumber) if identification else None)
    return numbers


def segment_voxel_counts(seg: Dataset) -> dict[int, int]:
    """How many pixels of each segment a BINARY Segmentation holds.

    Counts the set pixels of every frame (PS3.3 C.8.20.2: BINARY frames are
    1 bit per pixel) and adds them up by the frame's Referenced Segment
    Number (Segment Identification, C.8.20.3.1). For a SEG on a stack of
    parallel planes the count times the voxel volume is the segment's
    volume. A segment described in the Segment Sequence but on no frame (an
    empty segment with empty frames omitted) counts 0.

    Returns
    -------
    dict[int, int]
        Segment Number -> number of set pixels, for every described segment.

    Raises
    ------
    ValueError
        ``seg`` is not a Segmentation, not BINARY, or has a frame without a
        segment or with a segment that is not described.
    """
    if seg.get("SOPClassUID") != SegmentationStorage:
        raise ValueError("seg must be a Segmentation (SOP Class 1.2.840.10008.5.1.4.1.1.66.4)")
    if seg.get("SegmentationType") != "BINARY":
        raise ValueError(f"SegmentationType of seg is {seg.get('SegmentationType')!r}; voxel counts need BINARY")
    counts = {int(item.SegmentNumber): 0 for item in seg.get("SegmentSequence", [])}
    frame_segments = _frame_segment_numbers(seg)
    pixels = np.asarray(seg.pixel_array).reshape(len(frame_segments), -1)
    for frame, (number, set_pixels) in enumerate(zip(frame_segments, np.count_nonzero(pixels, axis=1)), start=1):
        if number not in counts:
            raise ValueError(f"frame {frame} of seg names segment {number}, which SegmentSequence does not describe")
        counts[number] += int(set_pixels)
    return counts
