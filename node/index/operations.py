"""What operators change (node/actions.py): cancelled jobs and paused
destinations, and what ``/status`` reports of each destination."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Boolean, DateTime, String, Text, func, select
from sqlalchemy.orm import Mapped, mapped_column

from node.index.core import IndexCore
from node.index.schema import Base, Delivery, DeliveryAttempt, Job, JobState, utcnow


class DestinationState(Base):
    """An operator's pause of a destination (``[destinations.<name>]``):
    dispatch sends nothing to it while ``paused``; its deliveries stay pending."""

    __tablename__ = "destination_state"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    changed_by: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)


@dataclass(frozen=True)
class LastAttempt:
    """The latest delivery attempt to one destination."""

    at: dt.datetime
    ok: bool
    status: str | None
    error: str | None


class OperationQueries(IndexCore):
    """Cancelling jobs, pausing destinations, the last attempt per destination."""

    def cancel_job(self, job_id: int, reason: str) -> JobState | None:
        """Move a ``queued`` job to ``cancelled`` (its input series and study
        assembly too), in one transaction that locks the row, so a worker
        claiming it at the same moment either gets it first or not at all.
        Returns None when cancelled, else the state it is in (nothing
        changed). Raises LookupError for an unknown job."""
        with self._write_lock, self._session.begin() as s:
            job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is None:
                raise LookupError(f"no jobs row {job_id!r}")
            if not self._set_state(s, job, JobState.CANCELLED, reason[:500], expect=JobState.QUEUED):
                return job.state
            job.finished_at, job.error = utcnow(), f"cancelled: {reason}"
            self._sync_series_state(s, job, JobState.CANCELLED)  # type: ignore[attr-defined]  # JobQueries
            return None

    def set_destination_paused(self, name: str, paused: bool, *, by: str, reason: str) -> bool:
        """Pause or resume destination ``name``; returns whether it changed
        (False: it was paused, or running, already)."""
        with self._write_lock, self._session.begin() as s:
            row = s.get(DestinationState, name)
            if row is None:
                row = DestinationState(name=name, paused=False)
                s.add(row)
            if bool(row.paused) == paused:
                return False
            row.paused, row.changed_at, row.changed_by, row.reason = paused, utcnow(), by[:64], reason
            return True

    def paused_destinations(self) -> dict[str, DestinationState]:
        """Destination name -> its row, for the paused ones (detached rows)."""
        with self._session() as s:
            return {r.name: r for r in s.scalars(select(DestinationState).where(DestinationState.paused.is_(True)))}

    def destination_paused(self, name: str) -> bool:
        """Whether an operator paused ``name`` (dispatch asks before each batch)."""
        with self._session() as s:
            return bool(s.scalar(select(DestinationState.paused).where(DestinationState.name == name)))

    def last_attempts(self) -> dict[str, LastAttempt]:
        """Destination name -> its latest delivery attempt; destinations
        never tried are absent."""
        with self._session() as s:
            latest = (
                select(Delivery.destination, func.max(DeliveryAttempt.id).label("id"))
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .group_by(Delivery.destination)
                .subquery()
            )
            rows = s.execute(
                select(latest.c.destination, DeliveryAttempt).join(DeliveryAttempt, DeliveryAttempt.id == latest.c.id)
            )
            return {name: LastAttempt(a.at, a.ok, a.status, a.error) for name, a in rows}
