"""Derived objects of the bundle segmentation pipeline: a SEG with one segment per label, a volumetric SR.

For one CT or MR series the bundle gives a label map, mapped onto the
series' own grid; this module writes it as

1. :func:`write_seg`: a BINARY Segmentation (PS3.3 A.51, C.8.20) with one
   segment per output label of the bundle (Segment Number 1..n in label
   order), on the source series' grid: same Frame of Reference, Image
   Position/Orientation (Patient) and Pixel Measures; one frame per source
   slice and segment by default;
2. :func:`write_sr`: a Comprehensive 3D SR with a TID 1500 Measurement
   Report holding, per segment, one TID 1411 Volumetric ROI group that
   references that segment of the SEG and gives its volume in ml.

Codes (PS3.16): Segmented Property Category and Type from the pipeline's
settings (:meth:`~pipelines.bundle_segmentation.settings.BundleSegmentationSettings.segment_code`);
measurement SCT 118565006 "Volume", unit UCUM ``ml``; procedure reported
(CID 100) LOINC "CT unspecified body region" or "MRI unspecified body
region"; algorithm family DCM 123110 "Artificial Intelligence" (CID 7162).

Volumes are the SEG's voxel counts (:func:`pipelines.common.seg_frames.segment_voxel_counts`)
times the source grid's voxel volume (:func:`pipelines.common.geometry.slice_stack`:
Pixel Spacing x the slice spacing measured from Image Position (Patient)),
the same measure the brain tumour SR uses, so the SR says exactly what the
SEG holds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)

from pipelines.base import PipelineContext
from pipelines.common.derived_objects import (
    MeasurementGroup,
    binary_segmentation,
    check_label_map,
    compact_empty_label_map,
    comprehensive_sr,
    measurement_report,
    sanitized_sources,
    segment_description,
    volumetric_roi_group,
)
from pipelines.common.geometry import SliceStack, slice_stack
from pipelines.common.identity import (
    NOT_FOR_DIAGNOSTIC_USE,
    AlgorithmDescription,
    check_long_string,
    ensure_valid_values,
)
from pipelines.common.sanitize import Repair, reference_proxies, sanitize_source
from pipelines.common.seg_frames import check_segmentation, segment_voxel_counts
from pipelines.common.sr_content import device_observation_context, series_image_library
from pipelines.common.uids import derived_uids

__all__ = [
    "PIPELINE",
    "Segment",
    "make_segments",
    "segment_volumes_ml",
    "write_seg",
    "write_sr",
]

#: Routing name of the pipeline (its ``spec.py``); part of every UID.
PIPELINE = "bundle_segmentation"

#: Series numbers of the derived series (pneumonia 9801/9802, brain 9811/9812).
SEG_SERIES_NUMBER = 9821
SR_SERIES_NUMBER = 9822

#: Content Label (0070,0080), CS: at most 16 of A-Z 0-9 _ and space.
CONTENT_LABEL = "BUNDLE_SEG"

#: Procedure reported (CID 100) by the source's Modality.
PROCEDURES = {"CT": codes.cid100.CTUnspecifiedBodyRegion, "MR": codes.cid100.MRIUnspecifiedBodyRegion}

_SINGLE_FRAME = {"CT": (CTImageStorage,), "MR": (MRImageStorage,)}
_MULTI_FRAME = {
    "CT": (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage),
    "MR": (EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage),
}

#: Recommended display colours, one per segment in turn (RGB).
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)
_LO_TEXT = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,64}")


@dataclass(frozen=True)
class Segment:
    """One segment of the SEG: one label value of the bundle's label map.

    Attributes
    ----------
    number:
        Segment Number (0062,0004), 1..n.
    label:
        The label-map value it holds, 1..255.
    name:
        The bundle's name of the label (``channel_def``).
    category, property_type:
        Segmented Property Category (CID 7150) and Type (CID 7151).
    """

    number: int
    label: int
    name: str
    category: Code
    property_type: Code

    @property
    def segment_label(self) -> str:
        """Segment Label (0062,0005), LO: the name when it fits LO, else ``"Label <value>"``."""
        return self.name if _LO_TEXT.fullmatch(self.name) else f"Label {self.label}"


def make_segments(labels: Mapping[int, str], code_of) -> tuple[Segment, ...]:
    """One :class:`Segment` per label value, in ascending value order.

    Parameters
    ----------
    labels:
        Label value (1..255) -> name.
    code_of:
        ``name -> (category, type)``, e.g. the settings' ``segment_code``.

    Raises
    ------
    ValueError
        ``labels`` is empty or holds a value outside 1..255.
    """
    if not labels:
        raise ValueError("labels is empty: a SEG needs at least one segment")
    out = []
    for number, value in enumerate(sorted(labels), start=1):
        if not 1 <= int(value) <= 255:
            raise ValueError(f"label value {value} outside 1..255")
        category, property_type = code_of(labels[value])
        out.append(Segment(number, int(value), str(labels[value]), category, property_type))
    return tuple(out)


def _check_reference(reference: Sequence[Dataset]) -> tuple[SliceStack, bool, str]:
    if isinstance(reference, Dataset) or not isinstance(reference, Sequence) or not reference:
        raise ValueError("reference must be a non-empty sequence of pydicom Datasets (the source series)")
    modalities = {str(ds.get("Modality", "")).strip() for ds in reference}
    if len(modalities) != 1 or not modalities <= set(_SINGLE_FRAME):
        raise ValueError(f"Modality of the reference is {sorted(modalities)}; this writer takes one of CT, MR")
    (modality,) = modalities
    first = reference[0]
    multiframe = "PerFrameFunctionalGroupsSequence" in first or int(first.get("NumberOfFrames") or 1) > 1
    allowed = (_MULTI_FRAME if multiframe else _SINGLE_FRAME)[modality]
    for index, ds in enumerate(reference):
        if ds.get("SOPClassUID") not in allowed:
            names = ", ".join(uid.name for uid in allowed)
            raise ValueError(f"SOPClassUID of reference[{index}] is {ds.get('SOPClassUID')!r}; expected {names}")
    return slice_stack(reference), multiframe, modality


def _check_labels(labels: object, stack: SliceStack, segments: Sequence[Segment]) -> None:
    known = {0, *(s.label for s in segments)}
    check_label_map(labels, stack.shape, known, f"the bundle's labels are {sorted(known - {0})}")


def write_seg(
    reference: Sequence[Dataset],
    labels: np.ndarray,
    *,
    segments: Sequence[Segment],
    algorithm: AlgorithmDescription,
    context: PipelineContext,
    omit_empty_frames: bool = False,
    series_number: int = SEG_SERIES_NUMBER,
) -> tuple[hd.seg.Segmentation, list[Repair]]:
    """Write a label map as a DICOM SEG on the source series' grid.

    A BINARY Segmentation with one segment per :class:`Segment` (codes from
    the settings), Segment Algorithm Type AUTOMATIC with the model in each
    segment's Algorithm Identification Sequence, a Tracking UID per segment
    (the SR's group repeats it). Empty segments stay described. Each frame
    references its source slice (Derivation Image); the Referenced Series
    Sequence names the source series.

    Parameters
    ----------
    reference:
        The source series in slice order: single-frame CT or MR Image
        Storage images, or one enhanced multi-frame image whose frames are
        the slices in order; with a Frame of Reference and a regular spacing.
    labels:
        ``uint8`` ``(slices, Rows, Columns)``; ``labels[k]`` lies on
        ``reference[k]`` (frame ``k + 1``). Values 0 or a segment's ``label``.
    segments:
        From :func:`make_segments`.
    algorithm, context:
        The model; ``uid_prefix`` and ``manufacturer``.
    omit_empty_frames:
        ``True`` leaves out frames without a segment pixel (the compact variant).
    series_number:
        Series Number (0020,0011) of the SEG series.

    Returns
    -------
    seg, repairs:
        The Segmentation, and what was repaired in the source's values.

    Raises
    ------
    ValueError
        Naming the attribute: the reference is not one CT or MR stack (see
        :func:`pipelines.common.geometry.slice_stack`); ``labels`` has
        another shape or values no segment holds; a value does not fit its VR.
    TypeError
        ``labels`` is not a ``uint8`` ``numpy.ndarray``.
    """
    stack, multiframe, _ = _check_reference(reference)
    if not segments:
        raise ValueError("segments is empty: a SEG needs at least one segment")
    _check_labels(labels, stack, segments)
    check_long_string(context.manufacturer, "PipelineContext.manufacturer")
    proxies, repairs = sanitized_sources(reference, multiframe)
    kind = "SEG compact" if omit_empty_frames else "SEG"
    uids = derived_uids(list(reference), pipeline=PIPELINE, algorithm=algorithm, kind=kind, prefix=context.uid_prefix)
    masks = np.stack([labels == segment.label for segment in segments], axis=-1)
    proxies, masks, omit = compact_empty_label_map(proxies, masks, omit_empty_frames, multiframe)
    descriptions = [_segment(segment, algorithm, context, str(uids.sop_instance_uid)) for segment in segments]
    seg = binary_segmentation(
        proxies, masks, descriptions, uids=uids, pipeline=PIPELINE, algorithm=algorithm, context=context,
        series_number=series_number, omit_empty_frames=omit, content_label=CONTENT_LABEL,
        content_descriptions=[algorithm.label, algorithm.version],
    )
    ensure_valid_values(seg, "SEG")
    return seg, repairs


def _segment(
    segment: Segment, algorithm: AlgorithmDescription, context: PipelineContext, sop_instance_uid: str
) -> hd.seg.SegmentDescription:
    name = segment.name if segment.segment_label == segment.name else segment.segment_label
    return segment_description(
        number=segment.number,
        label=segment.segment_label,
        category=segment.category,
        property_type=segment.property_type,
        description=(
            f"Label {segment.label} ({name}) of {algorithm.label} (pipeline {PIPELINE}). {NOT_FOR_DIAGNOSTIC_USE}."
        ),
        algorithm=algorithm,
        context=context,
        sop_instance_uid=sop_instance_uid,
        display_color=hd.color.CIELabColor.from_rgb(*_PALETTE[(segment.number - 1) % len(_PALETTE)]),
    )


def segment_volumes_ml(reference: Sequence[Dataset], seg: Dataset) -> dict[int, float]:
    """Segment Number -> volume in ml: the SEG's voxel count of the segment
    times the reference grid's voxel volume (mm^3) / 1000.

    Raises
    ------
    ValueError
        ``seg`` is not a BINARY Segmentation on the reference's grid (Frame
        of Reference, Rows, Columns), or as :func:`write_seg` about ``reference``.
    """
    stack, _, _ = _check_reference(reference)
    check_segmentation(seg)
    for keyword, expected in (
        ("SegmentationType", "BINARY"),
        ("FrameOfReferenceUID", stack.frame_of_reference_uid),
        ("Rows", stack.rows),
        ("Columns", stack.columns),
    ):
        if seg.get(keyword) != expected:
            raise ValueError(f"{keyword} of seg is {seg.get(keyword)!r}; the reference's is {expected!r}")
    counts = segment_voxel_counts(seg)
    return {int(item.SegmentNumber): counts.get(int(item.SegmentNumber), 0) * stack.voxel_volume_mm3 / 1000.0
            for item in seg.SegmentSequence}


def write_sr(
    reference: Sequence[Dataset],
    seg: Dataset,
    *,
    segments: Sequence[Segment],
    algorithm: AlgorithmDescription,
    context: PipelineContext,
    series_number: int = SR_SERIES_NUMBER,
) -> tuple[hd.sr.Comprehensive3DSR, list[Repair]]:
    """Write the segment volumes as a TID 1500 Measurement Report.

    A Comprehensive 3D SR (PS3.3 A.35.13): TID 1001 observation context with
    the model as Device observer (TID 1004); procedure reported by Modality
    (CID 100); TID 1600 image library of the source series; one TID 1411
    Volumetric ROI group per segment: Referenced Segment = that segment of
    ``seg``, Source series for segmentation = the reference series,
    Tracking UID/ID = the segment's, finding category and type = the
    segment's codes, Volume (:func:`segment_volumes_ml`) in ml, the model in
    TID 4019. COMPLETE, UNVERIFIED, PRELIMINARY: a machine's result for a
    radiologist to review.

    Raises
    ------
    ValueError
        As :func:`write_seg` and :func:`segment_volumes_ml`; ``seg`` lacks
        one of ``segments``.
    """
    _, _, modality = _check_reference(reference)
    volumes = segment_volumes_ml(reference, seg)
    prefix = context.uid_prefix
    observation_context = device_observation_context(algorithm, manufacturer=context.manufacturer, prefix=prefix)
    proxy, repairs = sanitize_source(reference[0])
    uids = derived_uids([*reference, seg], pipeline=PIPELINE, algorithm=algorithm, kind="SR", prefix=prefix)
    numbers = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    groups: list[MeasurementGroup] = []
    for segment in segments:
        if segment.number not in numbers:
            raise ValueError(f"SegmentSequence of seg has no segment {segment.number} ({segment.name})")
        groups.append(
            volumetric_roi_group(
                seg, segment.number, source_series=str(reference[0].SeriesInstanceUID),
                finding_category=segment.category, finding_type=segment.property_type,
                volume_ml=volumes[segment.number], algorithm=algorithm,
            )
        )
    library = reference_proxies(list(reference))
    report = measurement_report(observation_context, PROCEDURES[modality], groups, series_image_library([library]))
    sr = comprehensive_sr(
        [proxy, *library, seg], report, uids=uids, pipeline=PIPELINE, algorithm=algorithm, context=context,
        series_number=series_number,
    )
    return sr, repairs
