"""Brain tumour segmentation: a preprocessed multi-sequence MR volume -> BraTS labels.

:class:`BrainTumourModel` loads a segmentation model card through the
:class:`~models.registry.ModelRegistry` once (the MONAI model-zoo bundle
``brats_mri_segmentation`` dropped in unchanged, or the project's demonstration
SegResNet) and, for one volume, runs what the bundle's ``inference.json`` runs:

1. the ``(C, D, H, W)`` array, channels in the card's order, z-scored over the
   brain per channel (MONAI ``NormalizeIntensity(nonzero=True,
   channel_wise=True)``; done by ``pipelines/brain_tumour/preprocess.py``), is
   laid out as the network expects (``volume_input.array_axes``) and, if its
   voxel size differs from the card's ``volume_input.spacing_mm``, resampled
   (MONAI ``Spacing``, trilinear);
2. MONAI ``sliding_window_inference`` with the card's roi and overlap (the
   bundle: 240x240x160, 0.5); inputs smaller than the roi are zero-padded to it
   (zero is the z-scored background) and cropped back;
3. sigmoid per output channel (TC, WT, ET), resampled back onto the input grid
   when step 1 resampled, threshold (``>= 0.5``, MONAI ``AsDiscrete``);
4. the card's label map in priority order; for BraTS ET -> 4, else TC -> 1,
   else WT -> 2 (the bundle's ``Lambdad``).

Network: SegResNet (Myronenko, BrainLes 2018, arXiv:1810.11654) as in the MONAI
bundle; labels as in the BraTS challenge (Menze et al., IEEE TMI 2015; Bakas et
al. 2018, arXiv:1811.02629).

The object can be shared by worker threads: the network is read-only in eval
mode, and one lock runs one volume at a time, which bounds peak memory (a
bundle-sized forward pass on a whole 240x240x160 window needs ~3.8 GB on CPU).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Spacing, SpatialResample

from models.card import ArrayAxes, ModelCard, SegmentationSpec, VolumeInputSpec
from models.registry import ModelRegistry
from pipelines.common.device import inference_precision, torch_device

__all__ = [
    "BrainTumourModel",
    "BrainTumourPrediction",
    "label_map",
    "region_masks",
    "resample_volume",
    "to_network_layout",
    "from_network_layout",
]

# Relative difference between voxel sizes below which no resampling is done.
_SPACING_RTOL = 1e-3


@dataclass(frozen=True)
class BrainTumourPrediction:
    """The model's answer for one volume, on the grid of the input array.

    Attributes
    ----------
    labels:
        ``(D, H, W)`` uint8 label map; 0 = background, else the card's labels
        (BraTS: 1 = necrotic/non-enhancing tumour core, 2 = peritumoral
        oedema, 4 = GD-enhancing tumour).
    probabilities:
        ``(K, D, H, W)`` float32 in [0, 1]: sigmoid of each output channel
        (BraTS: TC, WT, ET), on the input grid.
    channels:
        The K output channel names.
    label_names:
        Label value -> meaning.
    regions:
        Output channel -> the labels that make up its region (TC = {1, 4},
        WT = {1, 2, 4}, ET = {4}).
    spacing_mm:
        Voxel size of the input grid ``(D, H, W)`` in mm.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    channels: tuple[str, ...]
    label_names: dict[int, str]
    regions: dict[str, tuple[int, ...]]
    spacing_mm: tuple[float, float, float]
    timings: dict[str, float] = field(default_factory=dict)

    def region_masks(self) -> dict[str, np.ndarray]:
        """Channel name -> ``(D, H, W)`` bool mask of its region in :attr:`labels`."""
        return region_masks(self.labels, self.regions)

    def volumes_ml(self) -> dict[str, float]:
        """Channel name -> volume of its region in ml (voxel count x voxel volume in mm^3 / 1000)."""
        voxel_ml = float(np.prod(self.spacing_mm)) / 1000.0
        return {name: float(mask.sum()) * voxel_ml for name, mask in self.region_masks().items()}


def label_map(probabilities: np.ndarray | torch.Tensor, spec: SegmentationSpec) -> np.ndarray:
    """Turn per-channel probabilities into one label map, as the bundle's
    ``AsDiscrete(threshold)`` + ``Lambdad`` do.

    Parameters
    ----------
    probabilities:
        ``(K, *spatial)`` probabilities in the order of ``spec.channels``.
    spec:
        The card's ``segmentation``; a channel is on where its probability is
        ``>= spec.threshold``; the first rule of ``spec.label_rules`` whose
        channel is on gives the label (BraTS: ET -> 4, else TC -> 1, else WT -> 2).

    Returns
    -------
    ``(*spatial)`` uint8 labels, 0 where no rule applies.

    Raises
    ------
    ValueError
        The first axis is not ``len(spec.channels)`` long.
    """
    p = probabilities.detach().cpu().numpy() if isinstance(probabilities, torch.Tensor) else np.asarray(probabilities)
    if p.ndim < 2 or p.shape[0] != len(spec.channels):
        raise ValueError(f"probabilities: expected ({len(spec.channels)}, ...) for channels {spec.channels}, got "
                         f"{p.shape}")
    on = p >= spec.threshold
    labels = np.zeros(p.shape[1:], dtype=np.uint8)
    # Lowest priority first, so that earlier rules overwrite later ones.
    for rule in reversed(spec.label_rules):
        labels[on[spec.channels.index(rule.channel)]] = rule.label
    return labels


def region_masks(labels: np.ndarray, regions: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """Channel name -> bool mask of ``labels`` in that channel's region
    (MONAI ``ConvertToMultiChannelBasedOnBratsClasses`` for the BraTS regions)."""
    return {name: np.isin(labels, list(members)) for name, members in regions.items()}


def to_network_layout(x: torch.Tensor, axes: ArrayAxes) -> torch.Tensor:
    """``(C, D, H, W)`` -> the network's spatial layout: unchanged for ``"zyx"``,
    ``(C, W, H, D)`` for ``"xyz"`` (contiguous either way)."""
    return (x.permute(0, 3, 2, 1) if axes == "xyz" else x).contiguous()


def from_network_layout(x: torch.Tensor, axes: ArrayAxes) -> torch.Tensor:
    """Inverse of :func:`to_network_layout`."""
    return (x.permute(0, 3, 2, 1) if axes == "xyz" else x).contiguous()


def _spacing_to_network(spacing_dhw: Sequence[float], axes: ArrayAxes) -> tuple[float, float, float]:
    s = tuple(float(v) for v in spacing_dhw)
    return (s[2], s[1], s[0]) if axes == "xyz" else s  # type: ignore[return-value]


def _same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) <= _SPACING_RTOL * max(x, y) for x, y in zip(a, b, strict=True))


def resample_volume(
    x: torch.Tensor, src_spacing: Sequence[float], dst_spacing: Sequence[float], mode: str = "bilinear"
) -> torch.Tensor:
    """Resample ``(C, *spatial)`` from voxel size ``src_spacing`` to
    ``dst_spacing`` (mm, same axis order), keeping voxel 0's centre in place
    (MONAI ``Spacing``). ``mode``: ``"bilinear"`` (trilinear in 3-D) for
    images and probabilities, ``"nearest"`` for label maps. Returns a plain
    tensor of the input's dtype class (labels come back as they went in)."""
    affine = torch.diag(torch.tensor([*map(float, src_spacing), 1.0], dtype=torch.float64))
    # MONAI annotates dtype as a numpy DtypeLike and the result as a Tensor: it
    # takes torch dtypes, and returns a MetaTensor for a MetaTensor.
    spacing = Spacing(pixdim=tuple(float(s) for s in dst_spacing), mode=mode, dtype=torch.float32)  # type: ignore[arg-type]
    out = cast(MetaTensor, spacing(MetaTensor(x.float(), affine=affine)))
    return out.as_tensor().to(x.dtype) if not x.is_floating_point() else out.as_tensor()


def _resample_back(x: torch.Tensor, spacing: Sequence[float], dst_spacing: Sequence[float],
                   dst_shape: Sequence[int]) -> torch.Tensor:
    """``(C, *spatial)`` on the ``spacing`` grid -> the ``dst_spacing`` grid of
    ``dst_shape`` sharing voxel 0's centre (MONAI ``SpatialResample``, trilinear)."""
    src = torch.diag(torch.tensor([*map(float, spacing), 1.0], dtype=torch.float64))
    dst = torch.diag(torch.tensor([*map(float, dst_spacing), 1.0], dtype=torch.float64))
    resample = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)  # type: ignore[arg-type]
    out = cast(
        MetaTensor,
        resample(MetaTensor(x.float(), affine=src), dst_affine=dst, spatial_size=tuple(int(s) for s in dst_shape)),
    )
    return out.as_tensor()


class BrainTumourModel:
    """A loaded brain tumour segmentation model.

    Parameters
    ----------
    registry:
        Where the card and weights are found.
    name:
        Card name, e.g. ``"brats-segresnet-demo"`` (``BrainTumourSettings.model``)
        or the card of an imported MONAI bundle.
    device:
        torch device string: ``"cpu"``, ``"cuda"``, ``"cuda:1"``. On CUDA the
        forward pass runs at the precision :meth:`predict` is given (the
        bundle's ``amp: true`` is ``"fp16"``); the CPU runs fp32.

    Raises
    ------
    ValueError
        The card's task is not segmentation, the card's roi is not a multiple
        of what the network's down-sampling needs, or ``device`` is not a valid
        device (or CUDA is asked for and unavailable).
    models.registry.ModelNotFoundError, FileNotFoundError, models.registry.WeightsIntegrityError
        From the registry (unknown card, missing weights, SHA-256 mismatch).
    """

    def __init__(self, registry: ModelRegistry, name: str, device: str = "cpu") -> None:
        dev = torch_device(device)
        card = registry.card(name)
        if card.task != "segmentation" or card.volume_input is None or card.segmentation is None:
            raise ValueError(f"model {name!r}: task is {card.task!r}, expected 'segmentation'")
        self.card: ModelCard = card
        # The card's two specs, checked above (not None): what the methods read.
        self._vin: VolumeInputSpec = card.volume_input
        self._seg: SegmentationSpec = card.segmentation
        self.device = dev
        self.network = registry.load(name, dev)
        blocks_down = getattr(self.network, "blocks_down", None)
        # SegResNet halves each side once per down stage after the first.
        self.spatial_multiple = 2 ** (len(blocks_down) - 1) if blocks_down else 1
        self._check_roi(card.segmentation.sliding_window.roi_size, "segmentation.sliding_window.roi_size")
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ card facts

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def channels(self) -> tuple[str, ...]:
        """Sequence roles in input channel order, e.g. ``("T1c", "T1", "T2", "FLAIR")``."""
        return tuple(self._vin.channels)

    @property
    def bias_field_correction(self) -> bool:
        """Whether the model was trained on N4-corrected volumes (the card's ``volume_input``)."""
        return self._vin.bias_field_correction

    @property
    def input_spacing_mm(self) -> tuple[float, float, float]:
        """The card's voxel size as ``(D, H, W)`` mm of the node's array: a
        volume already on this grid is not resampled by :meth:`predict`."""
        s = self._vin.spacing_mm
        return _spacing_to_network(s, self._vin.array_axes)  # the permutation is its own inverse

    @property
    def roi_size(self) -> tuple[int, int, int]:
        """The card's sliding-window roi, in the network's axis order (as the card and settings give it)."""
        return self._seg.sliding_window.roi_size  # a tuple (pydantic)

    @property
    def overlap(self) -> float:
        return self._seg.sliding_window.overlap

    # ------------------------------------------------------------------ inference

    def predict(
        self,
        x: np.ndarray,
        *,
        spacing_mm: Sequence[float] | None = None,
        roi: Sequence[int] | None = None,
        overlap: float | None = None,
        precision: str = "fp32",
    ) -> BrainTumourPrediction:
        """Segment one preprocessed volume.

        Parameters
        ----------
        x:
            ``(C, D, H, W)`` float32, channels in :attr:`channels` order,
            LPS-oriented (D inferior->superior, H anterior->posterior, W
            right->left), each channel z-scored over its non-zero voxels, 0
            outside the brain.
        spacing_mm:
            Voxel size of ``x`` as ``(D, H, W)`` in mm; None means ``x`` is on
            the card's grid (:attr:`input_spacing_mm`). Otherwise ``x`` is
            resampled to the card's voxel size for the network and the
            probabilities are resampled back, so the result is on ``x``'s grid.
        roi:
            Sliding-window roi in the network's axis order (``settings.roi_size``);
            None uses the card's. Each side a multiple of :attr:`spatial_multiple`.
        overlap:
            Sliding-window overlap in [0, 1) (``settings.overlap``); None uses the card's.
        precision:
            ``"fp32"``, ``"bf16"`` or ``"fp16"`` (``PipelineContext.precision``):
            autocast on CUDA, fp32 on the CPU (:func:`inference_precision`).
            The logits are cast to float32 before the sigmoid.

        Returns
        -------
        :class:`BrainTumourPrediction` on ``x``'s grid.

        Raises
        ------
        ValueError
            ``x`` has the wrong shape, channel count or non-finite values;
            ``spacing_mm``, ``roi``, ``overlap`` or ``precision`` is invalid.
        """
        amp = inference_precision(self.device, precision)
        vin, seg = self._vin, self._seg
        x = self._check_input(x)
        sw = seg.sliding_window
        roi_size = tuple(int(r) for r in (sw.roi_size if roi is None else roi))
        self._check_roi(roi_size, "roi")
        ov = sw.overlap if overlap is None else float(overlap)
        if not 0.0 <= ov < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
        if spacing_mm is None:
            spacing_dhw = self.input_spacing_mm
        else:
            given = tuple(float(s) for s in spacing_mm)
            if len(given) != 3 or not all(np.isfinite(s) and s > 0 for s in given):
                raise ValueError(f"spacing_mm: expected three positive voxel sizes (D, H, W) in mm, got {spacing_mm!r}")
            spacing_dhw = (given[0], given[1], given[2])

        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            t = to_network_layout(torch.from_numpy(x), vin.array_axes)
            src_spacing = _spacing_to_network(spacing_dhw, vin.array_axes)
            resample = not _same_spacing(src_spacing, vin.spacing_mm)
            net_shape = tuple(t.shape[1:])
            if resample:
                t = resample_volume(t, src_spacing, vin.spacing_mm, mode="bilinear")
            timings["resample_in"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            with amp:
                logits = self._sliding_window(t, roi_size, ov)
            timings["sliding_window"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            probs = torch.sigmoid(logits)
            del logits
            if resample:
                probs = _resample_back(probs, vin.spacing_mm, src_spacing, net_shape).clamp_(0.0, 1.0)
            probs = from_network_layout(probs, vin.array_axes)
            prob_np = probs.numpy().astype(np.float32, copy=False)
            labels = label_map(prob_np, seg)
            timings["postprocess"] = time.perf_counter() - t0

        return BrainTumourPrediction(
            labels=labels,
            probabilities=prob_np,
            channels=tuple(seg.channels),
            label_names=seg.labels,
            regions={k: tuple(v) for k, v in seg.regions.items()},
            spacing_mm=spacing_dhw,
            timings=timings,
        )

    def _sliding_window(self, t: torch.Tensor, roi_size: tuple[int, ...], overlap: float) -> torch.Tensor:
        sw = self._seg.sliding_window
        inputs = t.unsqueeze(0).to(self.device)
        out = sliding_window_inference(inputs, roi_size, sw.sw_batch_size, self.network, overlap=overlap, mode=sw.mode)
        out = out.as_tensor() if isinstance(out, MetaTensor) else out
        return out[0].float().cpu()  # float32 whatever autocast ran in

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise ValueError(f"x: expected a numpy array (C, D, H, W), got {type(x).__name__}")
        n = len(self._vin.channels)
        if x.ndim != 4 or x.shape[0] != n or min(x.shape[1:]) < 1:
            raise ValueError(f"x: expected ({n}, D, H, W) for channels {self.channels}, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"x: expected float32 z-scored intensities, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError("x: contains NaN or infinite values")
        return x

    def _check_roi(self, roi: Sequence[int], what: str) -> None:
        if len(roi) != 3 or not all(int(r) >= self.spatial_multiple and int(r) % self.spatial_multiple == 0
                                    for r in roi):
            raise ValueError(f"{what} {tuple(roi)}: expected 3 sides, each a positive multiple of "
                             f"{self.spatial_multiple} (the network's down-sampling)")
