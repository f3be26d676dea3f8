"""Pneumonia inference with a Grad-CAM map on the source pixel grid.

:class:`PneumoniaModel` loads a classification model card through the
:class:`~models.registry.ModelRegistry` once, and for one radiograph returns the
probability of the card's target label (sigmoid of its logit, then
torchxrayvision's ``op_norm`` when the card asks for it) and a Grad-CAM map of
that output (Selvaraju et al., ICCV 2017, arXiv:1610.02391; MONAI
``monai.visualize.GradCAM``) resampled onto the source image's
``(Rows, Columns)``. :func:`cam_mask` thresholds the map for the SEG.

Calls are serialised by a lock: Grad-CAM keeps activations and gradients in
hooks on the shared network, so two images must not interleave. The object
can be shared by worker threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from monai.visualize import GradCAM
from pydicom import Dataset

from models.card import ModelCard
from models.densenet import op_norm
from models.registry import ModelRegistry
from pipelines.common.device import inference_precision, torch_device
from pipelines.pneumonia.preprocess import (
    CxrPreprocessor,
    Geometry,
    PreprocessedImage,
    SourceImage,
    dicom_to_image,
)

__all__ = ["PneumoniaPrediction", "PneumoniaModel", "cam_mask"]


@dataclass(frozen=True)
class PneumoniaPrediction:
    """The model's answer for one image.

    Attributes
    ----------
    probability:
        Probability of the target label in [0, 1] as the pipeline reports it
        (after ``op_norm`` when the card uses it; then 0.5 is the operating point).
    raw_probability:
        ``sigmoid(logit)`` before ``op_norm``.
    logit:
        The network's output for the target label.
    threshold:
        The card's operating point on :attr:`probability` (None if the card has none).
    cam:
        Grad-CAM of the target output, ``(Rows, Columns)`` float32 in [0, 1]
        on the source pixel grid (1 = the map's maximum), or None when not asked for.
    cam_model:
        The same map on the model-input grid, ``(H, W)`` float32 in [0, 1], or None.
    geometry:
        Source grid <-> model-input grid.
    notes:
        Preprocessing notes (VOI used, resampling skipped and why, ...), for the log.
    input_mean, input_std:
        Mean and standard deviation of the preprocessed image (the network
        input before intensity scaling, in [0, 1]): input-drift features.
    """

    probability: float
    raw_probability: float
    logit: float
    threshold: float | None
    cam: np.ndarray | None
    cam_model: np.ndarray | None
    geometry: Geometry
    notes: tuple[str, ...]
    input_mean: float = float("nan")
    input_std: float = float("nan")


def _max_normaliser(x: torch.Tensor) -> torch.Tensor:
    """Scale each map by its maximum so 0 keeps meaning "no evidence" (MONAI's
    default normaliser maps (min, max) to (1, 0), i.e. it flips)."""
    peak = x.flatten(1).amax(1).clamp_min(torch.finfo(x.dtype).tiny).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(peak > torch.finfo(x.dtype).tiny, x / peak, torch.zeros_like(x))


class PneumoniaModel:
    """A loaded pneumonia classifier.

    Parameters
    ----------
    registry:
        Where the card and weights are found.
    name:
        Card name, e.g. ``"pneumonia-densenet121-demo"`` (``PneumoniaSettings.model``).
    device:
        torch device string: ``"cpu"``, ``"cuda"``, ``"cuda:1"``.

    Raises
    ------
    ValueError
        The card's task is not classification or its activation not sigmoid,
        ``op_norm`` is asked for without a finite threshold for the target, the
        architecture has no Grad-CAM layer, or ``device`` is not a valid device
        (or CUDA is asked for and unavailable).
    models.registry.ModelNotFoundError, FileNotFoundError, models.registry.WeightsIntegrityError
        From the registry.
    """

    def __init__(self, registry: ModelRegistry, name: str, device: str = "cpu") -> None:
        dev = torch_device(device)
        card = registry.card(name)
        if card.task != "classification":
            raise ValueError(f"model {name!r}: task is {card.task!r}, expected 'classification'")
        if card.input is None or card.output is None:  # ModelCard requires both for "classification"
            raise ValueError(f"model {name!r}: the card has no input or output")
        if card.output.activation != "sigmoid":
            raise ValueError(f"model {name!r}: output.activation is {card.output.activation!r}, expected 'sigmoid'")
        cam_layer = registry.cam_layer(name)
        if cam_layer is None:
            raise ValueError(f"model {name!r}: architecture {card.architecture.name!r} has no Grad-CAM layer")
        self.card: ModelCard = card
        self.device = dev
        self.target_index = card.output.target_index
        self.preprocessor = CxrPreprocessor(card.input)
        net = registry.load(name, dev)
        # Gradients are needed only with respect to activations: freezing the
        # weights keeps calls free of shared .grad state.
        for p in net.parameters():
            p.requires_grad_(False)
        self._net = net
        self._op_threshs: torch.Tensor | None = None
        if card.output.op_norm:
            thr = getattr(net, "op_threshs", None)
            if thr is None or not torch.isfinite(thr[self.target_index]):
                raise ValueError(f"model {name!r}: output.op_norm is set but op_threshs[{self.target_index}] is not finite")
            self._op_threshs = thr.detach().to(dev, torch.float32)
        self._cam = GradCAM(nn_module=net, target_layers=cam_layer, postprocessing=_max_normaliser)
        self._lock = threading.Lock()

    @property
    def threshold(self) -> float | None:
        """The card's operating point on :attr:`PneumoniaPrediction.probability`."""
        return self.card.operating_point.threshold if self.card.operating_point else None

    def predict_dataset(self, ds: Dataset, cam: bool = True, precision: str = "fp32") -> PneumoniaPrediction:
        """Predict for a single-frame CR/DX dataset (see :func:`dicom_to_image`;
        raises its ValueError for unusable pixel data)."""
        return self.predict(dicom_to_image(ds), cam=cam, precision=precision)

    def predict(self, source: SourceImage, cam: bool = True, precision: str = "fp32") -> PneumoniaPrediction:
        """Predict for one source image.

        Parameters
        ----------
        source:
            ``(Rows, Columns)`` float32 in [0, 1] with its spacing.
        cam:
            Also compute the Grad-CAM map (one backward pass).
        precision:
            ``"fp32"``, ``"bf16"`` or ``"fp16"`` (``PipelineContext.precision``):
            autocast on CUDA, fp32 on the CPU (:func:`inference_precision`).

        Returns
        -------
        :class:`PneumoniaPrediction`; ``cam`` is ``(Rows, Columns)`` float32 in [0, 1].

        Raises
        ------
        ValueError
            ``precision`` is not one of the three.
        """
        amp = inference_precision(self.device, precision)
        pre: PreprocessedImage = self.preprocessor(source)
        x = torch.from_numpy(pre.tensor[None]).to(self.device)
        with self._lock:
            if cam:
                x.requires_grad_(True)
                # MONAI runs forward and backward in one call, so the backward
                # is under autocast too: its gradients take the forward's dtypes.
                with amp:
                    cam_map = self._cam(x, class_idx=self.target_index)  # (1, 1, H, W)
                logits = self._cam.nn_module.score  # the class score MONAI back-propagated
                assert logits is not None  # set by the call above
                logit = float(logits.detach().float().reshape(-1)[0])
                cam_model = cam_map[0, 0].detach().float().cpu().numpy()
            else:
                with torch.inference_mode(), amp:
                    logit = float(self._net(x)[0, self.target_index].float())
                cam_model = None
        raw = torch.sigmoid(torch.tensor([[logit]], dtype=torch.float64)).item()
        prob = raw
        if self._op_threshs is not None:
            p = torch.full((1, self._op_threshs.numel()), raw)
            p[0, self.target_index] = raw
            prob = float(op_norm(p, self._op_threshs.cpu())[0, self.target_index])
        cam_src = None
        if cam_model is not None:
            cam_model = np.clip(cam_model, 0.0, 1.0).astype(np.float32)
            cam_src = np.clip(pre.geometry.to_source(cam_model, order=1), 0.0, 1.0)
        return PneumoniaPrediction(
            probability=float(prob),
            raw_probability=float(raw),
            logit=logit,
            threshold=self.threshold,
            cam=cam_src,
            cam_model=cam_model,
            geometry=pre.geometry,
            notes=pre.notes,
            input_mean=float(pre.prepared.image.mean()),
            input_std=float(pre.prepared.image.std()),
        )


def cam_mask(cam: np.ndarray, fraction: float) -> np.ndarray:
    """Binary attention region: pixels at or above ``fraction`` of the map's maximum.

    Parameters
    ----------
    cam:
        ``(Rows, Columns)`` float array, >= 0 (a Grad-CAM map).
    fraction:
        In (0, 1); the pipeline's ``cam_threshold`` setting (default 0.5).

    Returns
    -------
    ``(Rows, Columns)`` bool; all False when the map is zero everywhere.

    Raises
    ------
    ValueError
        ``fraction`` outside (0, 1), ``cam`` not 2-D or not finite.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    cam = np.asarray(cam)
    if cam.ndim != 2 or not np.all(np.isfinite(cam)):
        raise ValueError(f"cam must be a finite 2-D array, got shape {cam.shape}")
    peak = float(cam.max()) if cam.size else 0.0
    if peak <= 0.0:
        return np.zeros(cam.shape, dtype=bool)
    return cam >= fraction * peak
