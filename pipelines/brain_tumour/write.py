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
from dataclasses import dataclass
from types import MappingProxyType

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)

from pipelines.base import PipelineContext
from pipelines.common.geometry import SliceStack, slice_stack
from pipelines.common.identity import (
    NOT_FOR_DIAGNOSTIC_USE,
    AlgorithmDescription,
    check_long_string,
    ensure_valid_values,
    fit_long_string,
    series_description,
)
from pipelines.common.sanitize import Repair, reference_proxies, sanitize_series, sanitize_source
from pipelines.common.seg_frames import check_segmentation, segment_voxel_counts
from pipelines.common.sr_content import device_observation_context, insert_image_library, series_image_library
from pipelines.common.uids import derived_uid, derived_uids, device_uid

__all__ = [
    "BRATS_LABELS",
    "PIPELINE",
    "REGIONS",
    "SEGMENTS",
    "TumourRegion",
    "TumourSegment",
    "TumourVolumes",
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

#: The values a BraTS label map may hold.
BRATS_LABELS = (0, 1, 2, 4)

MORPHOLOGICALLY_ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003, CID 7150
NECROSIS = codes.SCT.Necrosis  # SCT 6574001, CID 7168
EDEMA = codes.SCT.Edema  # SCT 79654002, CID 7168
ENHANCING_LESION = codes.NCIt.EnhancingLesion  # NCIt C113842, CID 7168
NEOPLASM = codes.SCT.Neoplasm  # SCT 108369006, CID 7159
LESION = codes.SCT.Lesion  # SCT 52988006, CID 7159
BRAIN = codes.SCT.Brain  # SCT 12738006
VOLUME = codes.SCT.Volume  # SCT 118565006
MILLILITER = Code("ml", "UCUM", "milliliter")
PROCEDURE = codes.cid100.MultiparametricMRI  # DCM 126020, CID 100

_MR_SINGLE_FRAME = (MRImageStorage,)
_MR_MULTI_FRAME = (EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage)


@dataclass(frozen=True)
class TumourSegment:
    """One segment of the SEG: a BraTS label.

    Attributes
    ----------
    number:
        Segment Number (0062,0004).
    brats_label:
        The label-map value it holds.
    abbreviation:
        BraTS name: ``"NCR"``, ``"ED"`` or ``"ET"``.
    label:
        Segment Label (0062,0005).
    property_type:
        Segmented Property Type (CID 7168).
    rgb:
        Recommended display colour, 0-255 per channel (written as CIE L*a*b*).
    meaning:
        What the label covers, for the Segment Description.
    """

    number: int
    brats_label: int
    abbreviation: str
    label: str
    property_type: Code
    rgb: tuple[int, int, int]
    meaning: str


NCR = TumourSegment(
    1, 1, "NCR", "Necrotic tumour core (NCR)", NECROSIS, (255, 0, 0), "necrotic and non-enhancing tumour core"
)
ED = TumourSegment(2, 2, "ED", "Peritumoral oedema (ED)", EDEMA, (0, 255, 0), "peritumoral oedema")
ET = TumourSegment(3, 4, "ET", "Enhancing tumour (ET)", ENHANCING_LESION, (255, 255, 0), "Gd-enhancing tumour")
#: The segments of the SEG, in Segment Number order.
SEGMENTS = (NCR, ED, ET)


@dataclass(frozen=True)
class TumourRegion:
    """A BraTS evaluation region: one or more segments together.

    Attributes
    ----------
    abbreviation:
        ``"ET"``, ``"TC"`` or ``"WT"``.
    name:
        Tracking Identifier of its SR group.
    segments:
        The segments whose union it is.
    finding_type:
        Finding of its SR group.
    """

    abbreviation: str
    name: str
    segments: tuple[TumourSegment, ...]
    finding_type: Code


#: ET (label 4), TC (labels 1 + 4), WT (labels 1 + 2 + 4).
REGIONS = (
    TumourRegion("ET", "Enhancing tumour (ET)", (ET,), ENHANCING_LESION),
    TumourRegion("TC", "Tumour core (TC = NCR + ET)", (NCR, ET), NEOPLASM),
    TumourRegion("WT", "Whole tumour (WT = NCR + ED + ET)", (NCR, ED, ET), LESION),
)


@dataclass(frozen=True)
class TumourVolumes:
    """Volumes of the segments and regions, as the SR states them.

    Attributes
    ----------
    voxel_counts:
        Segment abbreviation (``"NCR"``, ``"ED"``, ``"ET"``) -> number of
        voxels the SEG holds for it.
    pixel_spacing:
        Pixel Spacing of the reference (between rows, between columns), mm.
    slice_spacing:
        Distance between the reference's slices measured from Image Position
        (Patient) along the normal, mm (not Slice Thickness, which may
        differ from it when slices overlap or have gaps).
    """

    voxel_counts: Mapping[str, int]
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "voxel_counts", MappingProxyType(dict(self.voxel_counts)))

    @property
    def voxel_volume_mm3(self) -> float:
        """Pixel Spacing (rows) x Pixel Spacing (columns) x slice spacing, mm^3."""
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing

    def count(self, abbreviation: str) -> int:
        """Voxels of a segment (NCR, ED, ET) or region (ET, TC, WT).

        Raises
        ------
        KeyError
            Not one of those names.
        """
        for region in REGIONS:
            if region.abbreviation == abbreviation:
                return sum(self.voxel_counts[segment.abbreviation] for segment in region.segments)
        return self.voxel_counts[abbreviation]

    def ml(self, abbreviation: str) -> float:
        """Volume in ml of a segment (NCR, ED, ET) or region (ET, TC, WT):
        voxel count x voxel volume (mm^3) / 1000."""
        return self.count(abbreviation) * self.voxel_volume_mm3 / 1000.0

    def as_log(self) -> dict[str, float]:
        """``{"NCR_ml": ..., "ED_ml": ..., "ET_ml": ..., "TC_ml": ..., "WT_ml": ...,
        "voxel_mm3": ...}`` for a structured log line."""
        names = [segment.abbreviation for segment in SEGMENTS] + [r.abbreviation for r in REGIONS[1:]]
        return {**{f"{name}_ml": self.ml(name) for name in names}, "voxel_mm3": self.voxel_volume_mm3}


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
    :data:`SEGMENTS` (1 NCR, 2 ED, 3 ET; codes in the module docstring),
    Segment Algorithm Type AUTOMATIC with the model in each segment's
    Algorithm Identification Sequence (family DCM 123110 "Artificial
    Intelligence"), a Tracking UID per segment (the SR's groups repeat it),
    anatomic region Brain. Its geometry is the reference's own: same Study,
    Frame of Reference, Image Orientation/Position (Patient) and Pixel
    Measures; each frame references its source slice (Derivation Image), and
    the Referenced Series Sequence names the reference series only, as OHIF
    requires to place the overlay.

    Empty segments stay described: segment numbers and codes do not depend
    on what the model found, so a reader (and :func:`write_sr`) always finds
    NCR, ED and ET. With ``omit_empty_frames=False`` an empty segment has
    its all-zero frames; with ``True`` it has no frame at all (valid: PS3.3
    C.8.20 does not require a described segment to have frames; dciodvfy
    finds no error). An all-zero label map with ``omit_empty_frames=True``
    is written on the middle slice only (one empty frame per segment, 3 in
    all; highdicom would otherwise fall back to every frame, 465 for a
    BraTS volume, which defeats the compact form). For an enhanced
    multi-frame reference that fallback stays: highdicom cannot write a
    subset of a multi-frame source's frames.

    Parameters
    ----------
    reference:
        The reference series in slice order: single-frame MR Image Storage
        images of one series, or one Enhanced / Legacy Converted Enhanced MR
        image whose frames are the slices in order. Modality MR, with a
        Frame of Reference and a regular slice spacing. Pixel Data is not
        read.
    labels:
        ``numpy.ndarray`` of dtype ``uint8``, shape ``(slices, Rows,
        Columns)``: ``labels[k]`` lies on ``reference[k]`` (or frame
        ``k + 1``), row by row as the image's pixels. Values in
        :data:`BRATS_LABELS`.
    sources:
        Every source series of the run: role (``"T1"``, ``"T1c"``, ``"T2"``,
        ``"FLAIR"``) -> its datasets. The reference series is one of them.
        The SEG's UIDs derive from all of them, the pipeline name, the model
        and version (:func:`pipelines.common.uids.derived_uids`), and
        from ``omit_empty_frames``: the compact variant is another object,
        so it has other UIDs.
    algorithm:
        The model.
    context:
        ``uid_prefix`` roots the UIDs; ``manufacturer`` is written to
        Manufacturer (0008,0070).
    omit_empty_frames:
        ``False`` (default, docs/architecture.md): one frame per slice and
        segment, which every viewer draws. ``True``: only frames with a
        segment pixel, for destinations such as Weasis that refuse SEGs
        over 400 frames.
    series_number:
        Series Number (0020,0011) of the SEG series.

    Returns
    -------
    seg, repairs:
        The Segmentation, and what was repaired or left out of the
        reference's values (``str()`` for logs).

    Raises
    ------
    ValueError
        Naming the attribute: ``reference`` is not an MR series or enhanced
        MR image with a regular stack geometry in slice order (see
        :func:`pipelines.common.geometry.slice_stack`); ``labels`` has
        another shape or values outside :data:`BRATS_LABELS`; ``sources``
        does not hold the reference series, mixes studies, or is malformed;
        ``algorithm``/``context`` values do not fit their attributes.
    TypeError
        ``labels`` is not a ``uint8`` ``numpy.ndarray``; ``omit_empty_frames``
        is not a bool.
    """
    stack, multiframe = _check_reference(reference)
    _check_labels(labels, stack)
    if not isinstance(omit_empty_frames, bool):
        raise TypeError(f"omit_empty_frames must be a bool, got {type(omit_empty_frames).__name__}")
    source_images = _check_sources(sources, reference)
    check_long_string(context.manufacturer, "PipelineContext.manufacturer")

    if multiframe:
        proxy, repairs = sanitize_source(reference[0])
        proxies = [proxy]
    else:
        proxies, repairs = sanitize_series(reference)
    kind = "SEG compact" if omit_empty_frames else "SEG"
    uids = derived_uids(
        source_images, pipeline=PIPELINE, algorithm=algorithm, kind=kind, prefix=context.uid_prefix
    )

    # One boolean plane per segment, in Segment Number order: (slices, rows, columns, 3).
    masks = np.stack([labels == segment.brats_label for segment in SEGMENTS], axis=-1)
    omit = omit_empty_frames
    if omit and not multiframe and not masks.any():
        # Nothing found: the compact form is one empty frame per segment on
        # the middle slice (highdicom would fall back to all 3 x slices).
        middle = len(proxies) // 2
        proxies, masks, omit = [proxies[middle]], masks[middle : middle + 1], False

    descriptions = []
    for segment in SEGMENTS:
        description = hd.seg.SegmentDescription(
            segment_number=segment.number,
            segment_label=segment.label,
            segmented_property_category=MORPHOLOGICALLY_ABNORMAL,
            segmented_property_type=segment.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.segmentation_identification(),
            # The SR's TID 1411 group of this segment repeats Tracking UID/ID.
            tracking_uid=derived_uid(context.uid_prefix, "tracking", str(uids.sop_instance_uid), str(segment.number)),
            tracking_id=segment.label,
            anatomic_regions=[BRAIN],
            display_color=hd.color.CIELabColor.from_rgb(*segment.rgb),
        )
        # Segment Description (0062,0006), ST: room for the whole story.
        description.SegmentDescription = (
            f"BraTS label {segment.brats_label} ({segment.abbreviation}): {segment.meaning}, segmented by "
            f"{algorithm.label} (pipeline {PIPELINE}). {NOT_FOR_DIAGNOSTIC_USE}."
        )
        descriptions.append(description)

    seg = hd.seg.Segmentation(
        source_images=proxies,
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
        omit_empty_frames=omit,
        content_label=CONTENT_LABEL,
        content_description=fit_long_string(
            [
                f"BraTS NCR/ED/ET by {algorithm.label} - {NOT_FOR_DIAGNOSTIC_USE}",
                f"BraTS {algorithm.label} - {NOT_FOR_DIAGNOSTIC_USE}",
                f"{algorithm.label} - {NOT_FOR_DIAGNOSTIC_USE}",
                f"BraTS {algorithm.version} - {NOT_FOR_DIAGNOSTIC_USE}",
            ],
            "ContentDescription",
        ),
        series_description=series_description(PIPELINE, algorithm, "SEG"),
    )
    ensure_valid_values(seg, "SEG")
    return seg, repairs


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
    stack, _ = _check_reference(reference)
    return _measure(stack, reference, seg)


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

    - TID 1001 observation context: the model as Device observer (TID 1004)
      with the node's Manufacturer and a UID per model version;
    - procedure reported DCM 126020 "Multiparametric MRI";
    - TID 1600 image library: one group per source series (all roles), with
      the descriptors the series' images share (Modality, Frame of
      Reference, Rows/Columns, Pixel Spacing) on the group;
    - one TID 1411 Volumetric ROI group per segment (NCR, ED, ET): Referenced
      Segment = that segment of ``seg``, Source series for segmentation = the
      reference series, Tracking UID/ID = the segment's, finding category
      "Morphologically Abnormal Structure" and finding type = the segment's
      property type, finding site Brain, Volume in ml, the model in TID 4019;
    - one TID 1501 group each for TC and WT: finding "Neoplasm" / "Lesion",
      site Brain, Volume in ml inferred from the SEG's segments 1 + 3 / 1 + 2
      + 3 (one Source of Measurement per segment), TID 4019.

    Each volume is :func:`measure_volumes`: voxel count in the SEG x voxel
    volume (Pixel Spacing x slice spacing of the reference), / 1000 for ml,
    written exactly (Floating Point Value besides the 16-character Numeric
    Value). The report is COMPLETE, UNVERIFIED and PRELIMINARY: a machine's
    result for a radiologist to review. Evidence lists every image of every
    source series and the SEG. UIDs derive from the sources, the SEG, the
    pipeline and the model: the SR of a compact SEG is another SR.

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
    stack, _ = _check_reference(reference)
    source_images = _check_sources(sources, reference)
    volumes = _measure(stack, reference, seg)
    prefix = context.uid_prefix
    observation_context = device_observation_context(algorithm, manufacturer=context.manufacturer, prefix=prefix)

    proxy, repairs = sanitize_source(reference[0])
    uids = derived_uids(
        [*source_images, seg], pipeline=PIPELINE, algorithm=algorithm, kind="SR", prefix=prefix
    )
    reference_series = str(reference[0].SeriesInstanceUID)
    segment_items = {int(item.SegmentNumber): item for item in seg.SegmentSequence}

    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []  # TID 1411 and TID 1501 groups
    for segment in SEGMENTS:
        item = segment_items[segment.number]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=item.TrackingUID, identifier=item.SegmentLabel),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=segment.number,
                    source_series=hd.sr.SourceSeriesForSegmentation(reference_series),
                ),
                finding_category=MORPHOLOGICALLY_ABNORMAL,
                finding_type=segment.property_type,
                finding_sites=[hd.sr.FindingSite(BRAIN)],
                algorithm_id=algorithm.sr_identification(),
                measurements=[
                    hd.sr.Measurement(name=VOLUME, value=volumes.ml(segment.abbreviation), unit=MILLILITER)
                ],
            )
        )
    for region in REGIONS:
        if len(region.segments) == 1:
            continue  # ET: the ET segment's TID 1411 group above.
        sources_of_measurement = []
        for segment in region.segments:
            # One IMAGE item per segment (TID 300 allows 1-n): the form that
            # TID 1411 uses and that readers expect (highdicom 0.28's reader
            # fails on a multi-valued Referenced Segment Number).
            source = hd.sr.SourceImageForMeasurement(seg.SOPClassUID, seg.SOPInstanceUID)
            source.ReferencedSOPSequence[0].ReferencedSegmentNumber = segment.number
            sources_of_measurement.append(source)
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(prefix, "tracking", str(uids.sop_instance_uid), region.abbreviation),
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
        )

    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    # Reference series first; proxies of the other images carry references only.
    by_series: dict[str, list[Dataset]] = {}
    for image in source_images:
        by_series.setdefault(str(image.SeriesInstanceUID), []).append(image)
    library_series = [reference_proxies(images) for images in by_series.values()]
    insert_image_library(report, series_image_library(library_series))

    sr = hd.sr.Comprehensive3DSR(
        # highdicom copies Patient and Study from the first item: the
        # sanitised reference image; the others give only their UIDs.
        evidence=[proxy, *(image for images in library_series for image in images), seg],
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


# -- checks ---------------------------------------------------------------------


def _check_reference(reference: Sequence[Dataset]) -> tuple[SliceStack, bool]:
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


def _check_labels(labels: object, stack: SliceStack) -> None:
    if not isinstance(labels, np.ndarray) or labels.dtype != np.uint8:
        got = f"ndarray of dtype {labels.dtype}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise TypeError(f"labels must be a numpy.ndarray of dtype uint8, got {got}")
    if labels.shape != stack.shape:
        raise ValueError(f"labels has shape {labels.shape}, expected (slices, Rows, Columns) = {stack.shape}")
    histogram = np.bincount(labels.ravel(), minlength=256)
    unexpected = [int(value) for value in np.flatnonzero(histogram) if value not in BRATS_LABELS]
    if unexpected:
        raise ValueError(f"labels holds values {unexpected}; BraTS labels are {BRATS_LABELS}")


def _check_sources(sources: Mapping[str, Sequence[Dataset]], reference: Sequence[Dataset]) -> list[Dataset]:
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


def _measure(stack: SliceStack, reference: Sequence[Dataset], seg: Dataset) -> TumourVolumes:
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
