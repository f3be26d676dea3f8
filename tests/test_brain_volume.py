"""DICOM series -> 3-D volume: geometry, slice order, rescale, multi-frame, and the refusals."""

from __future__ import annotations

import copy
import random

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.base import PipelineInputError
from pipelines.brain_tumour.volume import SeriesVolume, series_to_image
from tests.brain_phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(flair_motion=True)


def _testdata(name: str):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} needs the pydicom-data package (pip install pydicom-data)")
    return pydicom.dcmread(path)


def _assert_same_image(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def _shifted(position, dx: float) -> list[float]:
    """``position`` moved ``dx`` mm along x (in the slice plane of an axial series)."""
    return [float(position[0]) + dx, float(position[1]), float(position[2])]


def _copies(datasets):
    return [copy.deepcopy(ds) for ds in datasets]


def test_geometry_and_voxels_match_the_rendered_phantom(phantom):
    shuffled = list(phantom.datasets["T1c"])
    random.Random(1).shuffle(shuffled)
    vol = series_to_image(shuffled)
    assert vol.image.GetPixelID() == sitk.sitkFloat32
    _assert_same_image(vol.image, sitk.Cast(phantom.images["T1c"], sitk.sitkFloat32))
    # Slices come back sorted along the normal (+z here), whatever the input order.
    assert [int(s.dataset.InstanceNumber) for s in vol.slices] == list(range(1, 41))
    assert vol.datasets == tuple(s.dataset for s in vol.slices)
    assert vol.frame_numbers == (None,) * 40 and not vol.is_multiframe
    assert vol.series_instance_uid == phantom.study.roles["T1c"]
    assert vol.frame_of_reference_uid == phantom.datasets["T1c"][0].FrameOfReferenceUID


def test_oblique_series_with_its_own_grid(phantom):
    vol = series_to_image(phantom.datasets["FLAIR"])
    _assert_same_image(vol.image, sitk.Cast(phantom.images["FLAIR"], sitk.sitkFloat32))
    assert abs(vol.image.GetDirection()[1]) > 0.08  # rotated 5 degrees about z


def test_slice_order_follows_position_not_instance_number(phantom):
    datasets = _copies(phantom.datasets["T2"])
    numbers = list(range(1, len(datasets) + 1))
    random.Random(2).shuffle(numbers)
    for ds, n in zip(datasets, numbers, strict=True):
        ds.InstanceNumber = n
    datasets.sort(key=lambda ds: ds.InstanceNumber)
    vol = series_to_image(datasets)
    z = [float(s.dataset.ImagePositionPatient[2]) for s in vol.slices]
    assert z == sorted(z)
    _assert_same_image(vol.image, sitk.Cast(phantom.images["T2"], sitk.sitkFloat32))


def test_slices_ordered_along_the_normal_when_it_points_down():
    """Image Orientation with row x column = -z: ascending along the normal is descending z."""
    ds = _testdata("eCT_Supplemental.dcm")  # real Enhanced CT, 2 frames, IOP -1\0\0\0\1\0
    vol = series_to_image([ds])
    assert vol.is_multiframe and vol.datasets == (ds,)
    assert vol.frame_numbers == (2, 1)  # frame 2 is at z = -149, frame 1 at z = -159
    np.testing.assert_allclose(vol.image.GetOrigin(), (99.5, -301.5, -149.0))
    np.testing.assert_allclose(vol.image.GetSpacing(), (0.388672, 0.388672, 10.0), atol=1e-6)
    np.testing.assert_allclose(np.array(vol.image.GetDirection()).reshape(3, 3)[:, 2], (0, 0, -1), atol=1e-9)
    # Pixel Value Transformation (shared functional group): intercept -1024.
    arr = sitk.GetArrayViewFromImage(vol.image)
    np.testing.assert_array_equal(arr[0], ds.pixel_array[1].astype(np.float32) - 1024)
    np.testing.assert_array_equal(arr[1], ds.pixel_array[0].astype(np.float32) - 1024)
    frames = vol.to_source_frames(np.stack([np.full(arr.shape[1:], 7), np.full(arr.shape[1:], 9)]))
    assert frames[0, 0, 0] == 9 and frames[1, 0, 0] == 7


def test_rescale_slope_and_intercept_applied(phantom):
    datasets = _copies(phantom.datasets["T1"])
    for ds in datasets:
        ds.RescaleSlope = "2.5"
        ds.RescaleIntercept = "-100"
    vol = series_to_image(datasets)
    expected = sitk.GetArrayViewFromImage(phantom.images["T1"]).astype(np.float32) * 2.5 - 100
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(vol.image), expected, rtol=1e-6)


def test_legacy_converted_enhanced_mr_reads_like_the_single_frame_series(phantom):
    single = phantom.datasets["T1c"]
    # highdicom's legacy converter builds a real multi-frame MR with per-frame
    # Plane Position and shared Plane Orientation / Pixel Measures groups.
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        list(reversed(single)),
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encode(enhanced)))
    assert "PerFrameFunctionalGroupsSequence" in ds and int(ds.NumberOfFrames) == 40
    vol = series_to_image([ds])
    _assert_same_image(vol.image, sitk.Cast(phantom.images["T1c"], sitk.sitkFloat32))
    assert vol.datasets == (ds,)
    # Frame f of the instance is the slice whose position it carries.
    for k, f in enumerate(vol.frame_numbers):
        item = ds.PerFrameFunctionalGroupsSequence[f - 1].PlanePositionSequence[0]
        assert [float(v) for v in item.ImagePositionPatient] == pytest.approx(
            [float(v) for v in single[k].ImagePositionPatient]
        )
    labels = np.arange(40, dtype=np.uint8)[:, None, None] * np.ones((1, 64, 64), np.uint8)
    frames = vol.to_source_frames(labels)
    assert [int(frames[f - 1, 0, 0]) for f in vol.frame_numbers] == list(range(40))


def _encode(ds) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_real_enhanced_mr_without_functional_groups_is_refused():
    ds = _testdata("emri_small.dcm")  # Enhanced MR whose functional groups were stripped
    with pytest.raises(PipelineInputError, match="PlanePositionSequence"):
        series_to_image([ds])


def test_real_single_frame_mr_slice():
    ds = _testdata("MR_small.dcm")
    vol = series_to_image([ds])
    assert vol.image.GetSize() == (64, 64, 1)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(vol.image)[0], ds.pixel_array.astype(np.float32))
    np.testing.assert_allclose(vol.image.GetOrigin(), [float(v) for v in ds.ImagePositionPatient])


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: delattr(d[3], "ImagePositionPatient"), r"ImagePositionPatient \(0020,0032\) is missing"),
        (lambda d: delattr(d[0], "ImageOrientationPatient"), r"ImageOrientationPatient \(0020,0037\) is missing"),
        (lambda d: delattr(d[5], "PixelSpacing"), r"PixelSpacing \(0028,0030\) is missing"),
        (lambda d: setattr(d[7], "ImageOrientationPatient", [1, 0, 0, 0, 0.99, 0.141]),
         "ImageOrientationPatient .* differs"),
        (lambda d: setattr(d[0], "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), "not orthogonal"),
        (lambda d: setattr(d[9], "ImagePositionPatient", list(d[8].ImagePositionPatient)), "same position"),
        (lambda d: d.pop(20), r"not uniform.*\+/-1 %"),
        (lambda d: setattr(d[4], "FrameOfReferenceUID", "1.2.3.4"), "FrameOfReferenceUID .* 2 frames of reference"),
        (lambda d: setattr(d[4], "SeriesInstanceUID", "1.2.3.4"), "SeriesInstanceUID"),
        (lambda d: setattr(d[6], "PixelSpacing", [1.5, 1.0]), "PixelSpacing .* differs"),
        (lambda d: setattr(d[2], "ImagePositionPatient", _shifted(d[2].ImagePositionPatient, 3.0)), "sheared"),
    ],
    ids=[
        "no-position", "no-orientation", "no-spacing", "orientation-differs", "not-orthogonal",
        "duplicate-position", "missing-slice", "two-frames-of-reference", "two-series",
        "spacing-differs", "sheared",
    ],
)
def test_refusals_name_the_attribute(phantom, damage, match):
    datasets = _copies(phantom.datasets["T1"])
    damage(datasets)
    with pytest.raises(PipelineInputError, match=match):
        series_to_image(datasets)


def test_small_spacing_jitter_is_accepted(phantom):
    datasets = _copies(phantom.datasets["T1"])
    # 0.5 % of the 1.5 mm gap: DS rounding and table jitter, within tolerance.
    ipp = [float(v) for v in datasets[10].ImagePositionPatient]
    datasets[10].ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.0075]
    vol = series_to_image(datasets)
    assert vol.image.GetSpacing()[2] == pytest.approx(1.5)


def test_pipeline_input_error_is_a_value_error():
    with pytest.raises(ValueError, match="no datasets"):
        series_to_image([])


def test_series_volume_checks_its_slices(phantom):
    vol = series_to_image(phantom.datasets["T1"])
    with pytest.raises(ValueError, match="slice sources"):
        SeriesVolume(vol.image, vol.slices[:-1], vol.series_instance_uid, None)
    with pytest.raises(ValueError, match="one multi-frame instance"):
        vol.to_source_frames(np.zeros(vol.shape, np.uint8))
