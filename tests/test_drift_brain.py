"""The brain demonstration card's input-drift reference (one study, from its
NIfTI training case) and what the drift monitor makes of so small a
reference: categories and acquisition settings compared, measurements
(intensity, score) shown but not compared. No model runs here."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from models.drift_reference import DriftFeature, build_reference, comparable, dicom_features
from models.registry import ModelRegistry
from node.config.drift import DriftSection
from node.drift import DriftMonitor
from node.metrics import Metrics

KEY = ("brain_tumour", "brats-segresnet-demo 0.1.0")
MEASUREMENTS = {"intensity_mean", "intensity_std", "score"}


def _brain_instance(thickness: float = 1.0, spacing: float = 1.0) -> Dataset:
    """The first instance of a converted BraTS study as the monitor reads it (pipelines/brain_tumour/convert.py)."""
    ds = Dataset()
    ds.Modality, ds.Manufacturer, ds.PhotometricInterpretation, ds.BitsStored = "MR", "SIEMENS", "MONOCHROME2", 16
    ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], thickness
    return ds


def _observation(reference, ds: Dataset) -> dict[str, str | float]:
    features: dict[str, str | float] = {str(k): v for k, v in dicom_features(ds).items()}
    for f in MEASUREMENTS:  # the pipeline's observations, at the reference's own (median) values
        features[f] = reference.features[DriftFeature(f)].quantiles[50]
    return features


def test_shipped_brain_card_has_a_one_study_reference_from_its_training_case():
    card = ModelRegistry().card("brats-segresnet-demo")
    ref = card.drift_reference
    assert ref is not None and ref.n == 1
    assert "TCGA-FG-6692-preprocessed" in ref.source and "TCGA-FG-6692-preprocessed" in card.training_data.training_members
    # What NIfTI carries (grid, MR grey scale) and what the pipeline measures; not Manufacturer, age, view or bits.
    assert sorted(ref.features) == ["intensity_mean", "intensity_std", "photometric_interpretation", "pixel_spacing_mm",
                                    "score", "slice_thickness_mm"]
    assert ref.features[DriftFeature.PHOTOMETRIC_INTERPRETATION].frequencies == {"MONOCHROME2": 1.0}
    assert ref.features[DriftFeature.SLICE_THICKNESS].quantiles == [1.0] * 101  # the BraTS 1 mm grid
    assert ref.features[DriftFeature.PIXEL_SPACING].quantiles == [1.0] * 101
    # z-scored over the brain, zeros outside: the whole field of view averages 0; WT in ml of a glioma.
    assert abs(ref.features[DriftFeature.INTENSITY_MEAN].quantiles[50]) < 1e-3
    assert 0.2 < ref.features[DriftFeature.INTENSITY_STD].quantiles[50] < 1.0
    assert 1.0 < ref.features[DriftFeature.SCORE].quantiles[50] < 100.0
    assert "too few for the measurements" in (ModelRegistry().card_path("brats-segresnet-demo").with_suffix(".md")
                                              .read_text(encoding="utf-8"))


def test_in_distribution_brain_jobs_raise_no_alert_and_a_thick_slice_study_does():
    ref = ModelRegistry().card("brats-segresnet-demo").drift_reference
    assert ref is not None
    monitor = DriftMonitor(DriftSection(window=10, min_count=2), Metrics())
    for _ in range(2):
        drift = monitor.observe_features(KEY, _observation(ref, _brain_instance()), "brats-segresnet-demo", ref)
    rows = {f.feature: f for f in drift.features}
    assert not drift.alerts, drift
    assert rows["photometric_interpretation"].value == 0.0
    assert rows["slice_thickness_mm"].value == 0.0 and rows["pixel_spacing_mm"].value == 0.0
    # A reference of one study cannot judge a measurement: shown (n, reference_n), not compared.
    assert {f for f, r in rows.items() if r.value is None} == MEASUREMENTS
    assert all(rows[f].n == 2 and rows[f].reference_n == 1 for f in MEASUREMENTS)
    # The scanner series of the same patient (5.5 mm slices, 0.9 mm pixels) is outside the reference's grid.
    for _ in range(8):
        drift = monitor.observe_features(KEY, _observation(ref, _brain_instance(5.5, 0.9)), "brats-segresnet-demo", ref)
    rows = {f.feature: f for f in drift.features}
    assert drift.alerts == ["pixel_spacing_mm", "slice_thickness_mm"]
    assert rows["slice_thickness_mm"].value == pytest.approx(0.8)  # 8 of the 10 jobs differ from the reference's 1 mm


def test_measurements_need_min_count_reference_values_settings_do_not():
    assert comparable(DriftFeature.SLICE_THICKNESS, 1, 30) and comparable(DriftFeature.BITS_STORED, 1, 30)
    assert not comparable(DriftFeature.SCORE, 29, 30) and comparable(DriftFeature.SCORE, 30, 30)
    monitor = DriftMonitor(DriftSection(window=10, min_count=5), Metrics())
    for n, expected in ((4, None), (5, 1.0)):  # a reference of 4 studies cannot judge the score; of 5 it can
        ref = build_reference([{"score": float(i), "slice_thickness_mm": 1.0} for i in range(n)], f"{n} studies")
        for i in range(5):
            drift = monitor.observe_features(KEY, {"score": 100.0 + i, "slice_thickness_mm": 1.0}, "card", ref)
        rows = {f.feature: f for f in drift.features}
        assert rows["score"].value == expected and rows["score"].alert == (expected is not None)
        assert rows["slice_thickness_mm"].value == 0.0 and rows["score"].reference_n == n
