"""Derived objects of the brain tumour pipeline.

For one MR study with four co-registered sequences (T1, T1c, T2, FLAIR) the
pipeline's model gives a BraTS label map on the grid of the *reference*
series (T1c by default): 1 = NCR (necrotic and non-enhancing tumour core),
2 = ED (peritumoral oedema), 4 = ET (Gd-enhancing tumour), 0 elsewhere. This
module writes it as two objects:

1. :func:`write_seg`: a BINARY Segmentation (PS3.3 A.51, C.8.20) with three
   segments, 1 = NCR, 2 = ED, 3 = ET, on the reference series' own grid (its
   Frame of Reference, Image Position/Orientation (Patient) and Pixel
   Measures; never a resampled grid), one frame per reference slice and
   segment by default (155 x 3 = 465 frames);
2. :func:`write_sr`: a Comprehensive 3D SR holding a TID 1500 Measurement
   Report of the volumes, in ml, of the three segments and of the BraTS
   regions ET (label 4), TC (labels 1 + 4) and WT (labels 1 + 2 + 4).

The pipeline's call::

    seg, seg_repairs = write_seg(reference, labels, sources=sources, algorithm=algorithm, context=context)
    sr, sr_repairs = write_sr(reference, seg, sources=sources, algorithm=algorithm, context=context)
    volumes = measure_volumes(reference, seg)  # what the SR says, for the job log
    context.log.info("tumour volumes", **volumes.as_log())
    for repair in dict.fromkeys(seg_repairs + sr_repairs):
        context.log.info("source value repaired", repair=str(repair))
    return [seg, sr]

where ``sources`` maps each role ("T1", "T1c", "T2", "FLAIR") to its
series' datasets (``{role: study.role(role) for role in ROLES}``) and
``reference`` is ``sources[settings.reference_role]`` sorted in slice order.

Codes (PS3.16; values as tabulated in pydicom's ``pydicom.sr`` tables, which
are generated from PS3.16):

- Segmented Property Category: SCT 49755003 "Morphologically Abnormal
  Structure" (CID 7150) for all three segments.
- Segmented Property Types from CID 7168 "Brain Lesion Segmentation Type
  With Necrosis", the context group PS3.16 defines for exactly this
  (glioma sub-region) segmentation:
  NCR -> SCT 6574001 "Necrosis"; ED -> SCT 79654002 "Edema" (CID 7168/7169
  note: the generic edema concept is used rather than NCIt C121674
  "Peritumoral Brain Edema"); ET -> NCIt C113842 "Enhancing Lesion".
  BraTS label 1 has merged necrosis and non-enhancing tumour since 2017;
  "Necrosis" names its dominant part, and the Segment Description says
  "necrotic and non-enhancing tumour core".
- Anatomic Region: SCT 12738006 "Brain".
- Recommended display colours: the BraTS/ITK-SNAP convention, NCR red, ED
  green, ET yellow.
- SR: measurement SCT 118565006 "Volume", unit UCUM ``ml``; finding site
  SCT 12738006 "Brain"; procedure DCM 126020 "Multiparametric MRI"
  (CID 100); TC finding SCT 108369006 "Neoplasm" and WT finding SCT
  52988006 "Lesion" (both CID 7159 "Lesion Segmentation Types": the tumour
  proper, and the whole abnormal region with its oedema).
- Algorithm family: DCM 123110 "Artificial Intelligence" (CID 7162).

How the SR references segments (PS3.16 TID 1411 row 7, "Referenced
Segment", references *one* segment; DCMTK's TID 1411 implementation refuses
any other number): each of the three segments has its own TID 1411
Volumetric ROI group referencing it, with the reference series as "Source
series for segmentation" and the segment's Tracking UID; the ET region *is*
the ET segment, so its group is that one. TC and WT are unions of segments,
not segments, so they are TID 1501 Measurement groups whose Volume
measurement (TID 300) is "INFERRED FROM" one IMAGE item "Source of
Measurement" (DCM 121112) per segment it adds up, each referencing the SEG
with that Referenced Segment Number (0062,000B): TC = 1, 3; WT = 1, 2, 3.
Every volume is the SEG's voxel count times the voxel volume
(:func:`measure_volumes`), so the SR says exactly what the SEG holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from pipelines.base import PipelineContext
from pipelines.brain_tumour.segments import (
    BRAIN,
    MORPHOLOGICALLY_ABNORMAL,
    PROCEDURE,
    REGIONS,
    SEGMENTS,
    TumourRegion,
    TumourSegment,
    TumourVolumes,
)
from pipelines.brain_tumour.write_checks import check_labels, check_reference, check_sources, measure
from pipelines.common.derived_objects import (
    MILLILITER,
    VOLUME,
    MeasurementGroup,
    binary_segmentation,
    compact_empty_label_map,
    comprehensive_sr,
    measurement_report,
    sanitized_sources,
    segment_description,
    volumetric_roi_group,
)
from pipelines.common.identity import (
    NOT_FOR_DIAGNOSTIC_USE,
    AlgorithmDescription,
    check_long_string,
    ensure_valid_values,
)
from pipelines.common.sanitize import Repair, reference_proxies, sanitize_source
from pipelines.common.sr_content import device_observation_context, series_image_library
from pipelines.common.uids import derived_uid, derived_uids

__all__ = [
    "PIPELINE",
    "measure_volumes",
    "write_seg",
    "write_sr",
]

#: Routing name of the pipeline (its ``spec.py``); part of every UID.
PIPELINE = "brain_tumour"

#: Series numbers of the derived series; high, so viewers list them after
#: the acquired ones (the pneumonia pipeline uses 9801/9802).
SEG_SERIES_NUMBER = 9811
SR_SERIES_NUMBER = 9812

#: Content Label (0070,0080), CS: at most 16 of A-Z 0-9 _ and space.
CONTENT_LABEL = "BRAIN_TUMOUR"


def write_seg(
    reference: Sequence[Dataset],
    labels: np.ndarray,
    *,
    sources: Mapping[str, Sequence[Dataset]],
    algorithm: AlgorithmDescription,
    context: PipelineContext,
    omit_empty_frames: bool = False,
    series_number: int = SEG_SERIES_NUMBER,
) -> tuple[hd.seg.Segmentation, list[Repair]]:
    """Write a BraTS label map as a DICOM SEG on the reference series' grid.

    A BINARY Segmentation (PS3.3 A.51, C.8.20) with the three
    :data:`~pipelines.brain_tumour.segments.SEGMENTS` (1 NCR, 2 ED, 3 ET;
    codes in the module docstring), AUTOMATIC, the model in each segment's
    Algorithm Identification (family DCM 123110), a Tracking UID per segment
    (the SR's groups repeat it), anatomic region Brain; on the reference's
    own geometry, each frame referencing its source slice, the Referenced
    Series Sequence naming the reference series only (OHIF needs it). Empty
    segments stay described; with ``omit_empty_frames`` they have no frame
    (:func:`~pipelines.common.derived_objects.compact_empty_label_map`).

    Parameters
    ----------
    reference:
        The reference series in slice order: single-frame MR images, or one
        Enhanced / Legacy Converted Enhanced MR image; with a Frame of
        Reference and a regular slice spacing. Pixel Data is not read.
    labels:
        ``uint8`` ``(slices, Rows, Columns)``, ``labels[k]`` on ``reference[k]``
        (or frame ``k + 1``); values in ``BRATS_LABELS``.
    sources:
        Role (``"T1"``, ``"T1c"``, ``"T2"``, ``"FLAIR"``) -> that series'
        datasets, the reference among them. The UIDs derive from all of them,
        the pipeline, the model and ``omit_empty_frames``.
    algorithm, context:
        The model; ``uid_prefix`` roots the UIDs, ``manufacturer`` is written.
    omit_empty_frames:
        ``False`` (default): one frame per slice and segment. ``True``: only
        frames with a segment pixel (Weasis refuses SEGs over 400 frames).
    series_number:
        Series Number (0020,0011) of the SEG series.

    Returns
    -------
    seg, repairs:
        The Segmentation, and what was repaired in the reference's values.

    Raises
    ------
    ValueError
        Naming the attribute: ``reference`` is not an MR stack in slice
        order (:func:`pipelines.common.geometry.slice_stack`); ``labels``
        has another shape or other values; ``sources`` lacks the reference,
        mixes studies or is malformed; a value does not fit its attribute.
    TypeError
        ``labels`` is not a ``uint8`` array; ``omit_empty_frames`` not a bool.
    """
    stack, multiframe = check_reference(reference)
    check_labels(labels, stack)
    if not isinstance(omit_empty_frames, bool):
        raise TypeError(f"omit_empty_frames must be a bool, got {type(omit_empty_frames).__name__}")
    source_images = check_sources(sources, reference)
    check_long_string(context.manufacturer, "PipelineContext.manufacturer")
    proxies, repairs = sanitized_sources(reference, multiframe)
    kind = "SEG compact" if omit_empty_frames else "SEG"
    uids = derived_uids(source_images, pipeline=PIPELINE, algorithm=algorithm, kind=kind, prefix=context.uid_prefix)
    # One boolean plane per segment, in Segment Number order: (slices, rows, columns, 3).
    masks = np.stack([labels == segment.brats_label for segment in SEGMENTS], axis=-1)
    proxies, masks, omit = compact_empty_label_map(proxies, masks, omit_empty_frames, multiframe)
    descriptions = [_segment(segment, algorithm, context, str(uids.sop_instance_uid)) for segment in SEGMENTS]
    seg = binary_segmentation(
        proxies, masks, descriptions, uids=uids, pipeline=PIPELINE, algorithm=algorithm, context=context,
        series_number=series_number, omit_empty_frames=omit, content_label=CONTENT_LABEL,
        content_descriptions=[f"BraTS NCR/ED/ET by {algorithm.label}", f"BraTS {algorithm.label}", algorithm.label,
                              f"BraTS {algorithm.version}"],
    )
    ensure_valid_values(seg, "SEG")
    return seg, repairs


def _segment(
    segment: TumourSegment, algorithm: AlgorithmDescription, context: PipelineContext, sop_instance_uid: str
) -> hd.seg.SegmentDescription:
    return segment_description(
        number=segment.number,
        label=segment.label,
        category=MORPHOLOGICALLY_ABNORMAL,
        property_type=segment.property_type,
        description=(
            f"BraTS label {segment.brats_label} ({segment.abbreviation}): {segment.meaning}, segmented by "
            f"{algorithm.label} (pipeline {PIPELINE}). {NOT_FOR_DIAGNOSTIC_USE}."
        ),
        algorithm=algorithm,
        context=context,
        sop_instance_uid=sop_instance_uid,
        display_color=hd.color.CIELabColor.from_rgb(*segment.rgb),
        anatomic_regions=[BRAIN],
    )


def measure_volumes(reference: Sequence[Dataset], seg: Dataset) -> TumourVolumes:
    """Volumes of the segments of ``seg``: voxel counts x voxel volume.

    The voxel counts are read from the SEG itself (every set pixel of every
    frame, by segment; :func:`pipelines.common.seg_frames.segment_voxel_counts`),
    so they are what a reader of the SEG finds, whatever frames were
    omitted. The voxel volume is the reference's Pixel Spacing (rows x
    columns) times its slice spacing measured from Image Position (Patient)
    (:func:`pipelines.common.geometry.slice_stack`), in mm^3; the SEG lies on
    that grid (checked).

    Parameters
    ----------
    reference:
        As for :func:`write_seg`.
    seg:
        The Segmentation :func:`write_seg` returned for ``reference`` (or
        that SEG read back).

    Raises
    ------
    ValueError
        As for :func:`write_seg` about ``reference``; ``seg`` is not a
        BINARY brain tumour SEG of the reference series (study, Frame of
        Reference, referenced series, Rows/Columns, Pixel Spacing, segments
        1 NCR, 2 ED, 3 ET).
    """
    stack, _ = check_reference(reference)
    return measure(stack, reference, seg)


def write_sr(
    reference: Sequence[Dataset],
    seg: Dataset,
    *,
    sources: Mapping[str, Sequence[Dataset]],
    algorithm: AlgorithmDescription,
    context: PipelineContext,
    series_number: int = SR_SERIES_NUMBER,
) -> tuple[hd.sr.Comprehensive3DSR, list[Repair]]:
    """Write the tumour volumes as a TID 1500 Measurement Report.

    A Comprehensive 3D SR (PS3.3 A.35.13) whose content is TID 1500
    "Imaging Measurement Report" (PS3.16) with:

    - TID 1001 observation context: the model as Device observer (TID 1004);
    - procedure reported DCM 126020 "Multiparametric MRI";
    - TID 1600 image library: one group per source series (all roles);
    - one TID 1411 Volumetric ROI group per segment (NCR, ED, ET): Referenced
      Segment = that segment of ``seg``, Source series for segmentation = the
      reference series, Tracking UID/ID = the segment's, finding category
      "Morphologically Abnormal Structure", finding type = the segment's
      property type, finding site Brain, Volume in ml, the model in TID 4019;
    - one TID 1501 group each for TC and WT (:func:`_region_group`).

    Each volume is :func:`measure_volumes`, written exactly (Floating Point
    Value besides Numeric Value). COMPLETE, UNVERIFIED, PRELIMINARY.
    Evidence: every source image and the SEG. UIDs derive from the sources,
    the SEG, the pipeline and the model.

    Parameters
    ----------
    reference, sources, algorithm, context:
        As for :func:`write_seg`, the same values it was given.
    seg:
        The Segmentation :func:`write_seg` returned.
    series_number:
        Series Number (0020,0011) of the SR series.

    Returns
    -------
    sr, repairs:
        The SR document, and what was repaired in the reference's values.

    Raises
    ------
    ValueError
        As for :func:`write_seg` and :func:`measure_volumes`.
    """
    stack, _ = check_reference(reference)
    source_images = check_sources(sources, reference)
    volumes = measure(stack, reference, seg)
    prefix = context.uid_prefix
    observation_context = device_observation_context(algorithm, manufacturer=context.manufacturer, prefix=prefix)
    proxy, repairs = sanitize_source(reference[0])
    uids = derived_uids([*source_images, seg], pipeline=PIPELINE, algorithm=algorithm, kind="SR", prefix=prefix)
    groups: list[MeasurementGroup] = [  # TID 1411 groups, then TID 1501 groups
        volumetric_roi_group(
            seg, segment.number, source_series=str(reference[0].SeriesInstanceUID),
            finding_category=MORPHOLOGICALLY_ABNORMAL, finding_type=segment.property_type, finding_sites=[BRAIN],
            volume_ml=volumes.ml(segment.abbreviation), algorithm=algorithm,
        )
        for segment in SEGMENTS
    ]
    # ET is the ET segment's TID 1411 group above.
    groups += [_region_group(region, seg, volumes, algorithm, uids.sop_instance_uid, prefix)
               for region in REGIONS if len(region.segments) > 1]
    # Reference series first; proxies of the other images carry references only.
    by_series: dict[str, list[Dataset]] = {}
    for image in source_images:
        by_series.setdefault(str(image.SeriesInstanceUID), []).append(image)
    library_series = [reference_proxies(images) for images in by_series.values()]
    report = measurement_report(observation_context, PROCEDURE, groups, series_image_library(library_series))
    # highdicom copies Patient and Study from the first item: the sanitised
    # reference image; the others give only their UIDs.
    evidence = [proxy, *(image for images in library_series for image in images), seg]
    sr = comprehensive_sr(evidence, report, uids=uids, pipeline=PIPELINE, algorithm=algorithm, context=context,
                          series_number=series_number)
    return sr, repairs


def _region_group(
    region: TumourRegion,
    seg: Dataset,
    volumes: TumourVolumes,
    algorithm: AlgorithmDescription,
    sr_instance_uid: str,
    prefix: str | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of a region that is a union of segments (TC, WT):
    finding "Neoplasm" / "Lesion", site Brain, Volume in ml inferred from the
    SEG's segments 1 + 3 / 1 + 2 + 3 (one Source of Measurement per
    segment), the model in TID 4019."""
    sources_of_measurement = []
    for segment in region.segments:
        # One IMAGE item per segment (TID 300 allows 1-n): the form that
        # TID 1411 uses and that readers expect (highdicom 0.28's reader
        # fails on a multi-valued Referenced Segment Number).
        source = hd.sr.SourceImageForMeasurement(seg.SOPClassUID, seg.SOPInstanceUID)
        source.ReferencedSOPSequence[0].ReferencedSegmentNumber = segment.number
        sources_of_measurement.append(source)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(prefix, "tracking", str(sr_instance_uid), region.abbreviation),
            identifier=region.name,
        ),
        finding_category=MORPHOLOGICALLY_ABNORMAL,
        finding_type=region.finding_type,
        finding_sites=[hd.sr.FindingSite(BRAIN)],
        algorithm_id=algorithm.sr_identification(),
        measurements=[
            hd.sr.Measurement(
                name=VOLUME,
                value=volumes.ml(region.abbreviation),
                unit=MILLILITER,
                referenced_images=sources_of_measurement,
            )
        ],
    )
