"""Brain tumour model side: segmentation cards, bundle loading, label map, sliding window, demo weights, training."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle_import import BRATS_TEMPLATE, import_monai_bundle
from models.card import ModelCard, SegmentationSpec
from models.registry import ModelRegistry, WeightsIntegrityError, sha256_file
from models.segresnet import build_segresnet
from pipelines.brain_tumour.model import BrainTumourModel, label_map, region_masks
from tests.conftest import shared_file
from tests.peers import SHARED_DATA

TCGA = SHARED_DATA / "brats" / "TCGA-FG-6692-preprocessed"
SMALL = {"blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 8, "in_channels": 4,
         "out_channels": 3, "dropout_prob": 0.2}


def template() -> dict:
    return json.loads(BRATS_TEMPLATE.read_text())


def small_card(weights: str, sha: str, roi=(16, 16, 16), spacing=(2.0, 2.0, 2.0)) -> dict:
    """A ``monai-segresnet`` state-dict card in the demo's shape, from the bundle template."""
    card = template()
    card.update(name="tiny-brats", version="0.0.1", demonstration_only=True)
    card["architecture"] = {"name": "monai-segresnet", "params": dict(SMALL)}
    card["volume_input"]["spacing_mm"] = list(spacing)
    card["segmentation"]["sliding_window"]["roi_size"] = list(roi)
    card["weights"] = {"format": "state_dict", "path": weights, "sha256": sha, "dtype": "float16"}
    return card


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A registry with one small SegResNet card (seeded random weights stored as float16)."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(3)
    net = build_segresnet(**SMALL)
    torch.save({k: v.half() for k, v in net.state_dict().items()}, d / "w.pt")
    (d / "tiny-brats.json").write_text(json.dumps(small_card("w.pt", sha256_file(d / "w.pt"))))
    return ModelRegistry([d], include_shipped=False)


def write_bundle(root: Path, params: dict = SMALL, roi=(16, 16, 16)) -> Path:
    from tests.test_bundle_parity import INFERENCE, METADATA

    cfg = copy.deepcopy(INFERENCE)
    cfg["network_def"] = {"_target_": "SegResNet", **params}
    cfg["inferer"]["roi_size"] = list(roi)
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=4))
    torch.manual_seed(5)
    from monai.networks.nets import SegResNet

    torch.save(SegResNet(**params).state_dict(), root / "models" / "model.pt")
    return root


# --------------------------------------------------------------------------- cards


def test_bundle_template_is_a_valid_segmentation_card_once_filled():
    data = template()
    data.update(name="brats", version="0.4.2",
                weights={"format": "monai_bundle", "path": "/b", "sha256": "0" * 64, "config_sha256": "1" * 64})
    card = ModelCard(**data)
    seg = card.segmentation
    assert card.volume_input.channels == ["T1c", "T1", "T2", "FLAIR"]
    assert seg.sliding_window.roi_size == (240, 240, 160) and seg.sliding_window.overlap == 0.5
    assert [(r.channel, r.label) for r in seg.label_rules] == [("ET", 4), ("TC", 1), ("WT", 2)]
    assert {m.name: m.value for m in card.metrics} == {"Dice TC": 0.8559, "Dice WT": 0.9026, "Dice ET": 0.7905,
                                                        "Mean Dice": 0.8518}
    assert all("bundle authors" in m.split for m in card.metrics)


@pytest.mark.parametrize(
    ("change", "attribute"),
    [
        (lambda d: d.pop("segmentation"), "segmentation"),
        (lambda d: d.update(input={"size": [224, 224]}), "input"),
        (lambda d: d["volume_input"].update(channels=["T1c", "T1c", "T2", "FLAIR"]), "volume_input.channels"),
        (lambda d: d["volume_input"].update(spacing_mm=[0, 1, 1]), "volume_input.spacing_mm"),
        (lambda d: d["volume_input"].update(array_axes="yxz"), "volume_input.array_axes"),
        (lambda d: d["segmentation"]["label_rules"].append({"channel": "NCR", "label": 3, "name": "x"}),
         "segmentation"),
        (lambda d: d["segmentation"]["regions"].update(ET=[4, 7]), "segmentation"),
        (lambda d: d["segmentation"]["sliding_window"].update(overlap=1.0), "segmentation.sliding_window.overlap"),
        (lambda d: d["segmentation"]["sliding_window"].update(roi_size=[4, 240, 160]),
         "segmentation.sliding_window.roi_size"),
        (lambda d: d["segmentation"].update(threshold=1.5), "segmentation.threshold"),
        (lambda d: d["architecture"]["params"].update(out_channels=2), "segmentation.channels"),
        (lambda d: d["weights"].update(config_sha256="1" * 64), "config_sha256"),
    ],
)
def test_invalid_segmentation_card_names_the_attribute(change, attribute):
    data = small_card("w.pt", "0" * 64)
    change(data)
    with pytest.raises(ValueError, match=attribute.replace(".", r"\.")):
        ModelCard(**data)


# --------------------------------------------------------------------------- bundle loading


def test_bundle_loads_strictly_and_refuses_tampering(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    card_path = import_monai_bundle(bundle, tmp_path / "cards", name="b")
    card = json.loads(card_path.read_text())
    assert card["weights"]["sha256"] == sha256_file(bundle / "models" / "model.pt")
    assert card["weights"]["config_sha256"] == sha256_file(bundle / "configs" / "inference.json")
    assert card["version"] == "0.4.2" and card["segmentation"]["sliding_window"]["roi_size"] == [16, 16, 16]
    reg = ModelRegistry([tmp_path / "cards"], include_shipped=False)
    net = reg.load("b")
    expected = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())

    # a changed config is code that changed: refused before ConfigParser reads it
    cfg_file = bundle / "configs" / "inference.json"
    original = cfg_file.read_bytes()
    cfg_file.write_bytes(original.replace(b'"overlap": 0.5', b'"overlap": 0.25'))
    with pytest.raises(WeightsIntegrityError, match="inference.json"):
        reg.load("b")
    cfg_file.write_bytes(original)

    # weights that do not fit network_def exactly: SHA-256 refused first; re-hashed, strict loading refuses
    sd = dict(expected)
    del sd["conv_final.2.conv.bias"]
    torch.save(sd, bundle / "models" / "model.pt")
    with pytest.raises(WeightsIntegrityError, match="model.pt"):
        reg.load("b")
    card["weights"]["sha256"] = sha256_file(bundle / "models" / "model.pt")
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="conv_final.2.conv.bias"):
        ModelRegistry([tmp_path / "cards"], include_shipped=False).load("b")

    # the card must describe network_def (the pipeline trusts its channel counts)
    card["architecture"]["params"] = {**SMALL, "init_filters": 16}
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="network_def"):
        ModelRegistry([tmp_path / "cards"], include_shipped=False).load("b")


def test_import_refuses_another_channel_order(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["channel_def"] = {"0": "FLAIR", "1": "T1", "2": "T1c", "3": "T2"}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="channel_def"):
        import_monai_bundle(bundle, tmp_path / "cards")


# --------------------------------------------------------------------------- label map


def test_label_map_follows_the_brats_priority_exactly():
    seg = SegmentationSpec(**template()["segmentation"])
    combos = list(itertools.product([False, True], repeat=3))  # (TC, WT, ET)
    # on = exactly the threshold (AsDiscrete uses >=), off = just below it
    probs = np.array([[0.5 if on else np.nextafter(np.float32(0.5), np.float32(0)) for on in c] for c in combos],
                     dtype=np.float32).T.reshape(3, len(combos), 1, 1)
    labels = label_map(probs, seg)[:, 0, 0]
    for (tc, wt, et), got in zip(combos, labels, strict=True):
        want = 4 if et else 1 if tc else 2 if wt else 0
        assert got == want, f"TC={tc} WT={wt} ET={et}: got {got}, want {want}"
    assert labels.dtype == np.uint8
    # regions of the labels: TC = {1, 4}, WT = {1, 2, 4}, ET = {4}
    masks = region_masks(np.array([0, 1, 2, 4], dtype=np.uint8), seg.regions)
    assert masks["TC"].tolist() == [False, True, False, True]
    assert masks["WT"].tolist() == [False, True, True, True]
    assert masks["ET"].tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="probabilities"):
        label_map(np.zeros((2, 4, 4, 4)), seg)


# --------------------------------------------------------------------------- sliding window


def _volume(shape, seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    x = g.normal(size=(4, *shape)).astype(np.float32)
    x[:, :2] = 0.0  # background slices, as outside a skull-stripped brain
    return x


def test_sliding_window_on_a_small_input(tiny):
    model = BrainTumourModel(tiny, "tiny-brats")
    assert model.channels == ("T1c", "T1", "T2", "FLAIR")
    assert model.input_spacing_mm == (2.0, 2.0, 2.0) and model.spatial_multiple == 8
    # smaller than the roi on every side: zero-padded to it, cropped back
    x = _volume((10, 12, 9))
    pred = model.predict(x)
    assert pred.labels.shape == (10, 12, 9) and pred.labels.dtype == np.uint8
    assert pred.probabilities.shape == (3, 10, 12, 9) and pred.probabilities.dtype == np.float32
    assert set(np.unique(pred.labels).tolist()) <= {0, 1, 2, 4}
    assert np.array_equal(pred.labels, label_map(pred.probabilities, model.card.segmentation))
    # several windows with overlap, roi and overlap from the settings
    big = _volume((40, 36, 28), seed=1)
    p2 = model.predict(big, roi=(16, 24, 16), overlap=0.25)
    assert p2.labels.shape == (40, 36, 28)
    # a 1 mm input is resampled to the card's 2 mm and the answer comes back on the 1 mm grid
    p3 = model.predict(big, spacing_mm=(1.0, 1.0, 1.0))
    assert p3.labels.shape == (40, 36, 28) and p3.spacing_mm == (1.0, 1.0, 1.0)
    assert not np.array_equal(p3.probabilities, p2.probabilities)
    vol = p3.volumes_ml()
    assert vol["WT"] == pytest.approx(np.isin(p3.labels, [1, 2, 4]).sum() / 1000.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": np.zeros((3, 8, 8, 8), np.float32)}, "x: expected"),
        ({"x": np.zeros((4, 8, 8), np.float32)}, "x: expected"),
        ({"x": np.zeros((4, 8, 8, 8), np.int16)}, "dtype"),
        ({"x": np.full((4, 8, 8, 8), np.nan, np.float32)}, "NaN"),
        ({"roi": (16, 12, 16)}, "roi"),
        ({"overlap": 1.0}, "overlap"),
        ({"spacing_mm": (1.0, 0.0, 1.0)}, "spacing_mm"),
    ],
)
def test_predict_validates_its_arguments(tiny, kwargs, match):
    model = BrainTumourModel(tiny, "tiny-brats")
    args = {"x": np.zeros((4, 8, 8, 8), np.float32), **kwargs}
    with pytest.raises(ValueError, match=match):
        model.predict(args.pop("x"), **args)


def test_model_refuses_classification_cards_and_bad_devices(tiny):
    with pytest.raises(ValueError, match="segmentation"):
        BrainTumourModel(ModelRegistry(), "pneumonia-densenet121-demo")
    with pytest.raises(ValueError, match="device"):
        BrainTumourModel(tiny, "tiny-brats", device="tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            BrainTumourModel(tiny, "tiny-brats", device="cuda")


# --------------------------------------------------------------------------- demo weights


@pytest.fixture(scope="module")
def demo():
    return BrainTumourModel(ModelRegistry(), "brats-segresnet-demo")


def test_demo_card_is_honest_and_weights_load(demo):
    card = demo.card
    assert card.demonstration_only and "not for diagnosis" in card.intended_use.lower()
    assert card.weights.sha256 == sha256_file(ModelRegistry().weights_path(card.name))
    assert ModelRegistry().weights_path(card.name).stat().st_size < 5_000_000
    held_out = [m for m in card.metrics if m.split.startswith("held-out")]
    assert sorted(m.name for m in held_out) == ["Dice ET", "Dice TC", "Dice WT"]
    assert all("optimistic" in m.split for m in held_out)
    assert card.training and card.training.wall_time_s <= 35 * 60
    pred = demo.predict(_volume((48, 56, 40)), spacing_mm=(1.0, 1.0, 1.0))
    assert set(np.unique(pred.labels).tolist()) <= {0, 1, 2, 4}


def test_demo_model_finds_the_tumour_of_the_tcga_case(demo):
    """The demo weights on the whole real case, through the deployment path; the floor sits below the
    figure in the card (that figure includes the voxels the model was trained on)."""
    from pipelines.brain_tumour.train_data import dice, find_brats_cases, load_case

    shared_file(TCGA / "TCGA-FG-6692_seg-consensus.nii.gz")
    (case,) = find_brats_cases(TCGA)
    image, label, spacing = load_case(case, demo.channels)
    pred = demo.predict(image, spacing_mm=spacing)
    assert set(np.unique(pred.labels).tolist()) <= {0, 1, 2, 4}
    wt = dice(pred.region_masks()["WT"], np.isin(label, [1, 2, 4]))
    card_wt = next(m.value for m in demo.card.metrics if m.name == "Dice WT" and m.split.startswith("whole case"))
    assert wt == pytest.approx(card_wt, abs=0.01)
    assert wt >= 0.5


#: WT Dice floor of the whole pipeline (DICOM in, SEG out) on TCGA-FG-6692 with the demonstration weights,
#: preprocessed as the card says the model was trained (no N4). Measured 0.643 here, the card's whole-case
#: figure through the model alone (0.599 with N4 on, which shifts the intensities from what the model
#: saw). The floor leaves room for CPU arithmetic differences, not for a model that lost the
#: tumour. The case is the demo model's training case (its held-out slab is part of it): this is a floor,
#: not a performance claim.
PIPELINE_WT_DICE_FLOOR = 0.60
#: The same patient and session as acquired (TCGA-FG-6692-raw: 26 axial slices of 5.5 mm, not
#: co-registered, not skull-stripped) must give nearly the same whole tumour as the BraTS-preprocessed
#: study. Measured (ml, raw vs preprocessed) WT 15.37 vs 15.05 (+2 %), TC 3.33 vs 4.57, ET 2.65 vs 4.02
#: (thick slices blur the small core); with N4 on (not as trained) WT was 5.94 vs 13.61 (-56 %).
RAW_WT_TOLERANCE = 0.25
TCGA_RAW = SHARED_DATA / "brats" / "TCGA-FG-6692-raw"


@pytest.fixture(scope="module")
def brain_pipeline():
    """One pipeline with the node's default settings (the demo card, N4 as the card says)."""
    from pipelines.brain_tumour.pipeline import BrainTumourPipeline
    from pipelines.brain_tumour.settings import BrainTumourSettings

    return BrainTumourPipeline(BrainTumourSettings(), ModelRegistry())


def _run_from_dicom(pipeline, case: Path, out: Path):
    """Convert ``case`` with the project's converter (as ``ainode tools nifti-to-dicom`` does), read the
    files back and run ``pipeline`` on the study; returns (series by role, SEG, context)."""
    import pydicom

    from pipelines.base import PipelineContext, Study
    from pipelines.brain_tumour.convert import nifti_to_dicom

    converted = nifti_to_dicom(case, out, patient_name="TCGA^FG6692", patient_id="TCGA-FG-6692")
    series = {role: [pydicom.dcmread(p) for p in s.paths] for role, s in converted.series.items()}
    study = Study(
        study_instance_uid=converted.study_instance_uid,
        series={datasets[0].SeriesInstanceUID: datasets for datasets in series.values()},
        roles={role: datasets[0].SeriesInstanceUID for role, datasets in series.items()},
    )
    context = PipelineContext()
    seg, _ = pipeline.run(study, context)
    return series, seg, context


@pytest.fixture(scope="module")
def tcga_run(brain_pipeline, tmp_path_factory):
    """The BraTS-preprocessed TCGA case through the pipeline from DICOM (shared by two tests)."""
    shared_file(TCGA / "TCGA-FG-6692_seg-consensus.nii.gz")
    return _run_from_dicom(brain_pipeline, TCGA, tmp_path_factory.mktemp("tcga"))


def _volumes_ml(series, seg) -> dict[str, float]:
    from pipelines.brain_tumour.write import measure_volumes

    volumes = measure_volumes(series["T1c"], seg)
    return {name: volumes.ml(name) for name in ("WT", "TC", "ET")}


@pytest.mark.slow
def test_pipeline_follows_the_card_on_bias_field_correction(brain_pipeline):
    assert brain_pipeline.model.card.volume_input.bias_field_correction is False
    assert brain_pipeline.n4 is False and brain_pipeline.algorithm.parameters["n4"] == "off"


@pytest.mark.slow
def test_pipeline_wt_dice_on_the_tcga_case_from_dicom(tcga_run):
    """The pipeline as the node runs it: the TCGA case converted to a DICOM MR study, read back,
    preprocessed as trained (no N4), segmented, written as a SEG; the SEG's whole tumour, read back with
    highdicom slice by slice, against the consensus labels resampled (nearest) onto the T1c series."""
    import SimpleITK as sitk

    from pipelines.brain_tumour.train_data import dice
    from pipelines.brain_tumour.volume import series_to_image
    from tests.dicom_checks import read_seg
    from tests.test_brain_write import slice_masks

    series, seg, context = tcga_run
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "n4=off" in algorithm.AlgorithmParameters.split(","), algorithm.AlgorithmParameters
    consensus = TCGA / "TCGA-FG-6692_seg-consensus.nii.gz"
    reference = series_to_image(series["T1c"])
    predicted_wt = slice_masks(read_seg(seg), list(reference.datasets)).any(-1)
    truth = sitk.Resample(sitk.ReadImage(str(consensus)), reference.image, sitk.Transform(), sitk.sitkNearestNeighbor)
    truth_wt = np.isin(sitk.GetArrayFromImage(truth), [1, 2, 4])
    assert truth_wt.sum() == 2477 + 20862 + 6840  # all of the consensus lands on the series
    wt = dice(predicted_wt, truth_wt)
    print(f"\npipeline WT Dice on TCGA-FG-6692 (from DICOM, N4 off as trained): {wt:.4f}; "
          f"volumes {_volumes_ml(series, seg)}; stages {context.timings}")
    assert wt >= PIPELINE_WT_DICE_FLOOR, wt


@pytest.mark.slow
def test_raw_scanner_study_gives_the_whole_tumour_of_the_preprocessed_one(brain_pipeline, tcga_run, tmp_path):
    """The scanner-space series of the same session (thick slices, not registered, not skull-stripped:
    outside the card's intended-use envelope, so the node would warn or refuse; a direct pipeline call runs
    no guard) through the same pipeline: WT within RAW_WT_TOLERANCE of the preprocessed study's."""
    shared_file(TCGA_RAW / "T1_AX_OtherEXampleTCIA_TCGA-FG-6692_Si_TCGA-FG-6692_T1_AX_SE_10_se2d1_t1.nii.gz")
    preprocessed = _volumes_ml(*tcga_run[:2])
    series, seg, context = _run_from_dicom(brain_pipeline, TCGA_RAW, tmp_path)
    raw = _volumes_ml(series, seg)
    assert brain_pipeline.extractor._extractor is not None  # deepbet stripped the raw study
    print("\nTCGA-FG-6692 ml, raw vs preprocessed (N4 off): "
          + "; ".join(f"{k} {raw[k]:.2f} vs {preprocessed[k]:.2f} ({raw[k] / preprocessed[k] - 1:+.0%})"
                      for k in raw))
    assert raw["WT"] == pytest.approx(preprocessed["WT"], rel=RAW_WT_TOLERANCE), (raw, preprocessed)


# --------------------------------------------------------------------------- training


def _write_case(folder: Path, name: str, style: str, seed: int, shape=(32, 40, 64)) -> None:
    """A synthetic BraTS-like case (D, H, W at 1 mm): four sequences and a spherical lesion with a
    core, an enhancing rim and oedema. ``style`` picks BraTS 2023 (``-t1n``..., ET = 3) or 2020 names."""
    import SimpleITK as sitk

    g = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    centre = (shape[0] // 2, shape[1] // 2, 22 + seed % 8)
    r = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    brain = ((zz - shape[0] / 2) / 15) ** 2 + ((yy - shape[1] / 2) / 19) ** 2 + ((xx - shape[2] / 2) / 30) ** 2 <= 1
    label = np.zeros(shape, np.uint8)
    label[r < 12] = 2
    label[r < 8] = 4
    label[r < 5] = 1
    label[~brain] = 0
    base = {"t1": 400, "t1c": 450, "t2": 600, "flair": 500}
    bright = {"t1": (0, -150, -50), "t1c": (0, 500, -100), "t2": (300, 100, 400), "flair": (350, 100, 200)}
    folder.mkdir(parents=True)
    names = ({"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"} if style == "2023" else
             {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"})
    sep = "-" if style == "2023" else "_"
    for seq, (ed, et, core) in bright.items():
        img = base[seq] + g.normal(0, 30, shape) + ed * (label == 2) + et * (label == 4) + core * (label == 1)
        img[~brain] = 0
        sitk.WriteImage(sitk.GetImageFromArray(img.astype(np.int16)), str(folder / f"{name}{sep}{names[seq]}.nii.gz"))
    out = label.copy()
    if style == "2023":
        out[label == 4] = 3
    sitk.WriteImage(sitk.GetImageFromArray(out), str(folder / f"{name}{sep}{names['seg']}.nii.gz"))


def test_find_cases_reads_brats_2020_2023_and_tcga_names(tmp_path):
    from pipelines.brain_tumour.train_data import find_brats_cases

    for case, files in {
        "BraTS20_Training_001": ["_t1", "_t1ce", "_t2", "_flair", "_seg"],
        "BraTS-GLI-00000-000": ["-t1n", "-t1c", "-t2w", "-t2f", "-seg"],
        "TCGA-FG-6692": ["_t1", "_t1c", "_t2", "_fla", "_seg-consensus"],
        "unlabelled": ["-t1n", "-t1c", "-t2w", "-t2f"],
    }.items():
        (tmp_path / case).mkdir()
        for suffix in files:
            (tmp_path / case / f"{case}{suffix}.nii.gz").write_bytes(b"")
    cases = {c.case_id: c for c in find_brats_cases(tmp_path)}
    assert sorted(cases) == ["BraTS-GLI-00000-000", "BraTS20_Training_001", "TCGA-FG-6692", "unlabelled"]
    assert cases["BraTS20_Training_001"].images["T1c"].name.endswith("_t1ce.nii.gz")
    assert cases["BraTS20_Training_001"].images["T1"].name.endswith("_t1.nii.gz")
    assert cases["BraTS-GLI-00000-000"].images["FLAIR"].name.endswith("-t2f.nii.gz")
    assert cases["TCGA-FG-6692"].label.name.endswith("_seg-consensus.nii.gz")
    assert cases["unlabelled"].label is None


@pytest.mark.parametrize("n_cases", [1, 3])
def test_training_smoke_run_writes_a_loadable_card(tmp_path, n_cases):
    from pipelines.brain_tumour.train import TrainConfig, train_brain_tumour
    from pipelines.brain_tumour.train_data import find_brats_cases, load_case

    data = tmp_path / "data"
    for i in range(n_cases):
        _write_case(data / f"case{i}", f"BraTS-GLI-0000{i}-000", "2023" if i % 2 == 0 else "2020", seed=i)
    image, label, spacing = load_case(find_brats_cases(data)[0])
    assert image.shape == (4, 32, 40, 64) and spacing == (1.0, 1.0, 1.0)
    assert set(np.unique(label).tolist()) == {0, 1, 2, 4}  # BraTS 2023's ET = 3 read as 4
    assert abs(float(image[0][image[0] != 0].mean())) < 1e-3  # z-scored over the brain

    result = train_brain_tumour(TrainConfig(
        data_dir=data, out_dir=tmp_path / "out", name="smoke", crop=(16, 16, 16), spacing_mm=2.0, max_steps=2,
        eval_every=2, time_budget_s=120, batch_size=2, threads=2, checkpoint_dir=tmp_path / "ckpt"))
    card = result.card
    assert result.card_path.is_file() and result.card_path.with_suffix(".md").is_file()
    assert card.training.hyperparameters["steps_run"] == 2
    # Intended-use rules from the training volumes' grids (1 mm, 32 axial slices), named as the shipped card's.
    rules = {r.name: r for r in card.intended_use_rules}
    assert set(rules) == {r.name for r in ModelRegistry().card("brats-segresnet-demo").intended_use_rules}
    assert rules["slice_thickness"].match["SliceThickness"].max == 1.5
    assert (rules["pixel_spacing"].match["PixelSpacingMm"].min, rules["pixel_spacing"].match["PixelSpacingMm"].max) == (0.8, 1.2)
    assert rules["slice_count"].match["NumberOfSlices"].min == int(32 * 0.65)
    assert rules["sequence_flair"].applies_to == "FLAIR"
    assert (tmp_path / "ckpt" / "smoke-best.pt").is_file()
    held = [m for m in card.metrics if m.split.startswith("held-out")]
    assert sorted(m.name for m in held) == ["Dice ET", "Dice TC", "Dice WT"]
    if n_cases == 1:
        assert card.training_data.split.method.startswith("in space")
    else:
        assert card.training_data.split.method.startswith("by case")
        assert len(card.training_data.split.members["test"]) == 1
    model = BrainTumourModel(ModelRegistry([tmp_path / "out" / "cards"], include_shipped=False), "smoke")
    pred = model.predict(image, spacing_mm=spacing)
    assert pred.labels.shape == (32, 40, 64)
    assert set(np.unique(pred.labels).tolist()) <= {0, 1, 2, 4}
    # The input-drift reference: one sample per labelled case, the geometry of the NIfTI grid, the z-scored input.
    ref = card.drift_reference
    assert ref is not None and ref.n == n_cases and "Input-drift reference" in result.card_path.with_suffix(".md").read_text()
    assert sorted(ref.features) == ["intensity_mean", "intensity_std", "photometric_interpretation", "pixel_spacing_mm",
                                    "score", "slice_thickness_mm"]  # no Manufacturer, age, view or bits: NIfTI has none
    assert ref.features["slice_thickness_mm"].quantiles == [1.0] * 101 and ref.features["pixel_spacing_mm"].n == n_cases
    assert ref.features["intensity_std"].quantiles[0] == pytest.approx(float(image.std()), abs=1e-5)
    assert ref.features["score"].quantiles[0] >= 0.0
    if n_cases == 1:  # `ainode models reference` on the NIfTI folder gives what training wrote
        from typer.testing import CliRunner

        from node.cli import app

        before = card.drift_reference
        out = CliRunner().invoke(app, ["models", "reference", str(result.card_path), "--data", str(data), "--threads", "1"])
        assert out.exit_code == 0, out.output
        again = ModelCard.from_file(result.card_path).drift_reference
        assert again is not None and again.features == before.features and again.source.startswith("1 BraTS-style NIfTI")
