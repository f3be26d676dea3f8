"""SR content that highdicom leaves to the caller.

- :func:`image_library`, :func:`series_image_library`,
  :func:`insert_image_library`: TID 1600 Image Library of the source images,
  with only the TID 1602/1603 descriptors that the sources support (planar
  images; volumes with one group per series);
- :func:`device_observation_context`: TID 1001/1004, the model as a device;
- :func:`referenced_segmentation_frame`: TID 1410 reference to a segment of
  a planar SEG.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.common.identity import AlgorithmDescription, check_long_string
from pipelines.common.seg_frames import segment_frame_numbers
from pipelines.common.uids import device_uid

__all__ = [
    "device_observation_context",
    "image_library",
    "insert_image_library",
    "referenced_segmentation_frame",
    "series_image_library",
]

_PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})

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

        def number(
            name: Code, value: float, unit: Code | CodedConcept, into: hd.sr.ContentSequence = descriptors
        ) -> None:
            into.append(hd.sr.NumContentItem(name, value, unit, relationship_type=acq))

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


def _library_descriptors(image: Dataset) -> dict[str, tuple[str, str, str | float]]:
    """TID 1602 descriptors of ``image`` that its values support, by key:
    ``(value type, concept name keyword in codes.DCM, value)``, with plain
    hashable values (comparing highdicom codes is slow)."""
    found: dict[str, tuple[str, str, str | float]] = {}
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


def _descriptor_item(value_type: str, name: str, value: str | float) -> hd.sr.ContentItem:
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    concept = getattr(codes.DCM, name)
    if value_type == "CODE":
        code = _modality_code(str(value))
        assert code is not None  # _library_descriptors keeps a modality only if it has a code
        return hd.sr.CodeContentItem(concept, code, acq)
    if value_type == "UIDREF":
        return hd.sr.UIDRefContentItem(concept, str(value), acq)
    assert not isinstance(value, str)  # PIXELS and MM values are numbers
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
        for image, own in zip(images, descriptors, strict=True):
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
