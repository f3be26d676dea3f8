"""Jobs: queue, claim, finish or fail, recover and retry."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.index.core import IndexCore
from node.index.schema import (
    AssemblyState,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    SeriesState,
    StudyAssembly,
    utcnow,
)
from node.index.views import JobView, _job_view


class ClaimLost(LookupError):
    """A worker reports on a job it no longer holds: its heartbeat went
    stale and the job was queued again (or an operator ended it). Its
    results are dropped; the holder's count."""


class JobQueries(IndexCore):
    """Jobs (node/route.py queues them, node/run.py runs them) and the
    deliveries their results queue."""

    def create_job(
        self,
        *,
        pipeline: str,
        route: str,
        level: str,
        study_uid: str,
        series_uid: str | None,
        destinations: Sequence[str],
        roles: dict[str, str] | None = None,
        failed_reason: str | None = None,
    ) -> int:
        """Queue a job for a series (``level="series"``) or, with the series
        UID per sequence role in ``roles``, a study (``level="study"``); its
        input series and study assembly become ``queued`` too. With
        ``failed_reason``, record it as failed at once (a study that never
        became complete: visible, never run). Returns the job id."""
        with self._write_lock, self._session.begin() as s:
            trigger = s.scalar(
                select(func.max(Instance.received_at)).where(
                    Instance.series_uid == series_uid if series_uid else Instance.study_uid == study_uid
                )
            )
            job = Job(
                pipeline=pipeline,
                route=route,
                level=level,
                study_uid=study_uid,
                series_uid=series_uid,
                destinations=",".join(destinations),
                roles=json.dumps(roles) if roles else None,
                state=JobState.QUEUED,
                trigger_received_at=trigger,
            )
            s.add(job)
            s.flush()  # its id, for the transitions row
            self._set_state(s, job, JobState.QUEUED, f"route {route}", created=True)
            if failed_reason is not None:
                self._set_state(s, job, JobState.FAILED, failed_reason)
                job.error, job.finished_at = failed_reason, utcnow()
            self._sync_series_state(s, job, job.state)
            return job.id

    def claim_job(self, worker_id: str | None = None, job_id: int | None = None) -> JobView | None:
        """Take a queued job, mark it running (one more attempt, ``worker_id``
        and its first heartbeat) and return it, or None when none is queued.

        Without ``job_id`` the oldest queued job (the embedded workers);
        with it that job only (a Celery message names its job), None when it
        is not queued: done, failed, or already claimed by another worker.
        Concurrent workers (several processes on PostgreSQL) never claim the
        same job: the row is locked (``FOR UPDATE``, and ``SKIP LOCKED`` when
        any queued job will do; SQLite has one writer at a time)."""
        with self._write_lock, self._session.begin() as s:
            if job_id is not None:  # wait for a lock the publisher may hold on this row, then judge its state
                job = s.scalar(select(Job).where(Job.id == job_id, Job.state == JobState.QUEUED).with_for_update())
            else:
                q = select(Job).where(Job.state == JobState.QUEUED).order_by(Job.id).limit(1)
                job = s.scalar(q.with_for_update(skip_locked=True))
            if job is None:
                return None
            reason = f"claimed by {worker_id}" if worker_id else None
            self._set_state(s, job, JobState.RUNNING, reason, expect=JobState.QUEUED)
            job.started_at, job.attempts = utcnow(), job.attempts + 1
            job.worker_id, job.heartbeat_at = worker_id, job.started_at
            self._sync_series_state(s, job, JobState.RUNNING)
            return _job_view(job)

    def _owned(self, s: Session, job_id: int, worker_id: str | None) -> Job:
        """The job row, checked to be still ``running`` under ``worker_id``
        when one is given. Raises :class:`ClaimLost` (the sweep gave it to
        another worker, or an operator ended it) or LookupError."""
        job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())  # no sweep or claim in between
        if job is None:
            raise LookupError(f"no job {job_id}")
        if worker_id is not None and (job.state != JobState.RUNNING or job.worker_id != worker_id):
            raise ClaimLost(f"job {job_id} is {job.state} under {job.worker_id or 'no worker'}, no longer {worker_id}'s")
        return job

    def _sync_series_state(self, s: Session, job: Job, state: JobState) -> None:
        """Mirror a job's state on its input series (and study assembly),
        except on one receiving again."""
        uids = [job.series_uid] if job.series_uid else list(json.loads(job.roles).values()) if job.roles else []
        for uid in sorted(set(uids)):  # one lock order for every job: no deadlock between study-level jobs
            series = s.get(Series, uid)
            if series is not None and series.state != SeriesState.RECEIVING:
                self._set_state(s, series, SeriesState(state), f"job {job.id}")
        if job.level == "study":
            assembly = s.get(StudyAssembly, (job.study_uid, job.route))
            if assembly is not None and assembly.state != AssemblyState.RECEIVING:
                self._set_state(s, assembly, AssemblyState(state), f"job {job.id}")

    def finish_job(
        self,
        job_id: int,
        results: Sequence[tuple[Any, Path, Sequence[str]]],
        timings: str | None = None,
        note: str | None = None,
        *,
        worker_id: str | None = None,
    ) -> None:
        """Mark a job done and queue each result for its destinations, in one
        transaction. With ``worker_id``, only while that worker holds it
        (else :class:`ClaimLost`, and nothing changes). ``results`` holds (dataset, outbox path, destination
        names); a second item with the same SOP Instance UID is another
        encoding of the same object (a compact SEG) and only adds deliveries.
        ``note`` is added to the reason of the ``done`` transition (e.g. the
        intended-use warnings). Raises LookupError for an unknown job."""
        with self._write_lock, self._session.begin() as s:
            job = self._owned(s, job_id, worker_id)
            seen: set[str] = set()
            for ds, path, destinations in results:
                row = s.get(Result, ds.SOPInstanceUID)
                if ds.SOPInstanceUID in seen:
                    pass
                elif row is None:
                    s.add(
                        Result(
                            sop_instance_uid=ds.SOPInstanceUID,
                            job_id=job_id,
                            study_uid=ds.StudyInstanceUID,
                            series_uid=ds.SeriesInstanceUID,
                            sop_class_uid=ds.SOPClassUID,
                            modality=ds.Modality,
                            path=str(path),
                        )
                    )
                else:  # a re-run of the same input replaces the earlier result
                    row.job_id = job_id
                    row.path = str(path)
                seen.add(ds.SOPInstanceUID)
                for dest in destinations:
                    self._queue_delivery(s, job_id, ds.SOPInstanceUID, dest, path)
            self._set_state(s, job, JobState.DONE, f"{len(results)} results" + (f"; {note}" if note else ""))
            job.finished_at = utcnow()
            job.timings = timings
            self._sync_series_state(s, job, JobState.DONE)

    def _queue_delivery(self, s: Session, job_id: int, sop_instance_uid: str, destination: str, path: Path) -> None:
        """A pending delivery of a result. A re-run of the same job (``jobs
        retry``) makes the same SOP Instance UIDs (deterministic UIDs), so its
        row may exist already: it is queued afresh rather than duplicated."""
        row = s.scalar(
            select(Delivery).where(
                Delivery.job_id == job_id,
                Delivery.sop_instance_uid == sop_instance_uid,
                Delivery.destination == destination,
            )
        )
        if row is None:
            s.add(Delivery(job_id=job_id, sop_instance_uid=sop_instance_uid, destination=destination, path=str(path)))
            return
        self._set_state(s, row, DeliveryState.PENDING, f"job {job_id} ran again")
        row.path, row.attempts = str(path), 0
        row.next_attempt_at, row.delivered_at, row.last_error = utcnow(), None, None

    def fail_job(
        self,
        job_id: int,
        error: str,
        traceback: str | None = None,
        timings: str | None = None,
        *,
        state: JobState = JobState.FAILED,
        worker_id: str | None = None,
    ) -> None:
        """End a job without results: ``failed`` (an input fault with
        ``traceback=None``, or a bug with its traceback), or with
        ``state=JobState.NOT_APPLICABLE`` valid input its pipeline does not
        process. ``error`` is the reason either way. With ``worker_id``, only
        while that worker holds it. Raises ValueError for another state,
        :class:`ClaimLost` or LookupError."""
        if state not in (JobState.FAILED, JobState.NOT_APPLICABLE, JobState.OUT_OF_SCOPE):
            raise ValueError(f"state must be failed, not_applicable or out_of_scope, got {state!r}")
        state = JobState(state)
        with self._write_lock, self._session.begin() as s:
            job = self._owned(s, job_id, worker_id)
            self._set_state(s, job, state, error[:500])
            job.finished_at = utcnow()
            job.error = error
            job.traceback = traceback
            job.timings = timings
            self._sync_series_state(s, job, state)

    def recover_jobs(self, max_attempts: int) -> tuple[int, int]:
        """On start-up: jobs left ``running`` by a dead process go back to
        ``queued``, or to ``failed`` once they have been tried ``max_attempts``
        times (a job that kills the node must not kill it forever).
        Returns (requeued, failed)."""
        requeued = failed = 0
        with self._write_lock, self._session.begin() as s:
            for job in s.scalars(select(Job).where(Job.state == JobState.RUNNING)):
                if job.attempts >= max_attempts:
                    reason = f"the node stopped during this job {job.attempts} times; giving up"
                    self._set_state(s, job, JobState.FAILED, reason)
                    job.error, job.finished_at = reason, utcnow()
                    failed += 1
                else:
                    self._set_state(s, job, JobState.QUEUED, "recovered after restart")
                    requeued += 1
                self._sync_series_state(s, job, job.state)
        return requeued, failed

    #: States an operator may queue again (``ainode jobs retry``).
    RETRYABLE = (JobState.FAILED, JobState.NOT_APPLICABLE, JobState.CANCELLED, JobState.OUT_OF_SCOPE)

    def retry_jobs(
        self,
        job_ids: Iterable[int] = (),
        *,
        failed: bool = False,
        since: dt.datetime | None = None,
        pipeline: str | None = None,
        by: str,
        reason: str | None = None,
    ) -> tuple[list[int], dict[int, str]]:
        """Queue jobs again at an operator's request (``ainode jobs retry``).

        Parameters
        ----------
        job_ids:
            Jobs named one by one: each may be ``failed`` or
            ``not_applicable`` (naming a job is a deliberate choice, e.g. once
            a pipeline reads lateral views).
        failed, since, pipeline:
            Also every ``failed`` job (never a ``not_applicable`` one),
            optionally only those finished at or after ``since`` (naive UTC)
            and of ``pipeline``.
        by, reason:
            Who asked and why, written into the job's ``transitions`` row.

        Each job goes back to ``queued`` with its attempts at 0, so
        ``max_job_attempts`` applies anew; its error and traceback stay in
        its transitions. A running node's workers claim it within their
        1 s poll (the Celery publisher's next pass, within 5 s). Returns the ids queued, and for each named job left alone
        why (unknown, or in a state that is not retried).
        """
        why = f"retry requested by {by}" + (f": {reason}" if reason else "")
        refused: dict[int, str] = {}
        requeued: list[int] = []
        with self._write_lock, self._session.begin() as s:
            chosen: dict[int, Job] = {}
            for job_id in dict.fromkeys(job_ids):
                job = s.get(Job, job_id)
                if job is None:
                    refused[job_id] = "no such job"
                elif job.state not in self.RETRYABLE:
                    refused[job_id] = f"state is {job.state}; only failed or not_applicable jobs are retried"
                else:
                    chosen[job.id] = job
            if failed:
                q = select(Job).where(Job.state == JobState.FAILED)
                if since is not None:
                    q = q.where(Job.finished_at >= since)
                if pipeline is not None:
                    q = q.where(Job.pipeline == pipeline)
                chosen.update((job.id, job) for job in s.scalars(q))
            for job_id in sorted(chosen):
                job = chosen[job_id]
                self._set_state(s, job, JobState.QUEUED, why)
                job.attempts = 0
                job.error = job.traceback = job.timings = None
                job.started_at = job.finished_at = job.enqueued_at = None
                self._sync_series_state(s, job, JobState.QUEUED)
                requeued.append(job_id)
        return requeued, refused

    def job(self, job_id: int) -> Job | None:
        """The job row (detached), or None."""
        with self._session() as s:
            return s.get(Job, job_id)

    def jobs(self, limit: int = 50, state: JobState | str | None = None) -> list[Job]:
        """The latest ``limit`` jobs (detached rows), newest first, optionally
        only those in ``state``. Raises ValueError for a state that is not a
        JobState."""
        with self._session() as s:
            q = select(Job).order_by(Job.id.desc()).limit(limit)
            if state:
                q = q.where(Job.state == JobState(state))
            return list(s.scalars(q))

