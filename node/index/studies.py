"""Studies: study-level assemblies and retention of whole studies."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from node.index.core import IndexCore
from node.index.schema import (
    AssemblyState,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
    StudyAssembly,
)

#: Assembly states in which a study-level rule is still collecting or processing the study.
_OPEN_ASSEMBLY = (AssemblyState.RECEIVING, AssemblyState.COMPLETE, AssemblyState.QUEUED, AssemblyState.RUNNING)


class StudyQueries(IndexCore):
    """Studies: retention of whole studies (node/retention.py) and the
    assemblies of study-level rules (node/route.py, node/complete.py)."""

    # -- retention (node/retention.py) ----------------------------------------------------

    def _study_busy(self, s: Session, study_uid: str) -> str | None:
        """Why a study's files must stay, or None: work on it is not over."""
        if s.scalar(select(Job.id).where(Job.study_uid == study_uid, Job.state.in_([JobState.QUEUED, JobState.RUNNING])).limit(1)):
            return "queued or running jobs"
        pending = select(Delivery.id).join(Job, Delivery.job_id == Job.id)
        if s.scalar(pending.where(Job.study_uid == study_uid, Delivery.state == DeliveryState.PENDING).limit(1)):
            return "pending deliveries"
        if s.scalar(
            select(Series.series_uid)
            .where(Series.study_uid == study_uid, Series.state.in_([SeriesState.RECEIVING, SeriesState.COMPLETE]))
            .limit(1)
        ):
            return "series still arriving or not yet routed"
        if s.scalar(
            select(StudyAssembly.route)
            .where(StudyAssembly.study_uid == study_uid, StudyAssembly.state.in_(_OPEN_ASSEMBLY))
            .limit(1)
        ):
            return "a study-level rule is still collecting it"
        return None

    def study_busy(self, study_uid: str) -> str | None:
        """Why the files of ``study_uid`` (spool, outbox) must be kept, or
        None: queued or running jobs, pending deliveries, series still
        arriving or not yet routed, an open study assembly."""
        with self._session() as s:
            return self._study_busy(s, study_uid)

    def idle_studies(self, cutoff: dt.datetime) -> list[str]:
        """Study Instance UIDs of the studies whose last instance came at or
        before ``cutoff`` (naive UTC) and that still have instances indexed."""
        with self._session() as s:
            q = (
                select(Study.study_uid)
                .where(Study.last_received_at <= cutoff)
                .where(select(Instance.sop_instance_uid).where(Instance.study_uid == Study.study_uid).exists())
            )
            return list(s.scalars(q))

    def purge_study(self, study_uid: str, cutoff: dt.datetime, reason: str) -> list[tuple[Path, int]] | None:
        """Forget every instance of an idle study, in one transaction that
        first checks it is still idle since ``cutoff`` and not busy
        (:meth:`study_busy`); its series become ``purged``. Returns the
        (path, size in bytes) of the instances forgotten, for the caller to
        delete, or None when the study is busy or received something since."""
        with self._write_lock, self._session.begin() as s:
            study = s.get(Study, study_uid)
            if study is None or study.last_received_at > cutoff or self._study_busy(s, study_uid):
                return None
            rows = s.execute(select(Instance.path, Instance.size).where(Instance.study_uid == study_uid)).all()
            s.execute(delete(Instance).where(Instance.study_uid == study_uid))
            for series in s.scalars(select(Series).where(Series.study_uid == study_uid, Series.state != SeriesState.PURGED)):
                self._set_state(s, series, SeriesState.PURGED, reason)
                series.instance_count = 0
            return [(Path(path), size) for path, size in rows]

    # -- study assembly -----------------------------------------------------------------

    def set_series_role(self, series_uid: str, role: str | None, reason: str) -> None:
        """Record a series' sequence role (``[sequences]``; None: it fills
        none) and why. Raises LookupError for an unknown series."""
        with self._write_lock, self._session.begin() as s:
            series = self._row(s, Series, series_uid)
            series.role, series.role_reason = role, reason

    def open_assembly(self, study_uid: str, route: str, reason: str) -> bool:
        """Start (or restart, when a new series arrives for a finished one)
        collecting ``study_uid`` for ``route``: its assembly becomes
        ``receiving``. Returns True if it changed; False while it is still
        receiving, queued or running."""
        with self._write_lock, self._session.begin() as s:
            assembly = s.get(StudyAssembly, (study_uid, route))
            if assembly is None:
                assembly = StudyAssembly(study_uid=study_uid, route=route, reason=reason)
                s.add(assembly)
                return self._set_state(s, assembly, AssemblyState.RECEIVING, reason, created=True)
            reopen = (AssemblyState.COMPLETE, AssemblyState.DONE, AssemblyState.FAILED, AssemblyState.NOT_APPLICABLE,
                      AssemblyState.CANCELLED, AssemblyState.OUT_OF_SCOPE)
            if not self._set_state(s, assembly, AssemblyState.RECEIVING, reason, expect=reopen):
                return False
            assembly.reason = reason
            return True

    def assemblies(self, state: AssemblyState | str = AssemblyState.RECEIVING) -> list[StudyAssembly]:
        """The study assemblies in ``state`` (detached rows). Raises
        ValueError for a state that is not an AssemblyState."""
        state = AssemblyState(state)
        with self._session() as s:
            return list(s.scalars(select(StudyAssembly).where(StudyAssembly.state == state)))

    def set_assembly_state(self, study_uid: str, route: str, new: AssemblyState | str, reason: str) -> None:
        """Move the assembly of ``study_uid`` for ``route`` to ``new``, with
        ``reason`` (nothing changes if it is in ``new`` already). Raises
        LookupError for an unknown assembly, ValueError for a state that is
        not an AssemblyState."""
        new = AssemblyState(new)
        with self._write_lock, self._session.begin() as s:
            assembly = self._row(s, StudyAssembly, (study_uid, route))
            if assembly.state != new:
                self._set_state(s, assembly, new, reason)
                assembly.reason = reason

    def study_series(self, study_uid: str) -> list[Series]:
        """The series of a study (detached rows), first received first."""
        with self._session() as s:
            return list(s.scalars(select(Series).where(Series.study_uid == study_uid).order_by(Series.first_received_at)))

    def study_info(self, study_uid: str) -> Study | None:
        """The study row (detached), or None."""
        with self._session() as s:
            return s.get(Study, study_uid)

