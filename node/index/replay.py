"""The state of ``ainode replay`` (node/replay/): one ``replay_runs`` row per
run (source, filters, pipeline, where its results go) and one
``replay_studies`` row per study the source listed, with its
:class:`ReplayStudyState` and reason.

Replay is not the clinical path: its rows have no ``transitions`` history
and never touch ``series``, ``jobs`` or ``deliveries``. A study is
``pending`` until its pipeline ran and its results were delivered; an
interrupted run leaves the study in work ``pending``, so a resumed run
does it again (its derived UIDs are deterministic: the same files).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import DateTime, Float, ForeignKey, Integer, String, Text, func, select
from sqlalchemy.orm import Mapped, mapped_column

from node.index.core import IndexCore
from node.index.schema import UID, Base, StateColumn, utcnow


class ReplayStudyState(enum.StrEnum):
    """States of a study in a replay run (``replay_studies.state``)."""

    #: Listed by the source; not yet processed (or interrupted while in work).
    PENDING = "pending"
    #: Its pipeline ran and every result was delivered.
    DONE = "done"
    #: Valid input the pipeline does not process (a CT for a chest model), or
    #: a study lacking a sequence role of a study-level pipeline.
    NOT_APPLICABLE = "not_applicable"
    #: Excluded by the replay's guardrails (a later change sets it; kept here
    #: so that the summary and the table already know it).
    OUT_OF_SCOPE = "out_of_scope"
    #: Fetching, the pipeline or the delivery failed: retried on resume.
    FAILED = "failed"


#: States a resumed run does not do again.
FINISHED = frozenset({ReplayStudyState.DONE, ReplayStudyState.NOT_APPLICABLE, ReplayStudyState.OUT_OF_SCOPE})


class ReplayRun(Base):
    """One ``ainode replay``: ``key`` is the digest of source, filters,
    pipeline and target, by which the same command finds its run again."""

    __tablename__ = "replay_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(Text)
    filters: Mapped[str] = mapped_column(Text)  # JSON (node.replay.ReplayFilters.to_json)
    pipeline: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(Text)  # "destination NAME" or "folder PATH"
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ReplayStudy(Base):
    """One study of a replay run (:class:`ReplayStudyState`)."""

    __tablename__ = "replay_studies"
    run_id: Mapped[int] = mapped_column(ForeignKey("replay_runs.id"), primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, default=0)  # order in which the source listed it
    study_date: Mapped[str | None] = mapped_column(String(8))
    modalities: Mapped[str | None] = mapped_column(String(64))  # ModalitiesInStudy, backslash-separated
    state: Mapped[ReplayStudyState] = mapped_column(
        StateColumn(ReplayStudyState), default=ReplayStudyState.PENDING, index=True
    )
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    instances: Mapped[int | None] = mapped_column(Integer)  # fetched
    results: Mapped[int | None] = mapped_column(Integer)  # derived objects delivered
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    seconds: Mapped[float | None] = mapped_column(Float)


@dataclass(frozen=True)
class ReplayRunView:
    id: int
    key: str
    source: str
    filters: str
    pipeline: str
    target: str
    created_at: dt.datetime


@dataclass(frozen=True)
class ReplayStudyView:
    run_id: int
    study_uid: str
    study_date: str | None
    modalities: str | None
    state: ReplayStudyState
    reason: str | None
    attempts: int
    instances: int | None
    results: int | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    seconds: float | None


def _run_view(r: ReplayRun) -> ReplayRunView:
    return ReplayRunView(r.id, r.key, r.source, r.filters, r.pipeline, r.target, r.created_at)


def _study_view(r: ReplayStudy) -> ReplayStudyView:
    return ReplayStudyView(
        r.run_id, r.study_uid, r.study_date, r.modalities, ReplayStudyState(r.state), r.reason, r.attempts or 0,
        r.instances, r.results, r.started_at, r.finished_at, r.seconds,
    )


class ReplayQueries(IndexCore):
    """Replay runs and their studies (module docstring)."""

    def replay_run_create(self, *, key: str, source: str, filters: str, pipeline: str, target: str) -> ReplayRunView:
        """A new run (no studies yet)."""
        with self._write_lock, self._session.begin() as s:
            row = ReplayRun(key=key, source=source, filters=filters, pipeline=pipeline, target=target)
            s.add(row)
            s.flush()
            return _run_view(row)

    def replay_run(self, run_id: int) -> ReplayRunView:
        """The run ``run_id``; LookupError if there is none."""
        with self._session() as s:
            return _run_view(self._row(s, ReplayRun, run_id))

    def replay_run_latest(self, key: str) -> ReplayRunView | None:
        """The latest run with this ``key`` (same source, filters, pipeline, target), or None."""
        with self._session() as s:
            row = s.scalar(select(ReplayRun).where(ReplayRun.key == key).order_by(ReplayRun.id.desc()).limit(1))
            return None if row is None else _run_view(row)

    def replay_add_studies(self, run_id: int, studies: Iterable[tuple[str, str | None, str | None]]) -> int:
        """Add (Study Instance UID, Study Date, ModalitiesInStudy) rows as
        ``pending`` where the run does not have them yet; returns how many were added."""
        added = 0
        with self._write_lock, self._session.begin() as s:
            have = set(s.scalars(select(ReplayStudy.study_uid).where(ReplayStudy.run_id == run_id)))
            for uid, date, modalities in studies:
                if uid in have:
                    continue
                have.add(uid)
                s.add(ReplayStudy(run_id=run_id, study_uid=uid, position=len(have), study_date=date, modalities=modalities))
                added += 1
            self._row(s, ReplayRun, run_id).updated_at = utcnow()
        return added

    def replay_studies(self, run_id: int, states: Iterable[ReplayStudyState] | None = None) -> list[ReplayStudyView]:
        """The run's studies (in the order they were listed), optionally only those in ``states``."""
        query = select(ReplayStudy).where(ReplayStudy.run_id == run_id)
        if states is not None:
            query = query.where(ReplayStudy.state.in_([ReplayStudyState(x).value for x in states]))
        with self._session() as s:
            return [_study_view(r) for r in s.scalars(query.order_by(ReplayStudy.position))]

    def replay_study_started(self, run_id: int, study_uid: str) -> None:
        """Count an attempt at the study and note when it began (its state stays what it was)."""
        with self._write_lock, self._session.begin() as s:
            row = self._row(s, ReplayStudy, (run_id, study_uid))
            row.attempts, row.started_at = (row.attempts or 0) + 1, utcnow()

    def replay_study_finished(
        self, run_id: int, study_uid: str, state: ReplayStudyState, reason: str | None = None, *,
        instances: int | None = None, results: int | None = None, seconds: float | None = None,
    ) -> None:
        """Record the study's outcome. Raises ValueError for ``pending`` (not an outcome)."""
        state = ReplayStudyState(state)
        if state is ReplayStudyState.PENDING:
            raise ValueError("state: pending is not an outcome of a replayed study")
        with self._write_lock, self._session.begin() as s:
            row = self._row(s, ReplayStudy, (run_id, study_uid))
            row.state, row.reason = state, reason
            row.instances, row.results, row.seconds, row.finished_at = instances, results, seconds, utcnow()
            self._row(s, ReplayRun, run_id).updated_at = row.finished_at

    def replay_counts(self, run_id: int) -> dict[ReplayStudyState, int]:
        """Studies of the run per state, every state present (0 where none)."""
        with self._session() as s:
            rows = s.execute(
                select(ReplayStudy.state, func.count()).where(ReplayStudy.run_id == run_id).group_by(ReplayStudy.state)
            )
            found = {ReplayStudyState(state): n for state, n in rows}
        return {state: found.get(state, 0) for state in ReplayStudyState}
