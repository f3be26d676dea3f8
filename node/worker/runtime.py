"""One ``ainode worker`` process: its pipelines loaded once, its claim on the
job it runs, its heartbeats and its announcement (:mod:`node.index.queue`).

:class:`WorkerRuntime.handle` is what the Celery task does with a message:

1. claim the job row (``queued -> running``, this worker's id, a first
   heartbeat) in one transaction; a message for a job that is not
   ``queued`` (done already, or held by another worker) is acknowledged and
   dropped;
2. run it with :class:`node.run.Runner`, reading the input from the shared
   spool or over WADO-RS and handing the results back through the shared
   outbox or over STOW-RS (``[worker] input`` / ``output``);
3. meanwhile a thread refreshes the job's heartbeat every
   ``heartbeat_seconds``, and the worker's own row, so the node's sweep
   takes back only the jobs of workers that died.

The same thread is the job time limit: Celery's ``solo`` pool does not
enforce ``task_time_limit``, so a job still running after
``job_time_limit_seconds`` is failed with that reason and the process
exits (status 70) for its supervisor to restart; its unacknowledged message
is dropped when it comes back, the job being ``failed``.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import structlog
from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeConfig, WorkerInput, WorkerOutput
from node.index import Index, JobState, WorkerInfo
from node.metrics import Metrics
from node.notify import Notifier
from node.queue.base import JobQueue
from node.run import IndexUnavailable, OutboxSink, ResultSink, Runner, SpoolSource, StudySource, default_worker_id
from node.spool import Spool

#: Exit status of a worker that stopped a job over its time limit (EX_SOFTWARE).
EXIT_TIME_LIMIT = 70


class WorkerQueue(JobQueue):
    """A worker's view of the queue: it claims and reports; the node publishes.

    During a cold shutdown Celery interrupts the running job by raising into
    it (the solo pool's ``terminate_job`` raises NotImplementedError), which
    the runner would record as a failure: then the job is given back instead.
    """

    def __init__(self, index: Index):
        super().__init__(index)
        self.cold_shutdown = False

    def enqueue(self) -> None:
        """Workers publish nothing: the node does (:class:`node.queue.CeleryQueue`)."""

    def fail(self, job_id, reason, traceback, timings, state, worker_id) -> None:
        if self.cold_shutdown and worker_id is not None:
            released = self.index.release_job(job_id, worker_id, "the worker stopped (cold shutdown) before the job ended")
            structlog.get_logger("node.worker").warning("job_released", job_id=job_id, reason="cold shutdown",
                                                        interrupted_by=reason, released=released)
            return
        super().fail(job_id, reason, traceback, timings, state, worker_id)


class WorkerRuntime:
    """What a worker process keeps between messages.

    Parameters
    ----------
    config:
        The shared configuration file, with this worker's ``[worker]
        device`` (``--device``).
    pipelines:
        The pipelines this worker runs; ``queues`` their queue names.
    metrics:
        This worker's own metrics (served on ``[worker] metrics_port``).
    """

    def __init__(self, config: NodeConfig, pipelines: list[str], queues: list[str], *, metrics: Metrics | None = None):
        self.config = config
        self.pipelines = pipelines
        self.queues = queues
        self.worker_id = default_worker_id()
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics_url: str | None = None
        self.log = structlog.get_logger("node.worker").bind(worker_id=self.worker_id)
        st = config.storage
        self.index = Index(st.engine_url())
        self.spool = Spool(st.spool_dir, st.quarantine_dir, st.outbox_dir, fsync=st.fsync)
        self.queue = WorkerQueue(self.index)
        self.notifier = Notifier(config)  # job.* events go out from here, as from an embedded node
        self.runner = Runner(
            config, self.index, self.spool, metrics=self.metrics, queue=self.queue, notifier=self.notifier,
            source=self._source(), sink=self._sink(), worker_id=self.worker_id,
        )
        self.loaded: dict[str, str] = {}
        self.current: int | None = None
        self.current_since = 0.0
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _source(self) -> StudySource:
        if self.config.worker.input == WorkerInput.DICOMWEB:
            from node.worker.io import DicomwebSource

            return DicomwebSource(self.config)
        return SpoolSource(self.index)

    def _sink(self) -> ResultSink:
        if self.config.worker.output == WorkerOutput.STOW:
            from node.worker.io import StowSink

            return StowSink(self.config)
        return OutboxSink(self.config, self.spool, self.queue)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Load the pipelines, announce what loaded, start the heartbeats."""
        self.runner.set_torch_threads()
        self.notifier.start()
        self.loaded = self.runner.warm_up(self.pipelines)
        served = [q for q in self.queues if q.split(".")[0] in self.loaded]
        for q in sorted(set(self.queues) - set(served)):
            self.log.error("queue_not_served", queue=q, detail="its pipeline did not load; the node will not publish to it")
        self.queues = served
        self.announce()
        self._beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        self._beat.start()
        self.log.info("worker_ready", queues=self.queues, pipelines=self.loaded, device=self.config.worker.device,
                      precision=str(self.config.worker.precision), input=str(self.config.worker.input),
                      output=str(self.config.worker.output), metrics_url=self.metrics_url)

    def announce(self) -> None:
        w = self.config.worker
        self.index.announce_worker(WorkerInfo(
            worker_id=self.worker_id, hostname=socket.gethostname(), queues=tuple(self.queues), pipelines=self.loaded,
            device=w.device, precision=str(w.precision), input=str(w.input), metrics_url=self.metrics_url,
        ))

    def close(self) -> None:
        """On shutdown: give back a job still held (a cold shutdown) and say we stopped."""
        self._stop.set()
        if self.current is not None:
            self.release(self.current, "the worker stopped before the job ended")
        try:
            self.index.worker_stopped(self.worker_id)
        except SQLAlchemyError as exc:
            self.log.warning("worker_stop_unrecorded", error=str(exc))
        self.notifier.stop(5.0)
        self.index.close()

    def _heartbeats(self) -> None:
        interval = self.config.worker.heartbeat_seconds
        while not self._stop.wait(interval):
            try:
                self.index.worker_heartbeat(self.worker_id)
                job_id = self.current
                if job_id is not None and not self.queue.heartbeat(job_id, self.worker_id):
                    self.log.warning("job_claim_lost", job_id=job_id, detail="the node gave it to another worker")
            except Exception as exc:  # the index is down: the node's sweep decides, not us
                self.log.warning("heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
            self._enforce_time_limit()

    def _enforce_time_limit(self) -> None:
        """Fail the current job and exit when it ran past ``job_time_limit_seconds``."""
        job_id, limit = self.current, self.config.worker.celery.job_time_limit_seconds
        if job_id is None or time.monotonic() - self.current_since <= limit:
            return
        reason = f"the job ran past job_time_limit_seconds ({limit:g} s); its worker stopped it and exited"
        self.log.error("job_time_limit_exceeded", job_id=job_id, limit=limit)
        try:
            self.index.fail_job(job_id, reason, state=JobState.FAILED, worker_id=self.worker_id)
        except Exception as exc:
            self.log.error("job_fail_unrecorded", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
        os._exit(EXIT_TIME_LIMIT)

    # -- messages --------------------------------------------------------------------

    def handle(self, job_id: int) -> JobState | None:
        """Claim and run job ``job_id``; None when the message is dropped.

        Raises
        ------
        IndexUnavailable
            The index could not be reached to claim it: nothing is held.
        TransientJobError
            The index or the node could not be reached; after a claim the
            job is still this worker's, for :meth:`release`.
        """
        t = time.perf_counter()
        try:
            job = self.queue.claim(self.worker_id, job_id)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index cannot be reached to claim job {job_id}: {exc}") from exc
        if job is None:
            row = self.index.job(job_id)
            self.log.info("message_dropped", job_id=job_id, state=row.state if row else "unknown",
                          holder=row.worker_id if row else None)
            self.metrics.messages_dropped.inc()
            return None
        self.metrics.claim_seconds.observe(time.perf_counter() - t)
        self.current_since = time.monotonic()  # before current: the watchdog reads both
        self.current = job.id
        try:
            state = self.runner.run_job(job)
        except Exception:
            self.current = None
            raise
        except BaseException:  # a shutdown interrupted the job: give it back now
            self.release(job.id, "the worker stopped before the job ended")
            self.current = None
            raise
        self.current = None
        return state

    def release(self, job_id: int, reason: str, *, hold_seconds: float = 0.0) -> None:
        """Give a claimed job back to ``queued`` (logged; never raises); the
        node publishes it again after ``hold_seconds`` (a retry of this
        worker's own task is due first)."""
        try:
            released = self.index.release_job(job_id, self.worker_id, reason, hold_seconds=hold_seconds,
                                              visibility_timeout=self.config.worker.celery.visibility_timeout_seconds)
            self.log.warning("job_released", job_id=job_id, reason=reason, released=released)
        except Exception as exc:
            self.log.error("job_release_failed", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
