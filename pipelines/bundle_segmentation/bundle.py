"""Run a MONAI bundle's own preprocessing, network, inferer and postprocessing on a series in memory.

MONAI's bundle workflow (``monai.bundle.ConfigWorkflow``, the bundle's
``evaluator``) reads files: ``preprocessing`` starts with ``LoadImaged`` of a
path and ``postprocessing`` ends with ``SaveImaged``. The node holds the
series in memory, so :class:`BundleModel` parses the bundle's
``configs/inference.json`` with ``monai.bundle.ConfigParser`` and runs what
the evaluator runs, with two differences only:

1. the bundle's ``LoadImaged`` is called with a runtime reader,
   :class:`SeriesReader`, instead of a file reader: everything else it does
   (dtype, ``ensure_channel_first``, ``image_only``, the meta dict key) is
   the bundle's. The reader gives the layout of MONAI's ``ITKReader`` for
   the same DICOM files: the array ``(x, y, z)`` = ``(column, row, slice)``
   with slices in ascending order along ``row x column`` (GDCM's order), the
   modality rescale applied (Rescale Slope/Intercept: Hounsfield units for
   CT), and the affine in RAS (``space = RAS``, DICOM's LPS with x and y
   negated). ``tests/test_bundle_segmentation.py`` checks it against
   MONAI's ``PydicomReader`` of the files: after ``Orientation("RAS")`` the
   arrays are equal and the affines agree to 1e-9 mm (PydicomReader stacks
   by Instance Number, so before reorientation the slice axis may run the
   other way);
2. ``SaveImaged``/``SaveImage`` are left out of ``postprocessing``: the
   label map goes to the SEG, not to a file.

The batch goes through MONAI's own ``list_data_collate`` and
``decollate_batch``, and postprocessing sees the batch item merged with the
output (``image``, ``pred``), as ``monai.engines.SupervisedEvaluator`` does.
The network comes from the model registry: SHA-256 of ``models/model.pt``
and ``configs/inference.json`` checked against the card, weights read with
``torch.load(weights_only=True)`` and loaded with ``strict=True``.

The result is the bundle's ``pred``: a one-channel label map in the
network's output space (after ``Orientationd``/``Spacingd``) unless the
bundle's postprocessing inverts it (``Invertd``); either way its affine says
where it lies, and the pipeline maps it onto the source grid from there.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import ImageReader, MetaTensor, decollate_batch, list_data_collate
from monai.transforms import Compose, LoadImaged, SaveImage, SaveImaged

from models.card import BundleOutputSpec, ModelCard
from models.registry import ModelRegistry
from pipelines.common.device import inference_precision, torch_device
from pipelines.common.resample import LPS_TO_RAS, affine_lps
from pipelines.common.volume import SeriesVolume

__all__ = ["BundleModel", "SeriesReader", "series_array_and_meta"]

#: The key of the network's output in the evaluator's output (``monai.utils.CommonKeys.PRED``).
PRED = "pred"


def series_array_and_meta(volume: SeriesVolume) -> tuple[np.ndarray, dict]:
    """The array and meta dict MONAI's ITK reader gives for ``volume``'s DICOM series.

    Returns
    -------
    array:
        float32 ``(x, y, z)`` = ``(column, row, slice)``, slices ascending
        along the normal ``row x column`` (as GDCM sorts them), rescaled
        values (``volume.image``'s).
    meta:
        ``affine`` and ``original_affine`` (4 x 4 float64, index -> RAS mm),
        ``spatial_shape``, ``space`` ``"RAS"``, ``original_channel_dim``
        ``nan`` (no channel), ``spacing`` (mm per axis).
    """
    array = np.ascontiguousarray(sitk.GetArrayFromImage(volume.image).transpose(2, 1, 0), dtype=np.float32)
    affine = LPS_TO_RAS @ affine_lps(volume.image)
    meta = {
        "affine": affine,
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(array.shape),
        "space": "RAS",
        "original_channel_dim": float("nan"),
        "spacing": np.asarray(volume.image.GetSpacing(), dtype=np.float64),
    }
    return array, meta


class SeriesReader(ImageReader):
    """A MONAI ``ImageReader`` for one series already in memory (see
    :func:`series_array_and_meta`); passed to ``LoadImaged`` at run time,
    so the "file name" it gets is only the label written to
    ``filename_or_obj`` (the Series Instance UID)."""

    def __init__(self, volume: SeriesVolume) -> None:
        super().__init__()
        self.volume = volume

    def verify_suffix(self, filename: Sequence[PathLike | str] | PathLike | str) -> bool:
        return True

    def read(self, data, **kwargs) -> SeriesVolume:
        return self.volume

    def get_data(self, img: SeriesVolume) -> tuple[np.ndarray, dict]:
        return series_array_and_meta(img)


def _without(compose: Compose, kinds: tuple[type, ...]) -> Compose:
    return Compose(
        [t for t in compose.transforms if not isinstance(t, kinds)],
        map_items=compose.map_items,
        unpack_items=compose.unpack_items,
        log_stats=compose.log_stats,
        lazy=compose.lazy,
        overrides=compose.overrides,
    )


class BundleModel:
    """A MONAI segmentation bundle, loaded once, run on one series at a time.

    Parameters
    ----------
    registry:
        Holds the bundle's card (task ``bundle_segmentation``).
    name:
        Card name.
    device:
        torch device string. On CUDA the forward pass runs at the precision
        :meth:`predict` is given (the worker's ``precision``); the bundle's
        ``"amp": true`` (float16 autocast in its evaluator) is kept in
        :attr:`amp` for information and is ``"fp16"`` there.

    Raises
    ------
    ValueError
        The card's task is not ``bundle_segmentation``; the bundle's
        ``preprocessing`` is not a ``Compose`` whose first transform is one
        ``LoadImaged``, or ``postprocessing`` is not a ``Compose``;
        ``device`` is not a usable torch device.
    models.registry.ModelNotFoundError, FileNotFoundError, models.registry.WeightsIntegrityError
        From the registry (unknown card, missing file, SHA-256 mismatch).
    """

    def __init__(self, registry: ModelRegistry, name: str, device: str = "cpu") -> None:
        from monai.bundle import ConfigParser

        dev = torch_device(device)
        card = registry.card(name)
        if card.task != "bundle_segmentation" or card.bundle_output is None:
            raise ValueError(f"model {name!r}: task is {card.task!r}, expected 'bundle_segmentation'")
        self.card: ModelCard = card
        self.output: BundleOutputSpec = card.bundle_output
        self.device = dev
        self.network = registry.load(name, dev)  # SHA-256 of model.pt and inference.json first
        root = registry.weights_path(name)
        parser = ConfigParser()
        parser.read_config(str(Path(root) / "configs" / "inference.json"))
        parser["bundle_root"] = str(root)
        parser["device"] = f"$torch.device({str(dev)!r})"
        where = f"MONAI bundle {root}: configs/inference.json"
        pre = parser.get_parsed_content("preprocessing")
        post = parser.get_parsed_content("postprocessing")
        if not isinstance(pre, Compose) or not pre.transforms or not isinstance(pre.transforms[0], LoadImaged):
            raise ValueError(f"{where}: preprocessing must be a Compose starting with LoadImaged")
        if not isinstance(post, Compose):
            raise ValueError(f"{where}: postprocessing must be a Compose")
        self.loader: LoadImaged = pre.transforms[0]
        if len(self.loader.keys) != 1:
            raise ValueError(f"{where}: LoadImaged loads {list(self.loader.keys)}; the node feeds one series")
        self.image_key = str(self.loader.keys[0])
        self.preprocessing = _without(pre, (LoadImaged,))
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = _without(post, (SaveImaged, SaveImage))
        self.amp = bool(parser.get_parsed_content("amp")) if "amp" in parser else False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name (the card's ``bundle_output.labels``)."""
        return dict(self.output.labels)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.output.modalities)

    def predict(self, volume: SeriesVolume, precision: str = "fp32") -> MetaTensor:
        """The bundle's label map for one series.

        ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast around the
        inferer on CUDA, fp32 on the CPU (:func:`inference_precision`); the
        network's output is cast to float32 before the bundle's postprocessing.

        Returns
        -------
        MetaTensor ``(1, *spatial)`` of integer labels on the CPU, with its
        affine (RAS) in ``.affine``.

        Raises
        ------
        ValueError
            The bundle's ``pred`` is not a one-channel map of whole numbers
            in 0..255 (a bundle whose postprocessing leaves probabilities or
            one-hot channels); ``precision`` is not one of the three.
        """
        amp = inference_precision(self.device, precision)
        with self._lock, torch.no_grad():
            data = self.loader({self.image_key: volume.series_instance_uid}, reader=SeriesReader(volume))
            data = self.preprocessing(data)
            batch = list_data_collate([data])
            inputs = batch[self.image_key].to(self.device)
            with amp:
                pred = self.inferer(inputs, self.network)
            if isinstance(pred, torch.Tensor):  # autocast leaves it in half precision
                pred = pred.float()
            batch_item = decollate_batch(batch, detach=True)[0]
            output = decollate_batch({self.image_key: inputs, PRED: pred}, detach=True)[0]
            item = self.postprocessing({**batch_item, **output})
        labels = item[PRED]
        if not isinstance(labels, MetaTensor):
            raise ValueError(f"model {self.name!r}: postprocessing gave {type(labels).__name__}, not a MetaTensor")
        labels = MetaTensor(labels.detach().cpu(), meta=labels.meta)
        if labels.ndim != 4 or labels.shape[0] != 1:
            raise ValueError(
                f"model {self.name!r}: the bundle's pred has shape {tuple(labels.shape)}; expected one channel "
                "of labels (1, X, Y, Z), e.g. after AsDiscreted(argmax=True)"
            )
        values = labels.as_tensor()
        if values.numel() and (
            bool((values != values.round()).any()) or float(values.min()) < 0 or float(values.max()) > 255
        ):
            raise ValueError(f"model {self.name!r}: the bundle's pred holds values that are not labels 0..255")
        if not all(math.isfinite(float(v)) for v in labels.affine.flatten()):
            raise ValueError(f"model {self.name!r}: the bundle's pred has a non-finite affine")
        return labels
