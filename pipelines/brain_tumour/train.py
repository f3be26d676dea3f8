"""Train demonstration brain tumour segmentation weights (SegResNet, BraTS labels).

The recipe is the MONAI ``brats_mri_segmentation`` bundle's ``train.json``,
shrunk to fit a CPU:

* network: MONAI SegResNet (Myronenko, BrainLes 2018, arXiv:1810.11654) with the
  bundle's block layout, ``init_filters`` 8 instead of 16 by default;
* input: channels T1c, T1, T2, FLAIR; each z-scored over its non-zero voxels
  (:func:`pipelines.brain_tumour.preprocess.normalize_nonzero`, the pipeline's
  own step: MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``) at
  the data's 1 mm, then resampled to the
  card's voxel size (2 mm by default) exactly as inference does
  (:func:`pipelines.brain_tumour.model.resample_volume`); layout (x, y, z) as
  the bundle (``array_axes = "xyz"``);
* targets: the BraTS regions TC = {1, 4}, WT = {1, 2, 4}, ET = {4} as sigmoid
  channels (MONAI ``ConvertToMultiChannelBasedOnBratsClasses``);
* loss: the bundle's MONAI ``DiceLoss(sigmoid=True, squared_pred=True,
  smooth_nr=0, smooth_dr=1e-5)``, with ``batch=True`` so crops without tumour
  still penalise false positives, plus binary cross-entropy on the same
  channels (``torch.nn.BCEWithLogitsLoss``; MONAI's ``DiceCELoss`` would use a
  softmax cross-entropy over the overlapping TC/WT/ET channels): from scratch, Dice alone barely moves in the
  few hundred steps a shared CPU allows (the tumour is < 1 % of the voxels),
  and the cross-entropy term gives every voxel a gradient from the first step;
* augmentation: random crops (MONAI ``RandCropByPosNegLabeld``, half centred on
  tumour: the tumour is < 1 % of a volume and the crops are small; blocks or
  cases with tumour are drawn 3x as often as those without), flips on
  the three axes, intensity scale and shift by up to 10 % (the bundle's
  ``RandFlipd``, ``RandScaleIntensityd``, ``RandShiftIntensityd``), plus random
  rotation (up to 15 degrees) and scaling (up to 15 %) (MONAI ``RandAffined``,
  sampled from a crop 25 % larger, so no padding enters): with one training
  case, a first run without it fitted the training blocks (Dice 0.92 there) but
  segmented the same region at 0.70 when the whole volume was the input;
* Adam with cosine decay, periodic validation, best-checkpoint selection,
  early stopping, a wall-clock budget.

Held-out data, designed for what exists:

* **Three or more labelled cases** (a BraTS 2020/2021/2023 training folder):
  cases are split into train / validation / test with a fixed seed; test cases
  are touched once, at the end.
* **One or two labelled cases** (here: TCGA-FG-6692): each case is split in
  space. A sagittal slab 24 mm wide, starting at the 70th percentile of the
  whole-tumour voxels' left-right positions, is the held-out test region; 8 mm
  on each side of it are a gap; training crops are cut from the two blocks
  outside slab and gaps only (each block is resampled and cropped on its own,
  so no training crop, and no interpolation kernel, touches the slab). There is
  no independent validation region: checkpoint selection and early stopping
  use the Dice on the training blocks (a fit measure, said so in the card).
  The held-out Dice is measured through the deployment path
  (:class:`~pipelines.brain_tumour.model.BrainTumourModel` on the whole 1 mm
  volume) and scored on the slab's voxels only. It is optimistic and limited:
  the same patient, scanner and tumour as the training blocks.

Data: case folders with the usual BraTS file names, read in place with
SimpleITK and oriented to LPS: ``*_t1``/``-t1n``, ``*_t1ce``/``_t1c``/``-t1c``,
``*_t2``/``-t2w``, ``*_flair``/``_fla``/``-t2f``, labels ``*_seg``/``-seg``/
``_seg-consensus`` with BraTS labels 1/2/4 (BraTS 2023: 1/2/3, ET = 3 is read as 4).
Cases without a label file are skipped.

Run::

    OMP_WAIT_POLICY=PASSIVE nice -n 10 python -m pipelines.brain_tumour.train \\
        --data ../shared/data/brats/TCGA-FG-6692-preprocessed --out models --threads 2

``OMP_WAIT_POLICY=PASSIVE`` matters on a shared CPU: with OpenMP's default
spinning, two torch threads competing with other processes for two cores ran a
training step 5-10x slower (1.6 s vs 11-15 s measured here).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.card import (
    Architecture,
    ArrayAxes,
    DataSplit,
    LabelRule,
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
from models.registry import ModelRegistry
from models.segresnet import build_segresnet, spatial_multiple
from pipelines.brain_tumour.model import BrainTumourModel, region_masks, resample_volume, to_network_layout
from pipelines.brain_tumour.preprocess import normalize_nonzero
from pipelines.common.training import (
    TrainResult,
    card_markdown,
    check_fields,
    command_line,
    config_hyperparameters,
    configure_logging,
    run_environment,
    save_float16_weights,
    state_copy,
    write_card,
)

log = logging.getLogger(__name__)

#: Input channel order of the MONAI bundle (metadata.json ``channel_def``).
CHANNELS: tuple[str, ...] = ("T1c", "T1", "T2", "FLAIR")

#: The BraTS label map of the bundle's inference.json, in priority order.
BRATS_RULES: tuple[LabelRule, ...] = (
    LabelRule(channel="ET", label=4, name="GD-enhancing tumour (ET)"),
    LabelRule(channel="TC", label=1, name="necrotic and non-enhancing tumour core (NCR/NET)"),
    LabelRule(channel="WT", label=2, name="peritumoral oedema (ED)"),
)
#: BraTS evaluation regions (output channels of the bundle: TC, WT, ET).
BRATS_REGIONS: dict[str, list[int]] = {"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]}

# File-name suffixes (after the case id, separated by "_" or "-") -> role.
_SUFFIXES: dict[str, str] = {
    "t1ce": "T1c", "t1c": "T1c", "t1gd": "T1c",
    "t1n": "T1", "t1": "T1",
    "t2w": "T2", "t2": "T2",
    "t2f": "FLAIR", "flair": "FLAIR", "fla": "FLAIR",
    "seg": "seg",
}
_NAME = re.compile(
    r"[_-](" + "|".join(sorted(_SUFFIXES, key=len, reverse=True)) + r")(?:[_-][a-z]+)?$", re.IGNORECASE
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class BratsCase:
    """One case folder: role (``"T1c"``...) -> NIfTI path, and the label file if any."""

    case_id: str
    images: dict[str, Path]
    label: Path | None


def find_brats_cases(data_dir: Path) -> list[BratsCase]:
    """The BraTS-style cases under ``data_dir`` (itself a case folder, or a
    folder of case folders), sorted by id.

    Raises
    ------
    FileNotFoundError
        ``data_dir`` does not exist or holds no case with all four sequences.
    ValueError
        A folder has two files for the same role.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} is not a directory (expected a BraTS case folder or a folder of them)")
    folders = [data_dir] + sorted(p for p in data_dir.iterdir() if p.is_dir())
    cases = []
    for folder in folders:
        found: dict[str, Path] = {}
        for f in sorted(folder.iterdir()):
            if not f.is_file() or not (f.name.endswith(".nii.gz") or f.name.endswith(".nii")):
                continue
            stem = f.name[: -len(".nii.gz")] if f.name.endswith(".nii.gz") else f.name[: -len(".nii")]
            m = _NAME.search(stem)
            if not m:
                continue
            role = _SUFFIXES[m.group(1).lower()]
            if role in found:
                raise ValueError(f"{folder}: two files for {role}: {found[role].name} and {f.name}")
            found[role] = f
        if all(r in found for r in CHANNELS):
            cases.append(BratsCase(folder.name, {r: found[r] for r in CHANNELS}, found.get("seg")))
    if not cases:
        raise FileNotFoundError(f"{data_dir}: no case folder with T1, T1c, T2 and FLAIR NIfTI files")
    return sorted(cases, key=lambda c: c.case_id)


def _read_lps(path: Path):
    import SimpleITK as sitk

    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    return sitk.GetArrayFromImage(img), tuple(float(s) for s in reversed(img.GetSpacing()))


def load_case(
    case: BratsCase, channels: Sequence[str] = CHANNELS
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """Read a case as the pipeline hands it to the model.

    Returns
    -------
    image:
        ``(C, D, H, W)`` float32, LPS (D inferior->superior, H anterior->posterior,
        W right->left), channels in ``channels`` order, each z-scored over its
        non-zero voxels (:func:`pipelines.brain_tumour.preprocess.normalize_nonzero`).
    label:
        ``(D, H, W)`` uint8 BraTS labels {0, 1, 2, 4} (BraTS 2023's ET = 3 becomes 4),
        or None when the case has no label file.
    spacing:
        ``(D, H, W)`` voxel size in mm.

    Raises
    ------
    ValueError
        The sequences (or the label) do not share one grid, or the label has
        values other than BraTS labels.
    """
    arrays: list[np.ndarray] = []
    spacing: tuple[float, ...] | None = None
    for role in channels:
        a, s = _read_lps(case.images[role])
        if spacing is not None and (a.shape != arrays[0].shape or not np.allclose(s, spacing, rtol=1e-3)):
            raise ValueError(f"case {case.case_id}: {role} is {a.shape} at {s} mm, {channels[0]} is "
                             f"{arrays[0].shape} at {spacing} mm: the sequences must be co-registered")
        arrays.append(a.astype(np.float32))
        spacing = s
    if spacing is None:
        raise ValueError("channels: expected at least one sequence role")
    image = normalize_nonzero(np.stack(arrays))  # the pipeline's own step 6
    label = None
    if case.label is not None:
        lab, s = _read_lps(case.label)
        if lab.shape != arrays[0].shape:
            raise ValueError(f"case {case.case_id}: label is {lab.shape}, images {arrays[0].shape}")
        values = set(np.unique(lab).tolist())
        if 3 in values and 4 in values or not values <= {0, 1, 2, 3, 4}:
            raise ValueError(f"case {case.case_id}: label values {sorted(values)} are not BraTS labels")
        lab = lab.astype(np.uint8)
        lab[lab == 3] = 4  # BraTS 2023 numbers ET 3
        label = lab
    return image, label, spacing


def _load_labelled(
    case: BratsCase, channels: Sequence[str] = CHANNELS
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """:func:`load_case` of a case that has a label file (ValueError if not)."""
    image, label, spacing = load_case(case, channels)
    if label is None:
        raise ValueError(f"case {case.case_id}: no label file")
    return image, label, spacing


def _targets(label: torch.Tensor, channels: Sequence[str], regions: dict[str, list[int]]) -> torch.Tensor:
    """``(*spatial)`` labels -> ``(K, *spatial)`` float region channels."""
    return torch.stack([torch.isin(label, torch.tensor(regions[c], dtype=label.dtype)) for c in channels]).float()


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks; 1.0 when both are empty (nothing to find, nothing found)."""
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * inter / total)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    Attributes
    ----------
    data_dir:
        A BraTS case folder or a folder of them (read in place).
    out_dir:
        Model root: writes ``weights/<name>.pt`` and ``cards/<name>.json``/``.md``.
    init_filters:
        SegResNet width (bundle: 16).
    spacing_mm:
        Isotropic voxel size the network works at, mm.
    crop:
        Training crop and inference roi, voxels (x, y, z) at ``spacing_mm``.
    affine_prob, rotate_deg, scale:
        Probability, largest rotation (degrees, each axis) and largest relative
        scaling of the random affine augmentation.
    batch_size, lr, weight_decay:
        Adam settings; the learning rate decays by a cosine over the time budget
        (or ``max_steps``, whichever ends first).
    max_steps:
        Upper bound on optimisation steps; the time budget usually ends training first.
    time_budget_s:
        Wall-clock budget of the optimisation loop (data loading and the final
        evaluation come on top).
    eval_every, patience:
        Validate every ``eval_every`` steps; stop after ``patience``
        validations without improvement of the mean Dice.
    slab_width_mm, slab_gap_mm, slab_quantile:
        Held-out slab when fewer than three labelled cases exist (see module doc).
    test_fraction, val_fraction:
        Case split when three or more labelled cases exist.
    cache_cases:
        Cases (or blocks) kept in memory at the network's voxel size.
    checkpoint_dir:
        Where the best and last checkpoints go; None = a new temporary folder.
    threads:
        torch intra-op threads; None keeps torch's default.
    """

    data_dir: Path
    out_dir: Path
    name: str = "brats-segresnet-demo"
    version: str = "0.1.0"
    init_filters: int = 8
    spacing_mm: float = 2.0
    crop: tuple[int, int, int] = (32, 64, 64)
    overlap: float = 0.5
    affine_prob: float = 0.5
    rotate_deg: float = 15.0
    scale: float = 0.15
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    dropout_prob: float = 0.2
    max_steps: int = 4000
    time_budget_s: float = 24 * 60.0
    eval_every: int = 100
    patience: int = 6
    slab_width_mm: float = 24.0
    slab_gap_mm: float = 8.0
    slab_quantile: float = 0.7
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    cache_cases: int = 48
    seed: int = 20250101
    threads: int | None = None
    checkpoint_dir: Path | None = None
    command: str | None = None

    def __post_init__(self) -> None:
        mult = spatial_multiple((1, 2, 2, 4))
        checks = {
            "init_filters": self.init_filters >= 8 and self.init_filters % 8 == 0,
            "spacing_mm": 0.5 <= self.spacing_mm <= 8.0,
            "crop": len(self.crop) == 3 and all(c >= mult and c % mult == 0 for c in self.crop),
            "overlap": 0.0 <= self.overlap < 1.0,
            "affine_prob": 0.0 <= self.affine_prob <= 1.0,
            "rotate_deg": 0.0 <= self.rotate_deg <= 45.0,
            "scale": 0.0 <= self.scale < 0.5,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "dropout_prob": 0.0 <= self.dropout_prob < 1.0,
            "max_steps": self.max_steps >= 1,
            "time_budget_s": self.time_budget_s > 0,
            "eval_every": self.eval_every >= 1,
            "patience": self.patience >= 1,
            "slab_width_mm": self.slab_width_mm > 0,
            "slab_gap_mm": self.slab_gap_mm >= 0,
            "slab_quantile": 0.0 <= self.slab_quantile <= 1.0,
            "test_fraction": 0 < self.test_fraction < 1,
            "val_fraction": 0 < self.val_fraction < 1 and self.test_fraction + self.val_fraction < 1,
            "cache_cases": self.cache_cases >= 1,
        }
        check_fields(self, checks)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Slab:
    """Held-out sagittal slab of one case, in voxels of the 1 mm W (x) axis."""

    start: int
    stop: int
    gap: int

    def train_ranges(self, width: int) -> list[tuple[int, int]]:
        ranges = [(0, self.start - self.gap), (self.stop + self.gap, width)]
        return [(a, b) for a, b in ranges if b - a > 0]


def _place_slab(label: np.ndarray, spacing_w: float, config: TrainConfig) -> _Slab:
    xs = np.nonzero(label > 0)[2]
    if xs.size == 0:
        raise ValueError("the case has no tumour voxels: a held-out slab cannot be placed")
    start = int(np.quantile(xs, config.slab_quantile))
    width = max(1, round(config.slab_width_mm / spacing_w))
    gap = round(config.slab_gap_mm / spacing_w)
    return _Slab(start, min(start + width, label.shape[2]), gap)


def _split_cases(ids: list[str], config: TrainConfig) -> dict[str, list[str]]:
    rng = np.random.default_rng(config.seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_test = max(1, round(config.test_fraction * len(ids)))
    n_val = max(1, round(config.val_fraction * len(ids)))
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


# --------------------------------------------------------------------------- training


def _versions() -> dict[str, str]:
    """Versions of the libraries this training uses beyond :func:`run_environment`'s."""
    import SimpleITK

    return {"SimpleITK": SimpleITK.Version.VersionString()}


def train_brain_tumour(config: TrainConfig) -> TrainResult:
    """Train, evaluate and write the demonstration weights and model card.

    Parameters
    ----------
    config:
        See :class:`TrainConfig`.

    Returns
    -------
    :class:`TrainResult`: the card (``out_dir/cards/<name>.json`` and ``.md``),
    the weights (``out_dir/weights/<name>.pt``, float16 state dict of
    ``monai-segresnet``) and the measured Dice scores.

    Raises
    ------
    FileNotFoundError
        No BraTS case under ``data_dir``, or none with a label file.
    ValueError
        Unreadable or inconsistent case data.
    """
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceLoss
    from monai.transforms import (
        Compose,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )
    from monai.utils import set_determinism

    t_start = time.monotonic()
    if config.threads:
        torch.set_num_threads(config.threads)
    set_determinism(seed=config.seed)
    rng = np.random.default_rng(config.seed)
    axes: ArrayAxes = "xyz"
    net_spacing = (config.spacing_mm,) * 3
    out = Path(config.out_dir)
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else Path(tempfile.mkdtemp(prefix="brats-ckpt-"))
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    all_cases = find_brats_cases(config.data_dir)
    cases = [c for c in all_cases if c.label is not None]
    skipped = [c.case_id for c in all_cases if c.label is None]
    if skipped:
        log.info("skipping %d case(s) without a label file: %s", len(skipped), ", ".join(skipped[:10]))
    if not cases:
        raise FileNotFoundError(f"{config.data_dir}: no case has a label file (*_seg / *-seg)")

    def to_net(image: np.ndarray, label: np.ndarray, spacing: tuple) -> dict[str, torch.Tensor]:
        """1 mm (C, D, H, W) + labels -> network layout at the network's voxel size."""
        img = to_network_layout(torch.from_numpy(np.ascontiguousarray(image)), axes)
        lab = to_network_layout(torch.from_numpy(np.ascontiguousarray(label))[None], axes)
        src = (spacing[2], spacing[1], spacing[0])
        img = resample_volume(img, src, net_spacing, mode="bilinear")
        lab = resample_volume(lab, src, net_spacing, mode="nearest")[0]
        return {"image": img, "label": _targets(lab, ["TC", "WT", "ET"], BRATS_REGIONS)}

    # ---- plan the held-out data
    split_members: dict[str, list[str]] = {}
    slabs: dict[str, _Slab] = {}
    if len(cases) >= 3:
        mode = "cases"
        split_members = _split_cases([c.case_id for c in cases], config)
        by_id = {c.case_id: c for c in cases}
        train_items: list[dict[str, Any]] = [{"case": by_id[i], "block": None} for i in split_members["train"]]
        val_cases = [by_id[i] for i in split_members["val"]]
        test_cases = [by_id[i] for i in split_members["test"]]
        split_method = (f"by case, seeded permutation (seed {config.seed}): test {config.test_fraction:.0%}, "
                        f"validation {config.val_fraction:.0%} of labelled cases, the rest training")
    else:
        mode = "slab"
        train_items = []
        for c in cases:
            image, label, spacing = _load_labelled(c)
            slab = _place_slab(label, spacing[2], config)
            slabs[c.case_id] = slab
            for a, b in slab.train_ranges(label.shape[2]):
                train_items.append({"case": c, "block": (a, b)})
        val_cases, test_cases = [], cases
        split_members = {"train": sorted({c.case_id for c in cases}), "test": sorted(slabs)}
        split_method = (
            f"in space, within each labelled case: a sagittal slab {config.slab_width_mm:g} mm wide, starting at "
            f"the {config.slab_quantile:.0%} quantile of the whole-tumour voxels' left-right (x) positions, is "
            f"held out for testing; {config.slab_gap_mm:g} mm on each side are unused; training crops come only "
            "from the blocks outside slab and gaps, each block resampled and cropped on its own"
        )
    log.info("mode %s: %d training items, %d validation cases, %d test cases", mode, len(train_items),
             len(val_cases), len(test_cases))

    def load_item(item: dict) -> dict:
        c, block = item["case"], item["block"]
        image, label, spacing = _load_labelled(c)
        if block is not None:
            a, b = block
            image, label = image[..., a:b], label[..., a:b]
        return to_net(image, label, spacing)

    from monai.data import CacheDataset
    from monai.transforms import Lambda

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
    t0 = time.monotonic()
    dataset = CacheDataset(train_items, transform=Lambda(load_item), cache_num=config.cache_cases,
                           num_workers=0, progress=False)
    log.info("prepared %d training item(s) in %.1f s", min(len(train_items), config.cache_cases),
             time.monotonic() - t0)

    # Slab mode has no independent validation region: the training blocks give a fit measure.
    # Case mode: up to 8 validation cases, re-read each time (bounded cost and memory).
    val_data = [dataset[i] for i in range(len(train_items))] if mode == "slab" else None
    val_items = [{"case": c, "block": None} for c in val_cases[:8]]

    params: dict[str, Any] = {"in_channels": len(CHANNELS), "out_channels": 3, "init_filters": config.init_filters,
              "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": config.dropout_prob}
    model = build_segresnet(**params)
    dice_loss = DiceLoss(smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True, sigmoid=True, batch=True)
    bce_loss = torch.nn.BCEWithLogitsLoss()

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_loss(logits, target) + bce_loss(logits, target)

    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def validate() -> dict[str, float]:
        """Slab mode: Dice pooled over the training blocks (a healthy block has no tumour, so a per-block
        Dice would be 0 or 1); case mode: mean of per-case Dice (the BraTS convention)."""
        model.eval()
        names = ("TC", "WT", "ET")
        per_item: dict[str, list[float]] = {k: [] for k in names}
        inter, total = np.zeros(3), np.zeros(3)
        items = val_data if val_data is not None else [load_item(it) for it in val_items]
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

    # ---- optimisation
    # Items with tumour are drawn 3x as often as items without (a healthy block): a batch without any
    # tumour voxel gives the Dice loss nothing to learn from.
    has_tumour = np.array([bool(dataset[i]["label"].sum() > 0) for i in range(len(train_items))]) \
        if len(train_items) <= config.cache_cases else np.ones(len(train_items), dtype=bool)
    draw = np.where(has_tumour, 3.0, 1.0)
    draw /= draw.sum()

    def batch() -> dict[str, torch.Tensor]:
        picks = rng.choice(len(train_items), size=config.batch_size, p=draw)
        with warnings.catch_warnings():
            # A block or case without tumour can only give background crops; MONAI warns each time.
            warnings.filterwarnings("ignore", message="Num foregrounds 0")
            samples = [random_tf(dataset[int(i)])[0] for i in picks]
        return {k: torch.stack([s[k].as_tensor() if hasattr(s[k], "as_tensor") else s[k] for s in samples])
                for k in ("image", "label")}

    history: list[dict] = []
    best = {"mean": -1.0, "step": 0}
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
        loss = loss_fn(model(drawn["image"]), drawn["label"])
        loss.backward()
        opt.step()
        step += 1
        out_of_time = time.monotonic() - loop_start > config.time_budget_s
        if step % 10 == 0:
            log.info("step %d loss %.4f lr %.2e (%.0f s)", step, loss.item(), lr, time.monotonic() - loop_start)
        if step % config.eval_every == 0 or step == config.max_steps or out_of_time:
            v = validate()
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

    # ---- write weights (float16 keeps the file small) and a provisional card, then evaluate through it
    weights_path, sha = save_float16_weights(best_state, out, config.name)

    def make_card(metrics: list[Metric], wall: float) -> ModelCard:
        return _demo_card(config, params, sha, weights_path, metrics, wall, split_method, split_members, slabs,
                          mode, history, best, step, stop_reason, len(cases), skipped)

    card_path = out / "cards" / f"{config.name}.json"
    make_card([], time.monotonic() - t_start).to_file(card_path)
    registry = ModelRegistry([out / "cards"], include_shipped=False)
    runner = BrainTumourModel(registry, config.name, "cpu")

    metrics = _evaluate(runner, test_cases, slabs, mode)
    wall = time.monotonic() - t_start
    card = make_card(metrics, wall)
    write_card(card, card_path, render_card_markdown(card))
    for m in metrics:
        log.info("%s [%s]: %.4f", m.name, m.split.split(":")[0], m.value)
    log.info("wrote %s (sha256 %s, %d bytes) and %s in %.0f s", weights_path, sha, weights_path.stat().st_size,
             card_path, wall)
    return TrainResult(card_path, weights_path, card, wall, history)


def _evaluate(runner: BrainTumourModel, cases: list[BratsCase], slabs: dict[str, _Slab], mode: str) -> list[Metric]:
    """Dice through the deployment path (:meth:`BrainTumourModel.predict` on the
    whole 1 mm volume), scored on the held-out voxels (slab mode: the slab; case
    mode: the test cases), plus, in slab mode, the whole case (optimistic)."""
    per: dict[str, dict[str, list[float]]] = {"heldout": {k: [] for k in ("TC", "WT", "ET")},
                                             "full": {k: [] for k in ("TC", "WT", "ET")}}
    counts: dict[str, int] = {}
    for c in cases:
        image, label, spacing = _load_labelled(c, runner.channels)
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


def _demo_card(config: TrainConfig, params: dict, sha: str, weights_path: Path, metrics: list[Metric], wall: float,
               split_method: str, members: dict, slabs: dict, mode: str, history: list[dict], best: dict,
               steps: int, stop_reason: str, n_cases: int, skipped: list[str]) -> ModelCard:
    single = mode == "slab"
    data_desc = (
        f"{n_cases} labelled BraTS-style case(s) from {Path(config.data_dir).name}: T1, T1c, T2, FLAIR, "
        "co-registered, skull-stripped, 1 mm"
        + (f"; {len(skipped)} case(s) without labels skipped" if skipped else "")
        + (". TCGA-FG-6692 (TCIA/TCGA glioma) after BraTS preprocessing (SRI-24 atlas, 1 mm, skull-stripped); "
           "labels: a consensus of five BraTS 2020 algorithms by majority vote (a pseudo ground truth, not an expert "
           "annotation), BraTS labels 1/2/4." if single else "")
    )
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
                                     normalisation="zscore_nonzero_channelwise", skull_stripped=True),
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
        training=TrainingRun(
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
        ),
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
        f"`{vin.array_axes}`; normalisation `{vin.normalisation}`; skull-stripped {vin.skull_stripped}.",
        f"- Inference: sliding window roi {tuple(seg.sliding_window.roi_size)}, overlap {seg.sliding_window.overlap}; "
        f"{seg.activation} over {', '.join(seg.channels)}; threshold {seg.threshold}.",
        "- Labels (first rule that applies): " + "; ".join(f"{r.channel} -> {r.label} ({r.name})"
                                                           for r in seg.label_rules) + ".",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see ``--help``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.brain_tumour.train",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a BraTS case folder or a folder of case folders")
    parser.add_argument("--out", type=Path, required=True, help="model root: writes weights/ and cards/ under it")
    parser.add_argument("--name", default=TrainConfig.name)
    parser.add_argument("--version", default=TrainConfig.version)
    parser.add_argument("--init-filters", type=int, default=TrainConfig.init_filters)
    parser.add_argument("--spacing-mm", type=float, default=TrainConfig.spacing_mm)
    parser.add_argument("--crop", type=int, nargs=3, default=list(TrainConfig.crop), metavar=("X", "Y", "Z"))
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    parser.add_argument("--budget-min", type=float, default=TrainConfig.time_budget_s / 60,
                        help="wall-clock budget of the optimisation loop, minutes")
    parser.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    parser.add_argument("--patience", type=int, default=TrainConfig.patience)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--log-file", type=Path, default=None)
    args = parser.parse_args(argv)
    configure_logging(args.log_file)
    # OpenMP's wait policy changes speed several-fold on a shared CPU; record it with the command.
    command = command_line("pipelines.brain_tumour.train", argv, environment=("OMP_WAIT_POLICY",))
    config = TrainConfig(
        data_dir=args.data, out_dir=args.out, name=args.name, version=args.version, init_filters=args.init_filters,
        spacing_mm=args.spacing_mm, crop=tuple(args.crop), batch_size=args.batch_size, lr=args.lr,
        max_steps=args.max_steps, time_budget_s=args.budget_min * 60, eval_every=args.eval_every,
        patience=args.patience, seed=args.seed, threads=args.threads, checkpoint_dir=args.checkpoint_dir,
        command=command,
    )
    train_brain_tumour(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
