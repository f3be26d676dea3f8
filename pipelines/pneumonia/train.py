"""Train the demonstration pneumonia weights on the NIH ChestX-ray14 starter set.

No pretrained weights can be downloaded here, so "transfer learning" happens
inside the project, in two stages on the same DenseNet-121
(:class:`models.densenet.XRVDenseNet121`, torchxrayvision's 18-output layout):

1. **Multi-task representation learning.** All 14 NIH finding labels, mapped to
   their torchxrayvision output indices (Pneumonia at 8), are trained together
   with a class-weighted, masked binary cross-entropy, so every image, not only
   the 32 pneumonia cases, teaches the features. The checkpoint with the best
   validation mean AUROC over the findings is kept.
2. **Pneumonia fine-tuning.** From that checkpoint, at a lower learning rate,
   the pneumonia output gets the main weight (the multi-task loss stays as a
   regulariser). Early stopping and checkpoint selection use the validation
   pneumonia AUROC.

Data are split by patient (no patient in two splits), stratified on whether the
patient has a pneumonia image, with a fixed seed; the patient ids of the test
and validation splits are written into the model card.

The held-out test split is touched once, at the end: AUROC with a percentile
bootstrap interval resampling patients, plus sensitivity and specificity at the
operating point chosen on validation (Youden's J).

Run::

    nice -n 10 python -m pipelines.pneumonia.train --data ../shared/data/cxr14 --out models

Data: NIH ChestX-ray14 (Wang et al., CVPR 2017; NIH Clinical Center, public),
starter set of github.com/jrzech/reproduce-chexnet (BSD-3-Clause), 256x256 PNG.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.card import (
    Architecture,
    DataSplit,
    Licence,
    Metric,
    ModelCard,
    OperatingPoint,
    OutputSpec,
    TrainingData,
    TrainingRun,
    Weights,
)
from models.densenet import PNEUMONIA_INDEX, XRV_LABELS
from pipelines.common.training import (
    TrainResult,
    card_markdown,
    check_fields,
    command_line,
    config_hyperparameters,
    configure_logging,
    run_environment,
    save_float16_weights,
    write_card,
)
from pipelines.pneumonia.train_data import NIH_FINDINGS, intended_use_rules
from pipelines.pneumonia.train_loop import Prepared, StageTrainer, predict, prepare_data
from pipelines.pneumonia.train_metrics import (
    auroc,
    bootstrap_ci,
    mean_auroc,
    sensitivity,
    specificity,
    youden_threshold,
)

log = logging.getLogger(__name__)

DATA_SOURCE = (
    "NIH ChestX-ray14 (Wang et al., CVPR 2017; NIH Clinical Center, public), images of the starter set of "
    "github.com/jrzech/reproduce-chexnet (BSD-3-Clause) downscaled to 256x256 8-bit PNG; labels from "
    "Data_Entry_2017_v2020.csv (NLP-mined from reports, not radiologist-verified)"
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run.

    Attributes
    ----------
    data_dir:
        Folder with ``labels.csv`` and ``images/*.png`` (read in place).
    out_dir:
        Model root: weights go to ``out_dir/weights/<name>.pt``, the card to
        ``out_dir/cards/<name>.json`` (and ``.md``).
    name, version:
        Card name and version.
    size:
        Network input side in pixels (square); the card records it and
        inference uses it.
    clahe:
        Apply CLAHE in preprocessing (recorded in the card's input spec).
    seed:
        Seeds the split, the weight initialisation, the batch order and the
        augmentations.
    test_fraction, val_fraction:
        Share of patients in the held-out test and validation splits.
    batch_size, lr_stage1, lr_stage2, weight_decay:
        Optimiser settings (AdamW).
    stage2_aux_weight:
        Weight of the multi-task loss during pneumonia fine-tuning.
    time_budget_s:
        Wall-clock budget for both training stages (evaluation excluded);
        ``stage1_share`` of it goes to stage 1.
    max_epochs_stage1, max_epochs_stage2, patience:
        Epoch limits and early-stopping patience (epochs without improvement).
    bootstrap:
        Bootstrap resamples for the confidence intervals (>= 1000 for reports).
    limit:
        Use only this many images (a third of them pneumonia), for smoke tests.
    threads:
        torch intra-op threads; None keeps torch's default.
    """

    data_dir: Path
    out_dir: Path
    name: str = "pneumonia-densenet121-demo"
    version: str = "0.1.0"
    size: int = 128
    clahe: bool = True
    seed: int = 20250101
    test_fraction: float = 0.3
    val_fraction: float = 0.15
    batch_size: int = 16
    lr_stage1: float = 1e-3
    lr_stage2: float = 2e-4
    weight_decay: float = 1e-4
    stage2_aux_weight: float = 0.3
    time_budget_s: float = 28 * 60.0
    stage1_share: float = 0.6
    max_epochs_stage1: int = 40
    max_epochs_stage2: int = 30
    patience: int = 6
    bootstrap: int = 2000
    limit: int | None = None
    threads: int | None = None
    command: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "size": self.size >= 32,
            "test_fraction": 0 < self.test_fraction < 1,
            "val_fraction": 0 < self.val_fraction < 1 and self.test_fraction + self.val_fraction < 1,
            "batch_size": self.batch_size >= 2,
            "lr_stage1": self.lr_stage1 > 0,
            "lr_stage2": self.lr_stage2 > 0,
            "time_budget_s": self.time_budget_s > 0,
            "stage1_share": 0 < self.stage1_share < 1,
            "max_epochs_stage1": self.max_epochs_stage1 >= 1,
            "max_epochs_stage2": self.max_epochs_stage2 >= 0,
            "patience": self.patience >= 1,
            "bootstrap": self.bootstrap >= 10,
            "limit": self.limit is None or self.limit >= 12,
        }
        check_fields(self, checks)


# --------------------------------------------------------------------------- training


def train_pneumonia(config: TrainConfig) -> TrainResult:
    """Train, evaluate and write the demonstration weights and model card.

    Parameters
    ----------
    config:
        See :class:`TrainConfig`.

    Returns
    -------
    :class:`TrainResult` with the card (``out_dir/cards/<name>.json``), the
    weights (``out_dir/weights/<name>.pt``, float16 state dict in
    torchvision naming) and the measured metrics.

    Raises
    ------
    FileNotFoundError
        The data folder, ``labels.csv`` or an image is missing.
    ValueError
        A split has no pneumonia positive (AUROC undefined).
    """
    t_start = time.monotonic()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    data_dir = Path(config.data_dir)
    if not (data_dir / "labels.csv").is_file():
        raise FileNotFoundError(f"{data_dir / 'labels.csv'} not found (expected the cxr14 folder of ../shared/data)")
    data = prepare_data(config, data_dir)
    trainer = StageTrainer(config, data, rng)
    budget_end = t_start + config.time_budget_s
    stage1_end = t_start + config.stage1_share * config.time_budget_s
    state1, best1 = trainer.stage(1, config.lr_stage1, config.max_epochs_stage1, "val_mean_auroc", stage1_end, None)
    log.info("stage 1 best: %s", best1)
    if config.max_epochs_stage2 > 0:
        _, best2 = trainer.stage(
            2, config.lr_stage2, config.max_epochs_stage2, "val_auroc_pneumonia", budget_end, state1
        )
    else:
        best2 = {**trainer.validate(), "epoch": 0}
    log.info("stage 2 best: %s", best2)
    operating_point, metrics = _evaluate(config, data, trainer.model)

    # Weights: float16 storage halves the file (~14 MB); the registry casts to float32.
    out = Path(config.out_dir)
    weights_path, sha = save_float16_weights(trainer.model.state_dict(), out, config.name)

    wall = time.monotonic() - t_start
    card = _model_card(config, data, operating_point, metrics, weights_path.name, sha, wall,
                       best1["epoch"], best2["epoch"], len(trainer.history))
    card_path = out / "cards" / f"{config.name}.json"
    write_card(card, card_path, render_card_markdown(card))
    # The input-drift reference (node.drift): every image this run read, through the written weights as the pipeline runs them.
    reference = _drift_reference(card_path, config.name, data_dir, set(data.rec.image_ids))
    card = card.model_copy(update={"drift_reference": reference})
    write_card(card, card_path, render_card_markdown(card))
    log.info("wrote %s (sha256 %s, %d bytes) and %s in %.0f s", weights_path, sha, weights_path.stat().st_size,
             card_path, wall)
    return TrainResult(card_path, weights_path, card, wall, trainer.history)


def _drift_reference(card_path: Path, name: str, data_dir: Path, image_ids: set[str]):
    """The card's ``drift_reference`` from the PNGs of ``data_dir`` named in
    ``image_ids`` (pipelines/pneumonia/reference.py): all of them without
    ``--limit``, as for the shipped card."""
    from models.registry import ModelRegistry
    from pipelines.pneumonia.model import PneumoniaModel
    from pipelines.pneumonia.reference import png_reference

    model = PneumoniaModel(ModelRegistry([card_path.parent], include_shipped=False), name, "cpu")
    return png_reference(model, data_dir, keep=lambda p: p.name in image_ids)


def _evaluate(
    config: TrainConfig, data: Prepared, model: torch.nn.Module
) -> tuple[tuple[float, float, float], list[Metric]]:
    """The operating point (threshold, sensitivity, specificity) chosen on
    the validation split, and the card's metrics with bootstrap intervals."""
    rec, idx, images, pre, y_all = data.rec, data.idx, data.images, data.pre, data.rec.labels
    # Final evaluation: operating point on validation, then the test split once.
    p_val = predict(model, images[idx["val"]], pre)[:, PNEUMONIA_INDEX]
    p_test_all = predict(model, images[idx["test"]], pre)
    p_test = p_test_all[:, PNEUMONIA_INDEX]
    y_val = y_all[idx["val"], PNEUMONIA_INDEX]
    y_test = y_all[idx["test"], PNEUMONIA_INDEX]
    g_val = [rec.patient_ids[i] for i in idx["val"]]
    g_test = [rec.patient_ids[i] for i in idx["test"]]
    thr, sens_v, spec_v = youden_threshold(y_val, p_val)
    ci = f"95 % percentile bootstrap, {config.bootstrap} resamples of patients (one image per patient here)"
    dataset = "NIH ChestX-ray14 starter set (jrzech/reproduce-chexnet), 256x256 PNG"

    def metric(name: str, fn, y, s, groups, split: str, positives: bool = True) -> Metric:
        value = fn(y, s)
        low, high, _ = bootstrap_ci(fn, y, s, groups, config.bootstrap, config.seed)
        # a percentile interval can miss a degenerate point estimate by rounding only
        low, high = min(low, value), max(high, value)
        return Metric(name=name, value=round(value, 4), ci95_low=round(low, 4), ci95_high=round(high, 4),
                      dataset=dataset, split=split, n=len(y), n_positive=int(np.sum(y)) if positives else None,
                      ci_method=ci)

    test_split = f"held-out test split ({config.test_fraction:.0%} of patients, stratified on pneumonia), used once"
    metrics = [
        metric("AUROC Pneumonia", auroc, y_test, p_test, g_test, test_split),
        metric("AUROC Pneumonia", auroc, y_val, p_val, g_val,
               "validation split (used for early stopping and checkpoint selection: optimistic)"),
        metric("Sensitivity Pneumonia at operating point", lambda y, s: sensitivity(y, s, thr), y_test, p_test, g_test,
               test_split),
        metric("Specificity Pneumonia at operating point", lambda y, s: specificity(y, s, thr), y_test, p_test, g_test,
               test_split),
        metric("Mean AUROC over NIH findings", lambda y, s: mean_auroc(y, s, rec.label_mask),
               y_all[idx["test"]], p_test_all, g_test, test_split + "; findings with positives in the split",
               positives=False),
    ]
    for m in metrics:
        log.info("%s [%s]: %.4f (95%% CI %.4f-%.4f), n=%d, positives=%s", m.name, m.split[:40], m.value,
                 m.ci95_low, m.ci95_high, m.n, m.n_positive)

    return (thr, sens_v, spec_v), metrics


def _model_card(
    config: TrainConfig,
    data: Prepared,
    operating_point: tuple[float, float, float],
    metrics: list[Metric],
    weights_name: str,
    sha: str,
    wall: float,
    stage1_best_epoch: int,
    stage2_best_epoch: int,
    epochs_run: int,
) -> ModelCard:
    """The model card of a finished run."""
    idx, spec = data.idx, data.spec
    thr, sens_v, spec_v = operating_point
    positives = {s: int(data.pneumonia[ii].sum()) for s, ii in idx.items()}
    return ModelCard(
        name=config.name,
        version=config.version,
        task="classification",
        description=(
            "DenseNet-121 (torchxrayvision layout, 18 outputs) trained from scratch on a few hundred NIH "
            "ChestX-ray14 images to flag pneumonia on frontal chest radiographs, with a Grad-CAM map of the "
            "pneumonia output. DEMONSTRATION WEIGHTS: NOT FOR DIAGNOSIS."
        ),
        architecture=Architecture(name="xrv-densenet121", params={"in_channels": 1, "out_channels": 18}),
        input=spec,
        output=OutputSpec(
            labels=[lab if lab in NIH_FINDINGS else "" for lab in XRV_LABELS], target="Pneumonia", op_norm=False
        ),
        operating_point=OperatingPoint(
            threshold=round(thr, 6),
            method="Youden's J (max sensitivity + specificity - 1) on the validation split",
            sensitivity=round(sens_v, 4),
            specificity=round(spec_v, 4),
            dataset="validation split",
        ),
        weights=Weights(format="state_dict", path=f"../weights/{weights_name}", sha256=sha, dtype="float16"),
        licence=Licence(
            spdx="Apache-2.0",
            notes="Weights trained in this project. Training images: NIH ChestX-ray14 (public, NIH Clinical "
            "Center terms: cite the dataset, no re-identification) via jrzech/reproduce-chexnet (BSD-3-Clause).",
        ),
        intended_use=(
            "Demonstration and integration testing of the dicom-ai-node pneumonia pipeline only. Demonstration "
            f"weights, not for diagnosis: trained on {len(idx['train'])} images ({positives['train']} with "
            "pneumonia) at low resolution; the measured AUROC has a wide interval and is far below published models. "
            "For real use import torchxrayvision's densenet121-res224-rsna weights (see models/cards/README.md)."
        ),
        # The envelope of the training split's images, for the node's intended-use guard.
        intended_use_rules=intended_use_rules(config.data_dir, [data.rec.image_ids[i] for i in idx["train"]],
                                              spec.modalities),
        demonstration_only=True,
        training_data=_training_data(config, data),
        training=TrainingRun(
            command=config.command or "train_pneumonia(...)",
            wall_time_s=round(wall, 1),
            **run_environment(_versions()),
            hyperparameters={
                **config_hyperparameters(config),
                "stage1_best_epoch": stage1_best_epoch,
                "stage2_best_epoch": stage2_best_epoch,
                "epochs_run": epochs_run,
                "augmentation": "MONAI RandAffine (rotate 8 deg, scale 10 %, translate 6 %), RandAdjustContrast "
                "(gamma 0.75-1.4), RandScaleIntensity 10 %, RandShiftIntensity 0.05, RandGaussianNoise 0.01",
                "loss": "stage 1: BCE over the 14 NIH findings with pos_weight = neg/pos clipped to [1, 30]; "
                f"stage 2: pneumonia BCE (pos_weight) + {config.stage2_aux_weight} x stage-1 loss",
            },
            notes="Stage 1 (multi-task) kept the best validation mean AUROC over the findings; stage 2 "
            "(pneumonia fine-tuning) kept the best validation pneumonia AUROC.",
        ),
        metrics=metrics,
        references=[
            "Huang G et al. Densely Connected Convolutional Networks. CVPR 2017. arXiv:1608.06993",
            "Wang X et al. ChestX-ray8: Hospital-scale chest X-ray database and benchmarks. CVPR 2017. "
            "arXiv:1705.02315",
            "Rajpurkar P et al. CheXNet. 2017. arXiv:1711.05225 (pneumonia AUROC 0.768 on ChestX-ray14)",
            "Zech J. reproduce-chexnet. github.com/jrzech/reproduce-chexnet (pneumonia AUROC 0.762)",
            "Cohen JP et al. TorchXRayVision. MIDL 2022. arXiv:2111.00595",
            "Selvaraju RR et al. Grad-CAM. ICCV 2017. arXiv:1610.02391",
        ],
    )


def _training_data(config: TrainConfig, data: Prepared) -> TrainingData:
    """The card's description of the training images and their split."""
    rec, idx = data.rec, data.idx
    positives = {s: int(data.pneumonia[ii].sum()) for s, ii in idx.items()}
    return TrainingData(
        description=f"{len(rec.image_ids)} frontal chest radiographs (PA and AP), one per patient, with the 14 "
        "NIH finding labels; 'No Finding' means none of them.",
        sources=[DATA_SOURCE],
        licence="NIH ChestX-ray14: public (NIH Clinical Center); starter set: BSD-3-Clause",
        n_images=len(rec.image_ids),
        split=DataSplit(
            method="by patient (Patient ID), stratified on patient-level pneumonia, scikit-learn "
            f"train_test_split: test {config.test_fraction:.0%}, validation {config.val_fraction:.0%} of "
            "patients, the rest training",
            seed=config.seed,
            counts={s: len(ii) for s, ii in idx.items()},
            positives=positives,
            members={"test": data.splits["test"], "val": data.splits["val"]},
        ),
    )


def _versions() -> dict[str, str]:
    """Versions of the libraries this training uses beyond :func:`run_environment`'s."""
    import skimage
    import sklearn

    # skimage's lazy-loading stub (__init__.pyi) does not declare __version__.
    return {"scikit-learn": sklearn.__version__, "scikit-image": skimage.__version__}  # type: ignore[attr-defined]


def render_card_markdown(card: ModelCard) -> str:
    """A short human-readable model card generated from the JSON card.

    Raises
    ------
    ValueError
        The card has no ``input`` or ``output`` (not a classification card).
    """
    inp, out = card.input, card.output
    if inp is None or out is None:
        raise ValueError(f"card {card.name!r}: no input or output; expected a classification card")
    model = [
        f"- Architecture: `{card.architecture.name}` {card.architecture.params}, weights "
        f"`{card.weights.path}` ({card.weights.format}, {card.weights.dtype}), SHA-256 `{card.weights.sha256}`.",
        f"- Input: {inp.size[0]}x{inp.size[1]}, {inp.channels} channel, modalities "
        f"{', '.join(inp.modalities)}; isotropic resampling {inp.isotropic_resampling}, pad to square "
        f"{inp.pad_to_square}, CLAHE {inp.clahe} (clip {inp.clahe_clip_limit}), intensity "
        f"{inp.intensity_range}.",
        f"- Output: sigmoid probability of `{out.target}` (output {out.target_index}), "
        f"op_norm {out.op_norm}.",
    ]
    if card.operating_point:
        op = card.operating_point
        model.append(f"- Operating point: {op.threshold:.4g} ({op.method}; sensitivity {op.sensitivity}, "
                     f"specificity {op.specificity} there).")
    performance = ["| metric | value | 95 % CI | n (positives) | split |", "|---|---|---|---|---|"]
    for m in card.metrics:
        ci = f"{m.ci95_low:.3f}-{m.ci95_high:.3f}" if m.ci95_low is not None else ""
        n = f"{m.n} ({m.n_positive})" if m.n_positive is not None else f"{m.n}"
        performance.append(f"| {m.name} | {m.value:.3f} | {ci} | {n} | {m.split} |")
    if card.metrics and card.metrics[0].ci_method:
        performance += ["", f"Intervals: {card.metrics[0].ci_method}."]
    split = card.training_data.split
    return card_markdown(
        card,
        model=model,
        performance=performance,
        split=f"Split: {split.method}; seed {split.seed}; images {split.counts}; pneumonia positives "
        f"{split.positives}. The test and validation patient ids are in the JSON card." if split else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see ``--help``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.pneumonia.train", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="cxr14 folder (labels.csv, images/)")
    parser.add_argument("--out", type=Path, required=True, help="model root: writes weights/ and cards/ under it")
    parser.add_argument("--name", default=TrainConfig.name)
    parser.add_argument("--version", default=TrainConfig.version)
    parser.add_argument("--size", type=int, default=TrainConfig.size)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--budget-min", type=float, default=TrainConfig.time_budget_s / 60)
    parser.add_argument("--bootstrap", type=int, default=TrainConfig.bootstrap)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="use only N images (smoke runs)")
    parser.add_argument("--log-file", type=Path, default=None)
    args = parser.parse_args(argv)
    configure_logging(args.log_file)
    command = command_line("pipelines.pneumonia.train", argv)
    config = TrainConfig(
        data_dir=args.data, out_dir=args.out, name=args.name, version=args.version, size=args.size, seed=args.seed,
        time_budget_s=args.budget_min * 60, bootstrap=args.bootstrap, threads=args.threads, limit=args.limit,
        command=command,
    )
    train_pneumonia(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
