"""The brain tumour pipeline's SEG and SR, and the shared pieces they added.

Sources: a small four-sequence MR study (``tests/mr_stack.py``: 24 slices of
32 x 32, 1 x 1 x 2 mm, valid MR Image Storage, one Frame of Reference) with
a known BraTS label map; the same T1c series as one Legacy Converted
Enhanced MR image; and, where ``../shared/data`` is present, a real TCGA
glioma case after BraTS preprocessing with its consensus segmentation
(2,477 NCR / 20,862 ED / 6,840 ET voxels of 1 mm^3).

Every object is checked with dciodvfy and read back with highdicom
(``segread``, ``srread``) from its encoded bytes. One test also writes the
phantom study of ``tests/brain_phantom.py``, whose series come from the
pipeline's NIfTI->DICOM converter.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

from pipelines.base import PipelineContext
from pipelines.brain_tumour import write as bw
from pipelines.common.geometry import slice_stack
from pipelines.common.identity import NOT_FOR_DIAGNOSTIC_USE, AlgorithmDescription
from pipelines.common.sanitize import reference_proxies, reference_proxy, sanitize_series, sanitize_sources
from pipelines.common.seg_frames import segment_voxel_counts
from tests.dicom_checks import read_seg, read_sr, run_dciodvfy, seg_mask_on_source
from tests.mr_stack import ROLES, enhanced_mr, mr_series, mr_study, series_from_sitk
from tests.peers import SHARED_DATA

TCGA = SHARED_DATA / "brats" / "TCGA-FG-6692-preprocessed"

ALGORITHM = AlgorithmDescription(
    name="brats-segresnet-demo",
    version="0.1.0",
    source="MONAI brats_mri_segmentation",
    parameters={"roi": "240x240x160", "overlap": "0.5"},
)
CONTEXT = PipelineContext()
SHAPE = (24, 32, 32)
SPACING = (1.0, 1.0, 2.0)  # rows, columns, slices; mm
VOXEL_ML = 1.0 * 1.0 * 2.0 / 1000.0


def tumour(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A BraTS-like label map: an oedema block around a necrotic core
    around an enhancing nucleus, off-centre so that flips would show
    (blocks given for 24 x 32 x 32 and scaled to ``shape``)."""
    labels = np.zeros(shape, np.uint8)

    def box(z0, z1, y0, y1, x0, x1):
        scale = np.array(shape * 2).reshape(2, 3).T.ravel() / np.array((24, 24, 32, 32, 32, 32))
        z0, z1, y0, y1, x0, x1 = (int(v * f) for v, f in zip((z0, z1, y0, y1, x0, x1), scale, strict=True))
        return slice(z0, max(z1, z0 + 1)), slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1))

    labels[box(6, 16, 6, 22, 9, 27)] = 2
    labels[box(8, 13, 9, 18, 12, 22)] = 1
    labels[box(9, 12, 11, 15, 14, 19)] = 4
    labels[box(14, 15, 20, 21, 25, 26)] = 4  # a lone enhancing voxel
    return labels


@dataclass
class Written:
    name: str
    reference: list[pydicom.Dataset]
    sources: dict[str, list[pydicom.Dataset]]
    labels: np.ndarray
    omit: bool
    seg: pydicom.Dataset
    sr: pydicom.Dataset

    @functools.cached_property
    def seg_read(self) -> hd.seg.Segmentation:
        """``seg`` encoded and read back with highdicom (once per case)."""
        return read_seg(self.seg)

    @functools.cached_property
    def sr_read(self) -> hd.sr.Comprehensive3DSR:
        """``sr`` encoded and read back with highdicom (once per case)."""
        return read_sr(self.sr)


@pytest.fixture(scope="module")
def study() -> dict[str, list[pydicom.Dataset]]:
    return mr_study(SHAPE, SPACING)


@pytest.fixture(scope="module")
def enhanced_study(study) -> dict[str, list[pydicom.Dataset]]:
    return {**study, "T1c": [enhanced_mr(study["T1c"])]}


LABELS = {
    "tumour": tumour,
    "no-ET": lambda: np.where(tumour() == 4, 1, tumour()).astype(np.uint8),
    "empty": lambda: np.zeros(SHAPE, np.uint8),
}
CASES = [(labels, omit) for labels in LABELS for omit in (False, True)]


def write(reference, sources, labels, omit=False, algorithm=ALGORITHM, context=CONTEXT):
    seg, _ = bw.write_seg(
        reference, labels, sources=sources, algorithm=algorithm, context=context, omit_empty_frames=omit
    )
    sr, _ = bw.write_sr(reference, seg, sources=sources, algorithm=algorithm, context=context)
    return seg, sr


@pytest.fixture(scope="module", params=CASES, ids=[f"{name}-{'compact' if omit else 'full'}" for name, omit in CASES])
def written(request, study) -> Written:
    name, omit = request.param
    labels = LABELS[name]()
    seg, sr = write(study["T1c"], study, labels, omit)
    return Written(name, study["T1c"], study, labels, omit, seg, sr)


@pytest.fixture(scope="module")
def enhanced(enhanced_study) -> Written:
    reference, labels = enhanced_study["T1c"], tumour()
    seg, sr = write(reference, enhanced_study, labels)
    return Written("enhanced", reference, enhanced_study, labels, False, seg, sr)


def dciodvfy_clean(dataset: pydicom.Dataset, directory: Path, name: str, iod: str) -> list[str]:
    result = run_dciodvfy(dataset, directory, name=name)
    assert result.errors == [], f"{name}: {result.errors}"
    assert result.returncode == 0
    assert result.iod == iod
    return result.warnings


def slice_masks(seg: hd.seg.Segmentation, reference: list[pydicom.Dataset]) -> np.ndarray:
    """``(slices, rows, columns, 3)`` bool, found through the SEG's references
    to each reference image (not by frame order)."""
    if len(reference) == 1 and "PerFrameFunctionalGroupsSequence" in reference[0]:
        frames = list(range(1, int(reference[0].NumberOfFrames) + 1))
        pixels = seg.get_pixels_by_source_frame(
            str(reference[0].SOPInstanceUID), frames, segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True
        )
    else:
        pixels = seg.get_pixels_by_source_instance(
            [str(ds.SOPInstanceUID) for ds in reference],
            segment_numbers=[1, 2, 3],
            assert_missing_frames_are_empty=True,
        )
    return pixels.astype(bool)


def expected_masks(labels: np.ndarray) -> np.ndarray:
    return np.stack([labels == 1, labels == 2, labels == 4], axis=-1)


# -- SEG ------------------------------------------------------------------------


def test_both_objects_pass_dciodvfy(written: Written, tmp_path: Path) -> None:
    for kind, dataset, iod in (("SEG", written.seg, "Segmentation"), ("SR", written.sr, "Comprehensive3DSR")):
        warnings = dciodvfy_clean(dataset, tmp_path, f"{kind}.dcm", iod)
        print(f"dciodvfy {written.name} compact={written.omit} {kind}: {warnings}")


def test_enhanced_reference_objects_pass_dciodvfy(enhanced: Written, tmp_path: Path) -> None:
    assert dciodvfy_clean(enhanced.seg, tmp_path, "SEG.dcm", "Segmentation") == []
    assert dciodvfy_clean(enhanced.sr, tmp_path, "SR.dcm", "Comprehensive3DSR") == []


def test_three_segments_coded_from_cid_7168_with_the_model(written: Written) -> None:
    seg = written.seg_read
    assert seg.number_of_segments == 3
    colours = set()
    for segment, label, code in (
        (1, "Necrotic tumour core (NCR)", ("6574001", "SCT")),
        (2, "Peritumoral oedema (ED)", ("79654002", "SCT")),
        (3, "Enhancing tumour (ET)", ("C113842", "NCIt")),
    ):
        description = seg.get_segment_description(segment)
        assert description.segment_label == label
        assert description.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
        property_type = description.segmented_property_type
        assert (property_type.value, property_type.scheme_designator) == code
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (ALGORITHM.name, ALGORITHM.version)
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
        assert description.anatomic_regions == [codes.SCT.Brain]
        assert description.tracking_uid and description.tracking_id == label
        assert NOT_FOR_DIAGNOSTIC_USE in description.SegmentDescription
        assert ALGORITHM.label in description.SegmentDescription
        colours.add(tuple(description.RecommendedDisplayCIELabValue))
    assert len(colours) == 3


def test_frames_one_per_slice_and_segment_unless_compact(written: Written) -> None:
    seg = written.seg_read
    expected = expected_masks(written.labels)
    frames = int(seg.NumberOfFrames)
    if not written.omit:
        assert frames == SHAPE[0] * 3
    elif written.name == "empty":
        # Nothing found: one empty frame per segment on the middle slice.
        assert frames == 3
        assert [uids[2] for uids in seg.get_source_image_uids()] == [written.reference[SHAPE[0] // 2].SOPInstanceUID]
    else:
        # One frame per (slice, segment) that holds a pixel of the segment.
        assert frames == int(expected.any(axis=(1, 2)).sum())


def test_masks_round_trip_slice_by_slice_onto_the_reference(written: Written) -> None:
    seg = written.seg_read
    expected = expected_masks(written.labels)
    if written.name == "empty" and written.omit:
        middle = written.reference[SHAPE[0] // 2]
        for number in (1, 2, 3):
            assert not seg_mask_on_source(seg, middle, number).any()
        return
    np.testing.assert_array_equal(slice_masks(seg, written.reference), expected)
    # One slice through the helper the pneumonia tests use, by SOP Instance UID.
    k = 10
    for number in (1, 2, 3):
        if expected[k, :, :, number - 1].any() or not written.omit:
            np.testing.assert_array_equal(
                seg_mask_on_source(seg, written.reference[k], number), expected[k, :, :, number - 1]
            )


def test_seg_lies_on_the_reference_grid_and_names_its_uids(written: Written) -> None:
    seg, reference = written.seg_read, written.reference
    first = reference[0]
    # OHIF draws nothing unless these match the stored series.
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence] == [first.SeriesInstanceUID]
    known = {(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in reference}
    assert set(seg.get_source_image_uids()) <= known
    if not written.omit:
        assert set(seg.get_source_image_uids()) == known

    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in first.PixelSpacing]
    assert float(shared.PixelMeasuresSequence[0].SliceThickness) == float(first.SliceThickness)
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        float(v) for v in first.ImageOrientationPatient
    ]
    positions = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in reference}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == positions[source]


def test_enhanced_reference_round_trips_frame_by_frame(enhanced: Written) -> None:
    seg = enhanced.seg_read
    assert int(seg.NumberOfFrames) == SHAPE[0] * 3
    assert seg.FrameOfReferenceUID == enhanced.reference[0].FrameOfReferenceUID
    referenced = [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence]
    assert referenced == [enhanced.reference[0].SeriesInstanceUID]
    np.testing.assert_array_equal(slice_masks(seg, enhanced.reference), expected_masks(enhanced.labels))
    volumes = bw.measure_volumes(enhanced.reference, enhanced.seg)
    assert volumes.voxel_volume_mm3 == pytest.approx(2.0)
    assert volumes.count("WT") == int(np.count_nonzero(enhanced.labels))


@pytest.mark.parametrize("written", [("no-ET", False), ("no-ET", True)], indirect=True, ids=["full", "compact"])
def test_empty_segment_stays_described_with_empty_or_no_frames(written: Written) -> None:
    seg = written.seg_read
    assert seg.get_segment_description(3).segment_label == "Enhancing tumour (ET)"
    et_frames = [
        frame
        for frame in seg.PerFrameFunctionalGroupsSequence
        if frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 3
    ]
    assert len(et_frames) == (0 if written.omit else SHAPE[0])
    assert not slice_masks(seg, written.reference)[..., 2].any()


# -- SR -------------------------------------------------------------------------


def seg_voxel_counts(seg: hd.seg.Segmentation, reference: list[pydicom.Dataset]) -> dict[int, int]:
    """Voxels per segment, from the read-back SEG's pixels on the reference."""
    if int(seg.NumberOfFrames) == 3 and len(seg.get_source_image_uids()) == 1:  # the compact empty SEG
        return {1: 0, 2: 0, 3: 0}
    masks = slice_masks(seg, reference)
    return {number: int(masks[..., number - 1].sum()) for number in (1, 2, 3)}


def volume_of(group) -> hd.sr.Measurement:
    (found,) = group.get_measurements(name=codes.SCT.Volume)
    assert found.unit == bw.MILLILITER
    return found


def test_sr_volumes_equal_seg_voxel_counts_times_voxel_volume(written: Written) -> None:
    seg, sr = written.seg_read, written.sr_read
    counts = seg_voxel_counts(seg, written.reference)
    # ... and those counts are the label map's: the SEG holds what the model said.
    labels = written.labels
    assert counts == {1: int((labels == 1).sum()), 2: int((labels == 2).sum()), 3: int((labels == 4).sum())}

    rois = sr.content.get_volumetric_roi_measurement_groups()
    assert [roi.tracking_identifier for roi in rois] == [s.label for s in bw.SEGMENTS]
    for roi, segment in zip(rois, bw.SEGMENTS, strict=True):
        assert volume_of(roi).value == pytest.approx(counts[segment.number] * VOXEL_ML, rel=1e-12, abs=0)

    regions = {group.tracking_identifier: group for group in sr.content.get_image_measurement_groups()}
    assert set(regions) == {"Tumour core (TC = NCR + ET)", "Whole tumour (WT = NCR + ED + ET)"}
    tc = volume_of(regions["Tumour core (TC = NCR + ET)"]).value
    wt = volume_of(regions["Whole tumour (WT = NCR + ED + ET)"]).value
    assert tc == pytest.approx((counts[1] + counts[3]) * VOXEL_ML, rel=1e-12, abs=0)
    assert wt == pytest.approx((counts[1] + counts[2] + counts[3]) * VOXEL_ML, rel=1e-12, abs=0)

    volumes = bw.measure_volumes(written.reference, written.seg)
    assert volumes.ml("ET") == pytest.approx(counts[3] * VOXEL_ML, rel=1e-12, abs=0)
    assert volumes.as_log()["WT_ml"] == pytest.approx(wt, rel=1e-12, abs=0)


def test_sr_groups_reference_their_segments_and_the_source_series(written: Written) -> None:
    seg, sr = written.seg, written.sr_read
    reference_series = written.reference[0].SeriesInstanceUID
    for roi, segment in zip(sr.content.get_volumetric_roi_measurement_groups(), bw.SEGMENTS, strict=True):
        assert roi.reference_type == codes.DCM.ReferencedSegment
        referenced = roi.referenced_segment
        assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert referenced.referenced_segment_numbers == [segment.number]  # TID 1411: one segment
        assert referenced.referenced_frame_numbers is None
        assert referenced.source_series_for_segmentation.value == reference_series
        assert roi.tracking_uid == seg.SegmentSequence[segment.number - 1].TrackingUID
        assert roi.finding_type == segment.property_type
        assert roi.finding_category == codes.SCT.MorphologicallyAbnormalStructure
        assert [site.value for site in roi.finding_sites] == [codes.SCT.Brain]

    members = {"Tumour core (TC = NCR + ET)": [1, 3], "Whole tumour (WT = NCR + ED + ET)": [1, 2, 3]}
    for group in sr.content.get_image_measurement_groups():
        sources = volume_of(group).referenced_images
        assert [source.referenced_sop_instance_uid for source in sources] == [seg.SOPInstanceUID] * len(sources)
        numbers = [n for source in sources for n in source.referenced_segment_numbers]
        assert numbers == members[group.tracking_identifier]
        assert all(source.relationship_type == hd.sr.RelationshipTypeValues.INFERRED_FROM for source in sources)


def test_sr_lists_all_four_series_as_evidence_and_image_library(written: Written) -> None:
    sr = written.sr_read
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert sr.StudyInstanceUID == written.reference[0].StudyInstanceUID
    expected = {ds.SOPInstanceUID for images in written.sources.values() for ds in images}
    expected.add(written.seg.SOPInstanceUID)
    assert {uids[2] for uids in sr.get_evidence()} == expected
    assert "PertinentOtherEvidenceSequence" not in sr

    (library,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    groups = library.ContentSequence
    assert len(groups) == len(ROLES)
    entries = [
        [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in group.ContentSequence
         if item.ValueType == "IMAGE"]
        for group in groups
    ]
    assert entries[0] == [ds.SOPInstanceUID for ds in written.reference]  # the reference series first
    assert {uid for group in entries for uid in group} == expected - {written.seg.SOPInstanceUID}
    shared = {
        item.ConceptNameCodeSequence[0].CodeMeaning for item in groups[0].ContentSequence if item.ValueType != "IMAGE"
    }
    assert {"Modality", "Frame of Reference UID", "Pixel Data Rows", "Horizontal Pixel Spacing"} <= shared

    (observer,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    assert observer.observer_identifying_attributes.name == ALGORITHM.label
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"
    groups = [*sr.content.get_volumetric_roi_measurement_groups(), *sr.content.get_image_measurement_groups()]
    assert len(groups) == 5
    for group in groups:  # TID 4019 in each
        names = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in group[0].ContentSequence}
        assert names["Algorithm Name"].TextValue == ALGORITHM.name
        assert names["Algorithm Version"].TextValue == ALGORITHM.version


def test_series_descriptions_name_the_model_and_warn(written: Written) -> None:
    for dataset in (written.seg, written.sr):
        assert NOT_FOR_DIAGNOSTIC_USE in dataset.SeriesDescription
        assert ALGORITHM.version in dataset.SeriesDescription
        assert len(dataset.SeriesDescription) <= 64
    assert ALGORITHM.label in written.seg.ContentDescription
    assert written.seg.ManufacturerModelName == ALGORITHM.name
    assert written.seg.SeriesInstanceUID != written.sr.SeriesInstanceUID


# -- UIDs, inputs ---------------------------------------------------------------


def uids(objects) -> list[str]:
    return [str(uid) for ds in objects for uid in (ds.SeriesInstanceUID, ds.SOPInstanceUID)]


def test_uids_are_deterministic_per_sources_model_version_and_variant() -> None:
    shape = (8, 16, 16)  # small: seven runs
    study = mr_study(shape, SPACING, seed="uid-test")
    reference, labels = study["T1c"], tumour(shape)
    first = uids(write(reference, study, labels))
    assert first == uids(write(reference, dict(reversed(list(study.items()))), labels))  # role order
    assert len(set(first)) == 4

    compact = uids(write(reference, study, labels, omit=True))
    assert set(compact).isdisjoint(first)  # another object, not the same UID with other frames
    newer = AlgorithmDescription(name=ALGORITHM.name, version="0.1.1")
    assert set(uids(write(reference, study, labels, algorithm=newer))).isdisjoint(first)
    # A change in a non-reference series changes the result's UIDs too.
    other_flair = {**study, "FLAIR": mr_series(shape, SPACING, role="FLAIR", seed="uid-test-rescan")}
    for ds in other_flair["FLAIR"]:
        ds.StudyInstanceUID = reference[0].StudyInstanceUID
    assert set(uids(write(reference, other_flair, labels))).isdisjoint(first)
    prefix = "1.2.826.0.1.3680043.10.543."
    rooted = write(reference, study, labels, context=PipelineContext(uid_prefix=prefix))
    assert all(uid.startswith(prefix) for uid in uids(rooted))
    assert all(item.TrackingUID.startswith(prefix) for item in rooted[0].SegmentSequence)


def test_source_values_are_repaired_and_sources_untouched(study) -> None:
    messy = [copy.deepcopy(ds) for ds in study["T1c"]]
    tag = Tag("PatientAge")
    for ds in messy:
        # As it comes off the wire, unconverted (pydicom warns on assigning it): AS needs 054Y.
        ds[tag] = RawDataElement(tag, "AS", 2, b"54", 0, False, True)
    sources = {**study, "T1c": messy}
    before = copy.deepcopy(messy)
    seg, seg_repairs = bw.write_seg(messy, tumour(), sources=sources, algorithm=ALGORITHM, context=CONTEXT)
    sr, sr_repairs = bw.write_sr(messy, seg, sources=sources, algorithm=ALGORITHM, context=CONTEXT)
    assert [(r.attribute, r.original, r.replacement) for r in seg_repairs] == [("PatientAge", "54", "054Y")]
    assert seg_repairs == sr_repairs
    assert seg.PatientAge == sr.PatientAge == "054Y"
    assert messy == before


def test_wrong_inputs_are_refused_naming_the_attribute(study) -> None:
    reference, labels = study["T1c"], tumour()

    def seg(reference=reference, labels=labels, sources=study, **kwargs):
        return bw.write_seg(reference, labels, sources=sources, algorithm=ALGORITHM, context=CONTEXT, **kwargs)

    with pytest.raises(TypeError, match="labels must be .* uint8"):
        seg(labels=labels.astype(np.int64))
    with pytest.raises(ValueError, match="labels has shape"):
        seg(labels=labels[:-1])
    with pytest.raises(ValueError, match=r"labels holds values \[3\]"):
        seg(labels=np.where(labels == 4, 3, labels).astype(np.uint8))
    with pytest.raises(TypeError, match="omit_empty_frames"):
        seg(omit_empty_frames=1)
    shuffled = [reference[i] for i in (0, 2, 1, *range(3, SHAPE[0]))]
    with pytest.raises(ValueError, match="not in plane order"):
        seg(reference=shuffled)
    with pytest.raises(ValueError, match="irregularly spaced"):
        seg(reference=reference[:5] + reference[6:], labels=np.delete(labels, 5, axis=0))
    ct = [copy.deepcopy(ds) for ds in reference]
    for ds in ct:
        ds.Modality = "CT"
    with pytest.raises(ValueError, match="Modality of reference"):
        seg(reference=ct)
    with pytest.raises(ValueError, match="sources holds no series"):
        seg(sources={role: images for role, images in study.items() if role != "T1c"})
    with pytest.raises(ValueError, match="StudyInstanceUID of an image of sources"):
        seg(sources={**study, "T2": mr_series(SHAPE, SPACING, role="T2", seed="another study")})
    with pytest.raises(ValueError, match="same series"):
        seg(sources={**study, "T1": study["T1c"]})
    with pytest.raises(ValueError, match="uid_prefix"):
        bw.write_seg(reference, labels, sources=study, algorithm=ALGORITHM, context=PipelineContext(uid_prefix="x"))

    written_seg, _ = seg()
    other = study["T1"]
    with pytest.raises(ValueError, match="ReferencedSeriesSequence of seg"):
        bw.write_sr(other, written_seg, sources=study, algorithm=ALGORITHM, context=CONTEXT)
    with pytest.raises(ValueError, match="seg must be a Segmentation"):
        bw.write_sr(reference, reference[0], sources=study, algorithm=ALGORITHM, context=CONTEXT)


def test_phantom_study_from_the_converter_writes_valid_objects(tmp_path: Path) -> None:
    # The other tests' series come from tests/mr_stack.py; this one from the
    # pipeline's own NIfTI->DICOM converter, through the phantom study.
    phantom = pytest.importorskip("tests.brain_phantom").make_phantom(size=(48, 48, 24), spacing=2.0)
    sources, labels = phantom.datasets, phantom.labels
    reference = sources["T1c"]
    assert set(np.unique(labels)) == {0, 1, 2, 4}
    seg, sr = write(reference, sources, labels)
    assert dciodvfy_clean(seg, tmp_path, "SEG.dcm", "Segmentation") == []
    assert dciodvfy_clean(sr, tmp_path, "SR.dcm", "Comprehensive3DSR") == []
    np.testing.assert_array_equal(slice_masks(read_seg(seg), reference), expected_masks(labels))
    groups = read_sr(sr).content.get_image_measurement_groups()
    (tc,) = [group for group in groups if group.tracking_identifier.startswith("Tumour core")]
    assert volume_of(tc).value == pytest.approx(np.isin(labels, (1, 4)).sum() * 2.0**3 / 1000, rel=1e-12)


# -- shared pieces (pipelines/common) --------------------------------------------


def test_slice_stack_measures_spacing_from_positions() -> None:
    series = mr_series((5, 4, 6), (0.5, 0.75, 3.0), orientation=(0, 1, 0, 0, 0, -1))  # sagittal
    stack = slice_stack(series)
    assert stack.shape == (5, 4, 6)
    assert stack.pixel_spacing == (0.5, 0.75)
    assert stack.slice_spacing == pytest.approx(3.0)
    assert stack.voxel_volume_mm3 == pytest.approx(0.5 * 0.75 * 3.0)
    assert slice_stack(series[::-1]).slice_spacing == pytest.approx(3.0)  # descending order is an order
    for ds in series:
        ds.SliceThickness = 5.0  # overlapping slices: the spacing, not the thickness, is the voxel's depth
    assert slice_stack(series).slice_spacing == pytest.approx(3.0)
    assert slice_stack(series[:1]).slice_spacing == 5.0
    with pytest.raises(ValueError, match="same plane"):
        slice_stack([series[0], series[0]])
    bad = copy.deepcopy(series)
    bad[2].PixelSpacing = [0.0, 0.0]
    with pytest.raises(ValueError, match=r"PixelSpacing of reference\[2\]"):
        slice_stack(bad)
    bad = copy.deepcopy(series)
    del bad[0].FrameOfReferenceUID
    with pytest.raises(ValueError, match="FrameOfReferenceUID"):
        slice_stack(bad)


def test_sanitize_series_gives_highdicom_what_sanitize_sources_gives(study) -> None:
    images = [copy.deepcopy(ds) for ds in study["T2"]]
    tag = Tag("PatientAge")
    # An invalid value on one image only: highdicom reads Patient attributes from the first image.
    images[3][tag] = RawDataElement(tag, "AS", 2, b"54", 0, False, True)
    images[5].PixelSpacing = [1.0, 1.5]  # a series-wide value that differs: checked on its own
    fast, fast_repairs = sanitize_series(images)
    full, full_repairs = sanitize_sources(images)
    for k, (a, b) in enumerate(zip(fast, full, strict=True)):
        for keyword in ("SOPInstanceUID", "ImagePositionPatient", "InstanceNumber", "PixelSpacing", "StudyInstanceUID"):
            assert a.get(keyword) == b.get(keyword), (k, keyword)
    assert fast[0] == full[0] and fast[5] == full[5]
    assert fast[1].SOPInstanceUID != fast[0].SOPInstanceUID  # proxies do not share elements
    assert fast_repairs == []  # image 3's age is not read by highdicom...
    assert [r.attribute for r in full_repairs] == ["PatientAge"]  # ...though it is wrong
    proxies = reference_proxies(study["FLAIR"])
    assert proxies == [reference_proxy(ds) for ds in study["FLAIR"]]
    assert "PatientName" not in proxies[1]


def test_segment_voxel_counts_read_what_a_seg_holds(written: Written) -> None:
    counts = segment_voxel_counts(written.seg_read)
    labels = written.labels
    assert counts == {1: int((labels == 1).sum()), 2: int((labels == 2).sum()), 3: int((labels == 4).sum())}


# -- real data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcga() -> tuple[dict[str, list[pydicom.Dataset]], np.ndarray]:
    if not TCGA.exists():
        pytest.skip(f"real data not available: {TCGA} (../shared/data is absent)")
    import SimpleITK as sitk

    sources = {
        role: series_from_sitk(sitk.ReadImage(str(TCGA / f"TCGA-FG-6692_{suffix}.nii.gz")), role=role, seed="tcga")
        for role, suffix in (("T1", "t1"), ("T1c", "t1c"), ("T2", "t2"), ("FLAIR", "fla"))
    }
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(TCGA / "TCGA-FG-6692_seg-consensus.nii.gz"))).astype(np.uint8)
    return sources, labels


def test_real_brats_case_writes_valid_objects_with_its_known_volumes(tcga, tmp_path: Path) -> None:
    sources, labels = tcga
    reference = sources["T1c"]
    seg, sr = write(reference, sources, labels)
    assert int(seg.NumberOfFrames) == 155 * 3
    assert dciodvfy_clean(seg, tmp_path, "SEG.dcm", "Segmentation") == []
    assert dciodvfy_clean(sr, tmp_path, "SR.dcm", "Comprehensive3DSR") == []
    # Voxel counts of the consensus segmentation (../shared/data/README.md), 1 mm^3 voxels.
    rois = read_sr(sr).content.get_volumetric_roi_measurement_groups()
    volumes = {group.tracking_identifier: volume_of(group).value for group in rois}
    assert volumes == {
        "Necrotic tumour core (NCR)": pytest.approx(2.477),
        "Peritumoral oedema (ED)": pytest.approx(20.862),
        "Enhancing tumour (ET)": pytest.approx(6.840),
    }
    log = bw.measure_volumes(reference, seg).as_log()
    assert log["TC_ml"] == pytest.approx(9.317) and log["WT_ml"] == pytest.approx(30.179)
    np.testing.assert_array_equal(slice_masks(read_seg(seg), reference)[80], expected_masks(labels)[80])
