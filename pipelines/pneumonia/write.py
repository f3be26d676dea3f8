"""Derived objects of the pneumonia pipeline.

For one single-frame chest radiograph (Modality CR or DX; the SOP Class may
be CR, DX or Secondary Capture) the pipeline returns two objects:

1. :func:`write_seg`: a BINARY Segmentation (PS3.3 A.51) with one segment,
   the Grad-CAM attention region that drove the model's decision, on the
   source's pixel grid;
2. :func:`write_sr`: a Comprehensive 3D SR holding a TID 1500 Measurement
   Report: the pneumonia probability, the operating threshold, the finding
   Pneumonia present/absent, and a TID 1410 group that references the SEG's
   segment and, through it, the source image.

The pipeline's call::

    seg, seg_repairs = write_seg(source, mask, algorithm=algorithm, context=context)
    sr, sr_repairs = write_sr(
        source, seg, probability=p, threshold=t, algorithm=algorithm, context=context
    )
    for repair in dict.fromkeys(seg_repairs + sr_repairs):
        context.log.info("source value repaired", repair=str(repair))
    return [seg, sr]

Both objects take patient and study attributes from a sanitised copy of the
source (see :mod:`pipelines.common.sanitize`); ``repairs`` says what changed.
Their UIDs are deterministic (:func:`pipelines.common.derived.derived_uids`).

Codes (PS3.16; code values as tabulated in pydicom's ``pydicom.sr`` tables,
which are generated from PS3.16):

- Segmented Property Category: SCT 309825002 "Spatial and Relational
  Concept" (CID 7150 Segmentation Property Categories). The segment is a
  region the model attended to, not tissue, anatomy or a lesion.
- Segmented Property Type: DCM 130403 "Gradient-weighted class activation"
  (CID 217 Visual Explanation; CID 7151 is extensible). It names the method
  that produced the region, so no reader mistakes it for the pneumonia itself.
- Finding: SCT 233604007 "Pneumonia"; values SCT 52101004 "Present" /
  SCT 272519000 "Absent" (CID 241 Present/Absent Only).
- Measurements: DCM 122157 "Probability" and DCM 122411 "Threshold Value"
  (PS3.16 Annex D; TID 1501 takes measurement names from extensible CIDs),
  unit UCUM ``{probability}`` (a UCUM annotation: dimensionless, unit 1 with
  a label); finding site SCT 39607008 "Lung".
- Procedure reported: SCT 363679005 "Imaging procedure" (CID 100).
- Algorithm family: DCM 123110 "Artificial Intelligence" (CID 7162).
"""

from __future__ import annotations

import math
from numbers import Real

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from pipelines.base import PipelineContext
from pipelines.common.derived import (
    NOT_FOR_DIAGNOSTIC_USE,
    AlgorithmDescription,
    Repair,
    add_patient_orientation,
    check_long_string,
    derived_uid,
    derived_uids,
    device_uid,
    ensure_valid_values,
    fit_long_string,
    image_library,
    insert_image_library,
    referenced_segmentation_frame,
    sanitize_source,
    segmentation_source,
    series_description,
)

__all__ = [
    "PIPELINE",
    "SEGMENT_LABEL",
    "write_seg",
    "write_sr",
]

#: Routing name of the pipeline (``pipelines.PIPELINES``); part of every UID.
PIPELINE = "pneumonia"

#: Segment Label (0062,0005) of the attention segment.
SEGMENT_LABEL = "Pneumonia model attention (Grad-CAM)"
#: Content Label (0070,0080), CS: at most 16 of A-Z 0-9 _ and space.
CONTENT_LABEL = "PNEUMONIA_CAM"

#: Series numbers of the derived series; high, so viewers list them after
#: the acquired ones.
SEG_SERIES_NUMBER = 9801
SR_SERIES_NUMBER = 9802

ATTENTION_CATEGORY = codes.SCT.SpatialAndRelationalConcept  # SCT 309825002, CID 7150
ATTENTION_TYPE = codes.DCM.GradientWeightedClassActivation  # DCM 130403, CID 217
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = codes.SCT.Present  # SCT 52101004, CID 241
ABSENT = codes.SCT.Absent  # SCT 272519000, CID 241
PROBABILITY = codes.DCM.Probability  # DCM 122157
THRESHOLD = codes.DCM.ThresholdValue  # DCM 122411
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
LUNG = codes.SCT.Lung  # SCT 39607008
PROCEDURE = codes.SCT.ImagingProcedure  # SCT 363679005, CID 100

# Orange, distinct from the greys of a radiograph (CIE L*a*b*, PS3.3 C.10.7.1.1).
_DISPLAY_COLOR = hd.color.CIELabColor(70.0, 40.0, 70.0)

_MODALITIES = ("CR", "DX")


def write_seg(
    source: Dataset,
    mask: np.ndarray,
    *,
    algorithm: AlgorithmDescription,
    context: PipelineContext,
    omit_empty_frames: bool = False,
    series_number: int = SEG_SERIES_NUMBER,
) -> tuple[hd.seg.Segmentation, list[Repair]]:
    """Write the model's Grad-CAM attention region as a DICOM SEG.

    A BINARY Segmentation (PS3.3 A.51, C.8.20) with one segment, labelled
    :data:`SEGMENT_LABEL`, coded SCT 309825002 "Spatial and Relational
    Concept" / DCM 130403 "Gradient-weighted class activation", Segment
    Algorithm Type AUTOMATIC with the model in its Algorithm Identification
    Sequence (family DCM 123110 "Artificial Intelligence", CID 7162).

    Geometry is the source's own: one frame on its pixel grid. A projection
    radiograph has no Frame of Reference; the SEG then has none either,
    carries the source's Patient Orientation (Type 2C, empty where the
    source has no valid one) and no Pixel Measures (see
    :func:`pipelines.common.derived.segmentation_source`); an invalid source
    Pixel Spacing such as ``0\\0`` is also reported as a repair.

    Parameters
    ----------
    source:
        The chest radiograph: a single-frame image with Modality CR or DX
        (SOP Class CR, DX or Secondary Capture). Pixel Data is not read.
    mask:
        ``numpy.ndarray`` of dtype ``bool``, shape ``(Rows, Columns)`` of the
        source: ``True`` where the Grad-CAM map is above the pipeline's
        threshold. May be all ``False`` (no attention region): the SEG then
        holds one empty frame.
    algorithm:
        The model (name, version) that produced the map.
    context:
        ``uid_prefix`` roots the UIDs; ``manufacturer`` is written to
        Manufacturer (0008,0070).
    omit_empty_frames:
        Passed to highdicom. ``False`` (default, see docs/architecture.md):
        every frame is written. With one frame this only matters for an
        empty mask, and highdicom then keeps the frame anyway (a SEG needs
        at least one).
    series_number:
        Series Number (0020,0011) of the SEG series.

    Returns
    -------
    seg, repairs:
        The Segmentation, and what was repaired or left out of the source's
        values (:class:`pipelines.common.derived.Repair`, ``str()`` for logs).

    Raises
    ------
    ValueError
        The source is not a single-frame CR/DX image or has unusable UIDs;
        ``mask`` has another shape; ``algorithm``/``context`` values do not
        fit their attributes. Messages name the attribute.
    TypeError
        ``mask`` is not a boolean ``numpy.ndarray``.
    """
    _check_source(source)
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise TypeError(f"mask must be a numpy.ndarray of dtype bool, got {_describe(mask)}")
    expected = (int(source.Rows), int(source.Columns))
    if mask.shape != expected:
        raise ValueError(f"mask has shape {mask.shape}, expected (Rows, Columns) = {expected} of the source")
    check_long_string(context.manufacturer, "PipelineContext.manufacturer")

    proxy, repairs = sanitize_source(source)
    uids = derived_uids([proxy], pipeline=PIPELINE, algorithm=algorithm, kind="SEG", prefix=context.uid_prefix)

    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=ATTENTION_CATEGORY,
        segmented_property_type=ATTENTION_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.segmentation_identification(),
        # Tracking UID/ID let the SR's TID 1410 group name this very region.
        tracking_uid=derived_uid(context.uid_prefix, "tracking", str(uids.sop_instance_uid), "1"),
        tracking_id=SEGMENT_LABEL,
        display_color=_DISPLAY_COLOR,
    )
    # Segment Description (0062,0006), ST: room for the whole story.
    segment.SegmentDescription = (
        f"Grad-CAM attention of {algorithm.label} (pipeline {PIPELINE}): the image region that most "
        f"drove the pneumonia score. It is not an outline of pneumonia. {NOT_FOR_DIAGNOSTIC_USE}."
    )

    seg = hd.seg.Segmentation(
        source_images=[segmentation_source(proxy)],
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=context.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=str(device_uid(algorithm, context.uid_prefix)),
        omit_empty_frames=omit_empty_frames,
        content_label=CONTENT_LABEL,
        content_description=fit_long_string(
            [
                f"Grad-CAM of {algorithm.label} - {NOT_FOR_DIAGNOSTIC_USE}",
                f"{algorithm.label} - {NOT_FOR_DIAGNOSTIC_USE}",
                f"Grad-CAM {algorithm.version} - {NOT_FOR_DIAGNOSTIC_USE}",
            ],
            "ContentDescription",
        ),
        series_description=series_description(PIPELINE, algorithm, "SEG"),
    )
    add_patient_orientation(seg, proxy)
    ensure_valid_values(seg, "SEG")
    return seg, repairs


def write_sr(
    source: Dataset,
    seg: Dataset,
    *,
    probability: float,
    threshold: float,
    algorithm: AlgorithmDescription,
    context: PipelineContext,
    series_number: int = SR_SERIES_NUMBER,
) -> tuple[hd.sr.Comprehensive3DSR, list[Repair]]:
    """Write the model's result as a TID 1500 Measurement Report.

    A Comprehensive 3D SR (PS3.3 A.35.13) whose content is TID 1500
    "Imaging Measurement Report" (PS3.16) with:

    - TID 1001 observation context: a Device observer (TID 1004) named after
      the model, with the node's Manufacturer and a UID per model version;
    - TID 1600 image library naming the source image;
    - a TID 1501 group: finding SCT "Pneumonia" at site SCT "Lung",
      measurements DCM "Probability" = ``probability`` and DCM "Threshold
      Value" = ``threshold`` (unit UCUM ``{probability}``), qualitative
      evaluation Pneumonia = SCT "Present" if ``probability >= threshold``
      else SCT "Absent", the source image as Source of the group, and the
      model in TID 4019 Algorithm Identification;
    - a TID 1410 group referencing segment 1 of ``seg`` (Referenced
      Segmentation Frame, with the source image as Source image for
      segmentation), its tracking identifier the segment's Tracking UID.

    The report is COMPLETE, UNVERIFIED and PRELIMINARY: a machine's result
    for a radiologist to review. Evidence lists the source and the SEG.

    Parameters
    ----------
    source:
        The chest radiograph the SEG was made from (as for :func:`write_seg`).
    seg:
        The Segmentation returned by :func:`write_seg` for ``source``.
    probability:
        The model's pneumonia probability in [0, 1] (dimensionless).
    threshold:
        Operating point in [0, 1] at or above which Pneumonia is reported
        present.
    algorithm, context:
        As for :func:`write_seg`.
    series_number:
        Series Number (0020,0011) of the SR series.

    Returns
    -------
    sr, repairs:
        The SR document, and what was repaired in the source's values.

    Raises
    ------
    ValueError
        ``probability`` or ``threshold`` is not a finite number in [0, 1];
        ``seg`` is not a Segmentation of ``source``'s study referencing
        ``source``; or as :func:`write_seg`.
    """
    _check_source(source)
    probability = _unit_interval(probability, "probability")
    threshold = _unit_interval(threshold, "threshold")
    _check_seg(seg, source)
    check_long_string(context.manufacturer, "PipelineContext.manufacturer")

    proxy, repairs = sanitize_source(source)
    prefix = context.uid_prefix
    uids = derived_uids([proxy], pipeline=PIPELINE, algorithm=algorithm, kind="SR", prefix=prefix)

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm, prefix),
        name=algorithm.label,
        manufacturer_name=context.manufacturer,
        model_name=algorithm.name,
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )

    classification = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(prefix, "tracking", str(uids.sop_instance_uid), "classification"),
            identifier="Pneumonia classification",
        ),
        finding_type=PNEUMONIA,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        algorithm_id=algorithm.sr_identification(),
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=probability, unit=PROBABILITY_UNIT),
            hd.sr.Measurement(name=THRESHOLD, value=threshold, unit=PROBABILITY_UNIT),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if probability >= threshold else ABSENT)
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(proxy)],
    )

    segment = seg.SegmentSequence[0]
    attention = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=segment.TrackingUID,
            identifier=segment.SegmentLabel,
        ),
        referenced_segment=referenced_segmentation_frame(seg, int(segment.SegmentNumber), proxy),
        finding_category=ATTENTION_CATEGORY,
        finding_type=ATTENTION_TYPE,
        algorithm_id=algorithm.sr_identification(),
    )

    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE,
        imaging_measurements=[classification, attention],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    insert_image_library(report, image_library([proxy]))

    sr = hd.sr.Comprehensive3DSR(
        evidence=[proxy, seg],
        content=report[0],
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=context.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(PIPELINE, algorithm, "SR"),
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=str(device_uid(algorithm, prefix)),
    )
    ensure_valid_values(sr, "SR")
    return sr, repairs


def _check_source(source: Dataset) -> None:
    if not isinstance(source, Dataset):
        raise ValueError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    modality = str(source.get("Modality", "")).strip()
    if modality not in _MODALITIES:
        raise ValueError(f"Modality of the source is {modality!r}; this writer takes {'/'.join(_MODALITIES)}")
    frames = source.get("NumberOfFrames")
    if frames not in (None, "") and int(frames) != 1:
        raise ValueError(f"NumberOfFrames of the source is {frames}; this writer takes a single-frame radiograph")
    for keyword in ("Rows", "Columns"):
        if not source.get(keyword):
            raise ValueError(f"{keyword} of the source is missing")


def _check_seg(seg: Dataset, source: Dataset) -> None:
    if not isinstance(seg, Dataset) or seg.get("SOPClassUID") != SegmentationStorage:
        raise ValueError("seg must be a Segmentation (SOP Class 1.2.840.10008.5.1.4.1.1.66.4)")
    if seg.get("StudyInstanceUID") != source.get("StudyInstanceUID"):
        raise ValueError(
            f"StudyInstanceUID of seg ({seg.get('StudyInstanceUID')}) differs from the source's "
            f"({source.get('StudyInstanceUID')})"
        )
    referenced = {
        str(instance.ReferencedSOPInstanceUID)
        for series in seg.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedInstanceSequence", [])
    }
    if str(source.SOPInstanceUID) not in referenced:
        raise ValueError(f"seg does not reference the source image {source.SOPInstanceUID}")
    if not seg.get("SegmentSequence"):
        raise ValueError("SegmentSequence of seg is empty")


def _unit_interval(value: object, attribute: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (Real, np.floating)):
        raise ValueError(f"{attribute} must be a number in [0, 1], got {type(value).__name__}")
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ValueError(f"{attribute} must be a number in [0, 1], got {number}")
    return number


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray of dtype {value.dtype}"
    return type(value).__name__
