"""BraTS-style training data for :mod:`pipelines.brain_tumour.train`: case
folders, reading a case as the pipeline hands it to the model, the held-out
plan (cases split by a seeded permutation, or a sagittal slab per case), and
the network-layout items the training loop samples crops from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.card import LabelRule
from pipelines.brain_tumour.model import resample_volume, to_network_layout
from pipelines.brain_tumour.normalise import normalize_nonzero

if TYPE_CHECKING:
    from pipelines.brain_tumour.train import TrainConfig

__all__ = [
    "BRATS_REGIONS",
    "BRATS_RULES",
    "CHANNELS",
    "BratsCase",
    "HeldOutPlan",
    "Slab",
    "dice",
    "find_brats_cases",
    "load_case",
    "load_item",
    "load_labelled",
    "plan_held_out",
    "to_net",
]

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
        non-zero voxels (:func:`pipelines.brain_tumour.normalise.normalize_nonzero`).
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


def load_labelled(
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



# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Slab:
    """Held-out sagittal slab of one case, in voxels of the 1 mm W (x) axis."""

    start: int
    stop: int
    gap: int

    def train_ranges(self, width: int) -> list[tuple[int, int]]:
        """``(first, stop)`` W ranges of the training blocks outside slab and gaps."""
        ranges = [(0, self.start - self.gap), (self.stop + self.gap, width)]
        return [(a, b) for a, b in ranges if b - a > 0]


def place_slab(label: np.ndarray, spacing_w: float, config: TrainConfig) -> Slab:
    """The held-out slab of a ``(D, H, W)`` label: ``config.slab_width_mm`` wide from the
    ``config.slab_quantile`` of the tumour's W positions; ValueError without tumour."""
    xs = np.nonzero(label > 0)[2]
    if xs.size == 0:
        raise ValueError("the case has no tumour voxels: a held-out slab cannot be placed")
    start = int(np.quantile(xs, config.slab_quantile))
    width = max(1, round(config.slab_width_mm / spacing_w))
    gap = round(config.slab_gap_mm / spacing_w)
    return Slab(start, min(start + width, label.shape[2]), gap)


def split_cases(ids: list[str], config: TrainConfig) -> dict[str, list[str]]:
    """Seeded permutation of case ids -> ``{"test", "val", "train"}`` id lists."""
    rng = np.random.default_rng(config.seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_test = max(1, round(config.test_fraction * len(ids)))
    n_val = max(1, round(config.val_fraction * len(ids)))
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


@dataclass
class HeldOutPlan:
    """What trains, what validates and what tests (module docstring of
    :mod:`pipelines.brain_tumour.train`).

    Attributes
    ----------
    mode:
        ``"cases"`` (three or more labelled cases) or ``"slab"``.
    train_items:
        ``{"case": BratsCase, "block": (first, stop) W range or None}``.
    val_cases, test_cases:
        Cases validated on (case mode only) and tested on at the end.
    members:
        ``{"train", "test"[, "val"]}`` -> case ids, for the card.
    slabs:
        case id -> its held-out :class:`Slab` (slab mode).
    method:
        The split in words, for the card.
    """

    mode: str
    train_items: list[dict[str, Any]]
    val_cases: list[BratsCase]
    test_cases: list[BratsCase]
    members: dict[str, list[str]]
    slabs: dict[str, Slab]
    method: str


def plan_held_out(cases: list[BratsCase], config: TrainConfig) -> HeldOutPlan:
    """Split labelled ``cases`` by case (three or more) or in space (a slab per case)."""
    if len(cases) >= 3:
        members = split_cases([c.case_id for c in cases], config)
        by_id = {c.case_id: c for c in cases}
        return HeldOutPlan(
            mode="cases",
            train_items=[{"case": by_id[i], "block": None} for i in members["train"]],
            val_cases=[by_id[i] for i in members["val"]],
            test_cases=[by_id[i] for i in members["test"]],
            members=members,
            slabs={},
            method=(
                f"by case, seeded permutation (seed {config.seed}): test {config.test_fraction:.0%}, "
                f"validation {config.val_fraction:.0%} of labelled cases, the rest training"
            ),
        )
    train_items: list[dict[str, Any]] = []
    slabs: dict[str, Slab] = {}
    for c in cases:
        image, label, spacing = load_labelled(c)
        slab = place_slab(label, spacing[2], config)
        slabs[c.case_id] = slab
        for a, b in slab.train_ranges(label.shape[2]):
            train_items.append({"case": c, "block": (a, b)})
    return HeldOutPlan(
        mode="slab",
        train_items=train_items,
        val_cases=[],
        test_cases=cases,
        members={"train": sorted({c.case_id for c in cases}), "test": sorted(slabs)},
        slabs=slabs,
        method=(
            f"in space, within each labelled case: a sagittal slab {config.slab_width_mm:g} mm wide, starting at "
            f"the {config.slab_quantile:.0%} quantile of the whole-tumour voxels' left-right (x) positions, is "
            f"held out for testing; {config.slab_gap_mm:g} mm on each side are unused; training crops come only "
            "from the blocks outside slab and gaps, each block resampled and cropped on its own"
        ),
    )


def to_net(image: np.ndarray, label: np.ndarray, spacing: tuple, spacing_mm: float) -> dict[str, torch.Tensor]:
    """1 mm (C, D, H, W) + labels -> network layout (``"xyz"``) at ``spacing_mm``
    voxels: ``{"image": (C, x, y, z), "label": (3, x, y, z) TC/WT/ET}``."""
    net_spacing = (spacing_mm,) * 3
    img = to_network_layout(torch.from_numpy(np.ascontiguousarray(image)), "xyz")
    lab = to_network_layout(torch.from_numpy(np.ascontiguousarray(label))[None], "xyz")
    src = (spacing[2], spacing[1], spacing[0])
    img = resample_volume(img, src, net_spacing, mode="bilinear")
    lab = resample_volume(lab, src, net_spacing, mode="nearest")[0]
    return {"image": img, "label": _targets(lab, ["TC", "WT", "ET"], BRATS_REGIONS)}


def load_item(item: dict, spacing_mm: float) -> dict:
    """A :attr:`HeldOutPlan.train_items` entry read and cut to its block, as :func:`to_net` gives it."""
    c, block = item["case"], item["block"]
    image, label, spacing = load_labelled(c)
    if block is not None:
        a, b = block
        image, label = image[..., a:b], label[..., a:b]
    return to_net(image, label, spacing, spacing_mm)
