"""Derived objects of the pneumonia pipeline.

For one single-frame chest radiograph (Modality CR or DX; the SOP Class may
be CR, DX or Secondary Capture) the pipeline returns two objects:

1. :func:`write_seg`: a BINARY Segmentation (PS3.3 A.51) with one segment,
   the Grad-CAM attention region that drove the model's decision, on the
   source's pixel grid;
2. :func:`write_sr`: a Comprehensive 3D SR holding a TID 1500 Measurement
   Report with one TID 1410 Planar ROI group: the outline of the attention
   region on the source image (SCOORD POLYLINE), holding the pneumonia
   probability, the operating threshold and the finding Pneumonia
   present/absent.

The pipeline's call::

    seg, seg_repairs = write_seg(source, mask, algorithm=algorithm, context=context)
    sr, sr_repairs = write_sr(
        source, mask, probability=p, threshold=t, algorithm=algorithm, context=context
    )
    for repair in dict.fromkeys(seg_repairs + sr_repairs):
        context.log.info("source value repaired", repair=str(repair))
    return [seg, sr]

Both objects take patient and study attributes from a sanitised copy of the
source (see :mod:`pipelines.common.sanitize`); ``repairs`` says what changed.
Their UIDs are deterministic (:func:`pipelines.common.uids.derived_uids`).

Why these forms (docs/architecture.md, "Chest radiograph SEG and SR"): a
radiologist reviews them in OHIF 3.13.2, which

- draws a SEG only with Pixel Measures and Plane Orientation, which a
  source without Frame of Reference does not give highdicom (see
  :func:`pipelines.common.seg_geometry.add_pixel_grid_geometry`);
- crashes on any TID 1500 measurement group without spatial coordinates
  (OHIF/Viewers #3390: groups derived from a SEG, and image-level TID 1501
  groups, are not supported), so the one group carries a SCOORD.

Codes (PS3.16; code values as tabulated in pydicom's ``pydicom.sr`` tables,
which are generated from PS3.16):

- Segmented Property Category and the ROI's Finding Category: SCT 309825002
  "Spatial and Relational Concept" (CID 7150 Segmentation Property
  Categories). The region is one the model attended to, not tissue,
  anatomy or a lesion.
- Segmented Property Type and the ROI's Finding: DCM 130403
  "Gradient-weighted class activation" (CID 217 Visual Explanation; CID 7151
  is extensible). It names the method that produced the region, so no reader
  mistakes it for the pneumonia itself.
- Geometric purpose of the region: DCM 111041 "Outline" (CID 219).
- Qualitative evaluation: SCT 233604007 "Pneumonia"; values SCT 52101004
  "Present" / SCT 272519000 "Absent" (CID 241 Present/Absent Only).
- Measurements: DCM 122157 "Probability" and DCM 122411 "Threshold Value"
  (PS3.16 Annex D; TID 1419 takes measurement names from extensible CIDs),
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

from pipelines.base import PipelineContext
from pipelines.common.derived_objects import (
    binary_segmentation,
    comprehensive_sr,
    measurement_report,
    segment_description,
)
from pipelines.common.identity import (
    NOT_FOR_DIAGNOSTIC_USE,
    AlgorithmDescription,
    check_long_string,
    ensure_valid_values,
)
from pipelines.common.outline import image_outline, region_outline
from pipelines.common.sanitize import Repair, sanitize_source
from pipelines.common.seg_geometry import add_patient_orientation, add_pixel_grid_geometry, segmentation_source
from pipelines.common.sr_content import device_observation_context, image_library
from pipelines.common.uids import derived_uid, derived_uids

__all__ = [
    "PIPELINE",
    "SEGMENT_LABEL",
    "WHOLE_IMAGE_LABEL",
    "write_seg",
    "write_sr",
]

#: Routing name of the pipeline (its ``spec.py``); part of every UID.
PIPELINE = "pneumonia"

#: Segment Label (0062,0005) of the attention segment.
SEGMENT_LABEL = "Pneumonia model attention (Grad-CAM)"
#: Tracking Identifier of the SR's region when the mask is empty: the
#: outline is then the whole image and the probability an image-level result.
WHOLE_IMAGE_LABEL = "Whole image (no Grad-CAM attention region)"
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
OUTLINE = codes.DCM.Outline  # DCM 111041, CID 219
PROCEDURE = codes.SCT.ImagingProcedure  # SCT 363679005, CID 100

# Largest distance (pixels) of the SR's simplified outline from the traced
# boundary of the mask: well under the pixel, a few hundred points at most
# for a Grad-CAM region.
_OUTLINE_TOLERANCE = 0.5

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

    Geometry is the source's own: one frame on its pixel grid, tied to it
    by the Derivation Image functional group (PS3.3 A.51.5.1). Without a
    Frame of Reference (a projection radiograph) the SEG carries the
    source's Patient Orientation (Type 2C) and, where the source has a valid
    (Imager) Pixel Spacing, shared Pixel Measures and Plane Orientation
    ``1\\0\\0\\0\\1\\0``, which OHIF needs to draw it
    (:func:`pipelines.common.seg_geometry.add_pixel_grid_geometry`).

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
    algorithm, context:
        The model that produced the map; ``uid_prefix`` roots the UIDs,
        ``manufacturer`` is Manufacturer (0008,0070).
    omit_empty_frames:
        Passed to highdicom (default ``False``, docs/architecture.md). With
        one frame it matters only for an empty mask, whose frame highdicom
        keeps anyway (a SEG needs at least one).
    series_number:
        Series Number (0020,0011) of the SEG series.

    Returns
    -------
    seg, repairs:
        The Segmentation, and what was repaired or left out of the source's
        values (:class:`pipelines.common.sanitize.Repair`, ``str()`` for logs).

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
    _check_mask(mask, source)
    check_long_string(context.manufacturer, "PipelineContext.manufacturer")

    proxy, repairs = sanitize_source(source)
    uids = derived_uids([proxy], pipeline=PIPELINE, algorithm=algorithm, kind="SEG", prefix=context.uid_prefix)
    segment = _attention_segment(algorithm, context, str(uids.sop_instance_uid))
    seg = binary_segmentation(
        [segmentation_source(proxy)], mask, [segment], uids=uids, pipeline=PIPELINE, algorithm=algorithm,
        context=context, series_number=series_number, omit_empty_frames=omit_empty_frames, content_label=CONTENT_LABEL,
        content_descriptions=[f"Grad-CAM of {algorithm.label}", algorithm.label, f"Grad-CAM {algorithm.version}"],
    )
    add_patient_orientation(seg, proxy)
    if "FrameOfReferenceUID" not in seg:
        add_pixel_grid_geometry(seg, proxy)
    ensure_valid_values(seg, "SEG")
    return seg, repairs


def _attention_segment(
    algorithm: AlgorithmDescription, context: PipelineContext, sop_instance_uid: str
) -> hd.seg.SegmentDescription:
    return segment_description(
        number=1,
        label=SEGMENT_LABEL,
        category=ATTENTION_CATEGORY,
        property_type=ATTENTION_TYPE,
        description=(
            f"Grad-CAM attention of {algorithm.label} (pipeline {PIPELINE}): the image region that most "
            f"drove the pneumonia score. It is not an outline of pneumonia. {NOT_FOR_DIAGNOSTIC_USE}."
        ),
        algorithm=algorithm,
        context=context,
        sop_instance_uid=sop_instance_uid,
        display_color=_DISPLAY_COLOR,
    )


def write_sr(
    source: Dataset,
    mask: np.ndarray,
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
    - one TID 1410 Planar ROI group (:func:`_attention_region`): the outline
      of the attention region on the source image (the whole image when
      ``mask`` is empty), the probability and threshold, Pneumonia Present
      or Absent, finding site Lung, the model in TID 4019.

    There is no group without coordinates (OHIF 3.13.2 crashes on one,
    OHIF/Viewers #3390) and no reference to the SEG: TID 1410 takes either an
    Image Region or a Referenced Segmentation Frame, not both. The SEG is
    therefore not in the evidence either: Current Requested Procedure
    Evidence lists what the content references (PS3.3 C.17.2.3), here the
    source image. The report is COMPLETE, UNVERIFIED and PRELIMINARY.

    Parameters
    ----------
    source:
        The chest radiograph (as for :func:`write_seg`).
    mask:
        The same ``bool`` array ``(Rows, Columns)`` that :func:`write_seg`
        was given: ``True`` where the Grad-CAM map is above the pipeline's
        threshold; may be all ``False``.
    probability, threshold:
        The model's pneumonia probability in [0, 1] (dimensionless), and the
        operating point at or above which Pneumonia is reported present.
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
        ``mask`` has another shape than the source; or as :func:`write_seg`.
    TypeError
        ``mask`` is not a boolean ``numpy.ndarray``.
    """
    _check_source(source)
    probability = _unit_interval(probability, "probability")
    threshold = _unit_interval(threshold, "threshold")
    _check_mask(mask, source)
    check_long_string(context.manufacturer, "PipelineContext.manufacturer")

    proxy, repairs = sanitize_source(source)
    prefix = context.uid_prefix
    uids = derived_uids([proxy], pipeline=PIPELINE, algorithm=algorithm, kind="SR", prefix=prefix)
    report = measurement_report(
        device_observation_context(algorithm, manufacturer=context.manufacturer, prefix=prefix),
        PROCEDURE,
        [_attention_region(proxy, mask, probability, threshold, algorithm, prefix, str(uids.sop_instance_uid))],
        image_library([proxy]),
    )
    sr = comprehensive_sr(
        [proxy], report, uids=uids, pipeline=PIPELINE, algorithm=algorithm, context=context, series_number=series_number
    )
    return sr, repairs


def _attention_region(
    proxy: Dataset,
    mask: np.ndarray,
    probability: float,
    threshold: float,
    algorithm: AlgorithmDescription,
    prefix: str | None,
    sr_instance_uid: str,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The SR's one TID 1410 Planar ROI group:

    - Image Region: a closed SCOORD POLYLINE on the source image (the SCOORD
      is SELECTED FROM the source: this is the SR's reference to it),
      geometric purpose DCM "Outline". With attention pixels in ``mask``
      it outlines the largest 4-connected region, holes filled
      (:func:`pipelines.common.outline.region_outline`), finding category
      SCT "Spatial and Relational Concept", finding DCM "Gradient-weighted
      class activation", Tracking Identifier :data:`SEGMENT_LABEL` (with
      "largest of n regions" when there are several; the SEG holds them
      all). With an empty ``mask`` it outlines the whole image, Tracking
      Identifier :data:`WHOLE_IMAGE_LABEL`, no finding: the probability is
      then plainly an image-level result. The probability is the model's
      output for the whole image in both cases; the outline shows where the
      model looked.
    - measurements (TID 1419) DCM "Probability" = ``probability`` and DCM
      "Threshold Value" = ``threshold``, unit UCUM ``{probability}``;
    - qualitative evaluation Pneumonia = SCT "Present" if
      ``probability >= threshold`` else SCT "Absent";
    - finding site SCT "Lung" and the model in TID 4019 Algorithm
      Identification.
    """
    if mask.any():
        outline, regions = region_outline(mask, tolerance=_OUTLINE_TOLERANCE)
        label = SEGMENT_LABEL if regions == 1 else f"{SEGMENT_LABEL}, largest of {regions} regions"
        finding = {"finding_category": ATTENTION_CATEGORY, "finding_type": ATTENTION_TYPE}
    else:
        outline = image_outline(int(proxy.Rows), int(proxy.Columns))
        label, finding = WHOLE_IMAGE_LABEL, {}

    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(prefix, "tracking", sr_instance_uid, "region"),
            identifier=label,
        ),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=hd.sr.SourceImageForRegion(proxy.SOPClassUID, proxy.SOPInstanceUID),
        ),
        geometric_purpose=OUTLINE,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        algorithm_id=algorithm.sr_identification(),
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=probability, unit=PROBABILITY_UNIT),
            hd.sr.Measurement(name=THRESHOLD, value=threshold, unit=PROBABILITY_UNIT),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if probability >= threshold else ABSENT)
        ],
        **finding,
    )


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


def _check_mask(mask: object, source: Dataset) -> None:
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise TypeError(f"mask must be a numpy.ndarray of dtype bool, got {_describe(mask)}")
    expected = (int(source.Rows), int(source.Columns))
    if mask.shape != expected:
        raise ValueError(f"mask has shape {mask.shape}, expected (Rows, Columns) = {expected} of the source")


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
