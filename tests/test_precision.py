"""``[worker] precision``: autocast on CUDA, fp32 on the CPU whatever is asked.

The CPU cases check that a pipeline's result does not depend on the setting
(bit for bit); the CUDA case runs where a GPU is present (``bench/gpu.py``
measures speed and agreement there).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from structlog.testing import capture_logs

from models.registry import ModelRegistry, sha256_file
from models.segresnet import build_segresnet
from pipelines.base import PipelineContext, Study
from pipelines.brain_tumour.model import BrainTumourModel
from pipelines.common import device as device_module
from pipelines.common.device import PRECISIONS, inference_precision


def test_the_cpu_runs_fp32_whatever_is_asked_and_says_so_once():
    device_module._log_cpu_fp32.cache_clear()
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    with capture_logs() as logs:
        for _ in range(2):
            for precision in PRECISIONS:
                with inference_precision("cpu", precision):
                    assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
                    assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    said = [entry for entry in logs if entry["event"] == "precision_ignored_on_cpu"]
    assert sorted(entry["precision"] for entry in said) == ["bf16", "fp16"]  # once each, not for fp32


@pytest.mark.parametrize("precision", ["fp64", "FP32", "bfloat16", "", "int8"])
def test_an_unknown_precision_is_refused_by_name(precision):
    with pytest.raises(ValueError, match=r"precision .* is not one of fp32, bf16, fp16"):
        inference_precision("cpu", precision)


def test_a_bad_device_is_refused_by_name():
    with pytest.raises(ValueError, match="device 'gpu'"):
        inference_precision("gpu", "bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocasts_to_the_asked_dtype():
    a = torch.ones(8, 8, device="cuda")
    with inference_precision("cuda", "fp16"):
        assert (a @ a).dtype == torch.float16
    if torch.cuda.is_bf16_supported():
        with inference_precision(torch.device("cuda"), "bf16"):
            assert (a @ a).dtype == torch.bfloat16
    with inference_precision("cuda", "fp32"):
        assert (a @ a).dtype == torch.float32


# --------------------------------------------------------------------------- pipelines on the CPU


def small_cr(rows: int = 96, columns: int = 80) -> Dataset:
    """A small synthetic frontal chest CR (12-bit MONOCHROME2, 0.5 mm pixels)."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:rows, 0:columns]
    pixels = (900 + 25 * yy + 8 * xx + rng.integers(0, 300, (rows, columns))).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Precision", "PREC1", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20250101", "120000", "1", "A1", ""
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CR", "CHEST", "PA", ["L", "F"]
    ds.SeriesNumber, ds.InstanceNumber, ds.Rows, ds.Columns = 1, 1, rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = pixels.tobytes()
    return ds


def _sr_numbers(sr: Dataset) -> list[str]:
    """Every NUMERIC value of an SR's content tree, in order."""
    out: list[str] = []

    def walk(items) -> None:
        for item in items:
            for mv in item.get("MeasuredValueSequence", []):
                out.append(str(mv.NumericValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out


def test_pneumonia_pipeline_on_the_cpu_gives_the_same_result_in_bf16():
    from pipelines.pneumonia.pipeline import PneumoniaPipeline
    from pipelines.pneumonia.settings import PneumoniaSettings

    pipeline = PneumoniaPipeline(PneumoniaSettings(), ModelRegistry())  # the demonstration weights
    ds = small_cr()
    study = Study(ds.StudyInstanceUID, {ds.SeriesInstanceUID: [ds]})
    seg32, sr32 = pipeline.run(study, PipelineContext(precision="fp32"))
    seg16, sr16 = pipeline.run(study, PipelineContext(precision="bf16"))
    assert seg16.PixelData == seg32.PixelData and seg16.SOPInstanceUID == seg32.SOPInstanceUID
    assert _sr_numbers(sr16) == _sr_numbers(sr32) and _sr_numbers(sr32)
    # the model itself, Grad-CAM included: equal bit for bit, float32 out
    a = pipeline.model.predict_dataset(ds, precision="fp32")
    b = pipeline.model.predict_dataset(ds, precision="fp16")
    assert (a.logit, a.probability) == (b.logit, b.probability)
    assert a.cam is not None and b.cam is not None and a.cam.dtype == np.float32
    assert np.array_equal(a.cam, b.cam)
    with pytest.raises(ValueError, match="precision 'half'"):
        pipeline.run(study, PipelineContext(precision="half"))


@pytest.fixture(scope="module")
def tiny_brain(tmp_path_factory) -> BrainTumourModel:
    """A small SegResNet card (seeded random weights), as in tests/test_brain_model.py."""
    from tests.test_brain_model import SMALL, small_card

    d = tmp_path_factory.mktemp("tiny-precision")
    torch.manual_seed(5)
    torch.save(build_segresnet(**SMALL).state_dict(), d / "w.pt")
    card = small_card("w.pt", sha256_file(d / "w.pt"))
    card["weights"]["dtype"] = "float32"
    (d / "tiny-brats.json").write_text(json.dumps(card))
    return BrainTumourModel(ModelRegistry([d], include_shipped=False), "tiny-brats")


def test_brain_model_on_the_cpu_gives_the_same_result_in_bf16_and_fp16(tiny_brain):
    g = np.random.default_rng(2)
    x = g.normal(size=(4, 30, 28, 20)).astype(np.float32)
    ref = tiny_brain.predict(x, spacing_mm=(1.0, 1.0, 1.0), roi=(16, 16, 16), overlap=0.25)
    assert ref.probabilities.dtype == np.float32
    for precision in ("bf16", "fp16"):
        other = tiny_brain.predict(x, spacing_mm=(1.0, 1.0, 1.0), roi=(16, 16, 16), overlap=0.25, precision=precision)
        assert np.array_equal(other.probabilities, ref.probabilities)
        assert np.array_equal(other.labels, ref.labels)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        tiny_brain.predict(x, precision="fp8")


def test_bundle_model_on_the_cpu_gives_the_same_labels_in_bf16(tmp_path):
    from pipelines.bundle_segmentation.pipeline import BundleSegmentationPipeline
    from pipelines.bundle_segmentation.settings import BundleSegmentationSettings
    from pipelines.common.volume import series_to_image
    from tests.test_bundle_segmentation import ct_series, write_bundle

    bundle = write_bundle(tmp_path / "test_organ_ct_segmentation")
    pipeline = BundleSegmentationPipeline(BundleSegmentationSettings(bundle=bundle), ModelRegistry(), device="cpu")
    volume = series_to_image(ct_series())
    ref = pipeline.model.predict(volume)
    other = pipeline.model.predict(volume, precision="bf16")
    assert torch.equal(ref.as_tensor(), other.as_tensor()) and {1, 2} <= set(torch.unique(ref).tolist())
    with pytest.raises(ValueError, match="precision"):
        pipeline.model.predict(volume, precision="tf32")
