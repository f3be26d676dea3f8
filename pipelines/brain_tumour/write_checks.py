"""Checks of the brain tumour writers' inputs: the reference series, the
label map, the source series and a SEG read back (:mod:`pipelines.brain_tumour.write`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydicom import Dataset
from pydicom.uid import (
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)

from pipelines.brain_tumour.segments import BRATS_LABELS, SEGMENTS, TumourVolumes
from pipelines.common.derived_objects import check_label_map
from pipelines.common.geometry import SliceStack, slice_stack
from pipelines.common.identity import check_long_string
from pipelines.common.seg_frames import check_segmentation, segment_voxel_counts

__all__ = ["check_labels", "check_reference", "check_sources", "measure"]

_MR_SINGLE_FRAME = (MRImageStorage,)
_MR_MULTI_FRAME = (EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage)


def check_reference(reference: Sequence[Dataset]) -> tuple[SliceStack, bool]:
    """The stack geometry of an MR reference series, and whether it is one
    enhanced multi-frame image; ValueError naming the attribute otherwise."""
    if isinstance(reference, Dataset) or not isinstance(reference, Sequence) or not reference:
        raise ValueError("reference must be a non-empty sequence of pydicom Datasets (the reference series)")
    for index, ds in enumerate(reference):
        if not isinstance(ds, Dataset):
            raise ValueError(f"reference[{index}] must be a pydicom Dataset, got {type(ds).__name__}")
        modality = str(ds.get("Modality", "")).strip()
        if modality != "MR":
            raise ValueError(f"Modality of reference[{index}] is {modality!r}; this writer takes MR")
    first = reference[0]
    multiframe = "PerFrameFunctionalGroupsSequence" in first or int(first.get("NumberOfFrames") or 1) > 1
    allowed = _MR_MULTI_FRAME if multiframe else _MR_SINGLE_FRAME
    for index, ds in enumerate(reference):
        if ds.get("SOPClassUID") not in allowed:
            names = ", ".join(uid.name for uid in allowed)
            raise ValueError(f"SOPClassUID of reference[{index}] is {ds.get('SOPClassUID')!r}; expected {names}")
    return slice_stack(reference), multiframe


def check_labels(labels: object, stack: SliceStack) -> None:
    """``labels`` is a ``uint8`` BraTS label map on ``stack``'s grid
    (:func:`~pipelines.common.derived_objects.check_label_map`)."""
    check_label_map(labels, stack.shape, BRATS_LABELS, f"BraTS labels are {BRATS_LABELS}")


def check_sources(sources: Mapping[str, Sequence[Dataset]], reference: Sequence[Dataset]) -> list[Dataset]:
    """Every source image, reference series first; checks the mapping."""
    if not isinstance(sources, Mapping) or not sources:
        raise ValueError("sources must be a non-empty mapping of role -> datasets of that series")
    study = reference[0].get("StudyInstanceUID")
    reference_series = reference[0].get("SeriesInstanceUID")
    by_series: dict[str, str] = {}
    images: list[Dataset] = []
    for role, datasets in sources.items():
        check_long_string(role, "sources role")
        if isinstance(datasets, Dataset) or not isinstance(datasets, Sequence) or not datasets:
            raise ValueError(f"sources[{role!r}] must be a non-empty sequence of pydicom Datasets")
        series = {ds.get("SeriesInstanceUID") for ds in datasets}
        if len(series) != 1:
            raise ValueError(f"SeriesInstanceUID of sources[{role!r}] takes {len(series)} values; a role is one series")
        (uid,) = series
        if uid in by_series:
            raise ValueError(f"sources[{role!r}] and sources[{by_series[uid]!r}] are the same series {uid}")
        by_series[uid] = role
        for ds in datasets:
            if ds.get("StudyInstanceUID") != study:
                raise ValueError(
                    f"StudyInstanceUID of an image of sources[{role!r}] is {ds.get('StudyInstanceUID')!r}; "
                    f"the reference's is {study!r}"
                )
        if uid == reference_series:
            held = {ds.get("SOPInstanceUID") for ds in datasets}
            missing = [ds.SOPInstanceUID for ds in reference if ds.get("SOPInstanceUID") not in held]
            if missing:
                raise ValueError(f"sources[{role!r}] lacks reference image(s) {missing[:3]}")
            images[:0] = list(datasets)
        else:
            images.extend(datasets)
    if reference_series not in by_series:
        raise ValueError(f"sources holds no series {reference_series}: the reference must be one of the sources")
    return images


def measure(stack: SliceStack, reference: Sequence[Dataset], seg: Dataset) -> TumourVolumes:
    """The volumes of ``seg``'s segments after checking that it is a brain
    tumour SEG of ``reference``."""
    _check_seg(seg, reference, stack)
    counts = segment_voxel_counts(seg)
    return TumourVolumes(
        voxel_counts={segment.abbreviation: counts[segment.number] for segment in SEGMENTS},
        pixel_spacing=stack.pixel_spacing,
        slice_spacing=stack.slice_spacing,
    )


def _check_seg(seg: Dataset, reference: Sequence[Dataset], stack: SliceStack) -> None:
    check_segmentation(seg)
    if seg.get("SegmentationType") != "BINARY":
        raise ValueError(f"SegmentationType of seg is {seg.get('SegmentationType')!r}; expected BINARY")
    first = reference[0]
    for keyword, expected in (
        ("StudyInstanceUID", first.get("StudyInstanceUID")),
        ("FrameOfReferenceUID", stack.frame_of_reference_uid),
        ("Rows", stack.rows),
        ("Columns", stack.columns),
    ):
        if seg.get(keyword) != expected:
            raise ValueError(f"{keyword} of seg is {seg.get(keyword)!r}; the reference's is {expected!r}")
    referenced = seg.get("ReferencedSeriesSequence") or []
    series = [str(item.SeriesInstanceUID) for item in referenced]
    if series != [str(first.SeriesInstanceUID)]:
        raise ValueError(f"ReferencedSeriesSequence of seg names series {series}; expected the reference series only")
    known = {str(ds.SOPInstanceUID) for ds in reference}
    for item in referenced[0].get("ReferencedInstanceSequence") or []:
        if str(item.ReferencedSOPInstanceUID) not in known:
            raise ValueError(f"seg references image {item.ReferencedSOPInstanceUID}, which is not in the reference")
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    spacing = tuple(float(v) for v in measures.PixelSpacing)
    if max(abs(a - b) for a, b in zip(spacing, stack.pixel_spacing, strict=True)) > 1e-6:
        raise ValueError(f"PixelSpacing of seg is {spacing}; the reference's is {stack.pixel_spacing}")
    described = {int(item.SegmentNumber): item for item in seg.get("SegmentSequence") or []}
    for segment in SEGMENTS:
        item = described.get(segment.number)
        code = item.SegmentedPropertyTypeCodeSequence[0] if item is not None else None
        if code is None or (code.CodeValue, code.CodingSchemeDesignator) != (
            segment.property_type.value,
            segment.property_type.scheme_designator,
        ):
            raise ValueError(f"SegmentSequence of seg has no segment {segment.number} {segment.abbreviation}")
