"""Input-drift monitoring: are the inputs of a model still like the data
it was made on?

Per model (pipeline and model version) the node keeps a sliding window of
its last ``[drift] window`` jobs' input features (:mod:`models.drift_reference`:
Manufacturer, View Position, Photometric Interpretation, Bits Stored,
Patient's Age, Pixel Spacing and Slice Thickness of the job's first
instance; the preprocessed intensity's mean and standard deviation and the
output score, which the pipeline reports in
``PipelineContext.observations``), and compares each feature with the
model card's ``drift_reference``: the population stability index for a
categorical feature, the two-sample Kolmogorov-Smirnov statistic for a
numerical one. A feature with fewer than ``[drift] min_count`` values in the
window has no statistic and never alerts; nor has a measurement (age,
intensity, score) whose reference holds fewer than ``min_count`` values
(:func:`models.drift_reference.comparable`: the brain demonstration card's
reference is one study), while categories and acquisition settings (pixel
spacing, slice thickness) are compared against a reference of any size; a
feature the reference lacks is not compared.

Each statistic is the gauge ``ainode_input_drift{pipeline,model_version,
feature,statistic}``, and ``ainode_input_drift_alert`` is 1 where it is above
the feature's threshold (:mod:`node.config.drift`). The same table is on the
dashboard and at ``GET /api/drift``.

Each job's features are also a row of the index (:mod:`node.index.drift`),
so :meth:`DriftMonitor.refresh` rebuilds the windows at start-up (and in a
process that did not run the jobs itself).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import structlog

from models.drift_reference import (
    PIPELINE_FEATURES,
    DriftReference,
    FeatureKind,
    comparable,
    dicom_features,
    ks_statistic,
    proportions,
    psi,
)
from node.config.drift import DriftSection
from node.metrics import Metrics

if TYPE_CHECKING:
    from node.index.drift import DriftQueries, ModelKey
    from pipelines.base import Study


@dataclass(frozen=True)
class FeatureDrift:
    """One row of the drift table.

    Attributes
    ----------
    feature, statistic:
        The feature, and ``"psi"`` (categorical) or ``"ks"`` (numerical).
    value:
        The statistic, dimensionless; None while ``n < min_count``, or while
        ``reference_n < min_count`` for a measurement (module docstring).
    threshold:
        Its alert threshold (``[drift]``).
    n, reference_n:
        Values of the feature in the window, and in the reference.
    alert:
        ``value > threshold``.
    """

    feature: str
    statistic: str
    value: float | None
    threshold: float
    n: int
    reference_n: int
    alert: bool


@dataclass(frozen=True)
class ModelDrift:
    """The drift table of one model: its window of ``jobs`` (at most
    ``window``), the card and reference source it is compared with (None:
    the card has no ``drift_reference``), one :class:`FeatureDrift` per
    feature of the reference."""

    pipeline: str
    model_version: str
    card: str | None
    reference_source: str | None
    jobs: int
    window: int
    min_count: int
    features: tuple[FeatureDrift, ...]

    @property
    def alerts(self) -> list[str]:
        return [f.feature for f in self.features if f.alert]

    def as_dict(self) -> dict:
        return {**asdict(self), "alerts": self.alerts}


class DriftMonitor:
    """The sliding windows and their comparison (module docstring).

    Parameters
    ----------
    settings:
        ``[drift]``.
    metrics:
        Where the gauges are; None: a private :class:`node.metrics.Metrics`.
    index:
        Where each job's features are kept (:class:`node.index.Index`); None:
        memory only (``ainode run``, unit tests).
    """

    def __init__(self, settings: DriftSection, metrics: Metrics | None = None, index: DriftQueries | None = None):
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.index = index
        self.log = structlog.get_logger("node.drift")
        self._lock = threading.Lock()
        self._windows: dict[ModelKey, deque[dict]] = {}
        self._references: dict[ModelKey, tuple[str, DriftReference | None]] = {}
        self._alerting: dict[ModelKey, list[str]] = {}

    def observe(self, pipeline: str, model: object, study: Study, observations: Mapping[str, float],
                *, job_id: int | None = None) -> ModelDrift | None:
        """Add one finished job of ``pipeline`` to its model's window and
        update the gauges. ``model`` is the pipeline instance that ran it
        (its ``model_version``, and its model card as :func:`node.guard.pipeline_card`
        finds it); ``observations`` its ``PipelineContext.observations``.

        Never raises: drift is reported, it never fails a job (an error is logged)."""
        if not self.settings.enabled:
            return None
        try:
            from node.guard import pipeline_card

            card = pipeline_card(model)
            features: dict[str, str | float] = {str(k): v for k, v in dicom_features(study.datasets[0]).items()}
            for feature in PIPELINE_FEATURES:
                value = observations.get(str(feature))
                if value is not None and value == value:  # not NaN
                    features[str(feature)] = float(value)
            key = (pipeline, str(getattr(model, "model_version", "unknown")))
            return self.observe_features(key, features, card.name if card else None,
                                         card.drift_reference if card else None, job_id=job_id)
        except Exception as exc:
            self.log.error("drift_observe_failed", pipeline=pipeline, error=f"{type(exc).__name__}: {exc}")
            return None

    def observe_features(self, key: ModelKey, features: Mapping[str, str | float], card: str | None,
                         reference: DriftReference | None, *, job_id: int | None = None) -> ModelDrift:
        """:meth:`observe` for features already read: ``key`` is (pipeline,
        model version), ``features`` feature name -> category or number."""
        with self._lock:
            self._set_reference(key, card, reference)
            self._window(key).append(dict(features))
            if self.index is not None:
                self.index.drift_record(key, features, keep=self.settings.window, job_id=job_id)
            drift = self._compare(key)
        self._publish(drift)
        return drift

    def refresh(self) -> None:
        """Rebuild every window and reference from the index (start-up, or a
        process whose jobs run elsewhere) and publish the gauges."""
        if self.index is None:
            return
        windows = self.index.drift_windows(self.settings.window)
        references = self.index.drift_references()
        with self._lock:
            for key, (card, text) in references.items():
                self._references[key] = (card, DriftReference.model_validate_json(text))
            for key, rows in windows.items():
                self._windows[key] = deque(rows, maxlen=self.settings.window)
            tables = [self._compare(key) for key in self._windows]
        for drift in tables:
            self._publish(drift)

    def report(self) -> list[ModelDrift]:
        """The drift table of every model seen, by pipeline and model version."""
        with self._lock:
            return [self._compare(key) for key in sorted(self._windows)]

    # ------------------------------------------------------------------ internals

    def _window(self, key: ModelKey) -> deque[dict]:
        if key not in self._windows:
            self._windows[key] = deque(maxlen=self.settings.window)
        return self._windows[key]

    def _set_reference(self, key: ModelKey, card: str | None, reference: DriftReference | None) -> None:
        if self._references.get(key) == (card or "", reference):
            return
        self._references[key] = (card or "", reference)
        if self.index is not None and reference is not None:
            self.index.drift_set_reference(key, card or "", reference.model_dump_json())

    def _compare(self, key: ModelKey) -> ModelDrift:
        window = self._windows.get(key, deque())
        card, reference = self._references.get(key, ("", None))
        rows = []
        for feature, ref in (reference.features.items() if reference else ()):
            values = [w[feature] for w in window if feature in w]
            threshold = self.settings.threshold(feature)
            categorical = feature.kind == FeatureKind.CATEGORICAL
            value: float | None = None
            if len(values) >= self.settings.min_count and comparable(feature, ref.n, self.settings.min_count):
                if categorical:
                    assert ref.frequencies is not None  # FeatureReference: one form per kind
                    value = psi(proportions(str(v) for v in values), ref.frequencies)
                else:
                    assert ref.quantiles is not None
                    value = ks_statistic([float(v) for v in values], ref.quantiles)
            rows.append(FeatureDrift(str(feature), "psi" if categorical else "ks", value, threshold, len(values),
                                     ref.n, value is not None and value > threshold))
        return ModelDrift(key[0], key[1], card or None, reference.source if reference else None, len(window),
                          self.settings.window, self.settings.min_count, tuple(rows))

    def _publish(self, drift: ModelDrift) -> None:
        labels = {"pipeline": drift.pipeline, "model_version": drift.model_version}
        self.metrics.input_drift_jobs.labels(**labels).set(drift.jobs)
        for row in drift.features:
            self.metrics.input_drift_alert.labels(**labels, feature=row.feature).set(1 if row.alert else 0)
            if row.value is not None:
                self.metrics.input_drift.labels(**labels, feature=row.feature, statistic=row.statistic).set(row.value)
        key = (drift.pipeline, drift.model_version)
        if self._alerting.get(key, []) != drift.alerts:  # log a change of the alerts, not every job
            self._alerting[key] = drift.alerts
            self.log.warning("input_drift_alerts", **labels, features=drift.alerts,
                             values=json.dumps({f.feature: round(f.value or 0.0, 4) for f in drift.features if f.alert}))



def reference_from_studies(pipeline: object, studies: list[Study], source: str, *, device: str = "cpu") -> DriftReference:
    """The reference of ``studies`` as the node would see them: each one run
    through ``pipeline`` (a :class:`pipelines.base.Pipeline`), its features
    read exactly as :meth:`DriftMonitor.observe` reads them. A study the
    pipeline does not take (:class:`~pipelines.base.PipelineNotApplicable`,
    :class:`~pipelines.base.PipelineInputError`) is left out and logged.

    Raises
    ------
    ValueError
        No study gave a sample (:func:`models.drift_reference.build_reference`).
    """
    from models.drift_reference import build_reference
    from pipelines.base import PipelineContext, PipelineInputError, PipelineNotApplicable

    log = structlog.get_logger("node.drift")
    samples = []
    for study in studies:
        context = PipelineContext(device=device, log=log.bind(study_uid=study.study_instance_uid))
        try:
            pipeline.run(study, context)  # type: ignore[attr-defined]  # a Pipeline
        except (PipelineNotApplicable, PipelineInputError) as exc:
            log.warning("drift_reference_study_skipped", study_uid=study.study_instance_uid, reason=str(exc))
            continue
        sample: dict = dict(dicom_features(study.datasets[0]))
        sample.update({f: float(context.observations[str(f)]) for f in PIPELINE_FEATURES if str(f) in context.observations})
        samples.append(sample)
    return build_reference(samples, source)
