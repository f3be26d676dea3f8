"""The pneumonia pipeline's SEG and SR, built from real chest radiographs.

Sources:
- ``RG1_UNCR.dcm`` (pydicom-data): a real CR chest PA, 1955x1841, 15-bit,
  MONOCHROME1, Pixel Spacing ``0\\0``, no Frame of Reference;
- the RSNA-style radiograph in ``../shared/data/cxr``: Secondary Capture with
  Modality CR, JPEG Baseline, Patient's Age ``62``; skipped where that folder
  is absent.

Each is written with an ellipse over one lung (a plausible Grad-CAM region)
and with an empty mask, then checked with dciodvfy and read back with
highdicom.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from pipelines.base import PipelineContext
from pipelines.common.derived import NOT_FOR_DIAGNOSTIC_USE, AlgorithmDescription, Repair
from pipelines.pneumonia import write as pw
from tests.dicom_checks import evaluation, measurement, read_seg, read_sr, run_dciodvfy, seg_mask_on_source

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RSNA_CXR = SHARED_DATA / "cxr" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"

ALGORITHM = AlgorithmDescription(
    name="pneumonia-densenet121-demo",
    version="1.0.0",
    source="torchxrayvision densenet121-res224-rsna",
    parameters={"cam_threshold": "0.5"},
)
CONTEXT = PipelineContext()
PROBABILITY = 0.7231
# torchxrayvision's op_threshs[8] for Pneumonia (docs: DESIGN "Models").
THRESHOLD = 0.13486601


def lung_ellipse(rows: int, columns: int) -> np.ndarray:
    """An ellipse over the image's left half (the patient's right lung on a PA
    film), in proportion to the image: what a Grad-CAM region looks like."""
    y, x = np.mgrid[:rows, :columns]
    return ((y - 0.45 * rows) / (0.22 * rows)) ** 2 + ((x - 0.30 * columns) / (0.11 * columns)) ** 2 <= 1.0


@pytest.fixture(scope="module")
def rg1() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


@pytest.fixture(scope="module")
def rsna() -> pydicom.Dataset:
    if not RSNA_CXR.exists():
        pytest.skip(f"../shared/data is absent: no real RSNA-style radiograph at {RSNA_CXR}")
    return pydicom.dcmread(RSNA_CXR)


@dataclass(frozen=True)
class Written:
    name: str
    source: pydicom.Dataset
    mask: np.ndarray
    seg: pydicom.Dataset
    seg_repairs: list[Repair]
    sr: pydicom.Dataset
    sr_repairs: list[Repair]


CASES = [(source, mask) for source in ("rg1", "rsna") for mask in ("ellipse", "empty")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{s}-{m}" for s, m in CASES])
def written(request: pytest.FixtureRequest) -> Written:
    source_name, mask_name = request.param
    source = request.getfixturevalue(source_name)
    mask = lung_ellipse(source.Rows, source.Columns)
    if mask_name == "empty":
        mask = np.zeros_like(mask)
    seg, seg_repairs = pw.write_seg(source, mask, algorithm=ALGORITHM, context=CONTEXT)
    sr, sr_repairs = pw.write_sr(
        source, seg, probability=PROBABILITY, threshold=THRESHOLD, algorithm=ALGORITHM, context=CONTEXT
    )
    return Written(f"{source_name}-{mask_name}", source, mask, seg, seg_repairs, sr, sr_repairs)


def test_dciodvfy_finds_no_error(written: Written, tmp_path: Path) -> None:
    for kind, dataset, iod in (("SEG", written.seg, "Segmentation"), ("SR", written.sr, "Comprehensive3DSR")):
        result = run_dciodvfy(dataset, tmp_path, name=f"{kind}.dcm")
        print(f"dciodvfy {written.name} {kind}: {result.warnings}")
        assert result.errors == [], f"{kind}: {result.errors}"
        assert result.returncode == 0
        assert result.iod == iod


def test_dciodvfy_reports_the_errors_of_the_raw_sources(rg1: pydicom.Dataset, tmp_path: Path) -> None:
    # The check must be able to fail: the sources themselves break the standard.
    result = run_dciodvfy(rg1, tmp_path)
    assert any("Pixel Spacing" in line for line in result.errors), result.errors
    if RSNA_CXR.exists():
        result = run_dciodvfy(pydicom.dcmread(RSNA_CXR), tmp_path, name="rsna.dcm")
        assert any("Patient's Age" in line for line in result.errors), result.errors


def test_mask_round_trips_pixel_exactly_onto_the_source_grid(written: Written) -> None:
    seg = read_seg(written.seg)
    assert seg.number_of_segments == 1
    assert int(seg.NumberOfFrames) == 1
    decoded = seg_mask_on_source(seg, written.source)
    assert decoded.shape == (written.source.Rows, written.source.Columns)
    np.testing.assert_array_equal(decoded, written.mask)


def test_segment_is_coded_as_model_attention_not_as_disease(written: Written) -> None:
    description = read_seg(written.seg).get_segment_description(1)
    assert description.segment_label == pw.SEGMENT_LABEL
    assert description.segmented_property_category == codes.SCT.SpatialAndRelationalConcept
    assert description.segmented_property_type == codes.DCM.GradientWeightedClassActivation
    assert description.segmented_property_type != pw.PNEUMONIA
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algorithm = description.algorithm_identification[0]
    assert algorithm.AlgorithmName == ALGORITHM.name
    assert algorithm.AlgorithmVersion == ALGORITHM.version
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
    assert ALGORITHM.label in description.SegmentDescription
    assert NOT_FOR_DIAGNOSTIC_USE in description.SegmentDescription


def test_seg_references_the_source_series_and_keeps_its_geometry(written: Written) -> None:
    source, seg = written.source, read_seg(written.seg)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.get_source_image_uids() == [
        (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    ]
    # Neither source has a Frame of Reference: the SEG must not invent one.
    assert "FrameOfReferenceUID" not in seg
    assert list(seg.PatientOrientation or []) == list(source.PatientOrientation or [])
    # Without a Frame of Reference no pixel size is claimed: RG1's 0\\0 is
    # invalid, and the RSNA file's valid 0.168 mm has no coordinate system
    # to live in (and highdicom could not read such a SEG back).
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    assert "PixelSpacing" not in seg


def test_series_descriptions_name_the_model_and_warn(written: Written) -> None:
    for dataset in (written.seg, written.sr):
        description = dataset.SeriesDescription
        assert NOT_FOR_DIAGNOSTIC_USE in description
        assert ALGORITHM.version in description
        assert len(description) <= 64
    assert written.seg.SeriesInstanceUID != written.sr.SeriesInstanceUID
    assert ALGORITHM.label in written.seg.ContentDescription
    assert written.seg.ManufacturerModelName == ALGORITHM.name
    assert written.seg.SoftwareVersions == ALGORITHM.version


def test_sr_is_a_measurement_report_of_probability_finding_and_attention(written: Written) -> None:
    source, seg, sr = written.source, written.seg, read_sr(written.sr)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"  # TID 1500

    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type == pw.PNEUMONIA
    probability = measurement(group, pw.PROBABILITY)
    assert probability.value == pytest.approx(PROBABILITY, abs=1e-9)
    assert probability.unit == pw.PROBABILITY_UNIT
    threshold = measurement(group, pw.THRESHOLD)
    assert threshold.value == pytest.approx(THRESHOLD, abs=1e-9)
    assert evaluation(group, pw.PNEUMONIA) == pw.PRESENT
    assert [image.referenced_sop_instance_uid for image in group.source_images] == [source.SOPInstanceUID]

    (roi,) = sr.content.get_planar_roi_measurement_groups()
    reference = roi.referenced_segmentation_frame
    assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert reference.referenced_segment_numbers == [1]
    assert reference.source_image_for_segmentation.referenced_sop_instance_uid == source.SOPInstanceUID
    assert roi.tracking_uid == seg.SegmentSequence[0].TrackingUID
    assert roi.finding_type == codes.DCM.GradientWeightedClassActivation

    evidence = {uids[2] for uids in sr.get_evidence()}
    assert evidence == {source.SOPInstanceUID, seg.SOPInstanceUID}

    (observer,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert device.name == ALGORITHM.label
    assert device.manufacturer_name == CONTEXT.manufacturer
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"


def test_sr_reports_absent_below_the_threshold(rg1: pydicom.Dataset) -> None:
    seg, _ = pw.write_seg(rg1, lung_ellipse(rg1.Rows, rg1.Columns), algorithm=ALGORITHM, context=CONTEXT)
    sr, _ = pw.write_sr(rg1, seg, probability=0.05, threshold=THRESHOLD, algorithm=ALGORITHM, context=CONTEXT)
    (group,) = read_sr(sr).content.get_image_measurement_groups()
    assert evaluation(group, pw.PNEUMONIA) == pw.ABSENT
    assert measurement(group, pw.PROBABILITY).value == pytest.approx(0.05)


def test_uids_are_deterministic_per_source_model_version_and_kind(rg1: pydicom.Dataset) -> None:
    mask = lung_ellipse(rg1.Rows, rg1.Columns)

    def run(algorithm: AlgorithmDescription, context: PipelineContext) -> tuple[pydicom.Dataset, pydicom.Dataset]:
        seg, _ = pw.write_seg(rg1, mask, algorithm=algorithm, context=context)
        sr, _ = pw.write_sr(rg1, seg, probability=0.4, threshold=THRESHOLD, algorithm=algorithm, context=context)
        return seg, sr

    def uids(objects: tuple[pydicom.Dataset, ...]) -> list[str]:
        return [str(uid) for ds in objects for uid in (ds.SeriesInstanceUID, ds.SOPInstanceUID)]

    first, again = run(ALGORITHM, CONTEXT), run(ALGORITHM, CONTEXT)
    assert uids(first) == uids(again)
    assert len(set(uids(first))) == 4

    newer = AlgorithmDescription(name=ALGORITHM.name, version="1.0.1")
    assert set(uids(run(newer, CONTEXT))).isdisjoint(uids(first))

    prefix = "1.2.826.0.1.3680043.10.543."
    rooted = run(ALGORITHM, PipelineContext(uid_prefix=prefix))
    assert all(uid.startswith(prefix) for uid in uids(rooted))


def test_repairs_are_recorded_and_applied(written: Written) -> None:
    source, seg, sr = written.source, written.seg, written.sr
    assert written.seg_repairs == written.sr_repairs
    repaired = {repair.attribute: repair for repair in written.seg_repairs}
    if written.name.startswith("rsna"):
        assert repaired["PatientAge"].original == "62"
        assert repaired["PatientAge"].replacement == "062Y"
        assert seg.PatientAge == sr.PatientAge == "062Y"
    else:
        assert repaired["PixelSpacing"].original == "0.000\\0.000"
        assert repaired["PixelSpacing"].replacement is None
    # Valid but odd identifying values are passed on untouched.
    for dataset in (seg, sr):
        assert str(dataset.PatientName) == str(source.PatientName)
        assert dataset.PatientID == source.PatientID
        assert dataset.StudyDate == source.StudyDate
    assert all(str(repair) for repair in written.seg_repairs)


def test_source_is_not_modified(rg1: pydicom.Dataset) -> None:
    before = copy.deepcopy(rg1)
    pw.write_seg(rg1, np.zeros((rg1.Rows, rg1.Columns), bool), algorithm=ALGORITHM, context=CONTEXT)
    assert rg1 == before


def test_empty_mask_with_omitted_frames_still_has_one_frame(rg1: pydicom.Dataset) -> None:
    empty = np.zeros((rg1.Rows, rg1.Columns), bool)
    seg, _ = pw.write_seg(rg1, empty, algorithm=ALGORITHM, context=CONTEXT, omit_empty_frames=True)
    decoded = seg_mask_on_source(read_seg(seg), rg1)
    assert int(seg.NumberOfFrames) == 1
    assert not decoded.any()


def test_wrong_inputs_are_refused_naming_the_attribute(rg1: pydicom.Dataset) -> None:
    mask = lung_ellipse(rg1.Rows, rg1.Columns)
    with pytest.raises(ValueError, match="mask has shape"):
        pw.write_seg(rg1, mask[:-1], algorithm=ALGORITHM, context=CONTEXT)
    with pytest.raises(TypeError, match="mask must be .* bool"):
        pw.write_seg(rg1, mask.astype(np.uint8), algorithm=ALGORITHM, context=CONTEXT)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    with pytest.raises(ValueError, match="Modality"):
        pw.write_seg(mr, np.zeros((mr.Rows, mr.Columns), bool), algorithm=ALGORITHM, context=CONTEXT)
    seg, _ = pw.write_seg(rg1, mask, algorithm=ALGORITHM, context=CONTEXT)
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="probability"):
            pw.write_sr(rg1, seg, probability=bad, threshold=0.5, algorithm=ALGORITHM, context=CONTEXT)
    with pytest.raises(ValueError, match="threshold"):
        pw.write_sr(rg1, seg, probability=0.5, threshold=2.0, algorithm=ALGORITHM, context=CONTEXT)
    other = copy.deepcopy(rg1)
    other.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["another image of the study"])
    with pytest.raises(ValueError, match="does not reference the source"):
        pw.write_sr(other, seg, probability=0.5, threshold=0.5, algorithm=ALGORITHM, context=CONTEXT)
    with pytest.raises(ValueError, match="uid_prefix"):
        pw.write_seg(rg1, mask, algorithm=ALGORITHM, context=PipelineContext(uid_prefix="not-a-root"))
    with pytest.raises(ValueError, match="PipelineContext.manufacturer"):
        pw.write_seg(rg1, mask, algorithm=ALGORITHM, context=PipelineContext(manufacturer="x" * 65))
