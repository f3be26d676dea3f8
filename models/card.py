"""Model cards: what a set of weights is, how to feed it, and how well it did.

A card is a JSON file (``models/cards/<name>.json`` or a configured directory)
validated by :class:`ModelCard`. It names the architecture the registry builds,
the weight file (path relative to the card, with its SHA-256), the input spec
the preprocessing follows, the output labels, the operating point, the licence
and intended use, the training data and the metrics measured on held-out data.
``intended_use_rules`` (:class:`IntendedUseRule`) state the intended use as
rules over the input's DICOM attributes, in the routing rule language; the
node checks them before a job runs (:mod:`node.guard`).
``drift_reference`` (:class:`models.drift_reference.DriftReference`) is the
distribution of the input features the node watches for drift (:mod:`node.drift`).

Classification cards (radiographs) describe their input with :class:`InputSpec`
and their outputs with :class:`OutputSpec`. Segmentation cards (multi-sequence
MR volumes, e.g. BraTS) use :class:`VolumeInputSpec` (``volume_input``: channel
order, voxel spacing, axis layout, normalisation) and :class:`SegmentationSpec`
(``segmentation``: output channels, activation, threshold, sliding window, the
priority-ordered map from channels to labels and the label regions), which
express the MONAI ``brats_mri_segmentation`` bundle's ``inference.json``.
Generic MONAI bundles (task ``bundle_segmentation``) run their own
``inference.json`` and need only :class:`BundleOutputSpec` (``bundle_output``:
the modalities they read and the name of each label value).

The fields follow the "Model Cards for Model Reporting" structure (Mitchell et
al., FAT* 2019, arXiv:1810.03993) and the metadata of MONAI bundles
(``configs/metadata.json``), reduced to what the node uses.

Validation errors are raised as :class:`ValueError` (pydantic's
``ValidationError`` is a subclass) whose message names the offending attribute.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.drift_reference import DriftReference
from models.intended_use import IntendedUseRule

_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    """Which network to build: ``name`` is a key of the registry's builders
    (e.g. ``"xrv-densenet121"``), ``params`` its keyword arguments."""

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class InputSpec(_Strict):
    """How an image must be prepared for the network.

    Attributes
    ----------
    modalities:
        DICOM Modality (0008,0060) values the model was trained for.
    channels:
        Network input channels.
    size:
        Network input ``(H, W)`` in pixels.
    isotropic_resampling:
        Resample to square pixels using Pixel Spacing (0028,0030) or Imager
        Pixel Spacing (0018,1164) before resizing.
    pad_to_square:
        Pad the shorter side (with black) before resizing, so no anatomy is cut.
    clahe:
        Apply CLAHE (skimage ``exposure.equalize_adapthist``) at the input size.
    clahe_clip_limit:
        CLAHE clip limit in (0, 1].
    intensity_range:
        ``(low, high)``: the [0, 1] image is mapped linearly onto it;
        torchxrayvision uses (-1024, 1024).
    """

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    channels: int = Field(1, ge=1)
    size: tuple[int, int]
    isotropic_resampling: bool = True
    pad_to_square: bool = True
    clahe: bool = False
    clahe_clip_limit: float = Field(0.01, gt=0.0, le=1.0)
    intensity_range: tuple[float, float] = (-1024.0, 1024.0)

    @field_validator("size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 8 or v[1] < 8:
            raise ValueError(f"expected (H, W) of at least 8 pixels each, got {v}")
        return v

    @field_validator("intensity_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"expected low < high, got {v}")
        return v


class OutputSpec(_Strict):
    """What the outputs mean.

    Attributes
    ----------
    labels:
        One name per network output, in output order; ``""`` for an output the
        weights were not trained for.
    activation:
        Applied to the logits to get probabilities.
    target:
        The label the pipeline reports (e.g. ``"Pneumonia"``).
    op_norm:
        Apply torchxrayvision's operating-point normalisation with the
        ``op_threshs`` buffer, so that 0.5 is the operating point.
    """

    labels: list[str] = Field(min_length=1)
    activation: Literal["sigmoid", "softmax"] = "sigmoid"
    target: str = Field(min_length=1)
    op_norm: bool = False

    @model_validator(mode="after")
    def _target_in_labels(self) -> OutputSpec:
        if self.target not in self.labels:
            raise ValueError(f"output.target {self.target!r} is not one of output.labels")
        return self

    @property
    def target_index(self) -> int:
        """Index of :attr:`target` in the network output."""
        return self.labels.index(self.target)


#: Spatial layouts of a volume handed to the network, relative to the node's
#: ``(C, D, H, W)`` array (D = slices inferior->superior, H = rows
#: anterior->posterior, W = columns right->left: LPS, as SimpleITK's
#: ``GetArrayFromImage`` gives an LPS-oriented image). ``"zyx"`` uses it as it
#: is; ``"xyz"`` transposes it to ``(C, W, H, D)``, the layout nibabel reads
#: BraTS NIfTI files in and the MONAI bundle was trained in.
ArrayAxes = Literal["zyx", "xyz"]


class VolumeInputSpec(_Strict):
    """How a multi-sequence volume must be prepared for a 3-D segmentation network.

    Attributes
    ----------
    modalities:
        DICOM Modality (0008,0060) values the model was trained for.
    channels:
        Sequence roles in network input channel order, e.g. ``["T1c", "T1",
        "T2", "FLAIR"]`` (the MONAI bundle's ``channel_def``). Unique.
    spacing_mm:
        Voxel size (mm) the network expects, per spatial axis of the network
        input (the order of ``array_axes``).
    array_axes:
        Spatial layout of the network input, see :data:`ArrayAxes`.
    normalisation:
        ``"zscore_nonzero_channelwise"``: MONAI ``NormalizeIntensity(nonzero=True,
        channel_wise=True)``, i.e. each channel z-scored over its non-zero voxels.
    skull_stripped:
        The model was trained on skull-stripped, co-registered volumes (BraTS).
    bias_field_correction:
        The training volumes were N4 bias-field corrected (Tustison et al., IEEE
        TMI 2010), so inputs must be too. BraTS releases are not N4-corrected in
        their final images: ``False`` unless the model's training says so.
    """

    modalities: list[str] = Field(default_factory=lambda: ["MR"], min_length=1)
    channels: list[str] = Field(min_length=1)
    spacing_mm: tuple[float, float, float]
    array_axes: ArrayAxes = "zyx"
    normalisation: Literal["zscore_nonzero_channelwise"] = "zscore_nonzero_channelwise"
    skull_stripped: bool = True
    bias_field_correction: bool = False

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v) or not all(v):
            raise ValueError(f"expected unique, non-empty sequence roles, got {v}")
        return v

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(math.isfinite(s) and 0.05 <= s <= 20.0 for s in v):
            raise ValueError(f"expected voxel sizes in [0.05, 20] mm, got {v}")
        return v


class SlidingWindow(_Strict):
    """MONAI ``sliding_window_inference`` settings (the bundle's ``inferer``).

    Attributes
    ----------
    roi_size:
        Window size in voxels, per spatial axis of the network input.
    overlap:
        Fraction of a window shared with its neighbour, in [0, 1).
    sw_batch_size:
        Windows per forward pass.
    mode:
        How overlapping windows are blended (MONAI ``BlendMode``).
    """

    roi_size: tuple[int, int, int]
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(1, ge=1)
    mode: Literal["constant", "gaussian"] = "constant"

    @field_validator("roi_size")
    @classmethod
    def _roi(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(8 <= s <= 1024 for s in v):
            raise ValueError(f"expected 8..1024 voxels per axis, got {v}")
        return v


class LabelRule(_Strict):
    """One step of the channel -> label map: voxels whose ``channel`` is on get
    ``label``, unless an earlier rule already labelled them."""

    channel: str = Field(min_length=1)
    label: int = Field(ge=1, le=255)
    name: str = Field(min_length=1, description="What the label means, e.g. 'GD-enhancing tumour (ET)'.")


class SegmentationSpec(_Strict):
    """What a segmentation network's outputs mean and how they become labels.

    Attributes
    ----------
    channels:
        Output channel names in output order, e.g. ``["TC", "WT", "ET"]``.
    activation:
        Applied to the logits per channel (the bundle's ``Activationsd(sigmoid=True)``).
    threshold:
        A channel is on where its probability is ``>= threshold`` (MONAI
        ``AsDiscrete(threshold=...)``).
    label_rules:
        The label map in priority order. The BraTS map of the bundle's
        ``Lambdad`` is ``[ET -> 4, TC -> 1, WT -> 2]``: ET wins, then TC, then WT.
    regions:
        Output channel -> the labels that make up its region (the BraTS
        evaluation regions: TC = {1, 4}, WT = {1, 2, 4}, ET = {4}; MONAI
        ``ConvertToMultiChannelBasedOnBratsClasses``). Training targets and Dice
        use them.
    sliding_window:
        See :class:`SlidingWindow`.
    """

    channels: list[str] = Field(min_length=1)
    activation: Literal["sigmoid"] = "sigmoid"
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    label_rules: list[LabelRule] = Field(min_length=1)
    regions: dict[str, list[int]]
    sliding_window: SlidingWindow

    @model_validator(mode="after")
    def _consistent(self) -> SegmentationSpec:
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"segmentation.channels: names must be unique, got {self.channels}")
        labels = [r.label for r in self.label_rules]
        if len(set(labels)) != len(labels):
            raise ValueError(f"segmentation.label_rules: labels must be unique, got {labels}")
        for r in self.label_rules:
            if r.channel not in self.channels:
                raise ValueError(f"segmentation.label_rules: channel {r.channel!r} is not one of {self.channels}")
        if set(self.regions) != set(self.channels):
            raise ValueError(
                f"segmentation.regions: keys {sorted(self.regions)} must be the channels {sorted(self.channels)}"
            )
        for ch, members in self.regions.items():
            if not members or not set(members) <= set(labels):
                raise ValueError(f"segmentation.regions[{ch!r}]: {members} must be non-empty labels of label_rules")
        for r in self.label_rules:
            if r.label not in self.regions[r.channel]:
                raise ValueError(
                    f"segmentation.regions[{r.channel!r}] lacks label {r.label}, which label_rules assigns from "
                    f"channel {r.channel!r}"
                )
        return self

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> meaning, in rule order."""
        return {r.label: r.name for r in self.label_rules}


class BundleOutputSpec(_Strict):
    """What a generic MONAI bundle reads and what its label map holds, from its
    ``configs/metadata.json`` (``network_data_format``).

    Attributes
    ----------
    modalities:
        DICOM Modality (0008,0060) values of the series it reads
        (``inputs.image.modality``), e.g. ``["CT"]``.
    labels:
        Label value (1..255) -> name, from ``outputs.pred.channel_def``
        without the background (value 0); e.g. ``{1: "spleen"}``.
    """

    modalities: list[str] = Field(min_length=1)
    labels: dict[int, str] = Field(min_length=1)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[int, str]) -> dict[int, str]:
        for value, name in v.items():
            if not 1 <= value <= 255 or not name.strip():
                raise ValueError(f"expected label values 1..255 with non-empty names, got {value}: {name!r}")
        return v


class OperatingPoint(_Strict):
    """Decision threshold for :attr:`OutputSpec.target`.

    ``threshold`` is on the probability the pipeline reports (after op_norm
    when the card uses it); ``method`` says how it was chosen and on which data.
    """

    threshold: float = Field(ge=0.0, le=1.0)
    method: str = Field(min_length=1)
    sensitivity: float | None = Field(None, ge=0.0, le=1.0)
    specificity: float | None = Field(None, ge=0.0, le=1.0)
    dataset: str | None = None


class Weights(_Strict):
    """The weight file: ``path`` is relative to the card's directory (or
    absolute); ``sha256`` is the lower-case hex digest of its bytes.

    For ``format == "monai_bundle"``, ``path`` is the bundle directory,
    ``sha256`` covers ``models/model.pt`` and ``config_sha256`` (when given)
    covers ``configs/inference.json``: MONAI's ``ConfigParser`` evaluates
    ``$`` expressions in that file, so it is checked like code before it is read.
    """

    format: Literal["state_dict", "torchscript", "monai_bundle"]
    path: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dtype: Literal["float32", "float16"] = "float32"
    config_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _config_hash_only_for_bundles(self) -> Weights:
        if self.config_sha256 is not None and self.format != "monai_bundle":
            raise ValueError("weights.config_sha256 is only meaningful for format 'monai_bundle'")
        return self


class Licence(_Strict):
    """SPDX identifier and where the terms are."""

    spdx: str = Field(min_length=1)
    url: str | None = None
    notes: str | None = None


class DataSplit(_Strict):
    """How the data were split, so the split can be checked and reproduced."""

    method: str = Field(min_length=1)
    seed: int | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    positives: dict[str, int] = Field(default_factory=dict)
    members: dict[str, list[str]] = Field(
        default_factory=dict, description="split name -> group ids (e.g. patient ids) in it"
    )


class TrainingData(_Strict):
    """Where the training images and labels came from."""

    description: str = Field(min_length=1)
    sources: list[str] = Field(default_factory=list)
    licence: str | None = None
    n_images: int | None = Field(None, ge=0)
    split: DataSplit | None = None
    # Identifiers of every training / validation member (Patient ID, image
    # file stem, case id): `ainode validate` excludes cases that match one.
    training_members: list[str] = Field(default_factory=list)
    validation_members: list[str] = Field(default_factory=list)


class TrainingRun(_Strict):
    """How the weights were produced."""

    command: str = Field(min_length=1)
    wall_time_s: float | None = Field(None, ge=0.0)
    date: str | None = None
    hardware: str | None = None
    software: dict[str, str] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    notes: str | None = None


class Metric(_Strict):
    """One measured figure with its 95 % confidence interval.

    Attributes
    ----------
    name:
        E.g. ``"AUROC Pneumonia"``.
    value, ci95_low, ci95_high:
        The estimate and its interval; ``ci95_low <= value <= ci95_high``.
    dataset, split:
        Which data, and which part of them (e.g. "held-out test split, by patient").
    n, n_positive:
        Images (or patients) evaluated, and how many were positive.
    ci_method:
        How the interval was computed (e.g. "percentile bootstrap, 2000
        resamples of patients").
    """

    name: str = Field(min_length=1)
    value: float
    ci95_low: float | None = None
    ci95_high: float | None = None
    dataset: str = Field(min_length=1)
    split: str = Field(min_length=1)
    n: int = Field(ge=1)
    n_positive: int | None = Field(None, ge=0)
    ci_method: str | None = None

    @model_validator(mode="after")
    def _ci_brackets_value(self) -> Metric:
        if (self.ci95_low is None) != (self.ci95_high is None):
            raise ValueError("metrics: ci95_low and ci95_high must both be given or both be empty")
        if self.ci95_low is not None and self.ci95_high is not None and not (
            self.ci95_low <= self.value <= self.ci95_high
        ):
            raise ValueError(
                f"metrics[{self.name!r}]: expected ci95_low <= value <= ci95_high, got "
                f"{self.ci95_low} <= {self.value} <= {self.ci95_high}"
            )
        if self.n_positive is not None and self.n_positive > self.n:
            raise ValueError(f"metrics[{self.name!r}]: n_positive {self.n_positive} exceeds n {self.n}")
        return self


class ModelCard(_Strict):
    """A validated model card.

    Raises
    ------
    ValueError
        On construction, for a missing, extra or invalid attribute; the message
        names it (e.g. ``weights.sha256``).
    """

    card_format: Literal[1] = 1
    name: str = Field(pattern=_NAME_PATTERN)
    version: str = Field(min_length=1)
    task: Literal["classification", "segmentation", "bundle_segmentation"]
    description: str = Field(min_length=1)
    architecture: Architecture
    input: InputSpec | None = None
    output: OutputSpec | None = None
    volume_input: VolumeInputSpec | None = None
    segmentation: SegmentationSpec | None = None
    bundle_output: BundleOutputSpec | None = None
    operating_point: OperatingPoint | None = None
    weights: Weights
    licence: Licence
    intended_use: str = Field(min_length=1)
    intended_use_rules: list[IntendedUseRule] = Field(
        default_factory=list, description="The intended use as rules over the input (node.guard checks them)."
    )
    demonstration_only: bool
    training_data: TrainingData
    training: TrainingRun | None = None
    metrics: list[Metric] = Field(default_factory=list)
    references: list[str] = Field(default_factory=list)
    drift_reference: DriftReference | None = Field(
        None, description="Input-drift reference (models.drift_reference); the node compares recent inputs with it."
    )

    @model_validator(mode="after")
    def _task_fields(self) -> ModelCard:
        # Each task has its own input/output description; a card must not mix them.
        need = {
            "classification": ("input", "output"),
            "segmentation": ("volume_input", "segmentation"),
            "bundle_segmentation": ("bundle_output",),
        }
        for task, fields in need.items():
            for f in fields:
                present = getattr(self, f) is not None
                if task == self.task and not present:
                    raise ValueError(f"{f}: required for task {self.task!r}")
                if task != self.task and present:
                    raise ValueError(f"{f}: only allowed for task {task!r}, this card's task is {self.task!r}")
        if self.task == "bundle_segmentation" and self.weights.format != "monai_bundle":
            raise ValueError(f"weights.format: task 'bundle_segmentation' needs 'monai_bundle', got "
                             f"{self.weights.format!r}")
        # Both are set together: _task_fields requires them for task "segmentation".
        if self.segmentation is not None and self.volume_input is not None:
            if self.architecture.params.get("out_channels", len(self.segmentation.channels)) != len(
                self.segmentation.channels
            ):
                raise ValueError(
                    f"segmentation.channels: {len(self.segmentation.channels)} names, but architecture.params."
                    f"out_channels is {self.architecture.params['out_channels']}"
                )
            if self.architecture.params.get("in_channels", len(self.volume_input.channels)) != len(
                self.volume_input.channels
            ):
                raise ValueError(
                    f"volume_input.channels: {len(self.volume_input.channels)} roles, but architecture.params."
                    f"in_channels is {self.architecture.params['in_channels']}"
                )
        return self

    @model_validator(mode="after")
    def _rule_names(self) -> ModelCard:
        names = [r.name for r in self.intended_use_rules]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"intended_use_rules: rule names must be unique, {', '.join(doubled)} repeated")
        return self

    @model_validator(mode="after")
    def _finite(self) -> ModelCard:
        for m in self.metrics:
            for field in ("value", "ci95_low", "ci95_high"):
                v = getattr(m, field)
                if v is not None and not math.isfinite(v):
                    raise ValueError(f"metrics[{m.name!r}].{field} is not finite: {v}")
        return self

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ValueError(_describe(exc, data.get("name"))) from exc

    @classmethod
    def from_file(cls, path: Path) -> ModelCard:
        """Read and validate a card.

        Raises
        ------
        FileNotFoundError
            ``path`` does not exist.
        ValueError
            The file is not JSON, or not a valid card; the message names the
            file and the attribute.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"model card {path}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"model card {path}: expected a JSON object at the top level")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"model card {path}: {exc}") from exc

    def to_file(self, path: Path) -> None:
        """Write the card as indented JSON (UTF-8, trailing newline)."""
        Path(path).write_text(
            json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    def weights_path(self, card_dir: Path) -> Path:
        """The weight file (or bundle directory) as an absolute path."""
        p = Path(self.weights.path)
        return p if p.is_absolute() else (Path(card_dir) / p).resolve()


def _describe(exc: ValidationError, name: Any) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<card>"
        parts.append(f"{loc}: {err['msg']}")
    who = f"model card {name!r}" if isinstance(name, str) else "model card"
    return f"{who}: " + "; ".join(parts)
