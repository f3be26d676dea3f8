"""The parts of a pipeline's SEG and SR that every writer builds the same way.

The brain tumour, pneumonia and bundle segmentation writers differ in their
segments, codes and measurements; what they share is here, so that one piece
of code writes it:

- :func:`sanitized_sources`, :func:`compact_empty_label_map`,
  :func:`check_label_map`: the source images and label map of a SEG;
- :func:`segment_description`: a Segment Sequence item (PS3.3 C.8.20.2.1)
  with the model, a Tracking UID and a Segment Description;
- :func:`binary_segmentation`: the BINARY Segmentation (PS3.3 A.51) with the
  node's device and series attributes;
- :func:`volumetric_roi_group`: a TID 1411 Volumetric ROI group with one
  Volume measurement of one segment of a SEG (PS3.16);
- :func:`measurement_report`, :func:`comprehensive_sr`: the TID 1500 report
  with its TID 1600 Image Library, and the Comprehensive 3D SR holding it
  (PS3.3 A.35.13);
- :func:`add_intended_use_warnings`: an input outside the model card's
  intended use, processed with a warning (:mod:`node.guard`), says so in
  each measurement group of the SR; the SEG's and SR's Series Descriptions
  say "OUT OF INTENDED USE".
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.base import PipelineContext
from pipelines.common.identity import (
    NOT_FOR_DIAGNOSTIC_USE,
    OUT_OF_INTENDED_USE,
    AlgorithmDescription,
    ensure_valid_values,
    fit_long_string,
    series_description,
)
from pipelines.common.sanitize import Repair, sanitize_series, sanitize_source
from pipelines.common.sr_content import insert_image_library
from pipelines.common.uids import DerivedUIDs, derived_uid, device_uid

__all__ = [
    "MILLILITER",
    "VOLUME",
    "add_intended_use_warnings",
    "binary_segmentation",
    "check_label_map",
    "comprehensive_sr",
    "compact_empty_label_map",
    "measurement_report",
    "sanitized_sources",
    "segment_description",
    "volumetric_roi_group",
]

VOLUME = codes.SCT.Volume  # SCT 118565006
MILLILITER = Code("ml", "UCUM", "milliliter")

#: The TID 1500 measurement groups the writers put in a report.
MeasurementGroup = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def sanitized_sources(reference: Sequence[Dataset], multiframe: bool) -> tuple[list[Dataset], list[Repair]]:
    """Sanitised copies of a SEG's source images and what was repaired
    (:mod:`pipelines.common.sanitize`): the one enhanced multi-frame image,
    or every single-frame image of the series."""
    if multiframe:
        proxy, repairs = sanitize_source(reference[0])
        return [proxy], repairs
    return sanitize_series(reference)


def check_label_map(labels: object, shape: tuple[int, ...], allowed: Collection[int], known: str) -> None:
    """Check a label map: a ``uint8`` ``numpy.ndarray`` of ``shape``
    (slices, Rows, Columns) holding only values in ``allowed``.

    Raises
    ------
    TypeError
        ``labels`` is not a ``uint8`` ``numpy.ndarray``.
    ValueError
        Another shape, or a value outside ``allowed`` (the message ends
        with ``known``, which says what the labels are).
    """
    if not isinstance(labels, np.ndarray) or labels.dtype != np.uint8:
        got = f"ndarray of dtype {labels.dtype}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise TypeError(f"labels must be a numpy.ndarray of dtype uint8, got {got}")
    if labels.shape != shape:
        raise ValueError(f"labels has shape {labels.shape}, expected (slices, Rows, Columns) = {shape}")
    histogram = np.bincount(labels.ravel(), minlength=256)
    unexpected = [int(value) for value in np.flatnonzero(histogram) if value not in allowed]
    if unexpected:
        raise ValueError(f"labels holds values {unexpected}; {known}")


def compact_empty_label_map(
    proxies: list[Dataset], masks: np.ndarray, omit: bool, multiframe: bool
) -> tuple[list[Dataset], np.ndarray, bool]:
    """The sources, masks and ``omit_empty_frames`` to give highdicom.

    With ``omit`` and no segment pixel at all, highdicom would fall back to
    every frame (slices x segments), which defeats the compact form; the SEG
    is then one empty frame per segment on the middle slice. For an enhanced
    multi-frame source that fallback stays: highdicom cannot write a subset
    of a multi-frame source's frames.
    """
    if omit and not multiframe and not masks.any():
        middle = len(proxies) // 2
        return [proxies[middle]], masks[middle : middle + 1], False
    return proxies, masks, omit


def segment_description(
    *,
    number: int,
    label: str,
    category: Code,
    property_type: Code,
    description: str,
    algorithm: AlgorithmDescription,
    context: PipelineContext,
    sop_instance_uid: str,
    display_color: hd.color.CIELabColor,
    anatomic_regions: Sequence[Code] | None = None,
) -> hd.seg.SegmentDescription:
    """One Segment Sequence item (PS3.3 C.8.20.2.1): Segment Label and
    Tracking ID ``label``, Segment Algorithm Type AUTOMATIC with the model in
    its Algorithm Identification Sequence, a Tracking UID derived from the
    SEG's SOP Instance UID and ``number`` (an SR's group repeats it), and
    Segment Description (0062,0006, ST: room for the whole story)
    ``description``.

    Raises
    ------
    ValueError
        From highdicom, a value does not fit its attribute.
    """
    item = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=category,
        segmented_property_type=property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.segmentation_identification(),
        tracking_uid=derived_uid(context.uid_prefix, "tracking", sop_instance_uid, str(number)),
        tracking_id=label,
        anatomic_regions=anatomic_regions,
        display_color=display_color,
    )
    item.SegmentDescription = description
    return item


def binary_segmentation(
    source_images: Sequence[Dataset],
    masks: np.ndarray,
    descriptions: Sequence[hd.seg.SegmentDescription],
    *,
    uids: DerivedUIDs,
    pipeline: str,
    algorithm: AlgorithmDescription,
    context: PipelineContext,
    series_number: int,
    omit_empty_frames: bool,
    content_label: str,
    content_descriptions: Sequence[str],
) -> hd.seg.Segmentation:
    """A BINARY Segmentation (PS3.3 A.51) with the node's Manufacturer, the
    model as Manufacturer's Model Name / Software Versions, the model's
    device UID as Device Serial Number, and the series description of
    :func:`~pipelines.common.identity.series_description`. Content
    Description is the first of ``content_descriptions`` that fits LO,
    each followed by the not-for-diagnostic-use warning.

    Not yet checked: the caller adds what it needs and then calls
    :func:`~pipelines.common.identity.ensure_valid_values`.

    Raises
    ------
    ValueError
        No content description fits LO, or highdicom refuses a value.
    """
    return hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=context.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=str(device_uid(algorithm, context.uid_prefix)),
        omit_empty_frames=omit_empty_frames,
        content_label=content_label,
        content_description=fit_long_string(
            [f"{text} - {NOT_FOR_DIAGNOSTIC_USE}" for text in content_descriptions], "ContentDescription"
        ),
        series_description=series_description(
            pipeline, algorithm, "SEG", out_of_intended_use=bool(context.intended_use_warnings)
        ),
    )


def volumetric_roi_group(
    seg: Dataset,
    segment_number: int,
    *,
    source_series: str,
    finding_category: Code,
    finding_type: Code,
    volume_ml: float,
    algorithm: AlgorithmDescription,
    finding_sites: Sequence[Code] | None = None,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 Volumetric ROI group of segment ``segment_number`` of ``seg``:
    Referenced Segment that segment with ``source_series`` as "Source series
    for segmentation", the segment's Tracking UID and Label as Tracking
    UID/Identifier, a Volume (SCT 118565006) of ``volume_ml`` in UCUM ``ml``,
    and the model in TID 4019.

    Raises
    ------
    ValueError
        ``seg``'s Segment Sequence has no such segment.
    """
    items = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    if segment_number not in items:
        raise ValueError(f"SegmentSequence of seg has no segment {segment_number}")
    item = items[segment_number]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=item.TrackingUID, identifier=item.SegmentLabel),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series),
        ),
        finding_category=finding_category,
        finding_type=finding_type,
        finding_sites=None if finding_sites is None else [hd.sr.FindingSite(site) for site in finding_sites],
        algorithm_id=algorithm.sr_identification(),
        measurements=[hd.sr.Measurement(name=VOLUME, value=volume_ml, unit=MILLILITER)],
    )


def measurement_report(
    observation_context: hd.sr.ObservationContext,
    procedure: Code,
    groups: Sequence[MeasurementGroup],
    library: hd.sr.ContainerContentItem,
) -> hd.sr.MeasurementReport:
    """TID 1500 Imaging Measurement Report (title CID 7021) of ``groups``,
    with the TID 1600 Image Library ``library`` at its row (PS3.16 TID 1500
    rows 4-6)."""
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=procedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    insert_image_library(report, library)
    return report


def comprehensive_sr(
    evidence: Sequence[Dataset],
    report: hd.sr.MeasurementReport,
    *,
    uids: DerivedUIDs,
    pipeline: str,
    algorithm: AlgorithmDescription,
    context: PipelineContext,
    series_number: int,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR (PS3.3 A.35.13) holding ``report``: COMPLETE,
    UNVERIFIED and PRELIMINARY (a machine's result for a radiologist to
    review), with the device attributes of :func:`binary_segmentation`.
    highdicom copies Patient and Study from ``evidence[0]``. The context's
    intended-use warnings go into ``report`` first
    (:func:`add_intended_use_warnings`).

    Raises
    ------
    ValueError
        A value does not fit its VR
        (:func:`~pipelines.common.identity.ensure_valid_values`).
    """
    add_intended_use_warnings(report, context.intended_use_warnings)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=context.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(
            pipeline, algorithm, "SR", out_of_intended_use=bool(context.intended_use_warnings)
        ),
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=str(device_uid(algorithm, context.uid_prefix)),
    )
    ensure_valid_values(sr, "SR")
    return sr


def add_intended_use_warnings(report: hd.sr.MeasurementReport, warnings: Sequence[str]) -> None:
    """Put each of ``warnings`` (``PipelineContext.intended_use_warnings``)
    into every measurement group of ``report`` as a TEXT item "Comment"
    (DCM 121106), relationship CONTAINS, value ``"OUT OF INTENDED USE:
    <warning>"``, after the group's measurements.

    highdicom's ``QualitativeEvaluation`` (TID 1501/1410/1411) is coded
    only and a warning is free text, hence the item is appended here, under
    the group's container; "Comment" is the DCM concept for free text about
    a finding. No warnings: ``report`` is unchanged.

    Raises
    ------
    ValueError
        A warning is empty, or ``report`` has no measurement group.
    """
    if not warnings:
        return
    if any(not str(w).strip() for w in warnings):
        raise ValueError("intended_use_warnings holds an empty warning")
    measurements = [item for item in report[0].ContentSequence if item.name == codes.DCM.ImagingMeasurements]
    groups = [
        group
        for container in measurements
        for group in container.get("ContentSequence", [])
        if group.name == codes.DCM.MeasurementGroup
    ]
    if not groups:
        raise ValueError("report has no measurement group to carry the intended-use warnings")
    for group in groups:
        if "ContentSequence" not in group:
            group.ContentSequence = hd.sr.ContentSequence()
        for warning in warnings:
            group.ContentSequence.append(
                hd.sr.TextContentItem(
                    name=codes.DCM.Comment,
                    value=f"{OUT_OF_INTENDED_USE}: {warning}",
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
