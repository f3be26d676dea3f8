"""Read-only queries for the HTTP API and the dashboard: lists with filters
and paging, the timeline of a study, the results of a job.

Every list returns ``(total, rows)``: how many rows match the filters, and
the page of at most ``limit`` of them from ``offset``, newest first. Times
are naive UTC, as the index stores them.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from node.index.core import IndexCore
from node.index.schema import (
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    SeriesState,
    Study,
    StudyAssembly,
    Transition,
)


@dataclass(frozen=True)
class StudyRow:
    """One study of :meth:`ReportQueries.study_list`."""

    study: Study
    series: int
    instances: int
    modalities: list[str]
    series_states: dict[str, int]
    job_states: dict[str, int]


@dataclass(frozen=True)
class TimelineEvent:
    """One moment of a study's history (:meth:`ReportQueries.study_timeline`).

    ``event``: ``instances_received`` (a batch: the instances of one
    association, or of STOW-RS requests, of one series), ``series_state`` /
    ``study_state`` / ``job_state`` / ``delivery_state`` (a ``transitions``
    row: completion, the routing decision, a job queued, started, finished,
    a delivery re-queued), ``job_stages`` (the pipeline's stages, seconds),
    ``delivery_attempt``.
    """

    at: dt.datetime
    event: str
    data: dict[str, Any] = field(default_factory=dict)


def _page(s: Session, q: Select, order, limit: int, offset: int) -> tuple[int, list]:
    total = s.scalar(select(func.count()).select_from(q.order_by(None).subquery())) or 0
    return total, list(s.scalars(q.order_by(*order).limit(limit).offset(offset)))


class ReportQueries(IndexCore):
    """Lists, timelines and results for the operator's views."""

    def study_list(
        self,
        *,
        state: SeriesState | str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        patient_id: str | None = None,
        modality: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[int, list[StudyRow]]:
        """Studies, latest received first. ``state``: one of its series is in
        that SeriesState; ``since``/``until``: its last instance came in
        [since, until]; ``patient_id``: Patient ID (0010,0020) exactly;
        ``modality``: one of its series has it. Raises ValueError for a
        state that is not a SeriesState."""
        q = select(Study)
        if state is not None:
            state = SeriesState(state)
            q = q.where(select(Series.series_uid).where(Series.study_uid == Study.study_uid, Series.state == state).exists())
        if modality is not None:
            q = q.where(
                select(Series.series_uid).where(Series.study_uid == Study.study_uid, Series.modality == modality).exists()
            )
        if since is not None:
            q = q.where(Study.last_received_at >= since)
        if until is not None:
            q = q.where(Study.last_received_at <= until)
        if patient_id is not None:
            q = q.where(Study.patient_id == patient_id)
        with self._session() as s:
            total, studies = _page(s, q, (Study.last_received_at.desc(), Study.study_uid), limit, offset)
            uids = [st.study_uid for st in studies]
            series_rows = s.execute(
                select(Series.study_uid, Series.modality, Series.state, Series.instance_count).where(Series.study_uid.in_(uids))
            ).all()
            job_rows = s.execute(
                select(Job.study_uid, Job.state, func.count()).where(Job.study_uid.in_(uids)).group_by(Job.study_uid, Job.state)
            ).all()
        rows = []
        for st in studies:
            mine = [r for r in series_rows if r.study_uid == st.study_uid]
            states: dict[str, int] = {}
            for r in mine:
                states[str(r.state)] = states.get(str(r.state), 0) + 1
            rows.append(
                StudyRow(
                    study=st,
                    series=len(mine),
                    instances=sum(r.instance_count for r in mine),
                    modalities=sorted({r.modality for r in mine if r.modality}),
                    series_states=states,
                    job_states={str(state): n for uid, state, n in job_rows if uid == st.study_uid},
                )
            )
        return total, rows

    def series_list(
        self,
        *,
        study_uid: str | None = None,
        state: SeriesState | str | None = None,
        modality: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[int, list[Series]]:
        """Series (detached rows), latest received first, optionally of one
        study, in one SeriesState, of one modality. Raises ValueError for a
        state that is not a SeriesState."""
        q = select(Series)
        if study_uid is not None:
            q = q.where(Series.study_uid == study_uid)
        if state is not None:
            q = q.where(Series.state == SeriesState(state))
        if modality is not None:
            q = q.where(Series.modality == modality)
        with self._session() as s:
            return _page(s, q, (Series.last_received_at.desc(), Series.series_uid), limit, offset)

    def job_list(
        self,
        *,
        state: JobState | str | None = None,
        pipeline: str | None = None,
        since: dt.datetime | None = None,
        study_uid: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[int, list[Job]]:
        """Jobs (detached rows), newest first: in one JobState
        (``not_applicable`` and ``cancelled`` included), of one pipeline,
        created at or after ``since``, of one study. Raises ValueError for a
        state that is not a JobState."""
        q = select(Job)
        if state is not None:
            q = q.where(Job.state == JobState(state))
        if pipeline is not None:
            q = q.where(Job.pipeline == pipeline)
        if since is not None:
            q = q.where(Job.created_at >= since)
        if study_uid is not None:
            q = q.where(Job.study_uid == study_uid)
        with self._session() as s:
            return _page(s, q, (Job.id.desc(),), limit, offset)

    def delivery_list(
        self,
        *,
        state: DeliveryState | str | None = None,
        destination: str | None = None,
        job_id: int | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[int, list[Delivery]]:
        """Deliveries (detached rows), newest first: in one DeliveryState,
        to one destination, of one job. Raises ValueError for a state that
        is not a DeliveryState."""
        q = select(Delivery)
        if state is not None:
            q = q.where(Delivery.state == DeliveryState(state))
        if destination is not None:
            q = q.where(Delivery.destination == destination)
        if job_id is not None:
            q = q.where(Delivery.job_id == job_id)
        with self._session() as s:
            return _page(s, q, (Delivery.id.desc(),), limit, offset)

    def job_results(self, job_id: int) -> list[Result]:
        """The result objects (SEG, SR) a job wrote to the outbox (detached rows)."""
        with self._session() as s:
            return list(s.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.modality, Result.sop_instance_uid)))

    def result(self, sop_instance_uid: str) -> Result | None:
        """The result row of one SOP Instance UID, or None."""
        with self._session() as s:
            return s.get(Result, sop_instance_uid)

    def study_timeline(self, study_uid: str) -> list[TimelineEvent] | None:
        """Everything that happened to a study, oldest first; None for an
        unknown study. See :class:`TimelineEvent` for the events."""
        with self._session() as s:
            if s.get(Study, study_uid) is None:
                return None
            events = self._instance_batches(s, study_uid)
            series = list(s.scalars(select(Series.series_uid).where(Series.study_uid == study_uid)))
            jobs = list(s.scalars(select(Job).where(Job.study_uid == study_uid)))
            deliveries = list(s.scalars(select(Delivery).where(Delivery.job_id.in_([j.id for j in jobs]))))
            routes = list(s.scalars(select(StudyAssembly.route).where(StudyAssembly.study_uid == study_uid)))
            keys = (
                [("series", uid) for uid in series]
                + [("study", f"{study_uid}/{route}") for route in routes]
                + [("job", str(j.id)) for j in jobs]
                + [("delivery", str(d.id)) for d in deliveries]
            )
            for entity in ("series", "study", "job", "delivery"):
                ids = [i for e, i in keys if e == entity]
                for t in s.scalars(select(Transition).where(Transition.entity == entity, Transition.entity_id.in_(ids))):
                    data: dict[str, Any] = {"id": t.entity_id, "from_state": t.from_state, "to_state": t.to_state, "reason": t.reason}
                    events.append(TimelineEvent(t.at, f"{entity}_state", data))
            for j in jobs:
                if j.timings and j.finished_at:
                    stages = {k: float(v) for k, v in json.loads(j.timings).items()}
                    events.append(TimelineEvent(j.finished_at, "job_stages", {"id": str(j.id), "pipeline": j.pipeline, "stages": stages}))
            by_id = {d.id: d for d in deliveries}
            for a in s.scalars(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(list(by_id)))):
                d = by_id[a.delivery_id]
                data = {"id": str(d.id), "destination": d.destination, "sop_instance_uid": d.sop_instance_uid,
                        "attempt": a.attempt, "ok": a.ok, "status": a.status, "error": a.error, "seconds": a.seconds}
                events.append(TimelineEvent(a.at, "delivery_attempt", data))
        events.sort(key=lambda e: e.at)
        return events

    @staticmethod
    def _instance_batches(s: Session, study_uid: str) -> list[TimelineEvent]:
        """One event per (association or STOW-RS, series): first and last
        arrival, count, calling AE."""
        rows = s.execute(
            select(
                Instance.association_id, Instance.series_uid, Instance.calling_ae, Instance.source,
                func.min(Instance.received_at), func.max(Instance.received_at), func.count(),
            )
            .where(Instance.study_uid == study_uid)
            .group_by(Instance.association_id, Instance.series_uid, Instance.calling_ae, Instance.source)
        ).all()
        return [
            TimelineEvent(first, "instances_received", {
                "association_id": assoc, "series_uid": series_uid, "calling_ae": calling_ae,
                "source": source or "c-store", "first_at": first, "last_at": last, "count": count,
            })
            for assoc, series_uid, calling_ae, source, first, last, count in rows
        ]
