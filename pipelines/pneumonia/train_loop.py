"""The pneumonia training loop: data preparation, the two training stages
and their validation (:func:`pipelines.pneumonia.train.train_pneumonia`)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.card import InputSpec
from models.densenet import PNEUMONIA_INDEX, XRV_LABELS, XRVDenseNet121
from pipelines.common.training import state_copy
from pipelines.pneumonia.preprocess import CxrPreprocessor, png_to_image
from pipelines.pneumonia.train_data import read_labels, split_by_patient
from pipelines.pneumonia.train_metrics import auroc, mean_auroc

if TYPE_CHECKING:
    from pipelines.pneumonia.train import TrainConfig
    from pipelines.pneumonia.train_data import _Records

__all__ = ["Prepared", "StageTrainer", "augmenter", "predict", "prepare_data"]

log = logging.getLogger("pipelines.pneumonia.train")


def augmenter(size: int, seed: int):
    """The MONAI training augmentations, seeded."""
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandGaussianNoise,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    # Small geometric changes only: radiographs are acquired upright, and
    # left-right flips would put the heart on the wrong side.
    aug = Compose(
        [
            RandAffine(
                prob=0.9,
                rotate_range=(math.radians(8),),
                scale_range=(0.1, 0.1),
                translate_range=(0.06 * size, 0.06 * size),
                padding_mode="zeros",
                mode="bilinear",
            ),
            RandAdjustContrast(prob=0.5, gamma=(0.75, 1.4)),
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandShiftIntensity(offsets=0.05, prob=0.5),
            RandGaussianNoise(prob=0.2, std=0.01),
        ]
    )
    aug.set_random_state(seed=seed)
    return aug


def predict(model: torch.nn.Module, x: np.ndarray, pre: CxrPreprocessor, batch: int = 32) -> np.ndarray:
    """Sigmoid outputs ``(N, 18)`` for prepared images ``(N, H, W)`` in [0, 1]."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.stack([pre.to_network_input(im) for im in x[i : i + batch]]))
            out.append(torch.sigmoid(model(xb)).numpy())
    return np.concatenate(out)


@dataclass
class Prepared:
    """The labels, patient splits and prepared images of a run."""

    rec: _Records
    splits: dict[str, list[str]]
    idx: dict[str, np.ndarray]
    spec: InputSpec
    pre: CxrPreprocessor
    images: np.ndarray

    @property
    def pneumonia(self) -> np.ndarray:
        """Pneumonia label of every image."""
        return self.rec.labels[:, PNEUMONIA_INDEX]


def prepare_data(config: TrainConfig, data_dir: Path) -> Prepared:
    """Read the labels, split by patient and prepare every image.

    Raises
    ------
    FileNotFoundError
        An image is missing.
    """
    rec = read_labels(data_dir, config.limit)
    pneu = rec.labels[:, PNEUMONIA_INDEX]
    splits = split_by_patient(rec.patient_ids, pneu > 0, config.test_fraction, config.val_fraction, config.seed)
    split_of = {p: s for s, ps in splits.items() for p in ps}
    idx = {s: np.array([i for i, p in enumerate(rec.patient_ids) if split_of[p] == s]) for s in splits}
    for s, ii in idx.items():
        log.info("split %s: %d images, %d patients, %d pneumonia", s, len(ii), len(splits[s]), int(pneu[ii].sum()))

    spec = InputSpec(size=(config.size, config.size), clahe=config.clahe)
    pre = CxrPreprocessor(spec)
    t0 = time.monotonic()
    images = np.stack([pre.prepare(png_to_image(data_dir / "images" / name)).image for name in rec.image_ids])
    log.info("prepared %d images at %dx%d in %.1f s", len(images), config.size, config.size, time.monotonic() - t0)
    return Prepared(rec, splits, idx, spec, pre, images)


@dataclass
class StageTrainer:
    """Trains ``model`` on the training split of ``data`` in stages: stage 1
    the multi-task loss over the NIH findings, stage 2 pneumonia fine-tuning.
    Each epoch is validated; ``history`` holds one row per epoch."""

    config: TrainConfig
    data: Prepared
    rng: np.random.Generator
    model: XRVDenseNet121 = field(init=False)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        rec, tr = self.data.rec, self.data.idx["train"]
        n_pos = rec.labels[tr].sum(0)
        n_neg = len(tr) - n_pos
        # Class weighting: positives of rare findings count up to 30x.
        self.pos_weight = torch.from_numpy(np.clip(n_neg / np.maximum(n_pos, 1), 1.0, 30.0).astype(np.float32))
        self.label_mask = torch.from_numpy((rec.label_mask & (n_pos > 0)).astype(np.float32))
        self.model = XRVDenseNet121(in_channels=1, out_channels=len(XRV_LABELS))
        self.aug = augmenter(self.config.size, self.config.seed)

    def multitask_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target, pos_weight=self.pos_weight, reduction="none"
        )
        return (per * self.label_mask).sum(1).mean() / self.label_mask.sum()

    def pneumonia_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, PNEUMONIA_INDEX], target[:, PNEUMONIA_INDEX], pos_weight=self.pos_weight[PNEUMONIA_INDEX]
        )

    def run_epoch(self, opt: torch.optim.Optimizer, stage: int) -> float:
        """One pass over the training split in a seeded random order; mean loss."""
        config, data, model = self.config, self.data, self.model
        model.train()
        order = self.rng.permutation(data.idx["train"])
        total, n = 0.0, 0
        for i in range(0, len(order), config.batch_size):
            b = order[i : i + config.batch_size]
            if len(b) < 2:  # BatchNorm needs more than one sample
                continue
            xb = np.stack(
                [data.pre.to_network_input(np.clip(np.asarray(self.aug(data.images[j][None]))[0], 0, 1)) for j in b]
            )
            xb_t = torch.from_numpy(xb.astype(np.float32))
            yb = torch.from_numpy(data.rec.labels[b])
            logits = model(xb_t)
            if stage == 1:
                loss = self.multitask_loss(logits, yb)
            else:
                loss = self.pneumonia_loss(logits, yb) + config.stage2_aux_weight * self.multitask_loss(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            n += len(b)
        return total / max(n, 1)

    def validate(self) -> dict[str, float]:
        """Pneumonia AUROC and mean AUROC over the findings on the validation split."""
        data = self.data
        p = predict(self.model, data.images[data.idx["val"]], data.pre)
        yv = data.rec.labels[data.idx["val"]]
        return {
            "val_auroc_pneumonia": auroc(yv[:, PNEUMONIA_INDEX], p[:, PNEUMONIA_INDEX]),
            "val_mean_auroc": mean_auroc(yv, p, data.rec.label_mask),
        }

    def stage(
        self, number: int, lr: float, max_epochs: int, key: str, deadline: float, start_state: dict | None
    ) -> tuple[dict, dict]:
        """Train one stage until ``max_epochs``, ``deadline`` (monotonic s)
        or early stop on ``key``; load and return the best state and its metrics.

        Raises
        ------
        ValueError
            No epoch ran and there is no start state.
        """
        model, config = self.model, self.config
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=2)
        best_state, best = start_state, None
        if start_state is not None:
            best = self.validate()
            best["epoch"] = 0
            log.info("stage %d start: %s", number, best)
        since = 0
        epoch_times: list[float] = []
        for epoch in range(1, max_epochs + 1):
            if epoch_times and time.monotonic() + np.mean(epoch_times) > deadline:
                log.info("stage %d: time budget reached after %d epochs", number, epoch - 1)
                break
            te = time.monotonic()
            loss = self.run_epoch(opt, number)
            metrics = self.validate()
            epoch_times.append(time.monotonic() - te)
            sched.step(metrics[key])
            row = {"stage": number, "epoch": epoch, "loss": loss, **metrics, "lr": opt.param_groups[0]["lr"],
                   "seconds": epoch_times[-1]}
            self.history.append(row)
            improved = best is None or metrics[key] > best[key]
            log.info("%s%s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                     "  *" if improved else "")
            if improved:
                best_state, best, since = state_copy(model), {**metrics, "epoch": epoch}, 0
            else:
                since += 1
                if since >= config.patience:
                    log.info("stage %d: early stop, no gain in %s for %d epochs", number, key, since)
                    break
        if best_state is None or best is None:  # max_epochs 0 and no start state
            raise ValueError(f"stage {number}: no epoch ran and no state to start from")
        model.load_state_dict(best_state)
        return best_state, best
