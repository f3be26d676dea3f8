"""The dashboard's aggregate queries (node/api/routers/dashboard.py).

Each method is one read transaction and returns detached values
(dataclasses, dicts of counts), never ORM rows bound to a session. Times are
naive UTC, as the index stores them. Counts are SQL aggregates, so a page
costs the same with ten studies as with a million.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import and_, case, exists, func, or_, select

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
    Transition,
    utcnow,
)

#: A study with no job yet takes one of these states (from its series).
STUDY_RECEIVING, STUDY_ASSEMBLING, STUDY_UNMATCHED, STUDY_COMPLETE = "receiving", "assembling", "unmatched", "complete"


@dataclass(frozen=True)
class ResultFile:
    """A result object of a job in the outbox (``results`` row)."""

    sop_instance_uid: str
    modality: str  # SEG | SR
    path: str


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    job_id: int
    destination: str
    sop_instance_uid: str
    state: DeliveryState
    attempts: int
    attempts_total: int  # rows in delivery_attempts, across re-sends
    delivered_at: dt.datetime | None
    last_error: str | None
    #: Its first successful attempt: a re-send does not move it.
    first_delivered_at: dt.datetime | None = None


@dataclass(frozen=True)
class JobRow:
    id: int
    pipeline: str
    route: str
    state: JobState
    attempts: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    trigger_received_at: dt.datetime | None
    error: str | None
    traceback: str | None
    study_uid: str
    results: tuple[ResultFile, ...] = ()
    deliveries: tuple[DeliveryRow, ...] = ()

    @property
    def delivered_at(self) -> dt.datetime | None:
        """When its last result first reached its last destination (a
        re-send later does not move it); None until every delivery is
        delivered (or when it has none)."""
        if not self.deliveries or any(d.state != DeliveryState.DELIVERED for d in self.deliveries):
            return None
        return max(d.first_delivered_at or d.delivered_at for d in self.deliveries)  # type: ignore[type-var]


@dataclass(frozen=True)
class RecentStudy:
    """A recent study: its times (the timeline), state and jobs."""

    study_uid: str
    patient_id: str | None
    accession_number: str | None
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    completed_at: dt.datetime | None  # the latest series (or study) completion
    state: str
    jobs: tuple[JobRow, ...] = ()

    @property
    def job(self) -> JobRow | None:
        """The latest job."""
        return self.jobs[0] if self.jobs else None


@dataclass(frozen=True)
class DestinationHealth:
    name: str
    last_success_at: dt.datetime | None
    last_error_at: dt.datetime | None
    last_error: str | None
    pending: int
    failed: int
    next_attempt_at: dt.datetime | None


@dataclass(frozen=True)
class LatencySample:
    """One done job whose every result is delivered: seconds from the last
    instance of its input (``jobs.trigger_received_at``) to the last delivery."""

    job_id: int
    pipeline: str
    delivered_at: dt.datetime
    seconds: float


@dataclass
class LiveCounts:
    instances_last_hour: int = 0
    series: dict[str, int] = field(default_factory=dict)
    studies: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, dict[str, int]] = field(default_factory=dict)  # pipeline -> state -> n
    deliveries: dict[str, dict[str, int]] = field(default_factory=dict)  # destination -> pending/failed -> n


class DashboardQueries(IndexCore):
    """What the dashboard shows, in one read each."""

    def live_counts(self, now: dt.datetime | None = None) -> LiveCounts:
        """Instances received in the hour before ``now``; series by state;
        studies by state (the state of a study's latest job, else
        ``receiving`` / ``assembling`` / ``unmatched`` / ``complete`` from its
        series); jobs by pipeline and state; pending and failed deliveries
        per destination."""
        now = now or utcnow()
        out = LiveCounts()
        with self._session() as s:
            out.instances_last_hour = s.scalar(
                select(func.count()).select_from(Instance).where(Instance.received_at >= now - dt.timedelta(hours=1))
            ) or 0
            out.series = {str(k): n for k, n in s.execute(select(Series.state, func.count()).group_by(Series.state))}
            latest = select(func.max(Job.id).label("id")).group_by(Job.study_uid).subquery()
            for state, n in s.execute(select(Job.state, func.count()).join(latest, Job.id == latest.c.id).group_by(Job.state)):
                out.studies[str(state)] = n
            for state, n in s.execute(self._unrouted_study_states()):
                out.studies[state] = out.studies.get(state, 0) + n
            for pipeline, state, n in s.execute(select(Job.pipeline, Job.state, func.count()).group_by(Job.pipeline, Job.state)):
                out.jobs.setdefault(pipeline, {})[str(state)] = n
            rows = s.execute(
                select(Delivery.destination, Delivery.state, func.count())
                .where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]))
                .group_by(Delivery.destination, Delivery.state)
            )
            for destination, d_state, n in rows:
                out.deliveries.setdefault(destination, {})[str(d_state)] = n
        return out

    @staticmethod
    def _unrouted_study_states():
        """(state, count) of studies without a job, their state from their series."""

        def has(*states: SeriesState):
            return exists().where(Series.study_uid == Study.study_uid, Series.state.in_(states))

        state = case(
            (has(SeriesState.RECEIVING), STUDY_RECEIVING),
            (has(SeriesState.ASSIGNED), STUDY_ASSEMBLING),
            (has(SeriesState.COMPLETE), STUDY_COMPLETE),
            else_=STUDY_UNMATCHED,
        ).label("state")
        no_job = ~exists().where(Job.study_uid == Study.study_uid)
        return select(state, func.count()).select_from(Study).where(no_job).group_by(state)

    def recent_studies(self, limit: int = 12) -> list[RecentStudy]:
        """The ``limit`` studies whose latest instance came last, newest
        first, each with its jobs (newest first), their results and deliveries."""
        with self._session() as s:
            studies = list(s.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(limit)))
            uids = [st.study_uid for st in studies]
            series = defaultdict(list)
            for row in s.scalars(select(Series).where(Series.study_uid.in_(uids))):
                series[row.study_uid].append(row)
            jobs = defaultdict(list)
            for job in s.scalars(select(Job).where(Job.study_uid.in_(uids)).order_by(Job.id.desc())):
                jobs[job.study_uid].append(job)
            job_rows = self._job_rows(s, [j for js in jobs.values() for j in js])
            completed = self._completed_at(s, {st.study_uid: [x.series_uid for x in series[st.study_uid]] for st in studies})
        out = []
        for st in studies:
            rows = [job_rows[j.id] for j in jobs[st.study_uid]]
            members = series[st.study_uid]
            out.append(
                RecentStudy(
                    study_uid=st.study_uid,
                    patient_id=st.patient_id,
                    accession_number=st.accession_number,
                    modalities=tuple(sorted({m.modality for m in members if m.modality})),
                    series_count=len(members),
                    instance_count=sum(m.instance_count for m in members),
                    first_received_at=st.first_received_at,
                    last_received_at=st.last_received_at,
                    completed_at=completed.get(st.study_uid),
                    state=str(rows[0].state) if rows else _series_study_state([m.state for m in members]),
                    jobs=tuple(rows),
                )
            )
        return out

    def dashboard_job(self, job_id: int) -> JobRow | None:
        """One job with its results and deliveries, or None."""
        with self._session() as s:
            job = s.get(Job, job_id)
            return None if job is None else self._job_rows(s, [job])[job.id]

    def _job_rows(self, s, jobs: Sequence[Job]) -> dict[int, JobRow]:
        ids = [j.id for j in jobs]
        results = defaultdict(list)
        for r in s.scalars(select(Result).where(Result.job_id.in_(ids)).order_by(Result.modality)):
            results[r.job_id].append(ResultFile(r.sop_instance_uid, r.modality, r.path))
        deliveries = defaultdict(list)
        total = func.count(DeliveryAttempt.id)
        first_ok = func.min(case((DeliveryAttempt.ok.is_(True), DeliveryAttempt.at)))
        q = (
            select(Delivery, total, first_ok)
            .outerjoin(DeliveryAttempt, DeliveryAttempt.delivery_id == Delivery.id)
            .where(Delivery.job_id.in_(ids))
            .group_by(Delivery.id)
            .order_by(Delivery.id)
        )
        for d, n, first in s.execute(q):
            deliveries[d.job_id].append(
                DeliveryRow(d.id, d.job_id, d.destination, d.sop_instance_uid, d.state, d.attempts, n, d.delivered_at,
                            d.last_error, first)
            )
        return {
            j.id: JobRow(
                j.id, j.pipeline, j.route, j.state, j.attempts, j.created_at, j.started_at, j.finished_at,
                j.trigger_received_at, j.error, j.traceback, j.study_uid, tuple(results[j.id]), tuple(deliveries[j.id]),
            )
            for j in jobs
        }

    @staticmethod
    def _completed_at(s, series_by_study: dict[str, list[str]]) -> dict[str, dt.datetime]:
        """Per study, the latest transition of one of its series or assemblies to ``complete``."""
        owner = {uid: study for study, uids in series_by_study.items() for uid in uids}
        out: dict[str, dt.datetime] = {}
        if not series_by_study:
            return out
        rows = s.execute(
            select(Transition.entity, Transition.entity_id, func.max(Transition.at))
            .where(Transition.to_state == "complete", Transition.entity_id.in_(list(owner)) | _study_entity(series_by_study))
            .group_by(Transition.entity, Transition.entity_id)
        )
        for entity, entity_id, at in rows:
            study = owner.get(entity_id) if entity == "series" else entity_id.split("/", 1)[0]
            if study is not None and (study not in out or at > out[study]):
                out[study] = at
        return out

    def destination_health(self, names: Sequence[str]) -> list[DestinationHealth]:
        """For each destination ``names`` lists: its last successful and last
        failed attempt (with the error), pending and failed deliveries, and
        when the next pending one is due."""
        out = []
        with self._session() as s:
            for name in names:
                attempts = select(DeliveryAttempt).join(Delivery, Delivery.id == DeliveryAttempt.delivery_id).where(
                    Delivery.destination == name
                )
                last_ok = s.scalar(
                    select(func.max(DeliveryAttempt.at))
                    .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                    .where(Delivery.destination == name, DeliveryAttempt.ok.is_(True))
                )
                last_error = s.scalar(attempts.where(DeliveryAttempt.ok.is_(False)).order_by(DeliveryAttempt.id.desc()).limit(1))
                counts = dict(
                    s.execute(
                        select(Delivery.state, func.count()).where(Delivery.destination == name).group_by(Delivery.state)
                    ).all()
                )
                due = s.scalar(
                    select(func.min(Delivery.next_attempt_at)).where(
                        Delivery.destination == name, Delivery.state == DeliveryState.PENDING
                    )
                )
                out.append(
                    DestinationHealth(
                        name=name,
                        last_success_at=last_ok,
                        last_error_at=last_error.at if last_error else None,
                        last_error=last_error.error if last_error else None,
                        pending=counts.get(DeliveryState.PENDING, 0),
                        failed=counts.get(DeliveryState.FAILED, 0),
                        next_attempt_at=due,
                    )
                )
        return out

    def failed_jobs(self, limit: int = 10) -> list[JobRow]:
        """The latest failed jobs (``not_applicable`` is not a failure), newest first."""
        with self._session() as s:
            jobs = list(s.scalars(select(Job).where(Job.state == JobState.FAILED).order_by(Job.id.desc()).limit(limit)))
            rows = self._job_rows(s, jobs)
        return [rows[j.id] for j in jobs]

    def failed_deliveries(self, limit: int = 10) -> list[DeliveryRow]:
        """The latest failed deliveries, newest first."""
        with self._session() as s:
            ids = list(
                s.scalars(select(Delivery.job_id).where(Delivery.state == DeliveryState.FAILED).order_by(Delivery.id.desc()))
            )
            rows = self._job_rows(s, list(s.scalars(select(Job).where(Job.id.in_(ids[: limit * 4])))))
        failed = [d for job in rows.values() for d in job.deliveries if d.state == DeliveryState.FAILED]
        return sorted(failed, key=lambda d: -d.id)[:limit]

    def finished_jobs_since(self, since: dt.datetime) -> list[tuple[dt.datetime, str, JobState]]:
        """(finished_at, pipeline, state) of every job finished at or after ``since``."""
        with self._session() as s:
            rows = s.execute(
                select(Job.finished_at, Job.pipeline, Job.state).where(Job.finished_at >= since).order_by(Job.finished_at)
            )
            return [(at, pipeline, state) for at, pipeline, state in rows if at is not None]

    def latency_samples(self, since: dt.datetime) -> list[LatencySample]:
        """Done jobs whose results were all delivered, the last at or after
        ``since``, with seconds from their last instance to that delivery
        (each delivery's first successful attempt: a re-send does not count)."""
        with self._session() as s:
            first_ok = (
                select(DeliveryAttempt.delivery_id, func.min(DeliveryAttempt.at).label("at"))
                .where(DeliveryAttempt.ok.is_(True))
                .group_by(DeliveryAttempt.delivery_id)
                .subquery()
            )
            undelivered = func.sum(case((Delivery.state != DeliveryState.DELIVERED, 1), else_=0))
            delivered = func.max(func.coalesce(first_ok.c.at, Delivery.delivered_at))
            rows = s.execute(
                select(Job.id, Job.pipeline, Job.trigger_received_at, delivered)
                .join(Delivery, Delivery.job_id == Job.id)
                .outerjoin(first_ok, first_ok.c.delivery_id == Delivery.id)
                .where(and_(Job.state == JobState.DONE, Job.trigger_received_at.is_not(None)))
                .group_by(Job.id, Job.pipeline, Job.trigger_received_at)
                .having(and_(undelivered == 0, delivered >= since))
                .order_by(delivered)
            )
            return [
                LatencySample(job_id, pipeline, delivered, max(0.0, (delivered - trigger).total_seconds()))
                for job_id, pipeline, trigger, delivered in rows
            ]

    def spool_paths_of(self, sop_instance_uids: Sequence[str]) -> dict[str, str]:
        """Spool path of each of ``sop_instance_uids`` the index holds."""
        with self._session() as s:
            rows = s.execute(
                select(Instance.sop_instance_uid, Instance.path).where(Instance.sop_instance_uid.in_(list(sop_instance_uids)))
            )
            return dict(rows.all())


def _study_entity(series_by_study: dict[str, list[str]]):
    """``transitions`` rows of the study assemblies of these studies (``<study>/<route>``)."""
    return or_(*(and_(Transition.entity == "study", Transition.entity_id.like(f"{uid}/%")) for uid in series_by_study))


def _series_study_state(states: Sequence[SeriesState]) -> str:
    """The state of a study without a job, from its series' states."""
    if SeriesState.RECEIVING in states:
        return STUDY_RECEIVING
    if SeriesState.ASSIGNED in states:
        return STUDY_ASSEMBLING
    if SeriesState.COMPLETE in states:
        return STUDY_COMPLETE
    return STUDY_UNMATCHED


__all__ = [
    "DashboardQueries",
    "DeliveryRow",
    "DestinationHealth",
    "JobRow",
    "LatencySample",
    "LiveCounts",
    "ResultFile",
    "RecentStudy",
]
