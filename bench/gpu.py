"""GPU benchmark of the two demonstration models, fp32 against bf16 (issue 11, Done means 4).

Measures, on one CUDA device, with the project's network definitions
(``models/``), the shipped demonstration weights (loaded and SHA-256-checked by
:class:`models.registry.ModelRegistry`) and the pipelines' precision switch
(:func:`pipelines.common.device.inference_precision`):

- chest: DenseNet-121 (``pneumonia-densenet121-demo``, its card's input size)
  forward passes at batch 1, 8 and 32 in images per second, on 32 real NIH
  ChestX-ray14 radiographs preprocessed as the pipeline does (synthetic input
  when those are not prepared); the fp32-vs-bf16 largest probability
  difference; one Grad-CAM call (forward + backward, what the pipeline runs per
  image) in ms, with the Dice of the fp32 and bf16 attention masks;
- brain: :meth:`BrainTumourModel.predict` (``brats-segresnet-demo``, MONAI
  ``sliding_window_inference``) on the real BraTS case
  ``BraTS-GLI-00001-000`` (4 x 240 x 240 x 155, z-scored over the brain as the
  pipeline does; the case is already co-registered, 1 mm and skull-stripped,
  so the other preprocessing steps do nothing), in seconds, with the Dice of the
  fp32 and bf16 label maps per region WT, TC, ET (background dominates, so
  voxel agreement would say nothing);
- peak GPU memory (``torch.cuda.max_memory_allocated``) per part.

Each timing: warm-up calls, ``torch.cuda.synchronize`` before and after,
several timed calls, the median. Targets are printed beside the figures:
brain predict <= 0.6 s, fp32-vs-bf16 Dice >= 0.99 per region, chest >= 500
images/s at batch 32. Output: one JSON object on stdout.

Imports only torch, numpy, monai, nibabel, pydantic, pydicom and structlog
(through ``models`` and ``pipelines.brain_tumour.model``), not the node.

Prepare here, then run on the device machine (Python 3.12, torch with CUDA,
no package registry), carrying ``bench/gpu-wheels`` and ``bench/gpu-inputs``::

    bench/gpu_wheels.sh      # here: wheels + inputs (ignored by git)
    pip install --no-index --find-links bench/gpu-wheels -r bench/gpu-wheels/requirements.txt && python bench/gpu.py

On the CPU, tiny sizes, to check that it runs (the CPU always runs fp32)::

    .venv/bin/python bench/gpu.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.registry import ModelRegistry  # noqa: E402
from pipelines.brain_tumour.model import BrainTumourModel, region_masks  # noqa: E402
from pipelines.common.device import inference_precision, torch_device  # noqa: E402

CHEST_MODEL = "pneumonia-densenet121-demo"
BRAIN_MODEL = "brats-segresnet-demo"
INPUTS = REPO / "bench" / "gpu-inputs"
CHEST_INPUTS = INPUTS / "chest-inputs.npy"
BRATS_CASES = (INPUTS / "BraTS-GLI-00001-000", REPO.parent / "shared" / "data" / "brats" / "BraTS-GLI-00001-000")
#: BraTS 2023 file-name suffix -> sequence role (as pipelines/brain_tumour/train_data.py reads them).
BRATS_SUFFIXES = {"t1c": "T1c", "t1n": "T1", "t2w": "T2", "t2f": "FLAIR"}
TARGETS = {"brain_predict_s": 0.6, "brain_dice_fp32_vs_bf16": 0.99, "chest_images_per_s_batch_32": 500.0}
PRECISIONS = ("fp32", "bf16")
MIB = 1024 * 1024


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Callable[[], Any], dev: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in seconds over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_mib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / MIB, 1) if dev.type == "cuda" else None


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty (undefined)."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


# --------------------------------------------------------------------------- chest


def chest_inputs(registry: ModelRegistry, n: int) -> tuple[torch.Tensor, str]:
    """``(n, C, H, W)`` float32 model inputs: the prepared real radiographs, or synthetic ones."""
    spec = registry.card(CHEST_MODEL).input
    assert spec is not None  # a classification card has one
    if CHEST_INPUTS.is_file():
        real = torch.from_numpy(np.load(CHEST_INPUTS)).float()
        reps = -(-n // real.shape[0])
        return real.repeat(reps, 1, 1, 1)[:n].contiguous(), f"{real.shape[0]} NIH ChestX-ray14 images ({CHEST_INPUTS.name})"
    g = torch.Generator().manual_seed(0)
    low, high = spec.intensity_range
    x = torch.rand((n, spec.channels, *spec.size), generator=g) * (high - low) + low
    return x, "synthetic (uniform in the card's intensity range; run bench/gpu_wheels.sh for real images)"


def bench_chest(registry: ModelRegistry, dev: torch.device, batches: tuple[int, ...], warmup: int, iters: int) -> dict:
    card = registry.card(CHEST_MODEL)
    assert card.input is not None and card.output is not None
    net = registry.load(CHEST_MODEL, dev)
    for p in net.parameters():
        p.requires_grad_(False)
    x_all, source = chest_inputs(registry, max(batches))
    x_all = x_all.to(dev)
    target = card.output.target_index
    out: dict[str, Any] = {"model": f"{card.name} {card.version}", "input_size": list(card.input.size), "inputs": source}
    probs: dict[str, torch.Tensor] = {}
    for precision in PRECISIONS:
        _reset_peak(dev)
        for b in batches:
            x = x_all[:b]

            def forward(x: torch.Tensor = x, precision: str = precision) -> torch.Tensor:
                with torch.inference_mode(), inference_precision(dev, precision):
                    return net(x)

            s = _timed(forward, dev, warmup, iters)
            out.setdefault(f"batch_{b}", {})[f"{precision}_images_per_s"] = round(b / s, 1)
        probs[precision] = torch.sigmoid(forward(x_all)[:, target].float()).cpu()
        out[f"peak_gpu_mib_{precision}"] = _peak_mib(dev)
    biggest = f"batch_{max(batches)}"
    out[biggest]["target_images_per_s"] = TARGETS["chest_images_per_s_batch_32"]
    out[biggest]["bf16_meets_target"] = out[biggest]["bf16_images_per_s"] >= TARGETS["chest_images_per_s_batch_32"]
    out["max_abs_probability_diff_fp32_vs_bf16"] = float((probs["fp32"] - probs["bf16"]).abs().max())
    out["gradcam_batch_1"] = bench_gradcam(registry, net, x_all[:1], target, dev, warmup, iters)
    return out


def bench_gradcam(registry: ModelRegistry, net: torch.nn.Module, x: torch.Tensor, target: int, dev: torch.device,
                  warmup: int, iters: int) -> dict:
    """One Grad-CAM call as :class:`pipelines.pneumonia.model.PneumoniaModel` makes it (forward and
    backward under the same autocast), in ms; Dice of the masks at half the map's maximum (the SEG's default)."""
    from monai.visualize import GradCAM

    layer = registry.cam_layer(CHEST_MODEL)
    assert layer is not None  # the pipeline refuses a card without one
    # No normaliser: the mask below is relative to the map's maximum, as pipelines/pneumonia/model.py's is.
    cam = GradCAM(nn_module=net, target_layers=layer, postprocessing=lambda m: m)
    out: dict[str, Any] = {"layer": layer}
    maps: dict[str, np.ndarray] = {}
    for precision in PRECISIONS:

        def call(precision: str = precision) -> torch.Tensor:
            xi = x.detach().clone().requires_grad_(True)
            with inference_precision(dev, precision):
                return cam(xi, class_idx=target)

        out[f"{precision}_ms"] = round(1000 * _timed(call, dev, warmup, iters), 2)
        maps[precision] = call()[0, 0].detach().float().cpu().numpy()
    masks = {p: m >= 0.5 * m.max() for p, m in maps.items()}
    out["mask_dice_fp32_vs_bf16"] = dice(masks["fp32"], masks["bf16"])
    return out


# --------------------------------------------------------------------------- brain


def brats_case() -> Path:
    for folder in BRATS_CASES:
        if folder.is_dir() and any(folder.glob("*.nii.gz")):
            return folder
    raise FileNotFoundError(f"no BraTS case in {' or '.join(map(str, BRATS_CASES))}; run bench/gpu_wheels.sh")


def load_brats(folder: Path, channels: tuple[str, ...]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The case as the model array: ``(C, D, H, W)`` float32, LPS (D inferior->superior, H anterior->posterior,
    W right->left, as ``sitk.DICOMOrient(image, "LPS")`` and ``GetArrayFromImage`` give it), each channel z-scored
    over its non-zero voxels (MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``, as
    ``pipelines/brain_tumour/normalise.py``), and the voxel size ``(D, H, W)`` in mm."""
    import nibabel as nib
    from monai.transforms import NormalizeIntensity

    by_role: dict[str, np.ndarray] = {}
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    for path in sorted(folder.glob("*.nii.gz")):
        role = BRATS_SUFFIXES.get(path.name[: -len(".nii.gz")].rsplit("-", 1)[-1].lower())
        if role is None:
            continue
        img: Any = nib.load(path)  # a Nifti1Image (typed as its base class)
        ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("LPS"))
        xyz = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), ornt)
        zooms = [0.0, 0.0, 0.0]
        for axis, (new_axis, _) in enumerate(ornt):
            zooms[int(new_axis)] = float(img.header.get_zooms()[axis])
        by_role[role] = np.ascontiguousarray(np.transpose(xyz, (2, 1, 0)), dtype=np.float32)
        spacing = (zooms[2], zooms[1], zooms[0])
    missing = [c for c in channels if c not in by_role]
    if missing:
        raise FileNotFoundError(f"{folder}: no NIfTI file for {missing} (suffixes {sorted(BRATS_SUFFIXES)})")
    stack = np.stack([by_role[c] for c in channels])
    normalise = NormalizeIntensity(nonzero=True, channel_wise=True, dtype=torch.float32)  # type: ignore[arg-type]
    z = normalise(torch.from_numpy(stack))
    return (z.as_tensor() if hasattr(z, "as_tensor") else torch.as_tensor(z)).numpy(), spacing


def bench_brain(registry: ModelRegistry, dev: torch.device, warmup: int, iters: int, crop: int | None) -> dict:
    model = BrainTumourModel(registry, BRAIN_MODEL, str(dev))
    folder = brats_case()
    x, spacing = load_brats(folder, model.channels)
    if crop:  # smoke: a central block, so the CPU finishes in seconds
        c = [s // 2 for s in x.shape[1:]]
        x = np.ascontiguousarray(x[:, c[0] - crop // 2: c[0] + crop // 2, c[1] - crop: c[1] + crop, c[2] - crop: c[2] + crop])
    out: dict[str, Any] = {
        "model": f"{model.name} {model.version}", "case": folder.name, "input_shape": list(x.shape),
        "spacing_mm": list(spacing), "roi": list(model.roi_size), "overlap": model.overlap,
        "target_predict_s": TARGETS["brain_predict_s"], "target_dice": TARGETS["brain_dice_fp32_vs_bf16"],
    }
    labels: dict[str, np.ndarray] = {}
    for precision in PRECISIONS:
        _reset_peak(dev)
        last: dict[str, Any] = {}

        def predict(precision: str = precision, last: dict[str, Any] = last) -> None:
            last["p"] = model.predict(x, spacing_mm=spacing, precision=precision)

        s = _timed(predict, dev, warmup, iters)
        pred = last["p"]
        labels[precision] = pred.labels
        out[precision] = {
            "predict_s": round(s, 4),
            "stages_s": {k: round(v, 4) for k, v in pred.timings.items()},  # of the last call
            "volumes_ml": {k: round(v, 2) for k, v in pred.volumes_ml().items()},
            "peak_gpu_mib": _peak_mib(dev),
            "meets_target": s <= TARGETS["brain_predict_s"],
        }
    regions = dict(model.card.segmentation.regions) if model.card.segmentation else {}
    a, b = region_masks(labels["fp32"], regions), region_masks(labels["bf16"], regions)
    scores = {name: dice(a[name], b[name]) for name in ("WT", "TC", "ET")}
    out["dice_fp32_vs_bf16"] = {k: None if v is None else round(v, 5) for k, v in scores.items()}
    out["dice_meets_target"] = all(v is None or v >= TARGETS["brain_dice_fp32_vs_bf16"] for v in scores.values())
    return out


# --------------------------------------------------------------------------- main


def prepare_chest(n: int = 32) -> Path:
    """Here, with the whole project: ``n`` NIH ChestX-ray14 PNGs through the pipeline's
    preprocessing (:class:`pipelines.pneumonia.preprocess.CxrPreprocessor`) into :data:`CHEST_INPUTS`."""
    from pipelines.pneumonia.preprocess import CxrPreprocessor, png_to_image

    spec = ModelRegistry().card(CHEST_MODEL).input
    assert spec is not None
    pre = CxrPreprocessor(spec)
    images = sorted((REPO.parent / "shared" / "data" / "cxr14" / "images").glob("*.png"))[:n]
    if len(images) < n:
        raise FileNotFoundError(f"need {n} PNGs in ../shared/data/cxr14/images, found {len(images)}")
    CHEST_INPUTS.parent.mkdir(parents=True, exist_ok=True)
    np.save(CHEST_INPUTS, np.stack([pre(png_to_image(p)).tensor for p in images]).astype(np.float32))
    return CHEST_INPUTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="torch device (default: cuda, or cpu with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device, to check that it runs")
    parser.add_argument("--prepare-chest", action="store_true", help="write bench/gpu-inputs/chest-inputs.npy and exit")
    args = parser.parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout holds the JSON only
    if args.prepare_chest:
        print(prepare_chest())
        return 0
    dev = torch_device(args.device or ("cpu" if args.smoke else "cuda"))
    batches, warmup, iters, crop = ((1, 2), 1, 2, 32) if args.smoke else ((1, 8, 32), 5, 20, None)
    t0 = time.perf_counter()
    registry = ModelRegistry()
    result: dict[str, Any] = {
        "bench": "gpu", "smoke": args.smoke, "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "note": None if dev.type == "cuda" else "not CUDA: bf16 runs fp32 here (pipelines.common.device)",
    }
    result["chest"] = bench_chest(registry, dev, batches, warmup, iters)
    result["brain"] = bench_brain(registry, dev, max(1, warmup // 5), max(2, iters // 4), crop)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
