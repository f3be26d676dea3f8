"""Preprocessing of real radiographs: intensities, inversion, spacing, geometry."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from models.card import InputSpec
from pipelines.pneumonia.preprocess import (
    Clahe,
    CxrImage,
    CxrPreprocessor,
    PadToSquare,
    PixelSpacing,
    ResampleIsotropic,
    Resize,
    SourceImage,
    dicom_to_image,
    png_to_image,
    read_pixel_spacing,
    rescale_to_unit,
)
from tests.peers import SHARED_DATA

RSNA_DCM = SHARED_DATA / "cxr" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
CXR14 = SHARED_DATA / "cxr14"
needs_data = pytest.mark.skipif(not RSNA_DCM.is_file(), reason=f"real data folder ../shared/data absent ({SHARED_DATA})")


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} needs the pydicom-data package (pip install pydicom-data)")
    return Path(path)


@pytest.fixture()
def rg1() -> pydicom.Dataset:
    return pydicom.dcmread(_testdata("RG1_UNCR.dcm"))


@pytest.fixture()
def rsna() -> pydicom.Dataset:
    if not RSNA_DCM.is_file():
        pytest.skip(f"real data folder ../shared/data absent ({SHARED_DATA})")
    return pydicom.dcmread(RSNA_DCM)


def _lung_and_spine(image: np.ndarray) -> tuple[float, float]:
    """Mean of the two lung fields and of the central (spine/mediastinum) strip
    of a PA chest radiograph."""
    h, w = image.shape
    rows = slice(int(0.3 * h), int(0.6 * h))
    lungs = np.concatenate([image[rows, int(0.2 * w):int(0.35 * w)].ravel(),
                            image[rows, int(0.65 * w):int(0.8 * w)].ravel()])
    spine = image[rows, int(0.47 * w):int(0.53 * w)]
    return float(lungs.mean()), float(spine.mean())


# --------------------------------------------------------------------------- DICOM -> [0, 1]


def test_rg1_15bit_monochrome1_is_read_and_inverted(rg1):
    src = dicom_to_image(rg1)
    assert src.image.shape == (1955, 1841) and src.image.dtype == np.float32
    assert src.image.min() == 0.0 and src.image.max() == 1.0
    assert any("MONOCHROME1 inverted" in n for n in src.notes)
    assert any("window center 15000" in n for n in src.notes)
    # displayed as MONOCHROME2: air-filled lungs darker than the mediastinum
    lungs, spine = _lung_and_spine(src.image)
    assert lungs < spine - 0.1
    # and it is exactly the inverse of reading the same values as MONOCHROME2
    as_mono2 = copy.deepcopy(rg1)
    as_mono2.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_allclose(src.image, 1.0 - dicom_to_image(as_mono2).image, atol=1e-6)


@needs_data
def test_rsna_jpeg_secondary_capture_is_read(rsna):
    assert rsna.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture, Modality CR
    src = dicom_to_image(rsna)
    assert src.image.shape == (1024, 1024) and src.image.dtype == np.float32
    assert 0.0 <= src.image.min() and src.image.max() <= 1.0
    # 8-bit 0..255 stored values: min-max scaling equals torchxrayvision's x / 255
    np.testing.assert_allclose(src.image, rsna.pixel_array.astype(np.float32) / 255.0, atol=1e-6)
    assert src.spacing.spacing == (0.168, 0.168) and src.spacing.source == "PixelSpacing"
    lungs, spine = _lung_and_spine(src.image)
    assert lungs < spine


def test_dicom_to_image_refuses_colour_and_constant_images(rg1):
    rgb = pydicom.dcmread(_testdata("SC_rgb.dcm"))
    with pytest.raises(ValueError, match="SamplesPerPixel"):
        dicom_to_image(rgb)
    flat = copy.deepcopy(rg1)
    flat.PixelData = np.full((flat.Rows, flat.Columns), 1000, np.uint16).tobytes()
    with pytest.raises(ValueError, match="constant"):
        dicom_to_image(flat)
    with pytest.raises(ValueError, match="constant"):
        rescale_to_unit(np.ones((3, 3)))


# --------------------------------------------------------------------------- spacing


def test_rg1_zero_pixel_spacing_is_reported_and_resampling_skipped(rg1):
    sp = read_pixel_spacing(rg1)
    assert sp.spacing is None
    assert "PixelSpacing" in sp.reason and "zero" in sp.reason
    assert "ImagerPixelSpacing is absent" in sp.reason
    out = CxrPreprocessor(InputSpec(size=(64, 64))).from_dicom(rg1)
    assert any(n.startswith("isotropic resampling skipped") for n in out.notes)
    assert any("zero" in n for n in out.notes)


@pytest.mark.parametrize(
    ("pixel", "imager", "expected", "source", "reason"),
    [
        (None, [0.2, 0.1], (0.2, 0.1), "ImagerPixelSpacing", "PixelSpacing is absent"),
        ([0.0, 0.0], [0.15, 0.15], (0.15, 0.15), "ImagerPixelSpacing", "zero"),
        ([0.1], None, None, None, "1 values"),
        ([-0.1, 0.1], None, None, None, "negative"),
        ([0.143, 0.143], [0.2, 0.2], (0.143, 0.143), "PixelSpacing", None),
    ],
)
def test_spacing_sources_and_invalid_values(rg1, pixel, imager, expected, source, reason):
    ds = copy.deepcopy(rg1)
    del ds.PixelSpacing
    if pixel is not None:
        ds.PixelSpacing = pixel
    if imager is not None:
        ds.ImagerPixelSpacing = imager
    sp = read_pixel_spacing(ds)
    assert sp.spacing == (pytest.approx(expected) if expected else None)
    assert sp.source == source
    if reason is None:
        assert sp.reason is None
    else:
        assert reason in sp.reason


# --------------------------------------------------------------------------- the chain


@needs_data
def test_rsna_chain_shapes_and_intensity_range(rsna):
    out = CxrPreprocessor(InputSpec(size=(224, 224), clahe=True)).from_dicom(rsna)
    assert out.tensor.shape == (1, 224, 224) and out.tensor.dtype == np.float32
    assert out.tensor.min() == pytest.approx(-1024) and out.tensor.max() == pytest.approx(1024)
    assert any("not needed" in n for n in out.notes)  # 0.168 x 0.168 mm is already square
    assert out.geometry.source_shape == (1024, 1024) and out.geometry.shape == (224, 224)


def test_clahe_is_applied_only_when_the_spec_asks(rg1):
    plain = CxrPreprocessor(InputSpec(size=(128, 128), clahe=False)).from_dicom(rg1)
    eq = CxrPreprocessor(InputSpec(size=(128, 128), clahe=True)).from_dicom(rg1)
    assert plain.tensor.shape == eq.tensor.shape == (1, 128, 128)
    np.testing.assert_array_equal(plain.prepared.geometry.matrix, eq.prepared.geometry.matrix)
    # CLAHE spreads the histogram: the equalised image is not the plain one
    assert np.abs(plain.prepared.image - eq.prepared.image).mean() > 0.02
    img = Clahe(0.01)(plain.prepared)
    assert img.image.min() >= 0 and img.image.max() <= 1
    with pytest.raises(ValueError, match="clip_limit"):
        Clahe(0.0)


def test_transforms_validate_their_arguments():
    with pytest.raises(ValueError, match="size"):
        Resize((0, 10))
    with pytest.raises(ValueError, match="value"):
        PadToSquare(2.0)
    with pytest.raises(ValueError, match="tolerance"):
        ResampleIsotropic(-1)
    with pytest.raises(ValueError, match="spec"):
        CxrPreprocessor({"size": (224, 224)})


def _with_marker(ds: pydicom.Dataset, rows: slice, cols: slice, value: int) -> pydicom.Dataset:
    """Copy of ``ds`` as uncompressed data with a constant rectangle burnt in."""
    out = copy.deepcopy(ds)
    arr = ds.pixel_array.copy()
    arr[rows, cols] = value
    out.PixelData = arr.tobytes()
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return out


def _marker_round_trip(ds, rows, cols, spec):
    """Burn a rectangle into the source at the darkest and at the brightest
    stored value; find it in model space from the two preprocessed images
    alone; map that model-space mask back to the source grid through the
    recorded geometry. Returns IoU and centroid error against the rectangle."""
    arr = ds.pixel_array
    pre = CxrPreprocessor(spec)
    a = pre.from_dicom(_with_marker(ds, rows, cols, arr.min()))
    b = pre.from_dicom(_with_marker(ds, rows, cols, arr.max()))
    diff = np.abs(b.prepared.image - a.prepared.image)
    model_mask = diff > 0.5 * diff.max()
    assert 0 < model_mask.sum() < model_mask.size / 4
    back = b.geometry.to_source(model_mask.astype(np.float32), order=1) >= 0.5
    truth = np.zeros(arr.shape, bool)
    truth[rows, cols] = True
    assert back.shape == truth.shape
    iou = (back & truth).sum() / (back | truth).sum()
    centre_error = np.abs(np.argwhere(back).mean(0) - np.argwhere(truth).mean(0))
    return iou, centre_error, b


def test_geometry_maps_model_space_back_onto_rg1(rg1):
    # non-square 1955x1841: padded, no spacing, MONOCHROME1
    iou, err, _ = _marker_round_trip(rg1, slice(300, 520), slice(1250, 1500), InputSpec(size=(224, 224)))
    assert iou > 0.85, iou
    assert np.all(err < 1955 / 224), err  # within one model pixel


def test_geometry_with_anisotropic_spacing_resamples_and_maps_back(rg1):
    ds = copy.deepcopy(rg1)
    ds.PixelSpacing = [0.2, 0.1]  # rows twice as far apart as columns
    iou, err, out = _marker_round_trip(ds, slice(600, 700), slice(300, 700), InputSpec(size=(160, 160)))
    assert any(n.startswith("resampled 1955x1841 at 0.2x0.1 mm to 3910x1841") for n in out.notes)
    assert iou > 0.8, iou
    assert np.all(err < 3910 / 160), err


@needs_data
def test_geometry_maps_model_space_back_onto_rsna(rsna):
    iou, err, _ = _marker_round_trip(rsna, slice(100, 260), slice(600, 900), InputSpec(size=(224, 224)))
    assert iou > 0.85, iou
    assert np.all(err < 1024 / 224), err


def test_geometry_maps_an_exact_model_pixel_to_its_source_block():
    # 100 x 50 source, padded to 100 x 100, resized to 10 x 10: each model
    # pixel covers a 10 x 10 source block, offset by the 25-column pad
    src = SourceImage(np.random.default_rng(0).random((100, 50), dtype=np.float32), PixelSpacing(None))
    img = CxrImage.from_source(src)
    out = Resize((10, 10))(PadToSquare()(img))
    mask = np.zeros((10, 10), np.float32)
    mask[2, 4] = 1.0  # model pixel (2, 4) -> rows 20-29, padded cols 40-49 -> source cols 15-24
    back = out.geometry.to_source(mask, order=0) > 0.5
    expected = np.zeros((100, 50), bool)
    expected[20:30, 15:25] = True
    np.testing.assert_array_equal(back, expected)
    with pytest.raises(ValueError, match="shape"):
        out.geometry.to_source(np.zeros((5, 5)))


# --------------------------------------------------------------------------- training images


@pytest.mark.skipif(not (CXR14 / "labels.csv").is_file(), reason=f"real data folder ../shared/data absent ({SHARED_DATA})")
def test_training_png_goes_through_the_same_chain():
    first = sorted((CXR14 / "images").glob("*.png"))[0]
    src = png_to_image(first)
    assert src.image.shape == (256, 256) and src.image.dtype == np.float32
    assert src.spacing.spacing is None and "PNG" in src.spacing.reason
    pre = CxrPreprocessor(InputSpec(size=(128, 128), clahe=True))
    out = pre(src)
    assert out.tensor.shape == (1, 128, 128)
    assert -1024 <= out.tensor.min() and out.tensor.max() <= 1024
    np.testing.assert_allclose(pre.to_network_input(pre.prepare(src).image), out.tensor)
