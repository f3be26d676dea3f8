"""Input-drift monitoring (node.drift, models.drift_reference): PSI and KS
against hand computations; the sliding window, the minimum count and the
restart from the index; and the real chest pipeline on real ChestX-ray14
images wrapped as DX: in-distribution input stays below every threshold,
and the same images sent as 16-bit MONOCHROME1 at 0.1 mm pixels move the
gauges past theirs. One check goes through a running node."""

from __future__ import annotations

import csv
import math
import random
import time

import numpy as np
import pydicom
import pytest
import torch

from models.card import ModelCard
from models.drift_reference import (
    ABSENT,
    DriftFeature,
    DriftReference,
    FeatureReference,
    build_reference,
    dicom_features,
    ks_statistic,
    proportions,
    psi,
)
from models.registry import SHIPPED_CARDS, ModelRegistry
from node.config.drift import DriftSection
from node.drift import DriftMonitor
from node.index import Index
from node.metrics import Metrics
from pipelines.base import PipelineContext, Study
from pipelines.pneumonia.preprocess import dicom_to_image
from tests.peers import SHARED_DATA
from tests.test_validate import _dx as wrap_as_dx

CXR14 = SHARED_DATA / "cxr14"
needs_cxr14 = pytest.mark.skipif(not (CXR14 / "labels.csv").is_file(),
                                 reason=f"real data folder ../shared/data absent ({SHARED_DATA})")
CARD = SHIPPED_CARDS / "pneumonia-densenet121-demo.json"
N = 40  # jobs per distribution (the default [drift] min_count is 30)


# ---------------------------------------------------------------------------- statistics


def test_psi_matches_hand_computation():
    # (0.5 - 0.8) ln(0.5 / 0.8) + (0.5 - 0.2) ln(0.5 / 0.2) = 0.14100 + 0.27489
    assert psi({"a": 0.5, "b": 0.5}, {"a": 0.8, "b": 0.2}) == pytest.approx(0.415888, abs=1e-6)
    assert psi({"a": 0.3, "b": 0.7}, {"a": 0.3, "b": 0.7}) == 0.0
    # A category seen on one side only is floored at 1e-4: 2 (1 - 1e-4) ln(1e4).
    assert psi({"MONOCHROME1": 1.0}, {"MONOCHROME2": 1.0}) == pytest.approx(2 * 0.9999 * math.log(1e4))
    assert proportions(["8", "16", "8", "8"]) == {"16": 0.25, "8": 0.75}


def test_ks_matches_hand_computation():
    # CDFs of {1,2,3,4} and {3,4,5,6}: at x = 2 they are 0.5 and 0, the largest gap.
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([10, 11], [1, 2, 3]) == 1.0


def test_reference_is_typed_and_names_what_is_wrong():
    ref = build_reference([{"bits_stored": "8", "score": float(i)} for i in range(201)], "201 synthetic samples")
    assert ref.features[DriftFeature.BITS_STORED].frequencies == {"8": 1.0}
    q = ref.features[DriftFeature.SCORE].quantiles
    assert q is not None and len(q) == 101 and q[0] == 0 and q[50] == 100 and q[100] == 200
    with pytest.raises(ValueError, match="features.score: a numeric feature needs quantiles"):
        DriftReference(source="x", n=1, features={"score": FeatureReference(n=1, frequencies={"a": 1.0})})
    with pytest.raises(ValueError, match="sum to"):
        FeatureReference(n=2, frequencies={"a": 0.4})
    with pytest.raises(ValueError, match="no samples"):
        build_reference([], "nothing")
    ds = pydicom.Dataset()
    ds.PatientAge, ds.ImagerPixelSpacing, ds.BitsStored = "006M", [0.15, 0.15], 12
    assert dicom_features(ds) == {
        DriftFeature.MANUFACTURER: ABSENT, DriftFeature.VIEW_POSITION: ABSENT,
        DriftFeature.PHOTOMETRIC_INTERPRETATION: ABSENT, DriftFeature.BITS_STORED: "12",
        DriftFeature.PATIENT_AGE: 0.5, DriftFeature.PIXEL_SPACING: 0.15,
    }


# ---------------------------------------------------------------------------- the monitor


def _reference() -> DriftReference:
    return build_reference([{"photometric_interpretation": "MONOCHROME2", "pixel_spacing_mm": 0.1 + i / 1000}
                            for i in range(100)], "synthetic")


def _value(metrics: Metrics, name: str, feature: str, **extra) -> float | None:
    return metrics.registry.get_sample_value(name, {"pipeline": "p", "model_version": "m 1", "feature": feature, **extra})


def test_window_min_count_alert_and_restart_from_the_index(tmp_path):
    settings = DriftSection(window=10, min_count=4)
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    metrics = Metrics()
    monitor = DriftMonitor(settings, metrics, index)
    key, ref = ("p", "m 1"), _reference()
    for i in range(3):  # below min_count: no statistic, no alert
        drift = monitor.observe_features(key, {"photometric_interpretation": "MONOCHROME1", "pixel_spacing_mm": 0.5},
                                         "card", ref, job_id=i)
    assert [f.value for f in drift.features] == [None, None] and not drift.alerts
    assert _value(metrics, "ainode_input_drift_alert", "photometric_interpretation") == 0
    assert _value(metrics, "ainode_input_drift", "photometric_interpretation", statistic="psi") is None
    drift = monitor.observe_features(key, {"photometric_interpretation": "MONOCHROME1", "pixel_spacing_mm": 0.5},
                                     "card", ref)
    assert drift.alerts == ["photometric_interpretation", "pixel_spacing_mm"]
    assert _value(metrics, "ainode_input_drift", "pixel_spacing_mm", statistic="ks") == 1.0
    assert _value(metrics, "ainode_input_drift_alert", "photometric_interpretation") == 1
    for i in range(10):  # the window slides: ten in-distribution jobs replace the four shifted ones
        drift = monitor.observe_features(
            key, {"photometric_interpretation": "MONOCHROME2", "pixel_spacing_mm": 0.105 + i / 100}, "card", ref
        )
    assert drift.jobs == 10 and not drift.alerts
    assert _value(metrics, "ainode_input_drift", "photometric_interpretation", statistic="psi") == 0.0
    in_distribution_ks = _value(metrics, "ainode_input_drift", "pixel_spacing_mm", statistic="ks")
    assert in_distribution_ks is not None and in_distribution_ks <= 0.06
    # A restart: a new monitor over the same index has the same window, reference and gauges.
    metrics2 = Metrics()
    again = DriftMonitor(settings, metrics2, Index(f"sqlite:///{tmp_path / 'index.db'}"))
    again.refresh()
    [restored] = again.report()
    assert restored == drift
    assert metrics2.registry.get_sample_value(
        "ainode_input_drift", {"pipeline": "p", "model_version": "m 1", "feature": "pixel_spacing_mm", "statistic": "ks"}
    ) == in_distribution_ks
    assert len(index.drift_windows(100)[key]) == 10  # rows beyond the window are deleted


# ---------------------------------------------------------------------------- the real chest pipeline


def _rows() -> list[dict]:
    with (CXR14 / "labels.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _dx(row: dict, *, bits: int = 8, photometric: str = "MONOCHROME2", spacing: float | None = None) -> pydicom.Dataset:
    """A ChestX-ray14 PNG as a DX image with the patient's age and view from
    labels.csv and, by default, the original image's pixel spacing: 8-bit
    MONOCHROME2 as the training data; else stored with ``bits`` bits
    (values scaled to the full range) and ``photometric`` (MONOCHROME1:
    inverted, so it shows the same image), at ``spacing`` mm."""
    ds = wrap_as_dx(row, CXR14 / "images" / row["Image Index"])
    pixels = ds.pixel_array
    values = pixels.astype(np.uint16) * 257 if bits == 16 else pixels
    if photometric == "MONOCHROME1":
        values = values.max() - values
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.ImagerPixelSpacing = [spacing or float(row["OriginalImagePixelSpacing[x"])] * 2
    ds.PixelData = values.tobytes()
    return ds


@pytest.fixture(scope="module")
def chest():
    """The demo chest pipeline and 2 x N held-out test-split rows (patients
    the model never trained on), a seeded random sample."""
    from pipelines.pneumonia.pipeline import PneumoniaPipeline
    from pipelines.pneumonia.settings import PneumoniaSettings

    card = ModelCard.from_file(CARD)
    assert card.drift_reference is not None, "run: ainode models reference models/cards/pneumonia-densenet121-demo.json"
    assert card.training_data.split is not None
    test_patients = set(card.training_data.split.members["test"])
    rows = [r for r in _rows() if r["Patient ID"] in test_patients]
    random.Random(1).shuffle(rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 128 x 128 DenseNet: on a busy CPU more threads only wait for each other
    yield PneumoniaPipeline(PneumoniaSettings(), ModelRegistry()), rows[: 2 * N]
    torch.set_num_threads(threads)


def _feed(monitor: DriftMonitor, pipeline, datasets) -> None:
    """Each image as one job. The observations are those pipeline.run
    reports (checked on the first image: the same preprocessing and model),
    without its Grad-CAM and SEG/SR writing, which take 20 times longer."""
    for i, ds in enumerate(datasets):
        study = Study(ds.StudyInstanceUID, {ds.SeriesInstanceUID: [ds]})
        prediction = pipeline.model.predict(dicom_to_image(ds), cam=False)
        observations = {"intensity_mean": prediction.input_mean, "intensity_std": prediction.input_std,
                        "score": prediction.probability}
        if i == 0:
            context = PipelineContext()
            pipeline.run(study, context)
            assert context.observations == pytest.approx(observations, abs=1e-6)
        monitor.observe("pneumonia", pipeline, study, observations)


@needs_cxr14
def test_chest_gauges_stay_flat_in_distribution_and_move_for_shifted_input(chest):
    pipeline, rows = chest
    metrics = Metrics()
    monitor = DriftMonitor(DriftSection(window=N, min_count=N), metrics)
    t = time.perf_counter()
    _feed(monitor, pipeline, [_dx(r) for r in rows[:N]])
    [inside] = monitor.report()
    values = {f.feature: f.value for f in inside.features}
    print("in distribution:", {k: round(v, 3) for k, v in values.items() if v is not None})
    assert inside.jobs == N and not inside.alerts, inside
    assert values["bits_stored"] == values["photometric_interpretation"] == 0.0
    assert all(v is not None and v <= 0.25 for v in values.values()), values

    _feed(monitor, pipeline, [_dx(r, bits=16, photometric="MONOCHROME1", spacing=0.1) for r in rows[N:]])
    [shifted] = monitor.report()
    moved = {f.feature: f.value for f in shifted.features}
    print("shifted:", {k: round(v, 3) for k, v in moved.items() if v is not None}, f"{time.perf_counter() - t:.1f} s")
    assert {"bits_stored", "photometric_interpretation", "pixel_spacing_mm"} <= set(shifted.alerts)
    assert moved["bits_stored"] > 9 and moved["photometric_interpretation"] > 9 and moved["pixel_spacing_mm"] == 1.0
    labels = {"pipeline": "pneumonia", "model_version": pipeline.model_version}
    for feature in ("bits_stored", "photometric_interpretation", "pixel_spacing_mm"):
        assert metrics.registry.get_sample_value("ainode_input_drift_alert", {**labels, "feature": feature}) == 1
    assert metrics.registry.get_sample_value(
        "ainode_input_drift", {**labels, "feature": "bits_stored", "statistic": "psi"}) == moved["bits_stored"]
    # The preprocessing undoes the bit depth and the inversion: the network sees the same images.
    for feature in ("intensity_mean", "intensity_std", "score"):
        assert moved[feature] is not None and moved[feature] < 0.3, (feature, moved[feature])


# ---------------------------------------------------------------------------- through a running node


def test_a_running_node_reports_drift_of_its_jobs(node_config):
    """Four jobs through the real node (SCP, sweep, router, runner, the demo
    chest model): two 8-bit CRs as the card's reference, then two 12-bit
    ones; ``ainode_input_drift{feature="bits_stored"}`` goes from 0 to a PSI
    above the threshold, and the dashboard's table says so."""
    from node.api.routers.drift import drift_report
    from node.service import Node
    from tests.peers import free_port, wait_for
    from tests.test_dispatch import StoreSCP
    from tests.test_guardrails import CHEST_ROUTE, in_envelope_cr
    from tests.test_outcomes import finished, send, small_cr

    pacs = StoreSCP(free_port()).start()
    cfg = node_config(
        node={"bind_address": "127.0.0.1", "port": free_port()}, storage={"fsync": False},
        completion={"sweep_interval_seconds": 0.2, "series_idle_seconds": 30, "complete_on_release": True},
        routes=[CHEST_ROUTE], destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
        api={"enabled": False}, drift={"window": 10, "min_count": 2},
    )
    node = Node(cfg)
    node.start()
    try:
        def run(*datasets):
            assert send(cfg, *datasets) == [0] * len(datasets)
            assert wait_for(lambda: all(finished(node, ds.SeriesInstanceUID) for ds in datasets), 120)

        run(in_envelope_cr(), in_envelope_cr())
        [inside] = drift_report(node)
        rows = {f.feature: f for f in inside.features}
        # Synthetic 64 x 64 images are unlike ChestX-ray14 in intensity and view: only their bit depth is compared here.
        assert inside.jobs == 2 and rows["bits_stored"].value == 0.0 and not rows["bits_stored"].alert, inside
        labels = {"pipeline": "pneumonia", "model_version": inside.model_version, "feature": "bits_stored"}
        assert node.metrics.registry.get_sample_value("ainode_input_drift_alert", labels) == 0
        run(small_cr(), small_cr())  # 12-bit
        [after] = drift_report(node)
        psi_value = node.metrics.registry.get_sample_value("ainode_input_drift", {**labels, "statistic": "psi"})
        # 2 of 4 at "12" against 0 % (floored at 1e-4): (0.5 - 1e-4) ln(5000) + (0.5 - 1) ln(0.5)
        assert psi_value == pytest.approx(0.4999 * math.log(0.5 / 1e-4) - 0.5 * math.log(0.5), abs=1e-6)
        assert node.metrics.registry.get_sample_value("ainode_input_drift_alert", labels) == 1
        assert "bits_stored" in after.alerts and after.jobs == 4
    finally:
        node.stop()
        pacs.stop()


def test_gauges_and_the_shipped_alert_rule_pass_promtool(tmp_path):
    import subprocess
    from pathlib import Path

    from prometheus_client import generate_latest

    from tests.test_metrics import require_promtool

    metrics = Metrics()
    monitor = DriftMonitor(DriftSection(min_count=2), metrics)
    for _ in range(2):
        monitor.observe_features(("p", "m 1"), {"photometric_interpretation": "MONOCHROME1", "pixel_spacing_mm": 0.5},
                                 "card", _reference())
    text = generate_latest(metrics.registry).decode()
    assert 'ainode_input_drift_alert{feature="photometric_interpretation",model_version="m 1",pipeline="p"} 1.0' in text
    check = subprocess.run([require_promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    rules = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "ainode-alerts.yml"
    check = subprocess.run([require_promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and "SUCCESS: 1 rules found" in check.stdout, check.stdout + check.stderr
