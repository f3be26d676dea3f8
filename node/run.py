"""Run: take queued jobs, run their pipeline, put the results in the outbox.

Workers are threads (``[worker] concurrency``, 1 by default). A job:

1. is claimed (``queued -> running``, attempt counted) in one transaction;
2. reads its series from the spool into an in-memory :class:`pipelines.base.Study`;
3. runs the pipeline, whose models are loaded once per process;
4. writes every result durably to the outbox, then marks the job ``done`` and
   queues one delivery per result and destination in one transaction.

A crash anywhere before step 4 leaves the job ``running``; on restart the node
queues it again, and because derived UIDs are deterministic a re-run
overwrites rather than duplicates. A pipeline exception marks the job
``failed`` with its traceback, and the node keeps serving; an input fault
(:class:`~pipelines.base.PipelineInputError`) marks it ``failed`` with its
reason only; valid input the pipeline does not process
(:class:`~pipelines.base.PipelineNotApplicable`) ends ``not_applicable``;
input outside the model card's intended use (:mod:`node.guard`, before the
pipeline runs) ends ``out_of_scope`` where configured ``refuse``, else runs
with the warnings in its context and its ``done`` reason.
An operator queues failed jobs again with ``ainode jobs retry``; the workers
poll for queued jobs at least once a second, so a running node picks them up.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from collections.abc import Callable

import pydicom
import structlog

from node.config import NodeConfig
from node.config.guard import GuardAction, GuardSettings
from node.guard import Decision, OutOfScope, describe, evaluate, pipeline_card
from node.index import Index, JobState, JobView, utcnow
from node.metrics import Metrics, since
from node.notify import Notifier
from node.spool import Spool
from pipelines.base import Pipeline, PipelineContext, PipelineInputError, PipelineNotApplicable, Study
from pipelines.common.seg_frames import omit_empty_frames
from pipelines.registry import registry as pipeline_registry


def resolve_device(setting: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class PipelineCache:
    """One instance per pipeline name, built on first use (models load once)."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self._instances: dict[str, Pipeline] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Pipeline:
        """The pipeline ``name``, built on first use.

        Raises
        ------
        TypeError
            The registered class does not implement
            :class:`pipelines.base.Pipeline` (``name``, ``level``,
            ``model_version``, ``run``); the job fails with this reason.
        """
        with self._lock:
            if name not in self._instances:
                from models.registry import ModelRegistry

                cls = pipeline_registry().spec(name).load_class()
                registry = ModelRegistry(self.config.models.card_dirs)
                settings = getattr(self.config.pipelines, name)
                instance = cls(settings, registry, device=resolve_device(self.config.worker.device))
                if not isinstance(instance, Pipeline):
                    raise TypeError(
                        f"{cls.__module__}.{cls.__qualname__} does not implement pipelines.base.Pipeline "
                        "(attributes name, level, model_version and method run)"
                    )
                self._instances[name] = instance
            return self._instances[name]


def load_study(index: Index, job: JobView) -> Study:
    """Read a job's input series from the spool, pixel data included: its
    one series, or for a study-level job the series of each role."""
    series_uids = [job.series_uid] if job.series_uid else list(dict.fromkeys(job.roles.values()))
    if not series_uids:
        raise PipelineInputError("the job names no input series")
    series = {}
    for uid in series_uids:
        paths = index.instance_paths(uid)
        if not paths:
            raise PipelineInputError(f"series {uid} has no instances in the spool")
        series[uid] = [pydicom.dcmread(p) for p in paths]
    return Study(study_instance_uid=job.study_uid, series=series, roles=dict(job.roles))


class Runner:
    """Worker threads that run queued jobs.

    Parameters
    ----------
    config, index, spool:
        The node's configuration and state.
    metrics:
        The node's :class:`node.metrics.Metrics`; None: a private one.
    on_results:
        Called after a job queued deliveries, so dispatch wakes at once.
    notifier:
        The node's :class:`node.notify.Notifier` (``job.*`` events); None: none.
    """

    def __init__(
        self,
        config: NodeConfig,
        index: Index,
        spool: Spool,
        *,
        metrics: Metrics | None = None,
        on_results: Callable[[], None] | None = None,
        notifier: Notifier | None = None,
    ):
        self.config = config
        self.index = index
        self.spool = spool
        self.metrics = metrics if metrics is not None else Metrics()
        self.on_results = on_results
        self.notifier = notifier or Notifier()
        self.pipelines = PipelineCache(config)
        self.log = structlog.get_logger("node.run")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def wake(self) -> None:
        self._wake.set()

    def warm_up(self, names: list[str]) -> None:
        """Load these pipelines (and their models) now, so the first job does
        not pay for it. A pipeline that cannot load is logged; its jobs will
        fail with the same reason."""
        for name in names:
            t = time.perf_counter()
            try:
                self.pipelines.get(name)
            except Exception as exc:
                self.log.error("pipeline_unavailable", pipeline=name, error=f"{type(exc).__name__}: {exc}")
                continue
            self.log.info("pipeline_ready", pipeline=name, seconds=round(time.perf_counter() - t, 3))

    def start(self) -> None:
        if self.config.worker.torch_threads:
            import torch

            torch.set_num_threads(self.config.worker.torch_threads)
        for i in range(self.config.worker.concurrency):
            t = threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def alive(self) -> tuple[int, int]:
        """(worker threads alive, ``[worker] concurrency``)."""
        return sum(t.is_alive() for t in self._threads), self.config.worker.concurrency

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.index.claim_job()
            except Exception:
                self.log.exception("claim_failed")
                job = None
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self.run_job(job)

    def run_job(self, job: JobView) -> JobState:
        """Run one claimed job to ``done``, ``failed``, ``not_applicable``
        (:class:`pipelines.base.PipelineNotApplicable`: no result, no
        traceback, counted apart from failures) or ``out_of_scope``
        (refused by the intended-use guard); returns the state."""
        log = self.log.bind(job_id=job.id, pipeline=job.pipeline, study_uid=job.study_uid, series_uid=job.series_uid)
        started = time.perf_counter()
        timings: dict[str, float] = {}
        log.info("job_started", attempt=job.attempts)
        self._observe(self.metrics.latency_job_start, job)
        try:
            t = time.perf_counter()
            pipeline = self.pipelines.get(job.pipeline)
            timings["load_pipeline"] = time.perf_counter() - t
            t = time.perf_counter()
            study = load_study(self.index, job)
            timings["read_spool"] = time.perf_counter() - t
            warnings = self.check_intended_use(job, pipeline, study, log)
            context = PipelineContext(
                uid_prefix=self.config.node.uid_prefix,
                device=resolve_device(self.config.worker.device),
                log=log,
                timings=timings,
                intended_use_warnings=tuple(str(d) for d in warnings),
            )
            results = pipeline.run(study, context)
            t = time.perf_counter()
            stored = self.store_results(results, job.destinations)
            timings["write_outbox"] = time.perf_counter() - t
            timings["total"] = time.perf_counter() - started
            note = describe(warnings, GuardAction.WARN) if warnings else None
            self.index.finish_job(job.id, stored, json.dumps(timings), note=note)
        except OutOfScope as exc:
            return self._end_without_result(job, JobState.OUT_OF_SCOPE, str(exc), timings, started, log.warning)
        except PipelineNotApplicable as exc:
            return self._end_without_result(job, JobState.NOT_APPLICABLE, str(exc), timings, started, log.info)
        except PipelineInputError as exc:
            return self._end_without_result(job, JobState.FAILED, str(exc), timings, started, log.warning)
        except Exception as exc:
            tb = traceback.format_exc()
            return self._end_without_result(
                job, JobState.FAILED, f"{type(exc).__name__}: {exc}", timings, started, log.error, tb, repr(exc)
            )
        log.info(
            "job_done",
            results=[f"{ds.Modality} {ds.SOPInstanceUID} -> {','.join(dests)}" for ds, _, dests in stored],
            destinations=list(job.destinations),
            timings={k: round(v, 3) for k, v in timings.items()},
        )
        self._count(job, JobState.DONE, timings)
        if self.on_results:
            self.on_results()
        self.notifier.job(job, JobState.DONE, results=len(stored))
        return JobState.DONE

    def _end_without_result(
        self, job: JobView, state: JobState, reason: str, timings: dict[str, float], started: float,
        log_at, tb: str | None = None, log_reason: str | None = None,
    ) -> JobState:
        """Close a job that produced nothing: log it (with its traceback, for
        our own errors), record ``state`` and ``reason``, count it and notify."""
        timings["total"] = time.perf_counter() - started
        event = {JobState.OUT_OF_SCOPE: "job_out_of_scope", JobState.NOT_APPLICABLE: "job_not_applicable"}
        extra = {"traceback": tb} if tb else {}
        log_at(event.get(state, "job_failed"), reason=log_reason or reason, timings=timings, **extra)
        self.index.fail_job(job.id, reason, tb, json.dumps(timings), state=state)
        self._count(job, state, timings)
        self.notifier.job(job, state, reason)
        return state

    def check_intended_use(self, job: JobView, pipeline: Pipeline, study: Study, log) -> list[Decision]:
        """Judge ``study`` against the pipeline's model card (:mod:`node.guard`),
        count and log each decision, and return the warnings.

        Raises
        ------
        OutOfScope
            A rule configured ``refuse`` failed: the job ends ``out_of_scope``.
        ValueError
            ``intended_use.rules`` names a rule the card lacks (the job fails).
        """
        card = pipeline_card(pipeline)
        if card is None:
            return []
        settings = getattr(getattr(self.config.pipelines, job.pipeline, None), "intended_use", None) or GuardSettings()
        decisions = evaluate(card, study, settings)
        for d in decisions:
            self.metrics.intended_use.labels(pipeline=job.pipeline, rule=d.rule, action=str(d.action)).inc()
            log.info("intended_use_decision", rule=d.rule, action=str(d.action), values=dict(d.values),
                     decided_series_uid=d.series_uid)
        if any(d.action == GuardAction.REFUSE for d in decisions):
            raise OutOfScope(describe(decisions, GuardAction.REFUSE))
        return decisions

    def store_results(self, results, destinations: tuple[str, ...]) -> list[tuple]:
        """Write results to the outbox and say where each goes: a SEG goes in
        full to most destinations, and without its empty frames to those with
        ``omit_empty_frames`` (see :mod:`pipelines.common.seg_frames`)."""
        known = self.config.destinations
        compact = [d for d in destinations if d in known and known[d].omit_empty_frames]
        full = [d for d in destinations if d not in compact]
        stored = []
        for ds in results:
            path = self.spool.store_result(ds)
            variant = omit_empty_frames(ds) if compact and ds.Modality == "SEG" else None
            if variant is None:
                stored.append((ds, path, destinations))
            else:
                stored.append((ds, path, tuple(full)))
                stored.append((variant, self.spool.store_result(variant, "compact"), tuple(compact)))
        return stored

    def _count(self, job: JobView, state: JobState, timings: dict[str, float]) -> None:
        self.metrics.jobs.labels(pipeline=job.pipeline, state=state).inc()
        self.metrics.job_seconds.labels(pipeline=job.pipeline).observe(timings.get("total", 0.0))
        self._observe(self.metrics.latency_job_end, job)

    @staticmethod
    def _observe(histogram, job: JobView) -> None:
        """Seconds from the job's last input instance to now (:mod:`node.metrics`)."""
        seconds = since(job.trigger_received_at, utcnow())
        if seconds is not None:
            histogram.labels(pipeline=job.pipeline).observe(seconds)
