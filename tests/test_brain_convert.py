"""NIfTI BraTS case -> DICOM MR study: names, attributes, geometry round trip, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipelines.brain_tumour.convert import (
    SEQUENCE_PROTOCOLS,
    find_case_files,
    image_to_series,
    nifti_to_dicom,
    study_info,
    to_int16,
)
from pipelines.brain_tumour.volume import series_to_image
from tests.brain_phantom import make_phantom
from tests.dicom_checks import DCIODVFY
from tests.peers import SHARED_DATA

BRATS = SHARED_DATA / "brats" / "BraTS-GLI-00001-000"
TCGA = SHARED_DATA / "brats" / "TCGA-FG-6692-preprocessed"
needs_brats = pytest.mark.skipif(not BRATS.is_dir(), reason=f"real data folder ../shared/data absent ({SHARED_DATA})")
needs_tcga = pytest.mark.skipif(not TCGA.is_dir(), reason=f"real data folder ../shared/data absent ({SHARED_DATA})")


def _read(paths):
    return [pydicom.dcmread(p) for p in paths]


def _lps(path: Path) -> sitk.Image:
    return sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")


def _assert_round_trip(volume, nifti: sitk.Image) -> None:
    assert volume.image.GetSize() == nifti.GetSize()
    np.testing.assert_allclose(volume.image.GetSpacing(), nifti.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(volume.image.GetOrigin(), nifti.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.image.GetDirection(), nifti.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(nifti).astype(np.float32)
    )


# --------------------------------------------------------------------------- file names


@needs_brats
def test_brats_2023_names():
    files = find_case_files(BRATS)
    assert {r: p.name for r, p in files.items()} == {
        "T1": "BraTS-GLI-00001-000-t1n.nii.gz",
        "T1c": "BraTS-GLI-00001-000-t1c.nii.gz",
        "T2": "BraTS-GLI-00001-000-t2w.nii.gz",
        "FLAIR": "BraTS-GLI-00001-000-t2f.nii.gz",
    }


@needs_tcga
def test_tcga_names_ignore_the_segmentation():
    files = find_case_files(TCGA)
    assert {r: p.name for r, p in files.items()} == {
        "T1": "TCGA-FG-6692_t1.nii.gz",
        "T1c": "TCGA-FG-6692_t1c.nii.gz",
        "T2": "TCGA-FG-6692_t2.nii.gz",
        "FLAIR": "TCGA-FG-6692_fla.nii.gz",
    }


def test_brats_2020_names_and_refusals(tmp_path):
    names = ("Case_t1.nii.gz", "Case_t1ce.nii.gz", "Case_t2.nii", "Case_flair.nii.gz", "Case_seg.nii.gz", "notes.txt")
    for name in names:
        (tmp_path / name).write_bytes(b"")
    files = find_case_files(tmp_path)
    assert {r: p.name for r, p in files.items()} == {
        "T1": "Case_t1.nii.gz", "T1c": "Case_t1ce.nii.gz", "T2": "Case_t2.nii", "FLAIR": "Case_flair.nii.gz",
    }
    (tmp_path / "Case_fla.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="FLAIR: several files"):
        find_case_files(tmp_path)
    (tmp_path / "Case_fla.nii.gz").unlink()
    (tmp_path / "Case_t2.nii").unlink()
    with pytest.raises(ValueError, match="no T2 volume .*t2w"):
        find_case_files(tmp_path)


# --------------------------------------------------------------------------- pixel values


def test_to_int16_exact_for_integers_scaled_otherwise():
    ints = np.array([[-45, 0, 663]], dtype=np.int32)
    stored, slope, intercept = to_int16(ints)
    assert stored.dtype == np.int16 and (slope, intercept) == (1.0, 0.0)
    np.testing.assert_array_equal(stored, ints)
    floats = np.array([0.0, 0.25, 1000.5, 70000.0], dtype=np.float32)
    stored, slope, intercept = to_int16(floats)
    assert slope == pytest.approx(70000.0 / 32767) and stored[0] == 0
    np.testing.assert_allclose(stored * slope + intercept, floats, atol=slope / 2 + 1e-3)
    with pytest.raises(ValueError, match="NaN"):
        to_int16(np.array([1.0, np.nan]))


# --------------------------------------------------------------------------- attributes


def test_series_attributes_and_dciodvfy(tmp_path):
    phantom = make_phantom()
    t1c, t2, flair = phantom.datasets["T1c"], phantom.datasets["T2"], phantom.datasets["FLAIR"]
    ds = t1c[0]
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
    assert ds.SeriesDescription == "AX T1 MPRAGE POST GD" and ds.ProtocolName == "t1_mprage_ax_post_gd"
    assert "ContrastBolusAgent" in ds and ds.ContrastBolusRoute == "IV"
    assert all("ContrastBolusAgent" not in s[0] for s in (phantom.datasets["T1"], t2, flair))
    assert list(flair[0].ScanningSequence) == ["SE", "IR"] and float(flair[0].InversionTime) == 2500
    assert "InversionTime" not in t2[0] and t2[0].SeriesDescription == "AX T2 TSE"
    assert float(t2[0].RepetitionTime) > float(ds.RepetitionTime) and float(t2[0].EchoTime) > float(ds.EchoTime)
    assert ds.PatientName == "Phantom^Brain" and ds.PatientID == "PHANTOM-001"
    # One study, one frame of reference, four series, unique instances.
    everything = [d for ds_ in phantom.datasets.values() for d in ds_]
    assert {d.StudyInstanceUID for d in everything} == {phantom.study.study_instance_uid}
    assert len({d.FrameOfReferenceUID for d in everything}) == 1
    assert len({d.SeriesInstanceUID for d in everything}) == 4
    assert len({d.SOPInstanceUID for d in everything}) == len(everything)
    # Geometry of the first slice (centred 64 x 64 x 40 grid at 1.5 mm, LPS axes).
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([-47.25, -47.25, -29.25])
    assert [float(v) for v in ds.PixelSpacing] == [1.5, 1.5]
    assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 1.5
    assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16 and ds.pixel_array.dtype == np.int16
    assert float(ds.WindowWidth) > 0
    if not Path(DCIODVFY).exists():
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    from tests.dicom_checks import run_dciodvfy

    for role in ("T1c", "FLAIR"):
        result = run_dciodvfy(phantom.datasets[role][20], tmp_path, name=f"{role}.dcm")
        assert result.iod == "MRImage"
        assert result.errors == [], result.errors
        assert result.warnings == [], result.warnings


def test_sheared_image_refused():
    image = sitk.Image([4, 4, 4], sitk.sitkInt16)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0.2, 0.98))
    study = study_info(patient_name="A^B", patient_id="X", uid_parts=["sheared"])
    with pytest.raises(ValueError, match="not orthogonal"):
        image_to_series(image, SEQUENCE_PROTOCOLS["T1"], study, series_instance_uid="1.2.3")


# --------------------------------------------------------------------------- round trips


def _write_case(folder: Path, images: dict[str, sitk.Image], names: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for role, image in images.items():
        sitk.WriteImage(image, str(folder / names[role]))


_BRATS23 = {"T1": "c-t1n.nii.gz", "T1c": "c-t1c.nii.gz", "T2": "c-t2w.nii.gz", "FLAIR": "c-t2f.nii.gz"}


def test_ras_stored_nifti_round_trip_and_deterministic_uids(tmp_path):
    phantom = make_phantom(flair_motion=True)
    # Store the volumes RAS (nibabel canonical), the other common layout.
    images = {r: sitk.DICOMOrient(img, "RAS") for r, img in phantom.images.items()}
    _write_case(tmp_path / "case", images, _BRATS23)
    first = nifti_to_dicom(tmp_path / "case", tmp_path / "out1", patient_name="Test^Case", patient_id="C1")
    again = nifti_to_dicom(tmp_path / "case", tmp_path / "out2", patient_name="Test^Case", patient_id="C1")
    for role in _BRATS23:
        datasets = _read(first.series[role].paths)
        volume = series_to_image(datasets)
        _assert_round_trip(volume, _lps(tmp_path / "case" / _BRATS23[role]))
        assert [float(v) for v in datasets[0].ImageOrientationPatient][:3] == pytest.approx(
            np.array(phantom.images[role].GetDirection()).reshape(3, 3)[:, 0], abs=1e-6
        )
        # Same files, same UIDs, byte for byte.
        assert first.series[role].series_instance_uid == again.series[role].series_instance_uid
        assert [p.read_bytes() for p in first.series[role].paths] == [p.read_bytes() for p in again.series[role].paths]
    assert first.study_instance_uid == again.study_instance_uid
    # Different content: a different study.
    images["T2"] = sitk.Add(images["T2"], 1)
    _write_case(tmp_path / "changed", images, _BRATS23)
    changed = nifti_to_dicom(tmp_path / "changed", tmp_path / "out3", patient_name="Test^Case", patient_id="C1")
    assert changed.study_instance_uid != first.study_instance_uid
    assert changed.series["T2"].series_instance_uid != first.series["T2"].series_instance_uid


def test_float_nifti_gets_rescale(tmp_path):
    phantom = make_phantom(missing=("T1", "T2", "FLAIR"))
    image = sitk.Cast(phantom.images["T1c"], sitk.sitkFloat32) * 0.37
    folder = tmp_path / "case"
    folder.mkdir()
    sitk.WriteImage(image, str(folder / "f_t1c.nii.gz"))
    study = nifti_to_dicom(folder, tmp_path / "out", patient_name="F^F", patient_id="F", roles=("T1c",))
    datasets = _read(study.series["T1c"].paths)
    assert "RescaleSlope" in datasets[0]
    volume = series_to_image(datasets)
    slope = float(datasets[0].RescaleSlope)
    np.testing.assert_allclose(
        sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(image), atol=slope / 2 + 1e-4
    )


@pytest.fixture(scope="module")
def brats_study(tmp_path_factory):
    if not BRATS.is_dir():
        pytest.skip(f"real data folder ../shared/data absent ({SHARED_DATA})")
    out = tmp_path_factory.mktemp("brats-dicom")
    return nifti_to_dicom(BRATS, out, patient_name="BraTS^GLI00001", patient_id="BRATS-GLI-00001-000")


@needs_brats
def test_brats_case_round_trip(brats_study):
    assert set(brats_study.series) == {"T1", "T1c", "T2", "FLAIR"}
    for role, series in brats_study.series.items():
        assert len(series.paths) == 155
        datasets = _read(series.paths[::-1])  # any order in: sorted by position
        volume = series_to_image(datasets)
        _assert_round_trip(volume, _lps(brats_study.sources[role]))
        assert datasets[0].SeriesDescription == SEQUENCE_PROTOCOLS[role].series_description


@needs_tcga
def test_tcga_case_round_trip_with_negative_values(tmp_path):
    study = nifti_to_dicom(TCGA, tmp_path, patient_name="TCGA^FG6692", patient_id="TCGA-FG-6692", roles=("FLAIR",))
    for role in ("FLAIR",):
        volume = series_to_image(_read(study.series[role].paths))
        nifti = _lps(study.sources[role])
        assert sitk.GetArrayViewFromImage(nifti).min() < 0
        _assert_round_trip(volume, nifti)
