"""Evaluation and model card of :mod:`pipelines.brain_tumour.train`: Dice
through the deployment path, the demonstration card and its Markdown.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.card import (
    Architecture,
    DataSplit,
    IntendedUseRule,
    Licence,
    Metric,
    ModelCard,
    SegmentationSpec,
    SlidingWindow,
    TrainingData,
    TrainingRun,
    VolumeInputSpec,
    Weights,
)
from models.intended_use import RuleRange
from pipelines.brain_tumour.model import BrainTumourModel, region_masks
from pipelines.brain_tumour.train_data import (
    BRATS_REGIONS,
    BRATS_RULES,
    CHANNELS,
    BratsCase,
    HeldOutPlan,
    Slab,
    dice,
    load_labelled,
)
from pipelines.common.training import card_markdown, config_hyperparameters, run_environment

if TYPE_CHECKING:
    from pipelines.brain_tumour.train import TrainConfig
    from pipelines.brain_tumour.train_loop import LoopResult

__all__ = ["demo_card", "evaluate", "intended_use_rules", "render_card_markdown"]

log = logging.getLogger("pipelines.brain_tumour.train")


def _versions() -> dict[str, str]:
    """Versions of the libraries this training uses beyond :func:`run_environment`'s."""
    import SimpleITK

    return {"SimpleITK": SimpleITK.Version.VersionString()}


def evaluate(runner: BrainTumourModel, cases: list[BratsCase], slabs: dict[str, Slab], mode: str) -> list[Metric]:
    """Dice through the deployment path (:meth:`BrainTumourModel.predict` on the
    whole 1 mm volume), scored on the held-out voxels (slab mode: the slab; case
    mode: the test cases), plus, in slab mode, the whole case (optimistic)."""
    per: dict[str, dict[str, list[float]]] = {"heldout": {k: [] for k in ("TC", "WT", "ET")},
                                             "full": {k: [] for k in ("TC", "WT", "ET")}}
    counts: dict[str, int] = {}
    for c in cases:
        image, label, spacing = load_labelled(c, runner.channels)
        pred = runner.predict(image, spacing_mm=spacing)
        truth = region_masks(label, pred.regions)
        found = pred.region_masks()
        sl = slabs.get(c.case_id)
        for k in ("TC", "WT", "ET"):
            if sl is not None:
                cut = (Ellipsis, slice(sl.start, sl.stop))
                per["heldout"][k].append(dice(found[k][cut], truth[k][cut]))
                per["full"][k].append(dice(found[k], truth[k]))
                counts[f"heldout_{k}"] = counts.get(f"heldout_{k}", 0) + int(truth[k][cut].sum())
            else:
                per["heldout"][k].append(dice(found[k], truth[k]))
        log.info("evaluated %s in %.1f s", c.case_id, sum(pred.timings.values()))
    names = ", ".join(c.case_id for c in cases)
    metrics = []
    if mode == "slab":
        sl_desc = "; ".join(f"{cid}: x = {s.start}-{s.stop - 1} (1 mm voxels of the LPS W axis)" for cid, s in
                            slabs.items())
        for k in ("TC", "WT", "ET"):
            metrics.append(Metric(
                name=f"Dice {k}", value=round(float(np.mean(per["heldout"][k])), 4), dataset=names,
                split=f"held-out sagittal slab ({sl_desc}; {counts.get(f'heldout_{k}', 0)} {k} voxels): whole-volume "
                "inference at 1 mm, scored on the slab only; same patient as the training blocks, so optimistic",
                n=len(cases)))
        for k in ("TC", "WT", "ET"):
            metrics.append(Metric(
                name=f"Dice {k}", value=round(float(np.mean(per["full"][k])), 4), dataset=names,
                split="whole case (training blocks + gaps + held-out slab): NOT held out, a fit figure",
                n=len(cases)))
    else:
        for k in ("TC", "WT", "ET"):
            metrics.append(Metric(
                name=f"Dice {k}", value=round(float(np.mean(per["heldout"][k])), 4), dataset=names,
                split="held-out test cases (mean over cases, whole-volume inference at the data's voxel size)",
                n=len(cases)))
    return metrics


#: How far the intended use reaches beyond the training grid: slices up to 1.5 x the thickest
#: training slice spacing, in-plane voxels within 0.8-1.2 x the training ones, at least 65 % of
#: the fewest slices of a training volume (1 mm BraTS: 1.5 mm, 0.8-1.2 mm, 100 slices).
THICKNESS_FACTOR, PIXEL_FACTORS, SLICES_SHARE = 1.5, (0.8, 1.2), 0.65
_ROLE_WORDS = {"T1": "a pre-contrast T1-weighted", "T1c": "a post-contrast T1-weighted", "T2": "a T2-weighted",
               "FLAIR": "a T2 FLAIR"}


def _grid(path: Path) -> tuple[float, tuple[float, float], int]:
    """(slice spacing mm, in-plane spacings mm, slices) of a NIfTI volume from
    its header: the slice axis is the index axis closest to the patient's
    superior-inferior one (an axial series, as the DICOM conversion writes)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    spacing, size = reader.GetSpacing(), reader.GetSize()
    k = int(np.argmax(np.abs(np.asarray(reader.GetDirection()).reshape(3, 3)[2])))
    inplane = tuple(float(spacing[i]) for i in range(3) if i != k)
    return float(spacing[k]), (inplane[0], inplane[1]), int(size[k])


def intended_use_rules(cases: list[BratsCase]) -> list[IntendedUseRule]:
    """The card's ``intended_use_rules`` (:mod:`node.guard`) from the training
    cases' grids (each case's first sequence; load_case checks they share
    one): MR, slice thickness, in-plane spacing and slice count near the
    training volumes' (:data:`THICKNESS_FACTOR` etc.), and one MR series per
    sequence role, as the shipped demo card declares them."""
    grids = [_grid(c.images[CHANNELS[0]]) for c in cases]
    thick = max(g[0] for g in grids)
    pixels = [s for g in grids for s in g[1]]
    slices = min(g[2] for g in grids)
    low, high = round(min(pixels) * PIXEL_FACTORS[0], 3), round(max(pixels) * PIXEL_FACTORS[1], 3)
    seen = f"the {len(cases)} training volume(s)"
    rules = [
        IntendedUseRule(name="mr", description="MR series (the training volumes were MR)", match={"Modality": ["MR"]}),
        IntendedUseRule(name="slice_thickness", description=f"thin slices (Slice Thickness {thick * THICKNESS_FACTOR:g} "
                        f"mm or less): {seen} had {thick:g} mm slices, skull-stripped and co-registered",
                        match={"SliceThickness": RuleRange(max=round(thick * THICKNESS_FACTOR, 3))}),
        IntendedUseRule(name="pixel_spacing", description=f"in-plane voxels of {low:g} to {high:g} mm (Pixel Spacing); "
                        f"{seen}: {min(pixels):g}-{max(pixels):g} mm", match={"PixelSpacingMm": RuleRange(min=low, max=high)}),
        IntendedUseRule(name="slice_count", description=f"whole-brain coverage (at least {int(slices * SLICES_SHARE)} "
                        f"slices per series); {seen} had {slices} or more",
                        match={"NumberOfSlices": RuleRange(min=int(slices * SLICES_SHARE))}),
    ]
    rules += [IntendedUseRule(name=f"sequence_{role.lower()}", description=f"{_ROLE_WORDS.get(role, 'an')} MR series "
                              f"fills the {role} role (the training channels {', '.join(CHANNELS)})",
                              match={"Modality": ["MR"]}, applies_to=role) for role in CHANNELS]
    return rules


def _data_description(config: TrainConfig, n_cases: int, skipped: list[str], single: bool) -> str:
    """The card's ``training_data.description``."""
    return (
        f"{n_cases} labelled BraTS-style case(s) from {Path(config.data_dir).name}: T1, T1c, T2, FLAIR, "
        "co-registered, skull-stripped, 1 mm"
        + (f"; {len(skipped)} case(s) without labels skipped" if skipped else "")
        + (". TCGA-FG-6692 (TCIA/TCGA glioma) after BraTS preprocessing (SRI-24 atlas, 1 mm, skull-stripped); "
           "labels: a consensus of five BraTS 2020 algorithms by majority vote (a pseudo ground truth, not an expert "
           "annotation), BraTS labels 1/2/4." if single else "")
    )


def _training_run(config: TrainConfig, wall: float, run: LoopResult, single: bool) -> TrainingRun:
    """The card's ``training`` record: command, environment, hyperparameters and the loop's outcome."""
    steps, best, stop_reason, history = run.steps, run.best, run.stop_reason, run.history
    return TrainingRun(
        command=config.command or "train_brain_tumour(...)",
        wall_time_s=round(wall, 1),
        **run_environment(_versions()),
        hyperparameters={
            **config_hyperparameters(config, exclude=("checkpoint_dir",)),
            "crop": list(config.crop),
            "steps_run": steps,
            "best_step": best.get("step"),
            "stop_reason": stop_reason,
            "validation": "Dice pooled over the training blocks (slab mode: no independent validation region "
            "exists; a fit measure used for checkpoint selection and early stopping)" if single
            else "mean Dice on up to 8 validation cases",
            "best_validation": {k: round(best[k], 4) for k in ("TC", "WT", "ET", "mean") if k in best},
            "history": history,
            "loss": "MONAI DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5, batch=True) "
            "+ torch BCEWithLogitsLoss, on TC, WT, ET",
            "augmentation": "items with tumour drawn 3x as often as items without; MONAI SpatialPadd + "
            "RandCropByPosNegLabeld (pos 1, neg 1) of a crop 25 % larger, RandAffined (p affine_prob, rotation "
            "up to rotate_deg per axis, scaling up to scale, reflection padding) to the crop size, RandFlipd on each axis "
            "(p 0.5), RandScaleIntensityd 0.1, RandShiftIntensityd 0.1 (p 1)",
            "optimiser": "Adam, cosine decay over the wall-clock budget",
        },
        notes="Metrics were measured with the float16 weights as shipped, loaded through the model registry "
        "and BrainTumourModel.predict on the whole 1 mm volume (resampled to the card's voxel size and back).",
    )


def demo_card(
    config: TrainConfig,
    params: dict,
    sha: str,
    weights_path: Path,
    metrics: list[Metric],
    wall: float,
    plan: HeldOutPlan,
    run: LoopResult,
    n_cases: int,
    skipped: list[str],
    rules: list[IntendedUseRule] | None = None,
) -> ModelCard:
    """The demonstration weights' model card (``metrics`` empty for the provisional one;
    ``rules``: its :func:`intended_use_rules`)."""
    single = plan.mode == "slab"
    split_method, members = plan.method, plan.members
    data_desc = _data_description(config, n_cases, skipped, single)
    return ModelCard(
        name=config.name,
        version=config.version,
        task="segmentation",
        description=(
            f"MONAI SegResNet (init_filters {config.init_filters}, the brats_mri_segmentation bundle's block layout) "
            f"trained in this project at {config.spacing_mm:g} mm on "
            + ("one labelled glioma case" if single else f"{len(members.get('train', []))} labelled cases")
            + "; outputs sigmoid TC, WT, ET mapped to BraTS labels 4/1/2 as the MONAI bundle does. "
            "Demonstration weights: not for diagnosis."
        ),
        architecture=Architecture(name="monai-segresnet", params=params),
        volume_input=VolumeInputSpec(modalities=["MR"], channels=list(CHANNELS),
                                     spacing_mm=(config.spacing_mm,) * 3, array_axes="xyz",
                                     normalisation="zscore_nonzero_channelwise", skull_stripped=True,
                                     bias_field_correction=False),  # train_data.load_case: no N4
        segmentation=SegmentationSpec(
            channels=["TC", "WT", "ET"], activation="sigmoid", threshold=0.5, label_rules=list(BRATS_RULES),
            regions=BRATS_REGIONS,
            sliding_window=SlidingWindow(roi_size=config.crop, overlap=config.overlap, sw_batch_size=4,
                                         mode="constant"),
        ),
        weights=Weights(format="state_dict", path=f"../weights/{weights_path.name}", sha256=sha, dtype="float16"),
        licence=Licence(
            spdx="Apache-2.0",
            notes="Weights trained in this project. TCGA-FG-6692 data: BrainLesion/BraTS-Toolkit example data "
            "(Apache-2.0); the TCIA/TCGA data terms apply to the images. BraTS data terms apply to BraTS cases.",
        ),
        intended_use=(
            "Demonstration and integration testing of the dicom-ai-node brain tumour pipeline only. Not for "
            "diagnosis: trained on "
            + ("a single patient, evaluated on a held-out part of the same patient's tumour" if single else
               "a small number of cases for a short time")
            + ", at a coarse voxel size. For real use import the MONAI brats_mri_segmentation bundle "
            "(models/templates/brats_mri_segmentation.json, python -m models.bundle_import)."
        ),
        intended_use_rules=rules or [],
        demonstration_only=True,
        training_data=TrainingData(
            description=data_desc,
            sources=["BrainLesion/BraTS-Toolkit example data: TCGA-FG-6692-preprocessed (Apache-2.0)"] if single
            else [str(config.data_dir)],
            licence="TCIA/TCGA data terms; BraTS data terms",
            n_images=n_cases,
            split=DataSplit(method=split_method, seed=config.seed,
                            counts={"train_items": len(members.get("train", [])),
                                    "test_cases": len(members.get("test", []))},
                            members=members),
        ),
        training=_training_run(config, wall, run, single),
        metrics=metrics,
        references=[
            "Myronenko A. 3D MRI brain tumor segmentation using autoencoder regularization. BrainLes 2018. "
            "arXiv:1810.11654",
            "MONAI model zoo: brats_mri_segmentation bundle (configs/train.json, inference.json), Apache-2.0",
            "Menze BH et al. The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS). IEEE TMI 2015",
            "Bakas S et al. Identifying the best machine learning algorithms for brain tumor segmentation ... in the "
            "BRATS challenge. 2018. arXiv:1811.02629",
            "Kofler F et al. BraTS Toolkit. Front. Neurosci. 2020 (TCGA-FG-6692 example data and fusion)",
        ],
    )


def render_card_markdown(card: ModelCard) -> str:
    """A short human-readable model card generated from a segmentation JSON card.

    Raises
    ------
    ValueError
        The card has no ``volume_input`` or ``segmentation`` (not a segmentation card).
    """
    vin, seg = card.volume_input, card.segmentation
    if vin is None or seg is None:
        raise ValueError(f"card {card.name!r}: no volume_input or segmentation; expected a segmentation card")
    model = [
        f"- Architecture: `{card.architecture.name}` {card.architecture.params}; weights `{card.weights.path}` "
        f"({card.weights.format}, {card.weights.dtype}), SHA-256 `{card.weights.sha256}`.",
        f"- Input: channels {', '.join(vin.channels)}; {vin.spacing_mm} mm voxels; network layout "
        f"`{vin.array_axes}`; normalisation `{vin.normalisation}`; skull-stripped {vin.skull_stripped}; "
        + ("N4 bias-field correction (as trained)." if vin.bias_field_correction
           else "no bias-field correction (as trained)."),
        f"- Inference: sliding window roi {tuple(seg.sliding_window.roi_size)}, overlap {seg.sliding_window.overlap}; "
        f"{seg.activation} over {', '.join(seg.channels)}; threshold {seg.threshold}.",
        "- Labels (first rule that applies): " + "; ".join(f"{r.channel} -> {r.label} ({r.name})"
                                                           for r in seg.label_rules) + ".",
        "- Limitations: thick-slice input (e.g. 5.5 mm axial scanner series) is outside the training space, "
        "which is 1 mm isotropic, atlas-registered volumes; the `slice_thickness` rule flags it. It is resampled "
        "and segmented, but partial-volume blur changes the volumes, the tumour core and enhancing tumour most.",
    ]
    performance = ["| metric | value | n | data | split |", "|---|---|---|---|---|"]
    performance += [f"| {m.name} | {m.value:.4f} | {m.n} | {m.dataset} | {m.split} |" for m in card.metrics]
    split = card.training_data.split
    run_detail = "."
    if card.training:
        hp = card.training.hyperparameters
        run_detail = (f"; {hp.get('steps_run')} steps ({hp.get('stop_reason')}), best checkpoint at step "
                      f"{hp.get('best_step')} by {hp.get('validation')}.")
    return card_markdown(card, model=model, performance=performance,
                         split=f"Held-out data: {split.method}." if split else None, run_detail=run_detail)
