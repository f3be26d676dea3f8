"""DenseNet-121 in torchxrayvision's layout, for chest radiograph classification.

The network is MONAI's :class:`monai.networks.nets.DenseNet121` (2-D, one
input channel, 18 outputs) with two additions:

* a buffer ``op_threshs`` (18 values, NaN where a label has no operating point),
  as in torchxrayvision's ``DenseNet``;
* a state-dict key mapping, so that :meth:`~torch.nn.Module.state_dict` and
  :meth:`~torch.nn.Module.load_state_dict` speak torchvision's names, the names
  of torchxrayvision's released weights (``densenet121-res224-rsna`` and
  friends).

Why MONAI's network and not a copy of torchvision's: MONAI is already a
dependency, its DenseNet is maintained and tested upstream, and it is the same
computation: conv0/norm0/relu0/pool0, dense layers ``BN-ReLU-Conv1x1-BN-ReLU-
Conv3x3`` concatenated, transitions ``BN-ReLU-Conv1x1-AvgPool2``, ``norm5``,
then ``ReLU -> global average pool -> Linear`` (MONAI's ``class_layers``), which
is exactly torchxrayvision's ``features -> relu -> adaptive_avg_pool2d ->
classifier``. Only two names differ, and a documented key mapping is smaller
and easier to verify (the tests load a torchvision-named state dict with
``strict=True`` and compare outputs) than a second copy of the architecture.

Key mapping (torchvision/torchxrayvision name <-> MONAI module path)::

    features.denseblock{b}.denselayer{l}.{norm1,conv1,norm2,conv2}.*
        <-> features.denseblock{b}.denselayer{l}.layers.{norm1,conv1,norm2,conv2}.*
    classifier.{weight,bias}  <->  class_layers.out.{weight,bias}

Every other key (``features.conv0``, ``features.norm0``,
``features.transition{1..3}.{norm,conv}``, ``features.norm5``, ``op_threshs``)
is the same in both.

Sources: Huang et al., "Densely Connected Convolutional Networks", CVPR 2017
(arXiv:1608.06993); Cohen et al., "TorchXRayVision: A library of chest X-ray
datasets and models", MIDL 2022 (arXiv:2111.00595), repository
github.com/mlmed/torchxrayvision, ``torchxrayvision/models.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DenseNet121

#: torchxrayvision's ``default_pathologies`` (``torchxrayvision/datasets.py``):
#: the meaning of each of the 18 outputs. Index 8 is Pneumonia, 16 Lung Opacity.
XRV_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)
PNEUMONIA_INDEX = XRV_LABELS.index("Pneumonia")
LUNG_OPACITY_INDEX = XRV_LABELS.index("Lung Opacity")

#: Module whose output Grad-CAM uses: the ReLU after ``features.norm5``, i.e.
#: the last feature map before global pooling (7x7 at a 224x224 input).
GRADCAM_LAYER = "class_layers.relu"

_TV_LAYER = re.compile(r"^(features\.denseblock\d+\.denselayer\d+\.)(norm1|conv1|norm2|conv2)(\.|$)")
_MONAI_LAYER = re.compile(r"^(features\.denseblock\d+\.denselayer\d+\.)layers\.(norm1|conv1|norm2|conv2)(\.|$)")


def torchvision_to_monai_key(key: str) -> str:
    """Map one torchvision/torchxrayvision state-dict key (without prefix) to MONAI's."""
    if key.startswith("classifier."):
        return "class_layers.out." + key[len("classifier.") :]
    return _TV_LAYER.sub(r"\1layers.\2\3", key)


def monai_to_torchvision_key(key: str) -> str:
    """Map one MONAI DenseNet state-dict key (without prefix) to torchvision's."""
    if key.startswith("class_layers.out."):
        return "classifier." + key[len("class_layers.out.") :]
    return _MONAI_LAYER.sub(r"\1\2\3", key)


def _rename_in_place(state_dict: dict[str, Any], prefix: str, rename) -> None:
    """Rename the keys under ``prefix`` in place, keeping their order, and
    the matching ``_metadata`` entries (module path -> version)."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key.startswith(prefix):
            key = prefix + rename(key[len(prefix) :])
        state_dict[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in list(metadata):
            if key.startswith(prefix):
                local = key[len(prefix) :]
                # metadata keys are module paths; map them as if they were parameter keys
                new = prefix + rename(local + ".x")[:-2]
                if new != key:
                    metadata[new] = metadata.pop(key)


class XRVDenseNet121(DenseNet121):
    """DenseNet-121 that loads torchxrayvision DenseNet weights unchanged.

    Parameters
    ----------
    in_channels:
        Image channels; torchxrayvision uses 1 (grey-scale radiograph).
    out_channels:
        Number of outputs; 18 for torchxrayvision's label set :data:`XRV_LABELS`.
    op_threshs:
        Operating points, one per output (probabilities in (0, 1), NaN where
        none), kept in the buffer ``op_threshs``; all NaN by default. The
        forward pass does not use them; see :func:`op_norm`.
    dropout_prob:
        Dropout after each dense layer (0 in torchxrayvision).

    Forward
    -------
    ``x``: ``(B, in_channels, H, W)`` float32, intensities in [-1024, 1024]
    (torchxrayvision's ``normalize``); H = W = 224 for the released weights.
    Returns ``(B, out_channels)`` float32 logits. Unlike torchxrayvision's
    ``DenseNet.forward`` this neither resizes the input nor applies
    sigmoid/op_norm: resizing is the preprocessing's job (it keeps the geometry
    for Grad-CAM) and the inference code applies sigmoid and :func:`op_norm`.

    Raises
    ------
    ValueError
        ``in_channels`` or ``out_channels`` below 1, or ``op_threshs`` not of
        length ``out_channels``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = len(XRV_LABELS),
        op_threshs: Sequence[float] | None = None,
        dropout_prob: float = 0.0,
    ) -> None:
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be at least 1, got {out_channels}")
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            init_features=64,
            growth_rate=32,
            block_config=(6, 12, 24, 16),
            bn_size=4,
            dropout_prob=dropout_prob,
        )
        if op_threshs is None:
            thr = torch.full((out_channels,), float("nan"))
        else:
            thr = torch.as_tensor(list(op_threshs), dtype=torch.float32)
            if thr.shape != (out_channels,):
                raise ValueError(f"op_threshs must have {out_channels} values, got {tuple(thr.shape)}")
        self.register_buffer("op_threshs", thr)
        self.register_state_dict_post_hook(self._to_torchvision_names)
        self.register_load_state_dict_pre_hook(self._from_torchvision_names)

    @staticmethod
    def _to_torchvision_names(module, state_dict, prefix, local_metadata) -> None:
        _rename_in_place(state_dict, prefix, monai_to_torchvision_key)

    @staticmethod
    def _from_torchvision_names(
        module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # One on-disk format only: MONAI-style names would load silently
        # otherwise, and a file mixing both could hide a missing tensor.
        monai_named = [
            k for k in state_dict
            if k.startswith(prefix) and monai_to_torchvision_key(k[len(prefix):]) != k[len(prefix):]
        ]
        if monai_named:
            error_msgs.append(
                f"{len(monai_named)} keys use MONAI DenseNet names (e.g. {monai_named[0]!r}); "
                "expected torchvision/torchxrayvision names (e.g. 'classifier.weight')"
            )
        _rename_in_place(state_dict, prefix, torchvision_to_monai_key)


def op_norm(probabilities: torch.Tensor, op_threshs: torch.Tensor) -> torch.Tensor:
    """Rescale probabilities so that each label's operating point lands at 0.5.

    torchxrayvision's ``op_norm`` (``torchxrayvision/models.py``): for a
    sigmoid output ``p`` and threshold ``t``, ``p / (2t)`` when ``p < t``, else
    ``1 - (1 - p) / (2 (1 - t))``. The map is monotonic, continuous, and takes
    [0, t] to [0, 0.5] and [t, 1] to [0.5, 1]. Labels whose threshold is NaN
    get 0.5, as in torchxrayvision.

    Parameters
    ----------
    probabilities:
        ``(B, L)`` float, sigmoid outputs in [0, 1].
    op_threshs:
        ``(L,)`` float, thresholds in (0, 1) or NaN.

    Returns
    -------
    ``(B, L)`` float32 in [0, 1].

    Raises
    ------
    ValueError
        Shapes that do not match.
    """
    if probabilities.ndim != 2 or op_threshs.ndim != 1 or probabilities.shape[1] != op_threshs.shape[0]:
        raise ValueError(
            f"probabilities must be (B, L) and op_threshs (L,); got {tuple(probabilities.shape)} "
            f"and {tuple(op_threshs.shape)}"
        )
    p = probabilities.float()
    t = op_threshs.to(p.device, torch.float32).expand_as(p)
    valid = ~torch.isnan(t)
    low = (p < t) & valid
    high = ~(p < t) & valid
    out = torch.full_like(p, 0.5)
    out[low] = p[low] / (t[low] * 2)
    out[high] = 1.0 - (1.0 - p[high]) / ((1.0 - t[high]) * 2)
    return out
