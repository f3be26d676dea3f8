"""The contract between the node and a pipeline.

A pipeline takes an in-memory :class:`Study` (pydicom datasets grouped by
series) and returns derived DICOM objects (SEG, SR) as pydicom datasets. It
knows nothing of networking, spooling or the index; the node knows nothing of
models. See ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import structlog
from pydicom import Dataset


class PipelineInputError(ValueError):
    """The input is faulty: a required attribute is missing or invalid, a
    sequence is missing, pixel data cannot be used. A job that raises it
    fails at once (job state ``failed``), with this message as its reason and
    no traceback; the node does not retry it on its own.

    Only faults in the data belong here. A bug in the pipeline (a writer that
    produces an invalid object, a shape mismatch) must stay a plain
    exception, so that the job keeps its traceback."""


class PipelineNotApplicable(Exception):
    """The input is valid, but this pipeline does not process it: a colour
    image, a multi-frame image, a lateral chest view, a SEG, SR or localiser
    that a broad routing rule sent. The job ends ``not_applicable`` with this
    message as its reason: no result, no traceback, not counted as a failure.

    Deliberately not a :class:`PipelineInputError` (nor a ``ValueError``):
    a handler that adds context to input faults (``except ValueError``) must
    not turn "not for this model" into "faulty data"."""


@dataclass(frozen=True)
class Study:
    """The instances a job works on.

    Attributes
    ----------
    study_instance_uid:
        Study Instance UID (0020,000D) shared by every dataset.
    series:
        Series Instance UID (0020,000E) -> datasets of that series, pixel data
        included, sorted by Instance Number where present.
    roles:
        For study-level pipelines: sequence role (e.g. ``"T1c"``, ``"FLAIR"``)
        -> Series Instance UID, as the node's sequence rules decided.
    """

    def role(self, name: str) -> Sequence[Dataset]:
        """The datasets of the series that fills ``name``.

        Raises
        ------
        PipelineInputError
            No series fills that role.
        """
        if name not in self.roles:
            raise PipelineInputError(f"no {name} series in study {self.study_instance_uid}")
        return self.series[self.roles[name]]

    study_instance_uid: str
    series: Mapping[str, Sequence[Dataset]]
    roles: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.series:
            raise ValueError("Study.series is empty: a study needs at least one series")
        for role, series_uid in self.roles.items():
            if series_uid not in self.series:
                raise ValueError(f"Study.roles[{role!r}] names series {series_uid!r}, which is not in Study.series")
        for series_uid, datasets in self.series.items():
            if not datasets:
                raise ValueError(f"Study.series[{series_uid!r}] holds no datasets")
            for ds in datasets:
                if ds.get("StudyInstanceUID") != self.study_instance_uid:
                    raise ValueError(
                        f"StudyInstanceUID of {ds.get('SOPInstanceUID')} is "
                        f"{ds.get('StudyInstanceUID')!r}, expected {self.study_instance_uid!r}"
                    )

    @property
    def datasets(self) -> list[Dataset]:
        """Every dataset of the study, series by series."""
        return [ds for datasets in self.series.values() for ds in datasets]


@dataclass(frozen=True)
class PipelineContext:
    """What the node hands a pipeline besides the study.

    Attributes
    ----------
    uid_prefix:
        Organisation UID root for derived objects; ``None`` uses pydicom's.
        UIDs are derived deterministically from the source UIDs, the pipeline
        name and the model version, so a re-run replaces the earlier result.
    device:
        torch device string: ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
    precision:
        Arithmetic of the forward passes (``[worker] precision``): ``"fp32"``,
        ``"bf16"`` or ``"fp16"``. On CUDA the last two run under
        ``torch.autocast``; the CPU always runs fp32
        (:func:`pipelines.common.device.inference_precision`). Outputs are
        float32 either way.
    log:
        A structlog logger: the node's has the job's ids bound; by default
        ``structlog.get_logger("pipelines")``, so a pipeline always logs
        and never checks for a missing logger.
    manufacturer:
        Written to Manufacturer (0008,0070) of derived objects.
    timings:
        Filled by the pipeline: stage name -> wall time in seconds.
    intended_use_warnings:
        The model card's intended-use rules the input is outside of and that
        the node is configured to process with a warning (:mod:`node.guard`),
        one sentence each, starting with the rule's name (``frontal_view
        (...): ViewPosition=LL``); the writers put them in the SR and mark the SEG's
        Series Description "OUT OF INTENDED USE". Empty: within it.
    observations:
        Filled by the pipeline: input-drift feature -> value for this job
        (:data:`models.drift_reference.PIPELINE_FEATURES`:
        ``intensity_mean`` and ``intensity_std`` of the network input after
        preprocessing, ``score`` the model's output); the node compares them
        with the model card's reference (:mod:`node.drift`). A pipeline
        that fills nothing is watched on its DICOM attributes only.
    """

    uid_prefix: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    log: Any = field(default_factory=lambda: structlog.get_logger("pipelines"))
    manufacturer: str = "dicom-ai-node"
    timings: dict[str, float] = field(default_factory=dict)
    intended_use_warnings: tuple[str, ...] = ()
    observations: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Pipeline(Protocol):
    """A clinical task the node can run on a complete series or study."""

    #: Registry name, e.g. ``"pneumonia"``; routing rules refer to it.
    name: str
    #: ``"series"``: one job per complete series; ``"study"``: per study.
    level: str

    @property
    def model_version(self) -> str:
        """Version of the model in use, written into every derived object."""

    def run(self, study: Study, context: PipelineContext) -> list[Dataset]:
        """Process ``study`` and return the derived objects (SEG, SR).

        Raises
        ------
        PipelineInputError
            The input is faulty; the job fails without retry.
        PipelineNotApplicable
            The input is valid but not for this pipeline; the job ends
            ``not_applicable``.
        """
