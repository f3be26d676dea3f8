"""The generic MONAI-bundle pipeline gives what the bundle itself gives, on the CT's own grid.

The test builds, in tmp:

* a bundle in the model zoo's spleen-CT form (``configs/inference.json``:
  LoadImaged, EnsureChannelFirstd, Orientationd RAS, Spacingd, ScaleIntensityRanged
  on HU -57..164, EnsureTyped; SlidingWindowInferer; Activationsd softmax,
  AsDiscreted argmax, SaveImaged; the SupervisedEvaluator) holding a MONAI
  ``UNet`` whose top layers are set to threshold the scaled intensity
  (background / mid "liver" / bright "kidney"), the rest seeded random;
* a CT series of 32 coronal slices of 64 x 64, Rescale Slope 0.5 and
  Intercept -1024, Instance Numbers running against the slice normal, with a
  bright and a mid ellipsoid in a body: a reader that ignores the rescale,
  the orientation or the slice order gives other labels.

MONAI's own run is the bundle's ``evaluator`` (``monai.bundle.ConfigWorkflow``)
reading the DICOM files through LoadImaged(reader="PydicomReader") and saving
NIfTI with its SaveImaged; the node's run feeds the series from memory.
"""

from __future__ import annotations

import copy
import json
import time
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

pytest.importorskip("monai")
pytest.importorskip("ignite", reason="pytorch-ignite runs the bundle's own evaluator (test extra)")

from monai.networks.nets import UNet  # noqa: E402

from models.bundle_import import import_monai_bundle, import_segmentation_bundle  # noqa: E402
from models.registry import ModelRegistry, WeightsIntegrityError, sha256_file  # noqa: E402
from pipelines.base import PipelineContext, PipelineNotApplicable, Study  # noqa: E402
from pipelines.bundle_segmentation.pipeline import BundleSegmentationPipeline  # noqa: E402
from pipelines.bundle_segmentation.settings import BundleSegmentationSettings  # noqa: E402
from tests.dicom_checks import read_seg, read_sr, run_dciodvfy, seg_mask_on_source  # noqa: E402

ROWS = COLS = 64
SLICES = 32
PIXEL_SPACING = (0.9, 0.8)  # between rows, between columns (mm)
GAP = 2.5  # mm between slice centres
IOP = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # coronal: rows run to the patient's left, columns to the feet
ORIGIN = np.array([-28.0, -40.0, 30.0])  # LPS of slice 0's first pixel; slices step posterior (+y)
SLOPE, INTERCEPT = 0.5, -1024.0
# (centre LPS mm, semi-axes along x, y, z mm, HU)
BODY = ((0.0, 0.0, 0.0), (26.0, 38.0, 28.0), 0.0)
KIDNEY = ((-12.0, -15.0, 12.0), (12.0, 9.0, 11.0), 150.0)  # bright: scaled ~0.94
LIVER = ((8.0, 10.0, -8.0), (13.0, 16.0, 10.0), 60.0)  # mid: scaled ~0.53
LABELS = {"0": "background", "1": "liver", "2": "kidney"}

NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8],
           "strides": [2], "num_res_units": 0, "norm": "batch"}

# configs/inference.json in the form of the model zoo's spleen_ct_segmentation (0.5.x), small network and roi.
INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data/Task09_Spleen",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1,
         "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]},
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                   "num_workers": 4},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "output_dtype": "$np.uint8", "separate_folder": False, "resample": False},
    ]},
    "handlers": [
        {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
         "load_dict": {"model": "@network"}},
        {"_target_": "StatsHandler", "iteration_log": False},
    ],
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                  "val_handlers": "@handlers", "amp": True},
    "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
    "run": ["$@evaluator.run()"],
}

METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
    "version": "0.5.3",
    "monai_version": "1.3.0",
    "name": "Test organ CT segmentation",
    "task": "Decathlon-style CT organ segmentation",
    "description": "A test bundle: thresholds of the scaled intensity.",
    "intended_use": "Testing only.",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                             "spatial_shape": [32, 32, 32], "dtype": "float32", "value_range": [0, 1],
                             "is_patch_data": True, "channel_def": {"0": "image"}}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                             "spatial_shape": [32, 32, 32], "dtype": "float32", "value_range": [0, 1],
                             "is_patch_data": True, "channel_def": LABELS}},
    },
}


def threshold_unet() -> UNet:
    """The bundle's UNet, seeded; its first convolution and last transposed
    convolution set so that the logits are background 0.5, mid 10 f1 - 20 f2,
    bright 30 f2 with f1 = relu(mean - 0.3), f2 = relu(mean - 0.72) of the
    scaled intensity over each 3x3x3 window (the deeper branch is cut off)."""
    torch.manual_seed(20250601)
    net = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"}).eval()
    down, up = net.model[0], net.model[2]
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.copy_(torch.tensor([1.0, -0.3, -0.72, 0.0]))
        down.conv.weight[1:3] = 1.0 / 27.0
        down.adn.A.weight.zero_()  # PReLU -> ReLU
        up.conv.weight.zero_()
        up.conv.bias.zero_()
        up.conv.weight[0, 0] = 0.5  # (in, out, k, k, k): f0 = 1 -> background
        up.conv.weight[1, 1] = 10.0
        up.conv.weight[2, 1] = -20.0
        up.conv.weight[2, 2] = 30.0
    return net


def write_bundle(root: Path, inference: dict = INFERENCE, metadata: dict = METADATA) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=4))
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4))
    torch.save(threshold_unet().state_dict(), root / "models" / "model.pt")
    return root


def voxel_lps(k, r, c) -> np.ndarray:
    """Patient position (LPS mm) of slice k (ascending along the normal), row r, column c."""
    row_dir, col_dir = np.array(IOP[:3]), np.array(IOP[3:])
    normal = np.cross(row_dir, col_dir)
    return ORIGIN + k * GAP * normal + c * PIXEL_SPACING[1] * row_dir + r * PIXEL_SPACING[0] * col_dir


def phantom_hu() -> np.ndarray:
    """``(slices, rows, columns)`` HU: air, a body, the two organs, seeded noise of +-8 HU."""
    k, r, c = np.meshgrid(np.arange(SLICES), np.arange(ROWS), np.arange(COLS), indexing="ij")
    p = voxel_lps(k[..., None], r[..., None], c[..., None])
    hu = np.full((SLICES, ROWS, COLS), -1000.0)
    for centre, axes, value in (BODY, KIDNEY, LIVER):
        inside = (((p - np.array(centre)) / np.array(axes)) ** 2).sum(-1) <= 1.0
        hu[inside] = value
    return hu + np.random.default_rng(7).integers(-8, 9, size=hu.shape)


def ct_series(seed: str = "bundle-seg-test") -> list[Dataset]:
    """The phantom as CT Image Storage, slice k having Instance Number SLICES - k."""
    uid = lambda *parts: generate_uid(entropy_srcs=[seed, *map(str, parts)])  # noqa: E731
    stored = np.round((phantom_hu() - INTERCEPT) / SLOPE).astype(np.uint16)
    out = []
    for k in range(SLICES):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid("sop", k)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid("sop", k)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
        ds.FrameOfReferenceUID = uid("frame")
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^CT", "BUNDLE-CT-1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250601", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.Manufacturer = "CT", 3, "Phantom"
        ds.SeriesDescription = "Coronal CT phantom"
        ds.InstanceNumber, ds.AcquisitionNumber = SLICES - k, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:g}" for v in voxel_lps(k, 0, 0)]
        ds.ImageOrientationPatient = list(IOP)
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness, ds.KVP = GAP, 120
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = SLOPE, INTERCEPT, "HU"
        ds.PixelData = stored[k].tobytes()
        out.append(ds)
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The bundle, the series (files and datasets), the pipeline on the bundle folder and its results."""
    root = tmp_path_factory.mktemp("bundle-seg")
    bundle = write_bundle(root / "test_organ_ct_segmentation")
    series = ct_series()
    dicom_dir = root / "dicom"
    dicom_dir.mkdir()
    for ds in series:
        ds.save_as(dicom_dir / f"{ds.InstanceNumber:03d}.dcm", enforce_file_format=True)
    datasets = [pydicom.dcmread(p) for p in sorted(dicom_dir.glob("*.dcm"))]  # as the node reads them back
    pipeline = BundleSegmentationPipeline(BundleSegmentationSettings(bundle=bundle), ModelRegistry(), device="cpu")
    study = Study(datasets[0].StudyInstanceUID, {datasets[0].SeriesInstanceUID: datasets})
    context = PipelineContext(uid_prefix=None)  # the node's default, so the route test gets the same UIDs
    seg, sr = pipeline.run(study, context)
    return {"root": root, "bundle": bundle, "dicom_dir": dicom_dir, "datasets": datasets, "pipeline": pipeline,
            "seg": seg, "sr": sr, "context": context}


def monai_bundle_run(bundle: Path, dicom_dir: Path, out: Path):
    """The bundle's own evaluator on the DICOM files; its SaveImaged's NIfTI (array, affine)."""
    import nibabel as nib
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="infer",
        **{
            "bundle_root": str(bundle),
            "datalist": [str(dicom_dir)],
            "output_dir": str(out),
            "device": "$torch.device('cpu')",
            "dataloader#num_workers": 0,
            "preprocessing#transforms#0#reader": "PydicomReader",
        },
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    [saved] = list(out.rglob("*.nii.gz"))
    image = nib.load(saved)
    return np.asarray(image.dataobj), image.affine


def test_series_reader_gives_what_monai_reads_from_the_files(case):
    """HU and geometry: the in-memory series, reoriented to RAS, equals MONAI's PydicomReader of the files."""
    from monai.transforms import LoadImage, Orientation

    from pipelines.bundle_segmentation.bundle import SeriesReader
    from pipelines.common.volume import series_to_image

    volume = series_to_image(case["datasets"])
    ours = LoadImage(image_only=True, ensure_channel_first=True)(volume.series_instance_uid, reader=SeriesReader(volume))
    theirs = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(str(case["dicom_dir"]))
    ours_ras, theirs_ras = Orientation("RAS")(ours), Orientation("RAS")(theirs)
    np.testing.assert_allclose(ours_ras.affine.numpy(), theirs_ras.affine.numpy(), atol=1e-9)
    assert torch.equal(ours_ras.as_tensor(), theirs_ras.as_tensor())
    # Hounsfield units, not stored values: the kidney's centre is ~150 HU.
    centre = np.linalg.inv(ours.affine.numpy()) @ np.array([12.0, 15.0, 12.0, 1.0])  # LPS (-12, -15, 12) in RAS
    assert 140 <= float(ours[0][tuple(np.round(centre[:3]).astype(int))]) <= 160


def test_label_map_is_the_bundles_own(case, tmp_path):
    """In the network's output space our label map equals the bundle evaluator's, voxel for voxel."""
    expected, affine = monai_bundle_run(case["bundle"], case["dicom_dir"], tmp_path / "eval")
    from pipelines.common.volume import series_to_image

    ours = case["pipeline"].model.predict(series_to_image(case["datasets"]))
    got = ours.as_tensor()[0].numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(ours.affine.numpy(), affine, atol=1e-4)  # NIfTI stores float32
    fractions = {value: float((expected == value).mean()) for value in (0, 1, 2)}
    assert fractions[1] >= 0.01 and fractions[2] >= 0.01, fractions  # a comparison with content
    mismatch = int((got != expected).sum())
    assert mismatch == 0, f"{mismatch} of {expected.size} voxels differ from the bundle's own run"


def test_a_bundle_that_inverts_its_preprocessing_maps_back_exactly(case, tmp_path):
    """The model zoo's spleen bundle inverts its transforms (Invertd of @preprocessing): its pred is then on
    the fed series' own grid, and the map back onto the source grid is the identity."""
    from pipelines.bundle_segmentation.pipeline import labels_on_source_grid
    from pipelines.common.volume import series_to_image

    inverting = copy.deepcopy(INFERENCE)
    inverting["postprocessing"]["transforms"].insert(1, {
        "_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
        "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True})
    pipeline = BundleSegmentationPipeline(
        BundleSegmentationSettings(bundle=write_bundle(tmp_path / "spleen_style", inference=inverting)), ModelRegistry()
    )
    volume = series_to_image(case["datasets"])
    labels = pipeline.model.predict(volume)
    assert tuple(labels.shape) == (1, COLS, ROWS, SLICES)  # (x, y, z) of the fed series
    on_source = labels_on_source_grid(labels, volume)
    assert np.array_equal(on_source, labels.as_tensor()[0].numpy().astype(np.uint8).transpose(2, 1, 0))
    assert {1, 2} <= set(np.unique(on_source).tolist())


def test_seg_lies_on_the_ct_grid(case, tmp_path):
    seg_ds, datasets = case["seg"], case["datasets"]
    by_position = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[1]))  # along the normal (+y)
    seg = read_seg(seg_ds)
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert (seg.Rows, seg.Columns) == (ROWS, COLS)
    assert int(seg.NumberOfFrames) == SLICES * 2  # one frame per slice and segment
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == list(PIXEL_SPACING)
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == list(IOP)
    positions = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == positions[source]

    # Segments: one per output label, named by channel_def, coded by the default organ table.
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert [segments[n].SegmentLabel for n in (1, 2)] == ["liver", "kidney"]
    for number, organ in ((1, codes.SCT.Liver), (2, codes.SCT.Kidney)):
        item = segments[number]
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.SCT.AnatomicalStructure.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == organ.value
        assert item.SegmentAlgorithmName == "test_organ_ct_segmentation"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
    assert "NOT FOR DIAGNOSTIC USE" in seg.SeriesDescription and "0.5.3" in seg.SeriesDescription
    assert seg.ContentDescription == "test_organ_ct_segmentation 0.5.3 - NOT FOR DIAGNOSTIC USE"

    # Voxels checked by hand: organ centres (LPS) on the source slice and pixel they fall on.
    for (x, y, z), number in (((-12.0, -15.0, 12.0), 2), ((8.0, 10.0, -8.0), 1)):
        k = round((y - ORIGIN[1]) / GAP)
        r, c = round((ORIGIN[2] - z) / PIXEL_SPACING[0]), round((x - ORIGIN[0]) / PIXEL_SPACING[1])
        source = by_position[k]
        assert np.allclose([float(v) for v in source.ImagePositionPatient], voxel_lps(k, 0, 0))
        assert seg_mask_on_source(seg, source, number)[r, c], (number, k, r, c)
        assert not seg_mask_on_source(seg, source, 3 - number)[r, c]
    # Body (0 HU) and air are background.
    for k, r, c in ((16, 32, 2), (16, 2, 32), (1, 32, 32)):
        assert not any(seg_mask_on_source(seg, by_position[k], n)[r, c] for n in (1, 2)), (k, r, c)
    result = run_dciodvfy(seg_ds, tmp_path, name="seg.dcm")
    assert result.errors == [], result.errors


def test_sr_gives_each_segment_volume_in_ml(case, tmp_path):
    sr = read_sr(case["sr"])
    seg = case["seg"]
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription and "test_organ_ct_segmentation" in sr.SeriesDescription
    from pipelines.common.seg_frames import segment_voxel_counts

    counts = segment_voxel_counts(seg)
    voxel_ml = PIXEL_SPACING[0] * PIXEL_SPACING[1] * GAP / 1000.0
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["liver", "kidney"]
    for group, number in zip(groups, (1, 2), strict=True):
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        [volume] = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit.value == "ml"
        assert volume.value == pytest.approx(counts[number] * voxel_ml, rel=1e-9)
        assert counts[number] > 0
    # Of the order of the ellipsoids' volumes (ml, not mm^3): the network's 4.5 mm windows widen the mid
    # label (and put a rim of it around the bright object), so only within a factor of 2.
    for group, (_, axes, _) in zip(groups, (LIVER, KIDNEY), strict=True):
        [volume] = group.get_measurements(name=codes.SCT.Volume)
        ellipsoid_ml = 4 / 3 * np.pi * np.prod(axes) / 1000.0
        assert 0.5 * ellipsoid_ml <= volume.value <= 2.0 * ellipsoid_ml, (volume.value, ellipsoid_ml)
    result = run_dciodvfy(case["sr"], tmp_path, name="sr.dcm")
    assert result.errors == [], result.errors


def test_import_bundle_pins_the_card_and_refuses_tampering(case, tmp_path):
    from typer.testing import CliRunner

    from node.cli import app

    bundle = tmp_path / "bundle"
    write_bundle(bundle)
    done = CliRunner().invoke(app, ["models", "import-bundle", str(bundle), "--out", str(tmp_path / "cards"),
                                    "--pipeline", "bundle_segmentation", "--name", "organs"])
    assert done.exit_code == 0, done.output
    assert '[pipelines.bundle_segmentation] model = "organs"' in done.output
    card_path = tmp_path / "cards" / "organs.json"
    card = json.loads(card_path.read_text())
    assert card["task"] == "bundle_segmentation" and card["version"] == "0.5.3"
    assert card["bundle_output"] == {"modalities": ["CT"], "labels": {"1": "liver", "2": "kidney"}}
    assert card["weights"]["sha256"] == sha256_file(bundle / "models" / "model.pt")
    registry = ModelRegistry([tmp_path / "cards"], include_shipped=False)
    by_card = BundleSegmentationPipeline(BundleSegmentationSettings(model="organs"), registry)
    assert by_card.model_version == "organs 0.5.3"
    with pytest.raises(PipelineNotApplicable, match="reads CT"):
        mr = copy.deepcopy(case["datasets"][:2])
        for ds in mr:
            ds.Modality = "MR"
        by_card.run(Study(mr[0].StudyInstanceUID, {mr[0].SeriesInstanceUID: mr}), case["context"])

    # A pinned hash that differs, and weights changed after import: refused before loading.
    with pytest.raises(WeightsIntegrityError, match="pins"):
        BundleSegmentationPipeline(BundleSegmentationSettings(bundle=bundle, sha256="0" * 64), ModelRegistry())
    torch.save({k: v + 1 for k, v in threshold_unet().state_dict().items()}, bundle / "models" / "model.pt")
    with pytest.raises(WeightsIntegrityError, match="model.pt"):
        BundleSegmentationPipeline(BundleSegmentationSettings(model="organs"), registry)

    # The brain pipeline's importer (the CLI's default) keeps its BraTS checks: this bundle is not BraTS.
    with pytest.raises(ValueError, match="channel_def"):
        import_monai_bundle(bundle, tmp_path / "brats-cards")
    refused = CliRunner().invoke(app, ["models", "import-bundle", str(bundle), "--out", str(tmp_path / "brats-cards")])
    assert refused.exit_code == 2 and "channel_def" in refused.output
    # The generic checks name what is missing.
    broken = copy.deepcopy(METADATA)
    del broken["network_data_format"]["outputs"]["pred"]["channel_def"]
    with pytest.raises(ValueError, match="channel_def"):
        import_segmentation_bundle(write_bundle(tmp_path / "b2", metadata=broken), tmp_path / "cards")
    no_loader = copy.deepcopy(INFERENCE)
    del no_loader["preprocessing"]["transforms"][0]
    with pytest.raises(ValueError, match="LoadImaged"):
        import_segmentation_bundle(write_bundle(tmp_path / "b3", inference=no_loader), tmp_path / "cards")


@pytest.mark.integration
def test_route_sends_ct_to_the_bundle_and_results_reach_orthanc(case, tmp_path, orthanc, dcmtk):
    from tests.peers import NodeProcess, storescu, wait_for
    from tests.test_end_to_end import derived_in_orthanc, write_node_config

    route = """
[[routes]]
name = "ct-organs"
pipeline = "bundle_segmentation"
destinations = ["pacs"]
match = { Modality = ["CT"] }
"""
    config, ports = write_node_config(tmp_path, orthanc, "dicom", routes=route,
                                      completion={"series_idle_seconds": 30})
    with open(config, "a") as f:
        f.write(f'\n[pipelines.bundle_segmentation]\nbundle = "{case["bundle"]}"\n')
    node = NodeProcess(config, tmp_path)
    try:
        node.start(ports["api"], timeout=120)
        files = sorted(case["dicom_dir"].glob("*.dcm"))
        sent = storescu(files, ports["node"], "AINODE", calling_aet="CTSCANNER")
        assert sent.returncode == 0, sent.stderr
        study_uid = case["datasets"][0].StudyInstanceUID
        t = time.monotonic()
        found = wait_for(lambda: (f := derived_in_orthanc(orthanc, study_uid)) and len(f) == 2 and f, 90, 0.2,
                         "SEG and SR in Orthanc")
    finally:
        node.stop()
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1, found
    seg = pydicom.dcmread(BytesIO(orthanc.file(found["SEG"][0])))
    assert seg.SOPInstanceUID == case["seg"].SOPInstanceUID  # deterministic UIDs: the same result
    assert seg.FrameOfReferenceUID == case["datasets"][0].FrameOfReferenceUID
    assert hd.seg.segread(BytesIO(orthanc.file(found["SEG"][0]))).get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in case["datasets"]]
    ).any()
    sr = pydicom.dcmread(BytesIO(orthanc.file(found["SR"][0])))
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    print(f"\nCT series -> SEG and SR in Orthanc {time.monotonic() - t:.1f} s after the last instance")
