"""The job rows as the source of truth for distributed workers (node.queue):
heartbeats, releases, the stale-job sweep, what to publish, and the
workers' own announcements.

The broker is only the doorbell: a message names a job id, and whoever
takes it claims the row first (:meth:`JobQueries.claim_job`). What a
broker loses (a killed worker's unacknowledged message, a restarted Redis)
is recovered from these rows: a ``running`` job whose heartbeat is stale is
queued again, and a ``queued`` job published longer ago than the broker's
visibility timeout is published again.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import or_, select, update

from node.index.core import IndexCore
from node.index.jobs import ClaimLost, JobQueries
from node.index.schema import Job, JobState, Worker, utcnow
from node.index.views import JobView, _job_view


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker announces (``workers`` row): id, host, the queues it
    consumes and the pipeline -> model version it has loaded."""

    worker_id: str
    hostname: str
    queues: tuple[str, ...]
    pipelines: dict[str, str]
    device: str
    precision: str
    input: str
    metrics_url: str | None = None
    heartbeat_at: dt.datetime | None = None


class QueueQueries(JobQueries, IndexCore):
    """Claims, heartbeats and the sweeps behind ``[worker] backend = "celery"``."""

    def heartbeat_job(self, job_id: int, worker_id: str) -> bool:
        """Refresh the heartbeat of a job ``worker_id`` holds; False when it
        no longer holds it (the sweep queued it again): stop and drop it."""
        with self._write_lock, self._session.begin() as s:
            held = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker_id == worker_id, Job.state == JobState.RUNNING)
                .values(heartbeat_at=utcnow())
                .returning(Job.id)
            ).first()
            return held is not None

    def release_job(
        self, job_id: int, worker_id: str, reason: str, *, hold_seconds: float = 0.0, visibility_timeout: float = 0.0,
    ) -> bool:
        """A worker gives a job back: ``running -> queued``, its attempt not
        counted (``max_job_attempts`` bounds deaths, not outages). The node
        publishes it again at once, or with ``hold_seconds`` (a retry of the
        worker's own task is due first) no sooner than that: its publish
        time is set ``visibility_timeout - hold_seconds`` in the past. False
        when the worker no longer held it."""
        with self._write_lock, self._session.begin() as s:
            try:
                job = self._owned(s, job_id, worker_id)
            except (ClaimLost, LookupError):
                return False
            self._set_state(s, job, JobState.QUEUED, f"released by {worker_id}: {reason}")
            job.attempts = max(0, job.attempts - 1)
            job.worker_id = job.heartbeat_at = None
            held = max(0.0, visibility_timeout - hold_seconds)
            job.enqueued_at = utcnow() - dt.timedelta(seconds=held) if hold_seconds > 0 else None
            self._sync_series_state(s, job, JobState.QUEUED)
            return True

    def requeue_stale_jobs(self, stale_after: float, max_attempts: int) -> tuple[list[int], list[int]]:
        """Running jobs whose worker's heartbeat is older than ``stale_after``
        seconds (the worker died, or lost the index) go back to ``queued``,
        to be published at once, or to ``failed`` after ``max_attempts``
        (a job that kills its workers must not kill them all). Only the
        node in celery mode sweeps; the embedded workers' jobs are recovered
        at restart (:meth:`recover_jobs`). Clocks of the node and workers
        must agree (NTP) to well within ``stale_after``. Returns (queued
        ids, failed ids)."""
        cutoff = utcnow() - dt.timedelta(seconds=stale_after)
        requeued: list[int] = []
        failed: list[int] = []
        with self._write_lock, self._session.begin() as s:
            q = select(Job).where(Job.state == JobState.RUNNING, Job.heartbeat_at < cutoff, Job.worker_id.is_not(None))
            for job in s.scalars(q.with_for_update(skip_locked=True)):
                why = f"worker {job.worker_id} silent for over {stale_after:g} s"
                if job.attempts >= max_attempts:
                    reason = f"{why}, {job.attempts} times; giving up"
                    self._set_state(s, job, JobState.FAILED, reason)
                    job.error, job.finished_at = reason, utcnow()
                    failed.append(job.id)
                else:
                    self._set_state(s, job, JobState.QUEUED, why)
                    job.worker_id = job.heartbeat_at = job.enqueued_at = None
                    requeued.append(job.id)
                self._sync_series_state(s, job, job.state)
        return requeued, failed

    def jobs_to_publish(
        self, visibility_timeout: float, routes: Iterable[str] | None = None, limit: int = 500,
        *, known_routes: Iterable[str] | None = None,
    ) -> list[JobView]:
        """Queued jobs never published, or published longer ago than
        ``visibility_timeout`` seconds and still unclaimed (the broker lost
        the message): oldest first, of ``routes`` only when given (those
        whose queue a worker serves, so an unserved backlog blocks no other
        queue), and of routes not in ``known_routes`` (removed from the
        configuration since: the caller decides their queue). A queue merely
        backed up is not flooded: within the timeout a published job is not
        published again."""
        cutoff = utcnow() - dt.timedelta(seconds=visibility_timeout)
        with self._session() as s:
            q = select(Job).where(
                Job.state == JobState.QUEUED, or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff)
            )
            if routes is not None:
                chosen = Job.route.in_(list(routes))
                q = q.where(or_(chosen, Job.route.not_in(list(known_routes))) if known_routes is not None else chosen)
            return [_job_view(j) for j in s.scalars(q.order_by(Job.id).limit(limit))]

    def mark_published(self, job_id: int, queue: str, at: dt.datetime | None = None) -> None:
        """Record that a message for ``job_id`` went to ``queue`` at ``at``
        (taken before the send). Also when a worker claimed it before this
        ran (``started_at`` at or after ``at``), so enqueue -> claim is known."""
        at = at or utcnow()
        with self._write_lock, self._session.begin() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, or_(Job.state == JobState.QUEUED, Job.started_at >= at))
                .values(queue=queue, enqueued_at=at)
            )

    # -- workers ------------------------------------------------------------------

    def announce_worker(self, info: WorkerInfo) -> None:
        """Insert or refresh a worker's row: it is alive and can run these."""
        with self._write_lock, self._session.begin() as s:
            row = s.get(Worker, info.worker_id) or Worker(worker_id=info.worker_id, started_at=utcnow())
            row.hostname, row.queues, row.pipelines = info.hostname, json.dumps(list(info.queues)), json.dumps(info.pipelines)
            row.device, row.precision, row.input, row.metrics_url = info.device, info.precision, info.input, info.metrics_url
            row.heartbeat_at, row.stopped_at = utcnow(), None
            s.add(row)

    def worker_heartbeat(self, worker_id: str) -> None:
        with self._write_lock, self._session.begin() as s:
            s.execute(update(Worker).where(Worker.worker_id == worker_id).values(heartbeat_at=utcnow()))

    def worker_stopped(self, worker_id: str) -> None:
        with self._write_lock, self._session.begin() as s:
            s.execute(update(Worker).where(Worker.worker_id == worker_id).values(stopped_at=utcnow()))

    def live_workers(self, stale_after: float) -> list[WorkerInfo]:
        """Workers that heartbeat within ``stale_after`` seconds and have not stopped."""
        cutoff = utcnow() - dt.timedelta(seconds=stale_after)
        with self._session() as s:
            rows = s.scalars(select(Worker).where(Worker.heartbeat_at >= cutoff, Worker.stopped_at.is_(None)))
            return [_worker_info(w) for w in rows]

    def served_queues(self, stale_after: float) -> set[str]:
        """The queues some live worker consumes."""
        return {q for w in self.live_workers(stale_after) for q in w.queues}

    def jobs_by_worker(self, job_ids: Iterable[int]) -> dict[int, str | None]:
        """job id -> the worker that holds or last held it."""
        with self._session() as s:
            return dict(s.execute(select(Job.id, Job.worker_id).where(Job.id.in_(list(job_ids)))).tuples().all())


def _worker_info(w: Worker) -> WorkerInfo:
    return WorkerInfo(
        worker_id=w.worker_id, hostname=w.hostname, queues=tuple(json.loads(w.queues)), pipelines=json.loads(w.pipelines),
        device=w.device, precision=w.precision, input=w.input, metrics_url=w.metrics_url, heartbeat_at=w.heartbeat_at,
    )
