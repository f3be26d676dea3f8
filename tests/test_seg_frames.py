"""The compact SEG variant equals what highdicom writes with omit_empty_frames=True."""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipelines.common.seg_frames import (
    omit_empty_frames,
    segment_frame_numbers,
    segment_voxel_counts,
    segmentation_frames,
)
from tests.dicom_checks import run_dciodvfy


def ct_series(n: int = 5) -> list[pydicom.Dataset]:
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series, out = generate_uid(), []
    for i in range(n):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 2.0]
        out.append(ds)
    return out


def build(sources, mask, omit: bool, sop_uid: str) -> hd.seg.Segmentation:
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, label in enumerate(("a", "b"))
    ]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid="1.2.3.4",
        series_number=900,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        omit_empty_frames=omit,
    )


def test_compact_variant_matches_highdicom(tmp_path):
    sources = ct_series()
    rows, cols = sources[0].Rows, sources[0].Columns
    mask = np.zeros((5, rows, cols, 2), dtype=bool)
    mask[1, 10:30, 20:40, 0] = True
    mask[3, 50:60, 5:9, 0] = True
    mask[3, 0:5, 0:5, 1] = True
    uid = generate_uid()
    full = build(sources, mask, False, uid)
    expected = build(sources, mask, True, uid)
    assert full.NumberOfFrames == 10 and expected.NumberOfFrames == 3

    compact = omit_empty_frames(full)
    assert compact.SOPInstanceUID == full.SOPInstanceUID
    assert compact.NumberOfFrames == expected.NumberOfFrames
    assert np.array_equal(segmentation_frames(compact), segmentation_frames(expected))
    positions = [
        (f.FrameContentSequence[0].DimensionIndexValues, f.PlanePositionSequence[0].ImagePositionPatient,
         f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in compact.PerFrameFunctionalGroupsSequence
    ]
    assert positions == [
        (f.FrameContentSequence[0].DimensionIndexValues, f.PlanePositionSequence[0].ImagePositionPatient,
         f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in expected.PerFrameFunctionalGroupsSequence
    ]
    # highdicom reads it back onto the same source slices
    back = hd.seg.Segmentation.from_dataset(compact)
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sources], segment_numbers=[1, 2]
    )
    assert np.array_equal(pixels.astype(bool), mask)
    result = run_dciodvfy(compact, tmp_path)
    assert result.iod == "Segmentation" and result.errors == []


def test_nothing_to_drop_and_all_empty():
    sources = ct_series(2)
    rows, cols = sources[0].Rows, sources[0].Columns
    mask = np.ones((2, rows, cols, 2), dtype=bool)
    assert omit_empty_frames(build(sources, mask, False, generate_uid())) is None
    empty = build(sources, np.zeros_like(mask), False, generate_uid())
    compact = omit_empty_frames(empty)
    assert compact.NumberOfFrames == 1  # a SEG needs one frame


def test_one_segmentation_check_and_one_frame_reader():
    """Every reader of SEG frames refuses what is not a Segmentation with the
    same check, and the voxel counts and segment per frame come from the
    same frames that the compact variant keeps."""
    sources = ct_series(3)
    rows, cols = sources[0].Rows, sources[0].Columns
    mask = np.zeros((3, rows, cols, 2), dtype=bool)
    mask[0, :4, :5, 0] = True  # 20 pixels of segment 1 on slice 0
    mask[2, :3, :3, 1] = True  # 9 pixels of segment 2 on slice 2
    full = build(sources, mask, False, generate_uid())
    assert segment_voxel_counts(full) == {1: 20, 2: 9}
    assert segment_frame_numbers(full, 1) == [1, 2, 3] and segment_frame_numbers(full, 2) == [4, 5, 6]
    compact = omit_empty_frames(full)
    assert segment_voxel_counts(compact) == {1: 20, 2: 9}
    assert segment_frame_numbers(compact, 1) == [1] and segment_frame_numbers(compact, 2) == [2]
    for reader in (segmentation_frames, omit_empty_frames, segment_voxel_counts):
        with pytest.raises(ValueError, match="seg must be a Segmentation"):
            reader(sources[0])
