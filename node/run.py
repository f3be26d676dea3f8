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
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Protocol

import pydicom
import structlog
from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeConfig
from node.config.guard import GuardAction, GuardSettings
from node.drift import DriftMonitor
from node.guard import Decision, OutOfScope, describe, evaluate, pipeline_card
from node.index import ClaimLost, Index, JobState, JobView, utcnow
from node.metrics import Metrics, since
from node.notify import Notifier
from node.queue import EmbeddedQueue, JobQueue
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


def input_series(job: JobView) -> list[str]:
    """A job's input Series Instance UIDs: its one series, or for a
    study-level job the series of each role (once each). Raises
    :class:`~pipelines.base.PipelineInputError` when it names none."""
    uids = [job.series_uid] if job.series_uid else list(dict.fromkeys(job.roles.values()))
    if not uids:
        raise PipelineInputError("the job names no input series")
    return uids


def load_study(index: Index, job: JobView) -> Study:
    """Read a job's input series from the spool, pixel data included
    (:func:`input_series`)."""
    series = {}
    for uid in input_series(job):
        paths = index.instance_paths(uid)
        if not paths:
            raise PipelineInputError(f"series {uid} has no instances in the spool")
        series[uid] = [pydicom.dcmread(p) for p in paths]
    return Study(study_instance_uid=job.study_uid, series=series, roles=dict(job.roles))


class TransientJobError(Exception):
    """The index or the node could not be reached while running a job (a
    Celery worker fetching its input or handing back its results): the job
    is to be tried again, never failed for it."""


class IndexUnavailable(TransientJobError):
    """The index could not be reached to claim the job: nothing is held, so
    the message is retried until the index is back (at most every 60 s)."""


class StudySource(Protocol):
    """Where a job's input comes from: the spool here, or the node over
    WADO-RS (:mod:`node.worker.io`)."""

    def load(self, job: JobView) -> Study:
        """The job's series, pixel data included. Raises
        :class:`~pipelines.base.PipelineInputError` or :class:`TransientJobError`."""
        ...


class ResultSink(Protocol):
    """Where a job's results go: the outbox here (:class:`OutboxSink`), or
    back to the node over STOW-RS (:mod:`node.worker.io`)."""

    def deliver(self, job: JobView, results: list, timings: dict[str, float], note: str | None, worker_id: str | None) -> int:
        """Record ``results`` and mark the job done; returns how many objects
        were queued for delivery. Raises :class:`node.index.ClaimLost` or
        :class:`TransientJobError`."""
        ...


class SpoolSource:
    """Input read from the spool paths in the index (:func:`load_study`)."""

    def __init__(self, index: Index):
        self.index = index

    def load(self, job: JobView) -> Study:
        return load_study(self.index, job)


class OutboxSink:
    """Results written durably to the outbox, then the job marked done with
    one delivery per result and destination, in one transaction."""

    def __init__(self, config: NodeConfig, spool: Spool, queue: JobQueue):
        self.config = config
        self.spool = spool
        self.queue = queue

    def deliver(self, job: JobView, results: list, timings: dict[str, float], note: str | None, worker_id: str | None) -> int:
        if worker_id is not None and not self.queue.heartbeat(job.id, worker_id):  # lost: leave the outbox to the holder
            raise ClaimLost(f"job {job.id} is no longer {worker_id}'s")
        t = time.perf_counter()
        stored = self.store(results, job.destinations)
        timings["write_outbox"] = time.perf_counter() - t
        self.queue.complete(job.id, stored, json.dumps(timings), note, worker_id)
        return len(stored)

    def store(self, results, destinations: tuple[str, ...]) -> list[tuple]:
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


def default_worker_id() -> str:
    """``<host>:<pid>``: unique among live processes, readable in logs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Runner:
    """Runs claimed jobs: in worker threads of the node (embedded), or one at
    a time for a Celery worker (:mod:`node.worker`), which calls
    :meth:`run_job` itself.

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
    queue:
        Claims and outcomes (:class:`node.queue.JobQueue`); None: an
        :class:`~node.queue.EmbeddedQueue` on ``index``.
    source, sink:
        Where input comes from and results go; None: the spool
        (:class:`SpoolSource`) and the outbox (:class:`OutboxSink`).
    worker_id:
        Recorded on each claimed job; None: ``<host>:<pid>``.
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
        queue: JobQueue | None = None,
        source: StudySource | None = None,
        sink: ResultSink | None = None,
        worker_id: str | None = None,
    ):
        self.config = config
        self.index = index
        self.spool = spool
        self.metrics = metrics if metrics is not None else Metrics()
        self.drift = DriftMonitor(config.drift, self.metrics, index)  # input drift per model (node.drift)
        self.on_results = on_results
        self.notifier = notifier or Notifier()
        self.queue = queue if queue is not None else EmbeddedQueue(index)
        self.source = source or SpoolSource(index)
        self.sink = sink or OutboxSink(config, spool, self.queue)
        self.worker_id = worker_id or default_worker_id()
        self.pipelines = PipelineCache(config)
        self.log = structlog.get_logger("node.run")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def wake(self) -> None:
        self.queue.enqueue()

    def warm_up(self, names: list[str]) -> dict[str, str]:
        """Load these pipelines (and their models) now, so the first job does
        not pay for it. A pipeline that cannot load is logged; its jobs will
        fail with the same reason. Returns pipeline -> model version of
        those that loaded."""
        loaded = {}
        for name in names:
            t = time.perf_counter()
            try:
                loaded[name] = str(self.pipelines.get(name).model_version)
            except Exception as exc:
                self.log.error("pipeline_unavailable", pipeline=name, error=f"{type(exc).__name__}: {exc}")
                continue
            self.log.info("pipeline_ready", pipeline=name, seconds=round(time.perf_counter() - t, 3))
        return loaded

    def start(self) -> None:
        """Start ``[worker] concurrency`` threads claiming from an embedded queue."""
        self.set_torch_threads()
        for i in range(self.config.worker.concurrency):
            t = threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def set_torch_threads(self) -> None:
        if self.config.worker.torch_threads:
            import torch

            torch.set_num_threads(self.config.worker.torch_threads)

    def alive(self) -> tuple[int, int]:
        """(worker threads alive, ``[worker] concurrency``)."""
        return sum(t.is_alive() for t in self._threads), self.config.worker.concurrency

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.queue.enqueue()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _loop(self) -> None:
        worker_id = f"{self.worker_id}/{threading.current_thread().name}"
        assert isinstance(self.queue, EmbeddedQueue)
        while not self._stop.is_set():
            try:
                job = self.queue.claim(worker_id)
            except Exception:
                self.log.exception("claim_failed")
                job = None
            if job is None:
                self.queue.wait(1.0)
                continue
            try:
                self.run_job(job)
            except TransientJobError as exc:  # the index failed: give the job back and wait a moment
                self.log.error("job_interrupted", job_id=job.id, error=str(exc))
                try:
                    self.index.release_job(job.id, worker_id, str(exc))
                except Exception:
                    self.log.exception("job_release_failed", job_id=job.id)  # left running: recovered at restart
                self._stop.wait(1.0)

    def run_job(self, job: JobView) -> JobState | None:
        """Run one claimed job to ``done``, ``failed``, ``not_applicable``
        (:class:`pipelines.base.PipelineNotApplicable`: no result, no
        traceback, counted apart from failures) or ``out_of_scope``
        (refused by the intended-use guard); returns the state, or None when
        the job turned out no longer to be this worker's
        (:class:`node.index.ClaimLost`: its results are dropped).

        Raises
        ------
        TransientJobError
            The input or the results could not be moved (node or index
            unreachable): the caller retries; the job is not failed.
        """
        log = self.log.bind(job_id=job.id, pipeline=job.pipeline, study_uid=job.study_uid, series_uid=job.series_uid)
        started = time.perf_counter()
        timings: dict[str, float] = {}
        log.info("job_started", attempt=job.attempts, worker_id=job.worker_id)
        self._observe(self.metrics.latency_job_start, job)
        try:
            stored = self._execute(job, timings, started, log)
        except ClaimLost as exc:
            log.warning("job_claim_lost", reason=str(exc))
            return None
        except TransientJobError:
            raise
        except SQLAlchemyError as exc:  # the index, not the job: try again later
            raise TransientJobError(f"the index failed during job {job.id}: {type(exc).__name__}: {exc}") from exc
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
        log.info("job_done", results=stored, destinations=list(job.destinations),
                 timings={k: round(v, 3) for k, v in timings.items()})
        self._count(job, JobState.DONE, timings)
        if self.on_results:
            self.on_results()
        self.notifier.job(job, JobState.DONE, results=stored)
        return JobState.DONE

    def _execute(self, job: JobView, timings: dict[str, float], started: float, log) -> int:
        """Load, guard, run and hand over one job; returns how many objects
        the sink queued. Raises what :meth:`run_job` sorts into outcomes."""
        t = time.perf_counter()
        pipeline = self.pipelines.get(job.pipeline)
        timings["load_pipeline"] = time.perf_counter() - t
        t = time.perf_counter()
        study = self.source.load(job)
        timings["read_input"] = time.perf_counter() - t
        warnings = self.check_intended_use(job, pipeline, study, log)
        context = PipelineContext(
            uid_prefix=self.config.node.uid_prefix,
            device=resolve_device(self.config.worker.device),
            precision=str(self.config.worker.precision),
            log=log,
            timings=timings,
            intended_use_warnings=tuple(str(d) for d in warnings),
        )
        results = pipeline.run(study, context)
        note = describe(warnings, GuardAction.WARN) if warnings else None
        timings["total"] = time.perf_counter() - started
        stored = self.sink.deliver(job, results, timings, note, job.worker_id)
        self.drift.observe(job.pipeline, pipeline, study, context.observations, job_id=job.id)  # never raises
        return stored

    def _end_without_result(
        self, job: JobView, state: JobState, reason: str, timings: dict[str, float], started: float,
        log_at, tb: str | None = None, log_reason: str | None = None,
    ) -> JobState | None:
        """Close a job that produced nothing: log it (with its traceback, for
        our own errors), record ``state`` and ``reason``, count it and notify."""
        timings["total"] = time.perf_counter() - started
        event = {JobState.OUT_OF_SCOPE: "job_out_of_scope", JobState.NOT_APPLICABLE: "job_not_applicable"}
        extra = {"traceback": tb} if tb else {}
        log_at(event.get(state, "job_failed"), reason=log_reason or reason, timings=timings, **extra)
        try:
            self.queue.fail(job.id, reason, tb, json.dumps(timings), state, job.worker_id)
        except ClaimLost as exc:
            self.log.warning("job_claim_lost", job_id=job.id, reason=str(exc))
            return None
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
