"""Brain MR preprocessing: layout, registration, N4, skull stripping, normalisation, mapping back."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import NormalizeIntensity

from pipelines.base import PipelineInputError
from pipelines.brain_tumour.bias_field import foreground_mask, n4_correct
from pipelines.brain_tumour.convert import SEQUENCE_PROTOCOLS, find_case_files, image_to_series, study_info
from pipelines.brain_tumour.normalise import to_channels_first
from pipelines.brain_tumour.preprocess import DEFAULT_CHANNEL_ORDER, preprocess_study, to_reference
from pipelines.brain_tumour.registration import model_grid, register_rigid, reorient, resample_to_grid, same_grid
from pipelines.brain_tumour.skull_strip import DeepbetExtractor, morphological_brain_mask, skull_strip_check
from pipelines.brain_tumour.volume import series_to_image
from pipelines.common.uids import derived_uid
from tests.brain_phantom import BRAIN, image_grid, labels_on, make_phantom, tissue_at
from tests.peers import SHARED_DATA

BRATS = SHARED_DATA / "brats" / "BraTS-GLI-00001-000"
needs_brats = pytest.mark.skipif(not BRATS.is_dir(), reason=f"real data folder ../shared/data absent ({SHARED_DATA})")
FAST_N4 = {"n4_iterations": (20, 20)}


class RecordingLog:
    """Collects what a structlog logger would receive."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **fields) -> None:
        self.events.append((event, fields))


@pytest.fixture(scope="module")
def moved():
    """Skull-stripped phantom whose FLAIR is on its own grid with patient motion."""
    phantom = make_phantom(flair_motion=True)
    volumes = {r: series_to_image(ds) for r, ds in phantom.datasets.items()}
    log = RecordingLog()
    prep = preprocess_study(volumes, log=log, **FAST_N4)
    return phantom, volumes, prep, log


def _on_model_grid(prep) -> np.ndarray:
    """Ground-truth labels rendered on the model grid, ``(D, H, W)``."""
    return labels_on(prep.grid)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# --------------------------------------------------------------------------- the chain on the phantom


def test_output_layout(moved):
    _, _, prep, _ = moved
    # 64 x 64 x 40 voxels at 1.5 mm -> 96 x 96 x 60 at 1 mm, (C, D, H, W) = (C, z, y, x).
    assert prep.array.shape == (4, 60, 96, 96)
    assert prep.spacing_mm == (1.0, 1.0, 1.0) and prep.brain_mask.shape == (60, 96, 96)
    assert prep.array.dtype == np.float32 and prep.array.flags.c_contiguous
    assert prep.channel_order == DEFAULT_CHANNEL_ORDER == ("T1c", "T1", "T2", "FLAIR")
    assert prep.grid.GetSize() == (96, 96, 60) and prep.grid.GetSpacing() == (1.0, 1.0, 1.0)
    assert prep.grid.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    # The field of view keeps its centre (the phantom's grids are centred on 0).
    centre = prep.grid.TransformContinuousIndexToPhysicalPoint([47.5, 47.5, 29.5])
    np.testing.assert_allclose(centre, (0, 0, 0), atol=1e-9)
    assert set(prep.timings) == {"reorient", "register", "resample", "n4", "skull_strip", "normalise"}
    assert all(t >= 0 for t in prep.timings.values())


def test_channels_follow_the_requested_order_and_contrasts(moved):
    _, _, prep, _ = moved
    labels = _on_model_grid(prep)
    et, oedema, brain = labels == 4, labels == 2, (labels == 0) & (prep.array[0] != 0)
    contrast = {
        role: float(prep.array[c][et].mean() - prep.array[c][brain].mean()) for c, role in enumerate(prep.channel_order)
    }
    # The enhancing rim stands out most on T1c; oedema is bright on FLAIR and T2, not T1.
    assert max(contrast, key=contrast.get) == "T1c"
    flair, t1 = prep.channel_order.index("FLAIR"), prep.channel_order.index("T1")
    assert prep.array[flair][oedema].mean() > prep.array[flair][brain].mean() + 1.0
    assert prep.array[t1][oedema].mean() < prep.array[t1][brain].mean()


def test_zscore_over_non_zero_voxels(moved):
    _, _, prep, _ = moved
    for c in range(4):
        channel = prep.array[c]
        values = channel[channel != 0]
        assert abs(values.mean()) < 1e-3 and abs(values.std() - 1.0) < 1e-3
        # The background outside the head stays exactly 0.
        assert channel[0, 0, 0] == 0 and channel[-1, -1, -1] == 0


def test_registration_runs_only_where_the_grid_differs(moved):
    phantom, _, prep, log = moved
    assert not prep.registrations["T1c"].registered
    for role in ("T1", "T2"):
        assert not prep.registrations[role].registered
        assert "same grid" in prep.registrations[role].reason
    assert any("T1: skipped, same grid" in n for n in prep.notes)
    reg = prep.registrations["FLAIR"]
    assert reg.registered
    # Target registration error against the known motion, over the head.
    points = np.random.default_rng(0).uniform(-1, 1, size=(300, 3)) * np.array([32.0, 38.0, 20.0])
    errors = [
        np.linalg.norm(
            np.subtract(reg.transform.TransformPoint(tuple(p)), phantom.flair_motion.TransformPoint(tuple(p)))
        )
        for p in points
    ]
    assert max(errors) < 1.5, f"TRE up to {max(errors):.2f} mm"
    # The motion is undone: FLAIR's bright oedema lands on the oedema of the T1c grid.
    flair = prep.array[prep.channel_order.index("FLAIR")]
    labels = _on_model_grid(prep)
    hyper = flair > 0.5 * (flair[labels == 2].mean() + flair[(labels == 0) & (flair != 0)].mean())
    assert _dice(hyper, np.isin(labels, (2, 4))) > 0.8
    events = [e for e, _ in log.events]
    assert "brain_preprocess_step" in events and "brain_preprocess_note" in events
    assert {f["step"] for e, f in log.events if e == "brain_preprocess_step"} == set(prep.timings)


def test_registration_is_reproducible():
    phantom = make_phantom(flair_motion=True, missing=("T1", "T2"))
    fixed = reorient(sitk.Cast(phantom.images["T1c"], sitk.sitkFloat32))
    moving = reorient(sitk.Cast(phantom.images["FLAIR"], sitk.sitkFloat32))
    a = register_rigid(fixed, moving, shrink_factors=(4,), smoothing_sigmas_mm=(2,))
    b = register_rigid(fixed, moving, shrink_factors=(4,), smoothing_sigmas_mm=(2,))
    np.testing.assert_allclose(a.transform.GetParameters(), b.transform.GetParameters(), atol=1e-6)
    with pytest.raises(ValueError, match="one value per level"):
        register_rigid(fixed, moving, shrink_factors=(4, 2), smoothing_sigmas_mm=(2,))


def test_labels_map_back_exactly_onto_the_reference_series(moved):
    phantom, volumes, prep, _ = moved
    # The network's labels: ground truth on the T1c grid, nearest-neighbour on the model grid.
    truth = sitk.GetImageFromArray(phantom.labels)
    truth.CopyInformation(volumes["T1c"].image)
    on_model = sitk.GetArrayFromImage(
        sitk.Cast(resample_to_grid(truth, prep.grid, interpolator=sitk.sitkNearestNeighbor), sitk.sitkUInt8)
    )
    back = to_reference(on_model, prep, volumes["T1c"])
    assert back.dtype == np.uint8 and back.shape == (40, 64, 64)
    np.testing.assert_array_equal(back, phantom.labels)


def test_labels_map_back_onto_a_registered_series(moved):
    phantom, volumes, prep, _ = moved
    back = to_reference(_on_model_grid(prep), prep, volumes["FLAIR"])
    assert back.shape == volumes["FLAIR"].shape == (22, 84, 84)
    truth = labels_on(volumes["FLAIR"].image, phantom.flair_motion)
    assert _dice(back > 0, truth > 0) > 0.85
    assert _dice(back == 4, truth == 4) > 0.6  # a 3.5 mm rim on 3 mm slices


def test_to_reference_refusals(moved):
    phantom, volumes, prep, _ = moved
    with pytest.raises(ValueError, match=r"shape \(96, 96, 60\), expected .* \(60, 96, 96\)"):
        to_reference(np.zeros((96, 96, 60), np.uint8), prep, volumes["T1c"])
    with pytest.raises(ValueError, match="outside 0..255"):
        to_reference(np.full((60, 96, 96), 300, np.int32), prep, volumes["T1c"])
    other = series_to_image(make_phantom(seed=5, patient_id="OTHER").datasets["T1c"])
    with pytest.raises(ValueError, match="was not an input of preprocess_study"):
        to_reference(np.zeros((60, 96, 96), np.uint8), prep, other)


def test_missing_sequence_is_an_input_error():
    phantom = make_phantom(missing="FLAIR")
    volumes = {r: series_to_image(ds) for r, ds in phantom.datasets.items()}
    with pytest.raises(PipelineInputError, match="no FLAIR series"):
        preprocess_study(volumes)
    with pytest.raises(ValueError, match="skull_strip"):
        preprocess_study(volumes, skull_strip="sometimes")


# --------------------------------------------------------------------------- steps


def test_reorient_is_lossless():
    phantom = make_phantom(missing=("T1", "T2", "FLAIR"))
    lps = phantom.images["T1c"]
    ras = reorient(lps, "RAS")
    assert ras.GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    for index in [(3, 5, 7), (60, 10, 33)]:
        point = lps.TransformIndexToPhysicalPoint(index)
        assert ras[ras.TransformPhysicalPointToIndex(point)] == lps[index]
    assert same_grid(reorient(ras, "LPS"), lps)
    with pytest.raises(ValueError, match="orientation"):
        reorient(lps, "XYZ")


def test_model_grid():
    image = sitk.Image([64, 64, 40], sitk.sitkFloat32)
    image.SetSpacing((1.5, 1.5, 1.5))
    image.SetOrigin((-10.0, 20.0, 5.0))
    assert same_grid(model_grid(image, (1.5, 1.5, 1.5)), image)
    grid = model_grid(image, (1.0, 1.0, 3.0))
    assert grid.GetSize() == (96, 96, 20)
    np.testing.assert_allclose(
        grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()]),
        image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]),
    )
    with pytest.raises(ValueError, match="spacing"):
        model_grid(image, (1.0, 0.0, 1.0))


def test_n4_removes_the_bias_field():
    phantom = make_phantom(missing=("T1c", "T2", "FLAIR"))
    image = sitk.Cast(phantom.images["T1"], sitk.sitkFloat32)
    white = tissue_at(image_grid(image).points(), skull=False) == BRAIN
    # Away from the edges (partial volume) only the bias and noise vary.
    white &= sitk.GetArrayViewFromImage(sitk.BinaryErode(sitk.GetImageFromArray(white.astype(np.uint8)), [2] * 3)) > 0
    corrected = n4_correct(image, foreground_mask(image, stripped=True), shrink_factor=4, iterations=(20, 20))

    def cv(img):
        values = sitk.GetArrayViewFromImage(img)[white]
        return values.std() / values.mean()

    assert cv(image) > 0.05  # the phantom's bias field (noise alone gives ~0.02)
    assert cv(corrected) < 0.5 * cv(image)
    assert sitk.GetArrayViewFromImage(corrected)[0, 0, 0] == 0
    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    with pytest.raises(ValueError, match="mask is empty"):
        n4_correct(image, empty)


def test_skull_strip_check():
    stripped = make_phantom(missing=("T1", "T2", "FLAIR")).images["T1c"]
    head = make_phantom(skull=True, missing=("T1", "T2", "FLAIR")).images["T1c"]
    assert skull_strip_check(stripped).stripped
    check = skull_strip_check(head)
    assert not check.stripped and "noise" in check.reason and check.zero_fraction < 0.3
    # A whole head with the air zeroed by the scanner: too big to be a brain.
    big = sitk.Image([110, 130, 100], sitk.sitkInt16)
    big.SetSpacing((2.0, 2.0, 2.0))
    z, y, x = np.mgrid[:100, :130, :110]
    inside = ((x - 55) / 45.0) ** 2 + ((y - 65) / 55.0) ** 2 + ((z - 50) / 40.0) ** 2 <= 1
    zeroed = sitk.GetImageFromArray((inside * 500).astype(np.int16))
    zeroed.SetSpacing((2.0, 2.0, 2.0))
    check = skull_strip_check(zeroed)
    assert not check.stripped and "larger than a brain" in check.reason and check.foreground_ml > 2300


def test_morphological_fallback_finds_the_phantom_brain():
    phantom = make_phantom(skull=True, missing=("T1c", "T2", "FLAIR"))
    mask = sitk.GetArrayViewFromImage(morphological_brain_mask(phantom.images["T1"])) > 0
    assert _dice(mask, phantom.brain) > 0.9


def test_unstripped_study_is_stripped_by_the_fallback_without_deepbet(monkeypatch):
    phantom = make_phantom(skull=True)
    volumes = {r: series_to_image(ds) for r, ds in phantom.datasets.items()}
    monkeypatch.setitem(sys.modules, "deepbet", None)  # as if not installed: importing it raises ImportError
    prep = preprocess_study(volumes, n4=False)
    assert prep.skull_stripped_here == "morphological (deepbet not installed)"
    assert any("brain mask from T1 by morphological" in n for n in prep.notes)
    assert not any(c.stripped for c in prep.strip_checks.values())
    brain = sitk.GetImageFromArray(phantom.brain.astype(np.uint8))
    brain.CopyInformation(volumes["T1c"].image)
    brain = sitk.GetArrayFromImage(resample_to_grid(brain, prep.grid, interpolator=sitk.sitkNearestNeighbor)) > 0
    nonzero = np.any(prep.array != 0, axis=0)
    assert _dice(nonzero, brain) > 0.9
    kept = preprocess_study(volumes, skull_strip="never", n4=False)
    assert kept.skull_stripped_here is None
    assert np.count_nonzero(kept.array[0]) > 2 * np.count_nonzero(prep.array[0])  # scalp and noise kept


def test_to_channels_first_order():
    a = sitk.GetImageFromArray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))  # (z, y, x)
    b = a * 2
    out = to_channels_first({"A": a, "B": b}, ("B", "A"))
    assert out.shape == (2, 2, 3, 4)  # (C, z, y, x)
    assert out[1, 1, 2, 3] == a[3, 2, 1] and out[0, 1, 2, 3] == 2 * a[3, 2, 1]
    with pytest.raises(ValueError, match="not among the volumes"):
        to_channels_first({"A": a}, ("A", "C"))


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def brats_volumes(tmp_path_factory):
    if not BRATS.is_dir():
        pytest.skip(f"real data folder ../shared/data absent ({SHARED_DATA})")
    # In memory: the file round trip is test_brain_convert's; this saves writing 620 files.
    files = find_case_files(BRATS)
    study = study_info(patient_name="BraTS^1", patient_id="B1", uid_parts=["test_brain_preprocess"])
    volumes = {}
    for role, path in files.items():
        datasets = image_to_series(
            sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"),
            SEQUENCE_PROTOCOLS[role],
            study,
            series_instance_uid=derived_uid(None, study.study_instance_uid, role),
        )
        volumes[role] = series_to_image(datasets)
    return files, volumes


@needs_brats
def test_real_case_reproduces_the_bundle_input(brats_volumes):
    """Without N4, DICOM -> preprocess_study gives exactly what the MONAI
    bundle computes from the BraTS NIfTI files (LoadImage + NormalizeIntensity)."""
    files, volumes = brats_volumes
    prep = preprocess_study(volumes, n4=False)
    assert prep.array.shape == (4, 155, 240, 240)
    assert all(c.stripped for c in prep.strip_checks.values()) and prep.skull_stripped_here is None
    assert not any(r.registered for r in prep.registrations.values())
    nifti = np.stack(
        [sitk.GetArrayFromImage(sitk.ReadImage(str(files[r]))).transpose(2, 1, 0) for r in DEFAULT_CHANNEL_ORDER]
    ).astype(np.float32)
    expected = NormalizeIntensity(nonzero=True, channel_wise=True)(nifti)  # (C, x, y, z), as the bundle sees it
    np.testing.assert_allclose(prep.array.transpose(0, 3, 2, 1), np.asarray(expected), atol=1e-5)
    labels = (np.abs(prep.array[0]) > 2).astype(np.uint8)
    back = to_reference(labels, prep, volumes["T1c"])
    np.testing.assert_array_equal(back, labels)  # the T1c grid is the model grid


@needs_brats
@pytest.mark.skipif(
    importlib.util.find_spec("deepbet") is None, reason="deepbet is not installed (pip install deepbet==1.0.2)"
)
def test_deepbet_agrees_with_the_brats_skull_strip(brats_volumes):
    _, volumes = brats_volumes
    t1 = reorient(volumes["T1"].image)
    mask = sitk.GetArrayViewFromImage(DeepbetExtractor()(t1)) > 0
    brats = sitk.GetArrayViewFromImage(t1) != 0
    assert _dice(mask, brats) > 0.95


TCGA = SHARED_DATA / "brats" / "TCGA-FG-6692-preprocessed"


@pytest.mark.slow
@pytest.mark.skipif(not TCGA.is_dir(), reason=f"real data folder ../shared/data absent ({SHARED_DATA})")
def test_card_defaults_reproduce_the_training_input():
    """preprocess_study as the pipeline calls it for the demo card (N4 per the card: off) on the TCGA
    case converted to DICOM gives the array the model was trained on (train_data.load_case)."""
    from models.registry import ModelRegistry
    from pipelines.brain_tumour.train_data import find_brats_cases, load_case

    vin = ModelRegistry().card("brats-segresnet-demo").volume_input
    assert vin is not None and vin.bias_field_correction is False
    (case,) = find_brats_cases(TCGA)
    trained, _, spacing = load_case(case, vin.channels)
    study = study_info(patient_name="TCGA^FG6692", patient_id="TCGA-FG-6692", uid_parts=["test_card_defaults"])
    volumes = {
        role: series_to_image(image_to_series(
            sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"), SEQUENCE_PROTOCOLS[role], study,
            series_instance_uid=derived_uid(None, study.study_instance_uid, role),
        ))
        for role, path in find_case_files(TCGA).items()
    }
    prep = preprocess_study(volumes, channel_order=vin.channels, n4=vin.bias_field_correction)
    assert prep.array.shape == trained.shape and prep.spacing_mm == pytest.approx(spacing)
    brain = prep.brain_mask & (trained != 0).any(0)
    assert brain.sum() > 1_000_000  # the whole brain, not a corner of it
    np.testing.assert_allclose(prep.array[:, brain], trained[:, brain], atol=1e-3)
