"""The optimisation of :mod:`pipelines.brain_tumour.train`: augmentation, crop
sampling, validation, and the loop with checkpoint selection, early stopping
and a wall-clock budget (module docstring there for the recipe).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.brain_tumour.train_data import dice, load_item
from pipelines.common.training import state_copy

if TYPE_CHECKING:
    from pipelines.brain_tumour.train import TrainConfig

__all__ = ["LoopResult", "augmentation", "optimise", "validate"]

log = logging.getLogger("pipelines.brain_tumour.train")


@dataclass
class LoopResult:
    """Outcome of :func:`optimise`.

    Attributes
    ----------
    history:
        One entry per validation: step, loss and Dice per region.
    best:
        ``{"mean", "step", "TC", "WT", "ET"}`` of the best validation.
    best_state:
        State dict of the model at that validation.
    steps:
        Optimiser steps run.
    stop_reason:
        ``"max_steps"``, ``"time budget"`` or the early-stopping reason.
    train_time:
        Wall time of the loop in seconds.
    """

    history: list[dict]
    best: dict
    best_state: dict
    steps: int
    stop_reason: str
    train_time: float


def augmentation(config: TrainConfig) -> Any:
    """The seeded random crop/affine/flip/intensity transform (a MONAI ``Compose``)."""
    from monai.transforms import (
        Compose,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    # The affine samples the final crop from a 25 % larger one, so rotated corners hold tissue, not padding.
    outer = tuple(int(math.ceil(c * 1.25)) for c in config.crop)
    rot = math.radians(config.rotate_deg)
    random_tf = Compose([
        SpatialPadd(keys=["image", "label"], spatial_size=outer),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=outer, pos=1.0,
                               neg=1.0, num_samples=1),
        RandAffined(keys=["image", "label"], spatial_size=config.crop, prob=config.affine_prob,
                    rotate_range=(rot, rot, rot), scale_range=(config.scale,) * 3, mode=("bilinear", "nearest"),
                    padding_mode="reflection"),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
        RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
    ])
    random_tf.set_random_state(seed=config.seed)
    return random_tf


def validate(
    model: torch.nn.Module,
    val_data: Sequence[dict] | None,
    val_items: Sequence[dict],
    mode: str,
    config: TrainConfig,
) -> dict[str, float]:
    """Slab mode: Dice pooled over the training blocks ``val_data`` (a healthy block has no tumour, so a
    per-block Dice would be 0 or 1); case mode: mean of per-case Dice over ``val_items`` (the BraTS
    convention). Returns ``{"TC", "WT", "ET", "mean"}``."""
    from monai.inferers import sliding_window_inference

    model.eval()
    names = ("TC", "WT", "ET")
    per_item: dict[str, list[float]] = {k: [] for k in names}
    inter, total = np.zeros(3), np.zeros(3)
    items = val_data if val_data is not None else [load_item(it, config.spacing_mm) for it in val_items]
    with torch.inference_mode():
        for d in items:
            logits = sliding_window_inference(d["image"][None], config.crop, 4, model, overlap=config.overlap)
            on = (torch.sigmoid(logits[0]) >= 0.5).numpy()
            truth = d["label"].numpy() > 0.5
            for k, name in enumerate(names):
                per_item[name].append(dice(on[k], truth[k]))
                inter[k] += np.logical_and(on[k], truth[k]).sum()
                total[k] += on[k].sum() + truth[k].sum()
    model.train()
    if mode == "slab":
        res = {name: float(1.0 if total[k] == 0 else 2 * inter[k] / total[k]) for k, name in enumerate(names)}
    else:
        res = {name: float(np.mean(v)) for name, v in per_item.items()}
    res["mean"] = float(np.mean([res[n] for n in names]))
    return res


def _sampler(
    dataset: Any, n_items: int, random_tf: Any, rng: np.random.Generator, config: TrainConfig
) -> Callable[[], dict[str, torch.Tensor]]:
    """A function drawing one batch of augmented crops from ``dataset``."""
    # Items with tumour are drawn 3x as often as items without (a healthy block): a batch without any
    # tumour voxel gives the Dice loss nothing to learn from.
    has_tumour = np.array([bool(dataset[i]["label"].sum() > 0) for i in range(n_items)]) \
        if n_items <= config.cache_cases else np.ones(n_items, dtype=bool)
    draw = np.where(has_tumour, 3.0, 1.0)
    draw /= draw.sum()

    def batch() -> dict[str, torch.Tensor]:
        picks = rng.choice(n_items, size=config.batch_size, p=draw)
        with warnings.catch_warnings():
            # A block or case without tumour can only give background crops; MONAI warns each time.
            warnings.filterwarnings("ignore", message="Num foregrounds 0")
            samples = [random_tf(dataset[int(i)])[0] for i in picks]
        return {k: torch.stack([s[k].as_tensor() if hasattr(s[k], "as_tensor") else s[k] for s in samples])
                for k in ("image", "label")}

    return batch


def optimise(
    model: torch.nn.Module,
    dataset: Any,
    n_items: int,
    random_tf: Any,
    rng: np.random.Generator,
    run_validation: Callable[[], dict[str, float]],
    config: TrainConfig,
    ckpt_dir: Path,
) -> LoopResult:
    """Adam with cosine decay over the budget; validate every ``eval_every`` steps, keep the best
    state (``<name>-best.pt`` in ``ckpt_dir``, the last one in ``<name>-last.pt``), stop early."""
    from monai.losses import DiceLoss

    dice_loss = DiceLoss(smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True, sigmoid=True, batch=True)
    bce_loss = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batch = _sampler(dataset, n_items, random_tf, rng, config)
    history: list[dict] = []
    best: dict[str, Any] = {"mean": -1.0, "step": 0}
    best_state = state_copy(model)
    bad_evals = 0
    loop_start = time.monotonic()
    step = 0
    stop_reason = "max_steps"
    model.train()
    while step < config.max_steps:
        elapsed = time.monotonic() - loop_start
        # Cosine decay over the wall-clock budget (or the step limit, whichever is nearer): on a
        # shared CPU the time per step varies too much to plan steps in advance.
        progress = min(1.0, max(elapsed / config.time_budget_s, step / config.max_steps))
        lr = config.lr * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        drawn = batch()
        opt.zero_grad(set_to_none=True)
        logits = model(drawn["image"])
        loss = dice_loss(logits, drawn["label"]) + bce_loss(logits, drawn["label"])
        loss.backward()
        opt.step()
        step += 1
        out_of_time = time.monotonic() - loop_start > config.time_budget_s
        if step % 10 == 0:
            log.info("step %d loss %.4f lr %.2e (%.0f s)", step, loss.item(), lr, time.monotonic() - loop_start)
        if step % config.eval_every == 0 or step == config.max_steps or out_of_time:
            v = run_validation()
            history.append({"step": step, "loss": round(loss.item(), 4), **{k: round(x, 4) for k, x in v.items()}})
            log.info("validation at step %d: %s", step, history[-1])
            if v["mean"] > best["mean"]:
                best = {"mean": v["mean"], "step": step, **v}
                best_state = state_copy(model)
                torch.save({"model": best_state, "step": step, "validation": v}, ckpt_dir / f"{config.name}-best.pt")
                bad_evals = 0
            else:
                bad_evals += 1
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                       ckpt_dir / f"{config.name}-last.pt")
            if bad_evals >= config.patience:
                stop_reason = f"early stopping: no improvement in {config.patience} validations"
                break
        if out_of_time:
            stop_reason = "time budget"
            break
    train_time = time.monotonic() - loop_start
    log.info("stopped after %d steps (%s) in %.0f s; best validation mean Dice %.4f at step %d", step, stop_reason,
             train_time, best["mean"], best["step"])
    return LoopResult(history, best, best_state, step, stop_reason, train_time)
