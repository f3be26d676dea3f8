"""Inference, Grad-CAM, CAM thresholding, and the training code (smoke)."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pydicom
import pytest
import torch

from models.densenet import PNEUMONIA_INDEX, XRVDenseNet121
from models.registry import ModelRegistry, sha256_file
from pipelines.pneumonia.model import PneumoniaModel, cam_mask
from pipelines.pneumonia.preprocess import dicom_to_image
from pipelines.pneumonia.settings import PneumoniaSettings
from pipelines.pneumonia.train import TrainConfig, train_pneumonia
from pipelines.pneumonia.train_data import read_labels, split_by_patient
from pipelines.pneumonia.train_metrics import bootstrap_ci, youden_threshold
from tests.peers import REPO, SHARED_DATA

RSNA_DCM = SHARED_DATA / "cxr" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
CXR14 = SHARED_DATA / "cxr14"
DEMO = PneumoniaSettings().model
needs_cxr14 = pytest.mark.skipif(
    not (CXR14 / "labels.csv").is_file(), reason=f"real data folder ../shared/data absent ({SHARED_DATA})"
)


def _rg1() -> pydicom.Dataset:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("RG1_UNCR.dcm needs the pydicom-data package (pip install pydicom-data)")
    return pydicom.dcmread(path)


def _radiographs() -> list[pydicom.Dataset]:
    out = [_rg1()]
    if RSNA_DCM.is_file():
        out.append(pydicom.dcmread(RSNA_DCM))
    return out


@pytest.fixture(scope="module")
def demo() -> PneumoniaModel:
    return PneumoniaModel(ModelRegistry(), DEMO, device="cpu")


# --------------------------------------------------------------------------- demo weights


def test_demo_card_is_shipped_honest_and_matches_its_weights():
    reg = ModelRegistry()
    assert DEMO in reg.names()
    card = reg.card(DEMO)
    assert card.demonstration_only and "not for diagnosis" in card.intended_use.lower()
    assert card.weights.sha256 == sha256_file(reg.weights_path(DEMO))
    assert reg.weights_path(DEMO).stat().st_size < 20 * 2**20
    test_auc = [m for m in card.metrics if m.name == "AUROC Pneumonia" and m.split.startswith("held-out test")]
    assert len(test_auc) == 1 and test_auc[0].ci95_low <= test_auc[0].value <= test_auc[0].ci95_high
    assert card.operating_point is not None and 0 < card.operating_point.threshold < 1


@needs_cxr14
def test_demo_card_split_is_reproducible_from_its_seed():
    card = ModelRegistry().card(DEMO)
    split = card.training_data.split
    rec = read_labels(CXR14)
    again = split_by_patient(rec.patient_ids, rec.labels[:, PNEUMONIA_INDEX] > 0,
                             card.training.hyperparameters["test_fraction"],
                             card.training.hyperparameters["val_fraction"], split.seed)
    assert again["test"] == split.members["test"]
    assert again["val"] == split.members["val"]


def test_demo_weights_give_probabilities_and_cam_on_real_radiographs(demo):
    for ds in _radiographs():
        r = demo.predict_dataset(ds)
        assert 0.0 <= r.probability <= 1.0 and math.isfinite(r.logit)
        assert r.probability == pytest.approx(1 / (1 + math.exp(-r.logit)), abs=1e-6)  # no op_norm on this card
        assert r.cam.shape == (ds.Rows, ds.Columns) and r.cam.dtype == np.float32
        assert r.cam.min() >= 0.0 and r.cam.max() <= 1.0
        assert r.cam.max() > 0.5  # a real map, not all zeros
        assert r.cam_model.shape == tuple(demo.card.input.size)
        mask = cam_mask(r.cam, PneumoniaSettings().cam_threshold)
        assert mask.shape == (ds.Rows, ds.Columns) and mask.dtype == bool
        assert 0 < mask.sum() < mask.size
        # the CAM path reports the same logit as a plain forward pass
        assert demo.predict_dataset(ds, cam=False).logit == pytest.approx(r.logit, abs=1e-4)


def test_cam_lies_on_the_source_grid(demo):
    ds = _rg1()
    r = demo.predict_dataset(ds)
    # mapping the model-space map through the geometry gives the source-space map
    np.testing.assert_allclose(r.geometry.to_source(r.cam_model), r.cam, atol=1e-5)
    assert r.geometry.source_shape == (ds.Rows, ds.Columns)
    # the strongest source pixel lies where the strongest model pixel maps to
    peak = np.array(np.unravel_index(np.argmax(r.cam_model), r.cam_model.shape), float)
    src_peak = np.array(np.unravel_index(np.argmax(r.cam), r.cam.shape), float)
    mapped = (r.geometry.matrix @ np.append(src_peak, 1.0))[:2]
    assert np.all(np.abs(mapped - peak) <= 1.5), (mapped, peak)


def test_predictions_are_thread_safe_and_deterministic(demo):
    datasets = _radiographs()
    sources = [dicom_to_image(ds) for ds in datasets]
    expected = [demo.predict(s) for s in sources]
    results: dict[int, object] = {}

    def work(i: int) -> None:
        results[i] = demo.predict(sources[i % len(sources)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in results.items():
        e = expected[i % len(sources)]
        assert r.logit == pytest.approx(e.logit, abs=1e-5)
        np.testing.assert_allclose(r.cam, e.cam, atol=1e-5)


def test_op_norm_card_reports_normalised_probability(tmp_path):
    # a network whose pneumonia output is a constant logit, loaded through a
    # card that asks for op_norm with torchxrayvision's RSNA threshold
    net = XRVDenseNet121(op_threshs=[0.13486601] * 18)
    with torch.no_grad():
        net.class_layers.out.weight.zero_()
        net.class_layers.out.bias.fill_(math.log(0.3 / 0.7))  # sigmoid -> 0.3
    torch.save(net.state_dict(), tmp_path / "w.pt")
    card = json.loads((REPO / "models" / "templates" / "xrv-densenet121-res224-rsna.json").read_text())
    card.update(name="opnorm", weights={"format": "state_dict", "path": "w.pt", "sha256": sha256_file(tmp_path / "w.pt")})
    card["input"]["size"] = [64, 64]
    (tmp_path / "opnorm.json").write_text(json.dumps(card))
    model = PneumoniaModel(ModelRegistry([tmp_path], include_shipped=False), "opnorm")
    r = model.predict_dataset(_rg1())
    assert r.raw_probability == pytest.approx(0.3, abs=1e-6)
    assert r.probability == pytest.approx(1 - 0.7 / (2 * (1 - 0.13486601)), abs=1e-6)
    assert r.threshold == 0.5
    assert r.cam.shape == (1955, 1841)
    assert not cam_mask(r.cam, 0.5).any()  # constant output: no gradient, empty attention


def test_model_refuses_bad_device_and_segmentation_cards(tmp_path):
    with pytest.raises(ValueError, match="device"):
        PneumoniaModel(ModelRegistry(), DEMO, device="not-a-device")
    card = json.loads(ModelRegistry().card_path(DEMO).read_text())
    card["task"] = "segmentation"
    card["name"] = "seg"
    card["weights"]["path"] = str(ModelRegistry().weights_path(DEMO))
    (tmp_path / "seg.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="classification"):
        PneumoniaModel(ModelRegistry([tmp_path], include_shipped=False), "seg")


# --------------------------------------------------------------------------- cam_mask


def test_cam_mask_thresholds_at_a_fraction_of_the_maximum():
    cam = np.array([[0.0, 0.2, 0.4], [0.49, 0.5, 0.8]], np.float32)
    np.testing.assert_array_equal(cam_mask(cam, 0.5), cam >= 0.4)
    np.testing.assert_array_equal(cam_mask(cam / 2, 0.5), cam >= 0.4)  # relative to the max
    assert not cam_mask(np.zeros((4, 4)), 0.5).any()
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            cam_mask(cam, bad)
    with pytest.raises(ValueError, match="cam"):
        cam_mask(np.zeros(4), 0.5)


# --------------------------------------------------------------------------- training code


def test_split_by_patient_is_disjoint_stratified_and_reproducible():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 2}" for i in range(400)]  # two images per patient
    pos = np.zeros(400, bool)
    pos[rng.choice(400, 40, replace=False)] = True
    a = split_by_patient(patients, pos, 0.3, 0.15, seed=7)
    b = split_by_patient(patients, pos, 0.3, 0.15, seed=7)
    assert a == b
    sets = [set(v) for v in a.values()]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(patients)
    pos_patients = {p for p, y in zip(patients, pos, strict=True) if y}
    share = len(pos_patients & set(a["test"])) / len(pos_patients)
    assert abs(share - 0.3) < 0.06
    assert split_by_patient(patients, pos, 0.3, 0.15, seed=8) != a


def test_bootstrap_and_youden():
    y = np.array([0] * 50 + [1] * 10)
    s = np.concatenate([np.linspace(0, 0.6, 50), np.linspace(0.4, 1.0, 10)])
    groups = [str(i) for i in range(60)]
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(y, s)
    low, high, n = bootstrap_ci(roc_auc_score, y, s, groups, 1000, seed=0)
    assert low < auc < high and 0.5 < low and n > 950
    thr, sens, spec = youden_threshold(y, s)
    assert 0.4 <= thr <= 0.6 + 1e-9 and sens == pytest.approx(((s >= thr) & (y == 1)).sum() / 10)
    assert spec == pytest.approx(((s < thr) & (y == 0)).sum() / 50)


@needs_cxr14
def test_train_smoke_writes_a_loadable_card(tmp_path):
    cfg = TrainConfig(data_dir=CXR14, out_dir=tmp_path, name="smoke", size=32, limit=24, batch_size=4,
                      max_epochs_stage1=1, max_epochs_stage2=1, bootstrap=20, command="pytest smoke")
    result = train_pneumonia(cfg)
    assert result.card_path == tmp_path / "cards" / "smoke.json"
    assert (tmp_path / "cards" / "smoke.md").read_text().startswith("# smoke")
    reg = ModelRegistry([tmp_path / "cards"], include_shipped=False)
    card = reg.card("smoke")
    assert card.input.size == (32, 32) and card.input.clahe
    split = card.training_data.split
    assert sum(split.counts.values()) == 24 and split.positives["test"] >= 1
    model = PneumoniaModel(reg, "smoke")
    r = model.predict_dataset(_rg1(), cam=False)
    assert 0.0 <= r.probability <= 1.0
    # The card's intended-use rules: the training split's envelope, as the shipped card declares it.
    from node.config.guard import GuardSettings
    from node.guard import evaluate
    from pipelines.base import Study

    rules = {r.name: r for r in card.intended_use_rules}
    assert list(rules) == [r.name for r in ModelRegistry().card("pneumonia-densenet121-demo").intended_use_rules]
    assert set(rules["frontal_view"].match["ViewPosition"]) <= {"PA", "AP"}
    assert rules["bit_depth"].match["BitsStored"] == ["8"]  # 8-bit PNGs
    spacing = rules["pixel_spacing"].match["PixelSpacingMm"]
    assert spacing.min <= 0.139 and spacing.max >= 0.194  # labels.csv's detector spacings lie within
    ds = _rg1()
    ds.Modality, ds.ViewPosition, ds.PatientAge, ds.BitsStored = "DX", "LL", "045Y", 8
    found = evaluate(card, Study(ds.StudyInstanceUID, {ds.SeriesInstanceUID: [ds]}), GuardSettings())
    assert "frontal_view" in {d.rule for d in found} and "bit_depth" not in {d.rule for d in found}
