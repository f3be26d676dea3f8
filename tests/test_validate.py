"""``ainode validate`` on real data: the pneumonia demo model on ChestX-ray14
images wrapped as DX (the card's held-out test split, and a few training
images that the leakage check must exclude), and the brain demo model on
its one labelled case (its training case: included only with
--include-leaked, n = 1, no interval). The figures are checked against an
independent computation (scikit-learn, numpy)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from models.registry import ModelRegistry
from node.cli import app
from node.validate.scores import on_grid, read_label_map, region_metrics
from tests.peers import SHARED_DATA, node_sections, write_node_toml

runner = CliRunner()
CXR14 = SHARED_DATA / "cxr14"
TCGA = SHARED_DATA / "brats" / "TCGA-FG-6692-preprocessed"
needs_cxr14 = pytest.mark.skipif(not (CXR14 / "labels.csv").is_file(),
                                 reason=f"real data folder ../shared/data absent ({SHARED_DATA})")
needs_tcga = pytest.mark.skipif(not TCGA.is_dir(), reason=f"real data folder ../shared/data absent ({SHARED_DATA})")
N_TRAINING = 5  # training images put among the inputs: the leakage check must exclude them


def _dx(row: dict, png: Path) -> pydicom.Dataset:
    """A ChestX-ray14 PNG as a DX image (8-bit MONOCHROME2, its own study),
    with the patient's ID, sex, age and view from labels.csv; no pixel
    spacing, as the PNG carries none."""
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = row["Patient ID"], f"CXR14^{row['Patient ID']}"
    ds.PatientSex, ds.PatientAge = row["Patient Gender"], f"{int(row['Patient Age']):03d}Y"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", row["View Position"]
    ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["DERIVED", "SECONDARY"]
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = "20170101", 1, 1, row["Image Index"][:16]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    return ds


def _config(root: Path) -> Path:
    sections = node_sections(root / "node", worker={"torch_threads": 1, "device": "cpu"})  # 1: as fast as 2 on a shared CPU
    return write_node_toml(root / "node.toml", sections)


def _invoke(*args: str):
    result = runner.invoke(app, ["validate", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """The card's 187 held-out test images and N_TRAINING training images as
    DX files, replayed once through the pneumonia pipeline by validate."""
    root = tmp_path_factory.mktemp("validate-chest")
    card = ModelRegistry().card("pneumonia-densenet121-demo")
    test_patients = set(card.training_data.split.members["test"])
    training = set(card.training_data.training_members)
    rows = list(csv.DictReader((CXR14 / "labels.csv").open(newline="", encoding="utf-8")))
    chosen = [r for r in rows if r["Patient ID"] in test_patients]
    chosen += sorted((r for r in rows if r["Patient ID"] in training), key=lambda r: r["Image Index"])[:N_TRAINING]
    archive = root / "archive"
    archive.mkdir()
    labels, sop_of = [["SOPInstanceUID", "label"]], {}
    for r in chosen:
        ds = _dx(r, CXR14 / "images" / r["Image Index"])
        ds.save_as(archive / f"{Path(r['Image Index']).stem}.dcm", enforce_file_format=True)
        labels.append([ds.SOPInstanceUID, int("Pneumonia" in r["Finding Labels"].split("|"))])
        sop_of[r["Image Index"]] = ds.SOPInstanceUID
    with (root / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows(labels)
    config = _config(root)
    out = root / "results"
    result = _invoke(str(archive), "--pipeline", "pneumonia", "--labels", str(root / "labels.csv"), "--out", str(out),
                     "--threshold", "0.3", "--config", str(config))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "validation-report.json").read_text())
    return {"root": root, "out": out, "config": config, "report": report, "rows": chosen, "sop_of": sop_of,
            "test_patients": test_patients, "card": card, "output": result.output}


@needs_cxr14
def test_chest_scores_the_held_out_split_and_excludes_training_images(chest):
    report, card = chest["report"], chest["card"]
    training_sops = {chest["sop_of"][r["Image Index"]] for r in chest["rows"] if r["Patient ID"] not in chest["test_patients"]}
    assert len(training_sops) == N_TRAINING
    assert {c["key"] for c in report["leakage"]["cases"]} == training_sops
    assert all("training member(s)" in c["reason"] for c in report["leakage"]["cases"])
    assert not report["leakage"]["included"] and not set(report["scored"]) & training_sops
    s = report["classification"]
    assert report["n_scored"] == s["n"] == 187 and s["n_positive"] == 10
    assert report["model"]["card"] == card.name and report["config"]["sha256"]

    # independently: scikit-learn's AUROC and numpy's rates on the same predictions
    from sklearn.metrics import roc_auc_score

    y = np.array([c["label"] for c in s["cases"]])
    p = np.array([c["probability"] for c in s["cases"]])
    assert s["auroc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert s["auroc"]["ci95_low"] < s["auroc"]["value"] < s["auroc"]["ci95_high"]
    for name, t in (("card", card.operating_point.threshold), ("chosen", 0.3)):
        op = s["operating_points"][name]
        assert op["sensitivity"] == pytest.approx(np.mean(p[y == 1] >= t), abs=1e-6)
        assert op["specificity"] == pytest.approx(np.mean(p[y == 0] < t), abs=1e-6)
        assert op["accuracy"] == pytest.approx(np.mean((p >= t) == (y == 1)), abs=1e-6)
    assert sum(b["n"] for b in s["calibration"]) == 187 and len(s["calibration"]) == 10
    assert {g["value"] for g in s["subgroups"]["sex"]} == {"F", "M"}
    assert sum(g["n"] for g in s["subgroups"]["view"]) == 187
    assert [g["value"] for g in s["subgroups"]["manufacturer"]] == ["unknown"]  # the PNGs name no manufacturer

    page = (chest["out"] / "validation-report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and report["model"]["card_sha256"] in page
    assert "excluded from the figures" in page and "187" in page


@needs_cxr14
def test_chest_rescored_from_results_with_leaked_cases_kept(chest, tmp_path):
    result = _invoke("--results", str(chest["out"]), "--pipeline", "pneumonia", "--labels",
                     str(chest["root"] / "labels.csv"), "--include-leaked", "--report-dir", str(tmp_path),
                     "--config", str(chest["config"]))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "validation-report.json").read_text())
    assert report["n_scored"] == 187 + N_TRAINING and report["leakage"]["included"]
    assert "NOT held out" in (tmp_path / "validation-report.html").read_text()


def test_empty_mask_cases():
    empty, some = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    some[1:3, 1:3, 1:3] = True
    assert region_metrics(empty, empty, (1, 1, 1))["dice"] == 1.0
    assert region_metrics(empty, empty, (1, 1, 1))["hd95_mm"] is None
    for a, b in ((some, empty), (empty, some)):
        m = region_metrics(a, b, (1, 1, 1))
        assert m["dice"] == 0.0 and m["hd95_mm"] is None
    shifted = np.roll(some, 1, axis=0)
    m = region_metrics(shifted, some, (2.0, 1, 1))
    assert m["dice"] == pytest.approx(0.5) and m["hd95_mm"] == pytest.approx(2.0)


def test_labels_file_errors(tmp_path):
    from node.validate import read_labels

    bad = tmp_path / "labels.csv"
    bad.write_text("SOP Instance UID,label\n1.2.3,2\n")
    with pytest.raises(ValueError, match="line 2: label must be 0 or 1"):
        read_labels(bad, "classification")
    bad.write_text("PatientID,label\n1,1\n")
    with pytest.raises(ValueError, match="one of SOPInstanceUID"):
        read_labels(bad, "classification")


@needs_tcga
@pytest.mark.slow
def test_brain_case_is_its_training_case(tmp_path):
    import SimpleITK as sitk

    from node.findings import read_finding

    config = _config(tmp_path)
    study_dir, out = tmp_path / "study", tmp_path / "results"
    converted = runner.invoke(app, ["tools", "nifti-to-dicom", str(TCGA), "--out", str(study_dir), "--patient-id",
                                    "TCGA-FG-6692", "-c", str(config)])
    assert converted.exit_code == 0, converted.output
    run = runner.invoke(app, ["run", "brain_tumour", str(study_dir), "--out", str(out), "-c", str(config)])
    assert run.exit_code == 0, run.output
    seg_path = next(out.glob("SEG_*.dcm"))
    study_uid = pydicom.dcmread(seg_path, stop_before_pixels=True).StudyInstanceUID
    truth = TCGA / "TCGA-FG-6692_seg-consensus.nii.gz"
    (tmp_path / "labels.csv").write_text(f"StudyInstanceUID,label\n{study_uid},{truth}\n")
    base = ["--results", str(out), "--pipeline", "brain_tumour", "--labels", str(tmp_path / "labels.csv"), "-c", str(config)]

    refused = _invoke(*base)
    assert refused.exit_code == 2 and "training or validation members" in refused.output
    result = _invoke(*base, "--include-leaked")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "validation-report.json").read_text())
    assert report["n_scored"] == 1 and report["leakage"]["cases"][0]["key"] == study_uid
    assert "training" in report["leakage"]["cases"][0]["reason"]
    seg = report["segmentation"]
    assert seg["n"] == 1 and set(seg["per_region"]) == {"TC", "WT", "ET"}

    # independently: numpy Dice of the same label maps, and the SEG's volumes against the SR's
    from node.validate.evaluate import segment_labeller

    labeller = segment_labeller(ModelRegistry().card("brats-segresnet-demo"))
    pred, gt, spacing = on_grid(read_label_map(seg_path, labeller), sitk.ReadImage(str(truth)))
    for region, values in {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}.items():
        a, b = np.isin(pred, values), np.isin(gt, values)
        block = seg["per_region"][region]
        assert block["dice"]["mean"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-5)
        assert block["dice"]["ci95_low"] is None  # n = 1: no interval
        assert block["hd95_mm"]["mean"] > 0
    assert int(np.isin(gt, [1, 2, 4]).sum()) == 2477 + 20862 + 6840
    sr = read_finding(next(out.glob("SR_*.dcm")))
    native = read_label_map(seg_path, labeller)
    voxel_ml = float(np.prod(native.GetSpacing())) / 1000
    assert np.isin(sitk.GetArrayFromImage(native), [1, 2, 4]).sum() * voxel_ml == pytest.approx(sr.volumes_ml["WT"], rel=0.02)
    page = (out / "validation-report.html").read_text()
    assert "NOT held out" in page and "no interval" in page


def test_bootstrap_auroc_is_sklearn_on_the_resampled_cases():
    """The vectorised bootstrap statistic (resample counts as weights) equals
    scikit-learn's AUROC on the resampled cases themselves, ties included."""
    from sklearn.metrics import roc_auc_score

    from node.validate.scores import bootstrap_ci, weighted_auroc

    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(4, 40))
        y, p = rng.integers(0, 2, n), np.round(rng.random(n), 1)  # rounded: ties
        counts = rng.integers(0, 3, (1, n)).astype(float)
        drawn = np.repeat(np.arange(n), counts[0].astype(int))
        got = weighted_auroc(y, p, counts)[0]
        if 0 < y[drawn].sum() < len(drawn):
            assert got == pytest.approx(roc_auc_score(y[drawn], p[drawn]), abs=1e-12)
        else:
            assert np.isnan(got)
    y = rng.integers(0, 2, 60)
    p = 0.3 * y + rng.random(60)
    low, high, used = bootstrap_ci(lambda w: weighted_auroc(y, p, w), [str(i) for i in range(60)])
    assert low < roc_auc_score(y, p) < high and used == 2000
    assert bootstrap_ci(lambda w: w.sum(axis=1), ["one"] * 5) == (None, None, 0)
