"""The pneumonia pipeline's SEG and SR, built from real chest radiographs.

Sources:
- ``RG1_UNCR.dcm`` (pydicom-data): a real CR chest PA, 1955x1841, 15-bit,
  MONOCHROME1, Pixel Spacing ``0\\0``, Patient Orientation ``L\\F``, no Frame
  of Reference;
- the RSNA-style radiograph in ``../shared/data/cxr``: Secondary Capture with
  Modality CR, JPEG Baseline, Pixel Spacing 0.168 mm, Patient's Age ``62``;
  skipped where that folder is absent.

Each is written with an ellipse over one lung (a plausible Grad-CAM region)
and with an empty mask, then checked with dciodvfy and read back.

The SEG is read back with pydicom alone (:func:`segment_frames`): highdicom
0.28's ``segread`` cannot read a SEG whose Pixel Measures has no Slice
Thickness, and a projection radiograph has none (see
``pipelines.common.seg_geometry.add_pixel_grid_geometry``). The helpers here are
also used by the end-to-end and OHIF tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.pixels import unpack_bits
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage
from scipy import ndimage
from skimage.draw import polygon2mask

from pipelines.base import PipelineContext
from pipelines.common.identity import NOT_FOR_DIAGNOSTIC_USE, AlgorithmDescription
from pipelines.common.outline import image_outline, region_outline
from pipelines.common.sanitize import Repair, sanitize_source
from pipelines.common.seg_geometry import (
    PIXEL_GRID_ORIENTATION,
    add_pixel_grid_geometry,
    segmentation_source,
    valid_pixel_spacing,
)
from pipelines.pneumonia import write as pw
from tests.dicom_checks import evaluation, measurement, read_sr, run_dciodvfy
from tests.peers import SHARED_DATA

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


# --- reading back what goes over the wire, without the writer's code -----------------


def encoded(dataset: Dataset) -> Dataset:
    """``dataset`` written as a PS3.10 file and read back with pydicom."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def segment_frames(seg: Dataset) -> list[tuple[str, int, np.ndarray]]:
    """Every frame of a BINARY SEG as (source SOP Instance UID, segment
    number, ``bool`` array ``(Rows, Columns)``), decoded with pydicom only.

    Frames are bit-packed one after another with no padding between them
    (PS3.5 8.1.1, PS3.3 C.8.20.2); each frame's segment and source image come
    from its Segment Identification and Derivation Image functional groups,
    per frame or shared (PS3.3 C.7.6.16).
    """
    assert seg.SOPClassUID == SegmentationStorage, seg.SOPClassUID
    assert seg.SegmentationType == "BINARY" and int(seg.BitsAllocated) == 1
    rows, columns = int(seg.Rows), int(seg.Columns)
    count = int(seg.get("NumberOfFrames", 1))
    bits = unpack_bits(seg.PixelData)
    assert bits.size >= count * rows * columns, "Pixel Data is shorter than its frames"
    pixels = bits[: count * rows * columns].reshape(count, rows, columns).astype(bool)
    shared = seg.SharedFunctionalGroupsSequence[0]
    per_frame = seg.PerFrameFunctionalGroupsSequence
    assert len(per_frame) == count
    frames = []

    def group(index: int, item: Dataset, keyword: str) -> Dataset:
        sequence = item.get(keyword) or shared.get(keyword)
        assert sequence, f"frame {index + 1}: no {keyword}"
        return sequence[0]

    for index, item in enumerate(per_frame):
        source = group(index, item, "DerivationImageSequence").SourceImageSequence
        assert len(source) == 1, f"frame {index + 1} is derived from {len(source)} images"
        segment = int(group(index, item, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        frames.append((str(source[0].ReferencedSOPInstanceUID), segment, pixels[index]))
    return frames


def segment_on_source(seg: Dataset, source: Dataset, segment_number: int = 1) -> np.ndarray:
    """The segment's one frame on ``source``, checked to lie on its grid."""
    found = [
        mask for uid, number, mask in segment_frames(seg)
        if uid == str(source.SOPInstanceUID) and number == segment_number
    ]
    assert len(found) == 1, f"segment {segment_number} has {len(found)} frames on {source.SOPInstanceUID}"
    assert found[0].shape == (int(source.Rows), int(source.Columns))
    return found[0]


@dataclass(frozen=True)
class GridGeometry:
    """What a SEG says about its pixel grid in its shared functional groups."""

    spacing: tuple[float, float] | None
    orientation: tuple[float, ...] | None
    slice_thickness: bool
    plane_position: bool
    per_frame_geometry: bool


def grid_geometry(seg: Dataset) -> GridGeometry:
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    orientation = shared.get("PlaneOrientationSequence")
    return GridGeometry(
        spacing=tuple(float(v) for v in measures[0].PixelSpacing) if measures else None,
        orientation=tuple(float(v) for v in orientation[0].ImageOrientationPatient) if orientation else None,
        slice_thickness=bool(measures) and "SliceThickness" in measures[0],
        plane_position="PlanePositionSequence" in shared,
        per_frame_geometry=any(
            keyword in item
            for item in seg.PerFrameFunctionalGroupsSequence
            for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence", "PlanePositionSequence")
        ),
    )


def outline_mask(outline: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres are inside a SCOORD outline.

    ``outline`` holds (column, row) points in SCOORD image coordinates (PS3.3
    Table C.18.6-1: 0\\0 is the top left corner of the top left pixel), so
    the centre of pixel ``[r, c]`` is ``(c + 0.5, r + 0.5)``.
    """
    points = np.asarray(outline, dtype=float).reshape(-1, 2)
    return polygon2mask(shape, np.column_stack([points[:, 1] - 0.5, points[:, 0] - 0.5]))


def largest_region(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# --- cases ------------------------------------------------------------------------------


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
    seg: pydicom.Dataset  # as sent: encoded and read back with pydicom
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
        source, mask, probability=PROBABILITY, threshold=THRESHOLD, algorithm=ALGORITHM, context=CONTEXT
    )
    return Written(f"{source_name}-{mask_name}", source, mask, encoded(seg), seg_repairs, sr, sr_repairs)


# --- validity ---------------------------------------------------------------------------


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


# --- SEG ----------------------------------------------------------------------------------


def test_mask_round_trips_pixel_exactly_onto_the_source_grid(written: Written) -> None:
    seg = written.seg
    assert len(seg.SegmentSequence) == 1
    assert int(seg.NumberOfFrames) == 1
    decoded = segment_on_source(seg, written.source)
    np.testing.assert_array_equal(decoded, written.mask)


def test_pixel_check_sees_a_flipped_mask(rg1: pydicom.Dataset) -> None:
    # The round trip above can fail: a SEG whose rows were written upside
    # down does not decode to the mask.
    mask = lung_ellipse(rg1.Rows, rg1.Columns)
    seg, _ = pw.write_seg(rg1, mask, algorithm=ALGORITHM, context=CONTEXT)
    flipped = encoded(seg)
    flipped.PixelData = pydicom.pixels.pack_bits(segment_on_source(flipped, rg1)[::-1].astype(np.uint8))
    assert not np.array_equal(segment_on_source(flipped, rg1), mask)


def test_segment_is_coded_as_model_attention_not_as_disease(written: Written) -> None:
    description = hd.seg.SegmentDescription.from_dataset(written.seg.SegmentSequence[0])
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


def test_seg_references_the_source_series_without_a_frame_of_reference(written: Written) -> None:
    source, seg = written.source, written.seg
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    [series] = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == [source.SOPInstanceUID]
    assert [uid for uid, _, _ in segment_frames(seg)] == [source.SOPInstanceUID]
    # Neither source has a Frame of Reference: the SEG must not invent one.
    assert "FrameOfReferenceUID" not in seg
    assert list(seg.PatientOrientation or []) == list(source.PatientOrientation or [])
    assert "PixelSpacing" not in seg


def test_seg_states_the_source_grid_only_where_the_source_has_a_valid_spacing(written: Written) -> None:
    geometry = grid_geometry(written.seg)
    assert not geometry.plane_position and not geometry.per_frame_geometry
    if written.name.startswith("rsna"):
        # Pixel Spacing 0.168 mm: the source's own, and the grid's identity
        # orientation, which OHIF needs to draw the SEG.
        assert geometry.spacing == (0.168, 0.168)
        assert geometry.orientation == PIXEL_GRID_ORIENTATION == (1, 0, 0, 0, 1, 0)
        assert not geometry.slice_thickness  # a radiograph has none
    else:
        # RG1's Pixel Spacing is 0\0 and it has no Imager Pixel Spacing:
        # nothing valid to state, so nothing is stated.
        assert geometry.spacing is None and geometry.orientation is None


def test_grid_spacing_falls_back_to_imager_pixel_spacing_and_is_never_invented(rg1: pydicom.Dataset) -> None:
    mask = lung_ellipse(rg1.Rows, rg1.Columns)

    def geometry_with(**attributes: object) -> GridGeometry:
        source = copy.deepcopy(rg1)
        del source.PixelSpacing
        for keyword, value in attributes.items():
            setattr(source, keyword, value)
        seg, _ = pw.write_seg(source, mask, algorithm=ALGORITHM, context=CONTEXT)
        return grid_geometry(encoded(seg))

    # Imager Pixel Spacing (PS3.3 10.7.1.3: row spacing first) when Pixel Spacing is absent ...
    fallback = geometry_with(ImagerPixelSpacing=["0.143", "0.15"])
    assert fallback.spacing == (0.143, 0.15)
    assert fallback.orientation == PIXEL_GRID_ORIENTATION
    # ... Pixel Spacing first where both are valid ...
    assert geometry_with(PixelSpacing=["0.139", "0.139"], ImagerPixelSpacing=["0.15", "0.15"]).spacing == (0.139, 0.139)
    # ... and nothing where neither is valid.
    for invalid in (["0", "0"], ["-0.1", "0.1"], ["0.1"]):
        assert geometry_with(ImagerPixelSpacing=invalid).spacing is None
    assert geometry_with().spacing is None


def test_valid_pixel_spacing_and_grid_geometry_refuse_what_they_cannot_say(rg1: pydicom.Dataset) -> None:
    header = copy.deepcopy(rg1)
    assert valid_pixel_spacing(header) is None  # 0\0
    header.PixelSpacing = ["0.2", "0.1"]
    assert valid_pixel_spacing(header) == ((0.2, 0.1), "PixelSpacing")
    header.PixelSpacing = "nan\\0.1"
    assert valid_pixel_spacing(header) is None
    seg, _ = pw.write_seg(rg1, lung_ellipse(rg1.Rows, rg1.Columns), algorithm=ALGORITHM, context=CONTEXT)
    header.PixelSpacing = ["0.2", "0.2"]
    assert add_pixel_grid_geometry(seg, header) == "PixelSpacing"
    with pytest.raises(ValueError, match="PixelMeasuresSequence of seg is present already"):
        add_pixel_grid_geometry(seg, header)
    seg.FrameOfReferenceUID = pydicom.uid.generate_uid(entropy_srcs=["a frame of reference"])
    with pytest.raises(ValueError, match="FrameOfReferenceUID of seg is present"):
        add_pixel_grid_geometry(seg, header)
    with pytest.raises(ValueError, match="must be a Segmentation"):
        add_pixel_grid_geometry(rg1, header)


def test_highdicom_segread_cannot_read_the_grid_form(written: Written) -> None:
    """Why these tests decode the SEG with pydicom: highdicom 0.28 requires
    Slice Thickness in Pixel Measures. If this starts to pass, ``segread``
    can be used again."""
    if grid_geometry(written.seg).spacing is None:
        pytest.skip("no Pixel Measures in this SEG: highdicom reads it")
    with pytest.raises(AttributeError, match="Pixel Measures"):
        hd.seg.segread(BytesIO(_bytes(written.seg)))


def _bytes(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def test_segmentation_source_leaves_the_source_alone(rsna: pydicom.Dataset) -> None:
    proxy, _ = sanitize_source(rsna)
    clean = segmentation_source(proxy)
    assert "PixelSpacing" not in clean
    assert "PixelSpacing" in proxy  # a shallow copy would have lost it here too


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


# --- SR -----------------------------------------------------------------------------------


def test_sr_is_one_planar_roi_on_the_source_with_probability_and_finding(written: Written) -> None:
    source, sr = written.source, read_sr(written.sr)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"  # TID 1500

    # Every group has coordinates: OHIF 3.13.2 crashes on one without (#3390).
    assert sr.content.get_image_measurement_groups() == []
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    (roi,) = sr.content.get_planar_roi_measurement_groups()
    assert roi.reference_type == codes.DCM.ImageRegion
    region = roi.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert region.value[0].tolist() == region.value[-1].tolist(), "the outline must be closed"
    image = region.ContentSequence[0]
    assert image.ValueType == "IMAGE" and image.RelationshipType == "SELECTED FROM"
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    probability = measurement(roi, pw.PROBABILITY)
    assert probability.value == pytest.approx(PROBABILITY, abs=1e-9)
    assert probability.unit == pw.PROBABILITY_UNIT
    threshold = measurement(roi, pw.THRESHOLD)
    assert threshold.value == pytest.approx(THRESHOLD, abs=1e-9)
    assert threshold.unit == pw.PROBABILITY_UNIT
    assert evaluation(roi, pw.PNEUMONIA) == pw.PRESENT
    assert [site.value for site in roi.finding_sites] == [codes.SCT.Lung]
    [purpose] = roi[0].ContentSequence.find(codes.DCM.GeometricPurposeOfRegion)
    assert purpose.value == codes.DCM.Outline
    [algorithm] = roi[0].ContentSequence.find(codes.DCM.AlgorithmName)
    assert algorithm.value == ALGORITHM.name

    if written.mask.any():
        assert roi.tracking_identifier == pw.SEGMENT_LABEL
        assert roi.finding_category == codes.SCT.SpatialAndRelationalConcept
        assert roi.finding_type == codes.DCM.GradientWeightedClassActivation
    else:
        assert roi.tracking_identifier == pw.WHOLE_IMAGE_LABEL
        assert roi.finding_type is None and roi.finding_category is None

    # Evidence: the source image, which the SCOORD references; the SEG is
    # not referenced by the content, so it is not listed.
    assert {uids[2] for uids in sr.get_evidence()} == {source.SOPInstanceUID}

    (observer,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert device.name == ALGORITHM.label
    assert device.manufacturer_name == CONTEXT.manufacturer
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"


def _outline(sr: Dataset) -> np.ndarray:
    (roi,) = read_sr(sr).content.get_planar_roi_measurement_groups()
    return roi.roi.value


def test_sr_outline_is_the_mask_region_in_column_row_order(written: Written) -> None:
    shape = written.mask.shape
    outline = _outline(written.sr)
    rows, columns = shape
    assert outline[:, 0].min() >= 0 and outline[:, 0].max() <= columns
    assert outline[:, 1].min() >= 0 and outline[:, 1].max() <= rows
    drawn = outline_mask(outline, shape)
    expected = largest_region(written.mask) if written.mask.any() else np.ones(shape, bool)
    assert iou(drawn, expected) > 0.995, iou(drawn, expected)
    if written.mask.any():
        # The same check on a wrong convention fails: rows for columns
        # (transposed, on this non-square image: cropped to it), or mirrored.
        swapped = outline[:, ::-1]
        assert iou(outline_mask(swapped, shape), expected) < 0.5
        mirrored = np.column_stack([columns - outline[:, 0], outline[:, 1]])
        assert iou(outline_mask(mirrored, shape), expected) < 0.1


def test_region_outline_follows_an_asymmetric_region_on_a_non_square_grid() -> None:
    # An L on a wide image, in the top left: a transposed or mirrored
    # outline cannot match it.
    mask = np.zeros((60, 100), bool)
    mask[5:40, 10:18] = True  # the upright, 8 columns wide
    mask[32:40, 18:70] = True  # the foot, to the right
    mask[50:55, 85:90] = True  # a small second region
    mask[10, 12] = False  # a hole: filled
    outline, regions = region_outline(mask, tolerance=0)
    assert regions == 2
    assert outline.dtype == np.float32 and outline.shape[1] == 2
    np.testing.assert_array_equal(outline[0], outline[-1])
    # Column first: x spans columns 10..70, y rows 5..40 (pixel edges).
    assert (outline[:, 0].min(), outline[:, 0].max()) == (10, 70)
    assert (outline[:, 1].min(), outline[:, 1].max()) == (5, 40)
    expected = largest_region(mask)
    np.testing.assert_array_equal(outline_mask(outline, mask.shape), expected)
    simplified, _ = region_outline(mask)
    assert len(simplified) < len(outline)
    np.testing.assert_array_equal(outline_mask(simplified, mask.shape), expected)
    # A region on the image edge closes along the edge.
    edge = np.zeros((20, 30), bool)
    edge[0:5, 25:30] = True
    outline, _ = region_outline(edge)
    assert outline[:, 0].max() == 30 and outline[:, 1].min() == 0
    np.testing.assert_array_equal(outline_mask(outline, edge.shape), edge)


def test_region_and_image_outline_refuse_what_they_cannot_outline() -> None:
    with pytest.raises(ValueError, match="no pixel set"):
        region_outline(np.zeros((4, 4), bool))
    with pytest.raises(TypeError, match="dtype bool"):
        region_outline(np.ones((4, 4), np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        region_outline(np.ones((2, 4, 4), bool))
    with pytest.raises(ValueError, match="tolerance"):
        region_outline(np.ones((4, 4), bool), tolerance=-1)
    np.testing.assert_array_equal(image_outline(3, 5), [[0, 0], [5, 0], [5, 3], [0, 3], [0, 0]])
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        image_outline(0, 5)


def test_sr_names_the_largest_of_several_regions(rg1: pydicom.Dataset) -> None:
    mask = lung_ellipse(rg1.Rows, rg1.Columns)
    mask |= mask[:, ::-1] & (np.arange(rg1.Rows)[:, None] > 0.5 * rg1.Rows)  # part of the other lung
    sr, _ = pw.write_sr(rg1, mask, probability=0.6, threshold=THRESHOLD, algorithm=ALGORITHM, context=CONTEXT)
    (roi,) = read_sr(sr).content.get_planar_roi_measurement_groups()
    assert roi.tracking_identifier == f"{pw.SEGMENT_LABEL}, largest of 2 regions"
    assert iou(outline_mask(roi.roi.value, mask.shape), largest_region(mask)) > 0.995


def test_sr_reports_absent_below_the_threshold(rg1: pydicom.Dataset) -> None:
    mask = lung_ellipse(rg1.Rows, rg1.Columns)
    sr, _ = pw.write_sr(rg1, mask, probability=0.05, threshold=THRESHOLD, algorithm=ALGORITHM, context=CONTEXT)
    (roi,) = read_sr(sr).content.get_planar_roi_measurement_groups()
    assert evaluation(roi, pw.PNEUMONIA) == pw.ABSENT
    assert measurement(roi, pw.PROBABILITY).value == pytest.approx(0.05)


# --- both -----------------------------------------------------------------------------------


def test_uids_are_deterministic_per_source_model_version_and_kind(rg1: pydicom.Dataset) -> None:
    mask = lung_ellipse(rg1.Rows, rg1.Columns)

    def run(algorithm: AlgorithmDescription, context: PipelineContext) -> tuple[pydicom.Dataset, pydicom.Dataset]:
        seg, _ = pw.write_seg(rg1, mask, algorithm=algorithm, context=context)
        sr, _ = pw.write_sr(rg1, mask, probability=0.4, threshold=THRESHOLD, algorithm=algorithm, context=context)
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


def test_source_is_not_modified(rsna: pydicom.Dataset) -> None:
    before = copy.deepcopy(rsna)
    mask = lung_ellipse(rsna.Rows, rsna.Columns)
    pw.write_seg(rsna, mask, algorithm=ALGORITHM, context=CONTEXT)
    pw.write_sr(rsna, mask, probability=0.5, threshold=0.5, algorithm=ALGORITHM, context=CONTEXT)
    assert rsna == before


def test_empty_mask_with_omitted_frames_still_has_one_frame(rg1: pydicom.Dataset) -> None:
    empty = np.zeros((rg1.Rows, rg1.Columns), bool)
    seg, _ = pw.write_seg(rg1, empty, algorithm=ALGORITHM, context=CONTEXT, omit_empty_frames=True)
    seg = encoded(seg)
    assert int(seg.NumberOfFrames) == 1
    assert not segment_on_source(seg, rg1).any()


def test_wrong_inputs_are_refused_naming_the_attribute(rg1: pydicom.Dataset) -> None:
    mask = lung_ellipse(rg1.Rows, rg1.Columns)
    for write, kwargs in (
        (pw.write_seg, {}),
        (pw.write_sr, {"probability": 0.5, "threshold": 0.5}),
    ):
        with pytest.raises(ValueError, match="mask has shape"):
            write(rg1, mask[:-1], algorithm=ALGORITHM, context=CONTEXT, **kwargs)
        with pytest.raises(TypeError, match="mask must be .* bool"):
            write(rg1, mask.astype(np.uint8), algorithm=ALGORITHM, context=CONTEXT, **kwargs)
        mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        with pytest.raises(ValueError, match="Modality"):
            write(mr, np.zeros((mr.Rows, mr.Columns), bool), algorithm=ALGORITHM, context=CONTEXT, **kwargs)
        with pytest.raises(ValueError, match="uid_prefix"):
            write(rg1, mask, algorithm=ALGORITHM, context=PipelineContext(uid_prefix="not-a-root"), **kwargs)
        with pytest.raises(ValueError, match="PipelineContext.manufacturer"):
            write(rg1, mask, algorithm=ALGORITHM, context=PipelineContext(manufacturer="x" * 65), **kwargs)
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="probability"):
            pw.write_sr(rg1, mask, probability=bad, threshold=0.5, algorithm=ALGORITHM, context=CONTEXT)
    with pytest.raises(ValueError, match="threshold"):
        pw.write_sr(rg1, mask, probability=0.5, threshold=2.0, algorithm=ALGORITHM, context=CONTEXT)
