"""Index: the SQL record of every instance, series, study, job and delivery.

SQLite in WAL mode by default; any SQLAlchemy PostgreSQL URL works too.
Every state change of a series, study, job or delivery is also written as a
row of ``transitions`` in the same transaction, so the history of a study can
be audited (docs/architecture.md, "State, and why nothing is lost").

States::

    series:   receiving -> complete -> queued -> running -> done | failed | not_applicable
                                    \\-> unmatched -> purged          (-> purged by retention)
    job:      queued -> running -> done | failed | not_applicable
              (running -> queued on recovery; failed | not_applicable -> queued
              by an operator's ``ainode jobs retry``)
    delivery: pending -> delivered | failed
              (delivered | failed -> pending by ``ainode deliveries resend``)

SQLite runs with ``synchronous=NORMAL``: a power cut may lose the last
committed rows but never corrupts the file, and :meth:`Index.missing_paths`
lets the node re-index spool files whose rows were lost.
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
from collections.abc import Iterable, Sequence
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

UID = String(64)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class JobState(enum.StrEnum):
    """States of a job (``jobs.state``); its input series and study assembly
    mirror them."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    #: The input is faulty, the pipeline raised, or the node died during it
    #: ``max_job_attempts`` times.
    FAILED = "failed"
    #: Valid input this pipeline does not process (a lateral view, a colour
    #: image, a SEG a broad rule routed): not a failure, no result.
    NOT_APPLICABLE = "not_applicable"


class Base(DeclarativeBase):
    pass


class AssociationOutcome(enum.StrEnum):
    """``associations.outcome``: accepted while open, then released or
    aborted; rejected (A-ASSOCIATE-RJ) associations are recorded too."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RELEASED = "released"
    ABORTED = "aborted"


class Association(Base):
    """The audit of every association request, accepted or rejected."""

    __tablename__ = "associations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool | None] = mapped_column(Boolean)
    client_cert_subject: Mapped[str | None] = mapped_column(Text)  # RFC 4514
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    outcome: Mapped[str | None] = mapped_column(String(16))  # AssociationOutcome
    reason: Mapped[str | None] = mapped_column(Text)  # why it was rejected
    instances: Mapped[int] = mapped_column(Integer, default=0)


class Study(Base):
    __tablename__ = "studies"
    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Series(Base):
    __tablename__ = "series"
    series_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    last_association_id: Mapped[str | None] = mapped_column(String(36), index=True)
    released: Mapped[bool] = mapped_column(Boolean, default=False)
    # node.ingest.Source of the latest instance: which idle time completes the series.
    last_source: Mapped[str | None] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    state_changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    role: Mapped[str | None] = mapped_column(String(16))  # sequence role for study-level rules
    role_reason: Mapped[str | None] = mapped_column(Text)


class StudyAssembly(Base):
    """A study being collected for a study-level rule: its state is the
    study's (receiving -> queued -> running -> done | failed)."""

    __tablename__ = "study_assemblies"
    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    route: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    state_changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text)


class Instance(Base):
    __tablename__ = "instances"
    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, ForeignKey("series.series_uid"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    association_id: Mapped[str | None] = mapped_column(String(36))
    # An indexed value was clipped to its VR's maximum length; the file is whole.
    clipped: Mapped[bool | None] = mapped_column(Boolean, default=False)
    source: Mapped[str | None] = mapped_column(String(8))  # node.ingest.Source; NULL: C-STORE (older rows)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(8))
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    series_uid: Mapped[str | None] = mapped_column(UID, index=True)
    destinations: Mapped[str] = mapped_column(Text)  # comma-separated names
    roles: Mapped[str | None] = mapped_column(Text)  # JSON role -> series UID (study-level jobs)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    trigger_received_at: Mapped[dt.datetime | None] = mapped_column(DateTime)  # last instance of its input
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[str | None] = mapped_column(Text)  # JSON: stage -> seconds


class Result(Base):
    __tablename__ = "results"
    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination", "job_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    ok: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str | None] = mapped_column(String(32))  # DIMSE status 0xNNNN or HTTP code
    error: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float] = mapped_column(Float)


class Transition(Base):
    __tablename__ = "transitions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    entity: Mapped[str] = mapped_column(String(16))  # series | job | delivery
    entity_id: Mapped[str] = mapped_column(String(64), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text)


@dataclass(frozen=True)
class InstanceRecord:
    """What the receive step learned of an instance, to index it."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int
    instance_number: int | None = None
    modality: str | None = None
    series_description: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    calling_ae: str | None = None
    peer_address: str | None = None
    association_id: str | None = None
    clipped: bool = False
    source: str | None = None  # node.ingest.Source; None counts as C-STORE

    @classmethod
    def from_values(
        cls, values: dict[str, Any], transfer_syntax_uid: str, path: Path, size: int, *, clipped: bool = False, **peer
    ) -> InstanceRecord:
        """Build a record from :func:`node.ingest.index_values` (or an
        :class:`node.ingest.Accepted`'s values). An Instance Number
        (0020,0013) that is not an integer is only a sort key, so it is
        recorded as absent rather than refused."""
        try:
            number = int(values.get("InstanceNumber"))
        except (TypeError, ValueError):
            number = None
        return cls(
            sop_instance_uid=str(values["SOPInstanceUID"]),
            sop_class_uid=str(values["SOPClassUID"]),
            series_uid=str(values["SeriesInstanceUID"]),
            study_uid=str(values["StudyInstanceUID"]),
            transfer_syntax_uid=str(transfer_syntax_uid),
            path=path,
            size=size,
            instance_number=number,
            modality=values.get("Modality"),
            series_description=values.get("SeriesDescription"),
            patient_id=values.get("PatientID"),
            accession_number=values.get("AccessionNumber"),
            clipped=clipped,
            **peer,
        )

    @classmethod
    def from_header(cls, header, path: Path, size: int, **peer) -> InstanceRecord:
        """Build a record from a parsed header (:func:`node.spool.read_header`),
        text clipped to its VR's maximum length as :func:`from_values` expects."""
        from node.ingest import index_values  # node.ingest imports node.spool, not the index

        values, clipped = index_values(header)
        return cls.from_values(
            values, header.file_meta.TransferSyntaxUID, path, size, clipped=bool(clipped), **peer
        )


@dataclass(frozen=True)
class JobView:
    """A job as the runner needs it, detached from any session."""

    id: int
    pipeline: str
    route: str
    level: str
    study_uid: str
    series_uid: str | None
    destinations: tuple[str, ...]
    attempts: int
    roles: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeliveryView:
    id: int
    job_id: int
    sop_instance_uid: str
    destination: str
    path: str
    attempts: int


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL mode and its parent folder."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


class Index:
    """All reads and writes of the node's SQL state, one transaction a call."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite allows one writer; serialising here avoids busy waits.
        self._write_lock = threading.RLock() if url.startswith("sqlite") else _NullLock()

    def close(self) -> None:
        self.engine.dispose()

    def _transition(self, s: Session, entity: str, entity_id: Any, old: str | None, new: str, reason: str | None = None):
        s.add(Transition(entity=entity, entity_id=str(entity_id), from_state=old, to_state=new, reason=reason))

    # -- associations -----------------------------------------------------------

    def association_opened(
        self,
        assoc_id: str,
        calling_ae: str,
        address: str,
        port: int,
        *,
        called_ae: str | None = None,
        tls: bool | None = None,
        client_cert_subject: str | None = None,
        outcome: AssociationOutcome = AssociationOutcome.ACCEPTED,
        reason: str | None = None,
    ) -> None:
        """Record an association request and its outcome: accepted, or
        rejected (then it is closed at once, with ``reason``)."""
        rejected = outcome == AssociationOutcome.REJECTED
        with self._write_lock, self._session.begin() as s:
            s.add(
                Association(
                    id=assoc_id,
                    calling_ae=calling_ae[:16],
                    called_ae=None if called_ae is None else called_ae[:16],
                    peer_address=address,
                    peer_port=port,
                    tls=tls,
                    client_cert_subject=client_cert_subject,
                    outcome=str(outcome),
                    reason=reason,
                    closed_at=utcnow() if rejected else None,
                )
            )

    def associations(self, limit: int = 50) -> list[Association]:
        """The latest association records, newest first."""
        with self._session() as s:
            return list(s.scalars(select(Association).order_by(Association.opened_at.desc()).limit(limit)))

    def association_closed(self, assoc_id: str, outcome: str) -> int:
        """Record the end of an association. A release marks the series whose
        latest instance came on it as released; returns how many."""
        with self._write_lock, self._session.begin() as s:
            s.execute(
                update(Association)
                .where(Association.id == assoc_id, Association.closed_at.is_(None))
                .values(closed_at=utcnow(), outcome=outcome)
            )
            if outcome != "released":
                return 0
            res = s.execute(
                update(Series)
                .where(Series.last_association_id == assoc_id, Series.state == "receiving")
                .values(released=True)
            )
            return res.rowcount or 0

    # -- instances ----------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._session() as s:
            return s.get(Instance, sop_instance_uid) is not None

    def record_instance(self, rec: InstanceRecord) -> bool:
        """Index a spooled instance; create or reopen its series and study.

        Returns False when the SOP Instance UID was already indexed (a
        duplicate: stored once, nothing changes).

        This is the ingest hot path: the common case (a known series still
        receiving) takes four Core statements in one transaction.
        """
        now = utcnow()
        for _ in range(3):
            try:
                with self._write_lock, self.engine.begin() as c:
                    touched = c.execute(
                        update(Series)
                        .where(Series.series_uid == rec.series_uid, Series.state == "receiving")
                        .values(
                            instance_count=Series.instance_count + 1,
                            last_received_at=now,
                            last_association_id=rec.association_id,
                            released=False,
                            last_source=rec.source,
                        )
                    ).rowcount
                    if touched:
                        c.execute(update(Study).where(Study.study_uid == rec.study_uid).values(last_received_at=now))
                    else:
                        self._new_or_reopened_series(c, rec, now)
                    # Last: a duplicate SOP Instance UID fails here and rolls back the counts.
                    c.execute(
                        Instance.__table__.insert().values(
                            sop_instance_uid=rec.sop_instance_uid,
                            series_uid=rec.series_uid,
                            study_uid=rec.study_uid,
                            sop_class_uid=rec.sop_class_uid,
                            transfer_syntax_uid=rec.transfer_syntax_uid,
                            instance_number=rec.instance_number,
                            path=str(rec.path),
                            size=rec.size,
                            received_at=now,
                            calling_ae=rec.calling_ae,
                            peer_address=rec.peer_address,
                            association_id=rec.association_id,
                            clipped=rec.clipped,
                            source=rec.source,
                        )
                    )
                    if rec.association_id:
                        c.execute(
                            update(Association)
                            .where(Association.id == rec.association_id)
                            .values(instances=Association.instances + 1)
                        )
                return True
            except IntegrityError:
                if self.has_instance(rec.sop_instance_uid):
                    return False
                # Another association created the same study or series first
                # (PostgreSQL runs writers concurrently): try again.
        raise RuntimeError(f"could not index {rec.sop_instance_uid} after 3 attempts")

    def _new_or_reopened_series(self, c, rec: InstanceRecord, now: dt.datetime) -> None:
        """First instance of a series (and maybe of its study), or new content
        for a series that was already complete: it is processed again."""
        if c.execute(update(Study).where(Study.study_uid == rec.study_uid).values(last_received_at=now)).rowcount == 0:
            c.execute(
                Study.__table__.insert().values(
                    study_uid=rec.study_uid,
                    patient_id=rec.patient_id,
                    accession_number=rec.accession_number or None,
                    first_received_at=now,
                    last_received_at=now,
                )
            )
        old = c.execute(select(Series.state).where(Series.series_uid == rec.series_uid)).scalar()
        values = dict(
            state="receiving",
            state_changed_at=now,
            last_received_at=now,
            last_association_id=rec.association_id,
            released=False,
            last_source=rec.source,
        )
        if old is None:
            c.execute(
                Series.__table__.insert().values(
                    series_uid=rec.series_uid,
                    study_uid=rec.study_uid,
                    modality=rec.modality,
                    series_description=(rec.series_description or "")[:64],
                    sop_class_uid=rec.sop_class_uid,
                    instance_count=1,
                    first_received_at=now,
                    **values,
                )
            )
            reason = "first instance"
        else:
            c.execute(
                update(Series).where(Series.series_uid == rec.series_uid).values(instance_count=Series.instance_count + 1, **values)
            )
            reason = "new instance"
        c.execute(
            Transition.__table__.insert().values(
                entity="series", entity_id=rec.series_uid, from_state=old, to_state="receiving", at=now, reason=reason
            )
        )

    def missing_paths(self, paths: Iterable[Path]) -> list[Path]:
        """Of ``paths`` (spool files), those with no instance row."""
        paths = list(paths)
        with self._session() as s:
            known = set(s.scalars(select(Instance.path)))
        return [p for p in paths if str(p) not in known]

    def instance_paths(self, series_uid: str) -> list[Path]:
        """A series' files, by Instance Number then SOP Instance UID."""
        with self._session() as s:
            rows = s.execute(
                select(Instance.path, Instance.instance_number, Instance.sop_instance_uid).where(
                    Instance.series_uid == series_uid
                )
            ).all()
        rows.sort(key=lambda r: (r[1] is None, r[1] or 0, r[2]))
        return [Path(r[0]) for r in rows]

    # -- series --------------------------------------------------------------------

    def series_to_complete(
        self, now: dt.datetime, idle_seconds: float, on_release: bool, *, stow_idle_seconds: float | None = None
    ) -> list[str]:
        """Series in ``receiving`` that are idle long enough, or released.
        With ``stow_idle_seconds``, a series whose latest instance came by
        STOW-RS (``last_source``) waits that long instead of ``idle_seconds``."""
        cutoff = now - dt.timedelta(seconds=idle_seconds)
        with self._session() as s:
            q = select(Series.series_uid).where(Series.state == "receiving")
            cond = Series.last_received_at <= cutoff
            if stow_idle_seconds is not None:
                stow = Series.last_source == "stow-rs"
                stow_cutoff = now - dt.timedelta(seconds=stow_idle_seconds)
                cond = (stow & (Series.last_received_at <= stow_cutoff)) | (
                    (Series.last_source.is_(None) | ~stow) & cond
                )
            if on_release:
                cond = cond | (Series.released.is_(True))
            return list(s.scalars(q.where(cond)))

    def set_series_state(self, series_uid: str, new: str, reason: str | None = None, *, expect: str | None = None) -> bool:
        """Move a series to ``new``; with ``expect``, only from that state."""
        with self._write_lock, self._session.begin() as s:
            series = s.get(Series, series_uid)
            if series is None or (expect is not None and series.state != expect):
                return False
            if series.state != new:
                self._transition(s, "series", series_uid, series.state, new, reason)
                series.state = new
                series.state_changed_at = utcnow()
            return True

    def series_info(self, series_uid: str) -> Series | None:
        with self._session() as s:
            return s.get(Series, series_uid)

    def series_in_state(self, state: str, older_than: dt.datetime | None = None) -> list[Series]:
        with self._session() as s:
            q = select(Series).where(Series.state == state)
            if older_than is not None:
                q = q.where(Series.state_changed_at <= older_than)
            return list(s.scalars(q))

    def purge_series(self, series_uid: str, reason: str) -> None:
        """Forget a series' instances (their files are removed by the caller)."""
        with self._write_lock, self._session.begin() as s:
            series = s.get(Series, series_uid)
            if series is None:
                return
            s.execute(delete(Instance).where(Instance.series_uid == series_uid))
            self._transition(s, "series", series_uid, series.state, "purged", reason)
            series.state = "purged"
            series.state_changed_at = utcnow()
            series.instance_count = 0

    # -- retention (node/retention.py) ----------------------------------------------------

    def _study_busy(self, s: Session, study_uid: str) -> str | None:
        """Why a study's files must stay, or None: work on it is not over."""
        if s.scalar(select(Job.id).where(Job.study_uid == study_uid, Job.state.in_(["queued", "running"])).limit(1)):
            return "queued or running jobs"
        pending = select(Delivery.id).join(Job, Delivery.job_id == Job.id)
        if s.scalar(pending.where(Job.study_uid == study_uid, Delivery.state == "pending").limit(1)):
            return "pending deliveries"
        if s.scalar(
            select(Series.series_uid).where(Series.study_uid == study_uid, Series.state.in_(["receiving", "complete"])).limit(1)
        ):
            return "series still arriving or not yet routed"
        open_states = ["receiving", "complete", "queued", "running"]
        if s.scalar(
            select(StudyAssembly.route).where(StudyAssembly.study_uid == study_uid, StudyAssembly.state.in_(open_states)).limit(1)
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
        """Studies whose last instance came at or before ``cutoff`` (naive
        UTC) and that still have instances indexed."""
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
            for series in s.scalars(select(Series).where(Series.study_uid == study_uid, Series.state != "purged")):
                self._transition(s, "series", series.series_uid, series.state, "purged", reason)
                series.state, series.state_changed_at, series.instance_count = "purged", utcnow(), 0
            return [(Path(path), size) for path, size in rows]

    # -- study assembly -----------------------------------------------------------------

    def set_series_role(self, series_uid: str, role: str | None, reason: str) -> None:
        with self._write_lock, self._session.begin() as s:
            series = s.get(Series, series_uid)
            series.role, series.role_reason = role, reason

    def open_assembly(self, study_uid: str, route: str, reason: str) -> bool:
        """Start (or restart, when a new series arrives for a finished one)
        collecting ``study_uid`` for ``route``. Returns True if it changed."""
        with self._write_lock, self._session.begin() as s:
            assembly = s.get(StudyAssembly, (study_uid, route))
            key = f"{study_uid}/{route}"
            if assembly is None:
                s.add(StudyAssembly(study_uid=study_uid, route=route, state="receiving", reason=reason))
                self._transition(s, "study", key, None, "receiving", reason)
                return True
            if assembly.state in ("receiving", "queued", "running"):
                return False
            self._transition(s, "study", key, assembly.state, "receiving", reason)
            assembly.state, assembly.reason, assembly.state_changed_at = "receiving", reason, utcnow()
            return True

    def assemblies(self, state: str = "receiving") -> list[StudyAssembly]:
        with self._session() as s:
            return list(s.scalars(select(StudyAssembly).where(StudyAssembly.state == state)))

    def set_assembly_state(self, study_uid: str, route: str, new: str, reason: str) -> None:
        with self._write_lock, self._session.begin() as s:
            assembly = s.get(StudyAssembly, (study_uid, route))
            if assembly.state != new:
                self._transition(s, "study", f"{study_uid}/{route}", assembly.state, new, reason)
                assembly.state, assembly.reason, assembly.state_changed_at = new, reason, utcnow()

    def study_series(self, study_uid: str) -> list[Series]:
        with self._session() as s:
            return list(s.scalars(select(Series).where(Series.study_uid == study_uid).order_by(Series.first_received_at)))

    def study_info(self, study_uid: str) -> Study | None:
        with self._session() as s:
            return s.get(Study, study_uid)

    # -- jobs -------------------------------------------------------------------------

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
        """Queue a job; with ``failed_reason`` record it as failed at once
        (a study that never became complete: visible, never run)."""
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
                state="queued",
                trigger_received_at=trigger,
            )
            s.add(job)
            s.flush()
            self._transition(s, "job", job.id, None, "queued", f"route {route}")
            if failed_reason is not None:
                self._transition(s, "job", job.id, "queued", "failed", failed_reason)
                job.state, job.error, job.finished_at = "failed", failed_reason, utcnow()
            self._sync_series_state(s, job, job.state)
            return job.id

    def claim_job(self) -> JobView | None:
        """Take the oldest queued job and mark it running, or None."""
        with self._write_lock, self._session.begin() as s:
            for job_id in s.scalars(select(Job.id).where(Job.state == "queued").order_by(Job.id).limit(8)):
                res = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == "queued")
                    .values(state="running", started_at=utcnow(), attempts=Job.attempts + 1)
                )
                if res.rowcount == 1:
                    job = s.get(Job, job_id)
                    self._transition(s, "job", job_id, "queued", "running")
                    self._sync_series_state(s, job, "running")
                    return _job_view(job)
            return None

    def _sync_series_state(self, s: Session, job: Job, state: str) -> None:
        """Mirror a job's state on its input series (and study assembly)."""
        uids = [job.series_uid] if job.series_uid else list(json.loads(job.roles).values()) if job.roles else []
        for uid in uids:
            series = s.get(Series, uid)
            if series is not None and series.state not in ("receiving", state):
                self._transition(s, "series", series.series_uid, series.state, state, f"job {job.id}")
                series.state = state
                series.state_changed_at = utcnow()
        if job.level == "study":
            assembly = s.get(StudyAssembly, (job.study_uid, job.route))
            if assembly is not None and assembly.state not in ("receiving", state):
                self._transition(s, "study", f"{job.study_uid}/{job.route}", assembly.state, state, f"job {job.id}")
                assembly.state = state
                assembly.state_changed_at = utcnow()

    def finish_job(
        self, job_id: int, results: Sequence[tuple[Any, Path, Sequence[str]]], timings: str | None = None
    ) -> None:
        """Mark a job done and queue each result for its destinations, in one
        transaction. ``results`` holds (dataset, outbox path, destination
        names); a second item with the same SOP Instance UID is another
        encoding of the same object (a compact SEG) and only adds deliveries."""
        with self._write_lock, self._session.begin() as s:
            job = s.get(Job, job_id)
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
            self._transition(s, "job", job_id, job.state, JobState.DONE, f"{len(results)} results")
            job.state = JobState.DONE
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
        self._transition(s, "delivery", row.id, row.state, "pending", f"job {job_id} ran again")
        row.state, row.path, row.attempts = "pending", str(path), 0
        row.next_attempt_at, row.delivered_at, row.last_error = utcnow(), None, None

    def fail_job(
        self,
        job_id: int,
        error: str,
        traceback: str | None = None,
        timings: str | None = None,
        *,
        state: JobState = JobState.FAILED,
    ) -> None:
        """End a job without results: ``failed`` (an input fault with
        ``traceback=None``, or a bug with its traceback), or with
        ``state=JobState.NOT_APPLICABLE`` valid input its pipeline does not
        process. ``error`` is the reason either way."""
        if state not in (JobState.FAILED, JobState.NOT_APPLICABLE):
            raise ValueError(f"state must be failed or not_applicable, got {state!r}")
        with self._write_lock, self._session.begin() as s:
            job = s.get(Job, job_id)
            self._transition(s, "job", job_id, job.state, state, error[:500])
            job.state = state
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
            for job in s.scalars(select(Job).where(Job.state == "running")):
                if job.attempts >= max_attempts:
                    reason = f"the node stopped during this job {job.attempts} times; giving up"
                    self._transition(s, "job", job.id, "running", "failed", reason)
                    job.state, job.error, job.finished_at = "failed", reason, utcnow()
                    self._sync_series_state(s, job, "failed")
                    failed += 1
                else:
                    self._transition(s, "job", job.id, "running", "queued", "recovered after restart")
                    job.state = "queued"
                    self._sync_series_state(s, job, "queued")
                    requeued += 1
        return requeued, failed

    #: States an operator may queue again (``ainode jobs retry``).
    RETRYABLE = (JobState.FAILED, JobState.NOT_APPLICABLE)

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
        1 s poll. Returns the ids queued, and for each named job left alone
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
                self._transition(s, "job", job_id, job.state, JobState.QUEUED, why)
                job.state, job.attempts = JobState.QUEUED, 0
                job.error = job.traceback = job.timings = None
                job.started_at = job.finished_at = None
                self._sync_series_state(s, job, JobState.QUEUED)
                requeued.append(job_id)
        return requeued, refused

    def job(self, job_id: int) -> Job | None:
        with self._session() as s:
            return s.get(Job, job_id)

    def jobs(self, limit: int = 50, state: str | None = None) -> list[Job]:
        with self._session() as s:
            q = select(Job).order_by(Job.id.desc()).limit(limit)
            if state:
                q = q.where(Job.state == state)
            return list(s.scalars(q))

    # -- deliveries --------------------------------------------------------------------

    def due_deliveries(self, destination: str, now: dt.datetime, limit: int = 100) -> list[DeliveryView]:
        with self._session() as s:
            rows = s.scalars(
                select(Delivery)
                .where(Delivery.destination == destination, Delivery.state == "pending", Delivery.next_attempt_at <= now)
                .order_by(Delivery.id)
                .limit(limit)
            )
            return [
                DeliveryView(d.id, d.job_id, d.sop_instance_uid, d.destination, d.path, d.attempts) for d in rows
            ]

    def next_delivery_time(self, destination: str) -> dt.datetime | None:
        with self._session() as s:
            return s.scalar(
                select(func.min(Delivery.next_attempt_at)).where(
                    Delivery.destination == destination, Delivery.state == "pending"
                )
            )

    def record_attempt(
        self,
        delivery_id: int,
        *,
        ok: bool,
        status: str | None,
        error: str | None,
        seconds: float,
        next_attempt_at: dt.datetime | None,
    ) -> str:
        """Record one delivery attempt. ``next_attempt_at=None`` after a
        failure means the retries are used up. Returns the new state."""
        with self._write_lock, self._session.begin() as s:
            d = s.get(Delivery, delivery_id)
            d.attempts += 1
            s.add(
                DeliveryAttempt(delivery_id=delivery_id, attempt=d.attempts, ok=ok, status=status, error=error, seconds=seconds)
            )
            if ok:
                new = "delivered"
                d.delivered_at = utcnow()
                d.last_error = None
            elif next_attempt_at is None:
                new = "failed"
                d.last_error = error
            else:
                new = "pending"
                d.last_error = error
                d.next_attempt_at = next_attempt_at
            if new != d.state:
                self._transition(s, "delivery", delivery_id, d.state, new, error)
                d.state = new
            return new

    def deliveries(self, limit: int = 50, state: str | None = None) -> list[Delivery]:
        with self._session() as s:
            q = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
            if state:
                q = q.where(Delivery.state == state)
            return list(s.scalars(q))

    def attempts(self, delivery_id: int) -> list[DeliveryAttempt]:
        with self._session() as s:
            return list(
                s.scalars(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery_id).order_by(DeliveryAttempt.id))
            )

    def delivery(self, delivery_id: int) -> Delivery | None:
        """The delivery row ``delivery_id``, or None."""
        with self._session() as s:
            return s.get(Delivery, delivery_id)

    def resend_deliveries(
        self,
        ids: Sequence[int] = (),
        *,
        failed: bool = False,
        destination: str | None = None,
        since: dt.datetime | None = None,
        by: str,
        reason: str = "manual re-send",
    ) -> tuple[list[int], list[int]]:
        """Put deliveries back to ``pending``, due now, for a new cycle of attempts.

        Select either ``ids`` (deliveries in any state: a delivered one is
        sent again, the same file with the same SOP Instance UID, which a
        PACS stores once), or ``failed=True``: every ``failed`` delivery,
        narrowed to ``destination`` and to those whose last attempt was at or
        after ``since`` (naive UTC, as the index stores times).

        ``attempts`` restarts at 0, so the retry policy counts from the
        first attempt again; earlier attempts stay in ``delivery_attempts``
        (their numbers restart too) and ``last_error`` keeps the last error
        until the next attempt. Each re-queued delivery gets a
        ``transitions`` row (``delivery``, old state -> ``pending``, reason
        ``resend by BY: REASON``, at now), in the same transaction. A running
        node's dispatch thread polls due deliveries every second and picks
        them up without a restart.

        Returns
        -------
        (re-queued ids, ids not found)

        Raises
        ------
        ValueError
            Neither or both of ``ids`` and ``failed``; ``destination`` or
            ``since`` with ``ids``; an empty ``by`` or ``reason``.
        """
        if bool(ids) == failed:
            raise ValueError("give delivery ids or failed=True, not both and not neither")
        if ids and (destination is not None or since is not None):
            raise ValueError("destination and since narrow failed=True only, not delivery ids")
        if not by.strip() or not reason.strip():
            raise ValueError("by and reason must not be empty")
        note = f"resend by {by.strip()}: {reason.strip()}"
        now = utcnow()
        with self._write_lock, self._session.begin() as s:
            q = select(Delivery).order_by(Delivery.id)
            if ids:
                q = q.where(Delivery.id.in_(list(ids)))
            else:
                q = q.where(Delivery.state == "failed")
                if destination is not None:
                    q = q.where(Delivery.destination == destination)
                if since is not None:
                    last_at = (
                        select(DeliveryAttempt.delivery_id)
                        .group_by(DeliveryAttempt.delivery_id)
                        .having(func.max(DeliveryAttempt.at) >= since)
                    )
                    q = q.where(Delivery.id.in_(last_at))
            rows = list(s.scalars(q))
            for d in rows:
                self._transition(s, "delivery", d.id, d.state, "pending", note)
                d.state, d.attempts, d.next_attempt_at, d.delivered_at = "pending", 0, now, None
            found = {d.id for d in rows}
            return [d.id for d in rows], [i for i in dict.fromkeys(ids) if i not in found]

    # -- reporting -----------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per state for series, jobs and deliveries."""
        out: dict[str, dict[str, int]] = {}
        with self._session() as s:
            for name, model in (("series", Series), ("jobs", Job), ("deliveries", Delivery)):
                out[name] = {state: n for state, n in s.execute(select(model.state, func.count()).group_by(model.state))}
            out["study_assemblies"] = {
                state: n for state, n in s.execute(select(StudyAssembly.state, func.count()).group_by(StudyAssembly.state))
            }
            out["instances"] = {"total": s.scalar(select(func.count()).select_from(Instance)) or 0}
            out["studies"] = {"total": s.scalar(select(func.count()).select_from(Study)) or 0}
        return out

    def transitions(self, entity: str, entity_id: Any) -> list[Transition]:
        with self._session() as s:
            return list(
                s.scalars(
                    select(Transition)
                    .where(Transition.entity == entity, Transition.entity_id == str(entity_id))
                    .order_by(Transition.id)
                )
            )

    def ping(self) -> bool:
        with self._session() as s:
            return s.scalar(select(1)) == 1


def _add_missing_columns(engine: Engine) -> None:
    """Add columns a newer node defines to tables an older one created
    (``create_all`` creates missing tables only). New columns are nullable,
    so ``ALTER TABLE ... ADD COLUMN`` works on SQLite and PostgreSQL."""
    from sqlalchemy import inspect

    inspector = inspect(engine)
    with engine.begin() as c:
        for table in Base.metadata.sorted_tables:
            have = {col["name"] for col in inspector.get_columns(table.name)}
            for col in table.columns:
                if col.name not in have and col.nullable:
                    c.exec_driver_sql(
                        f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {col.type.compile(engine.dialect)}'
                    )


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _job_view(job: Job) -> JobView:
    return JobView(
        id=job.id,
        pipeline=job.pipeline,
        route=job.route,
        level=job.level,
        study_uid=job.study_uid,
        series_uid=job.series_uid,
        destinations=tuple(filter(None, job.destinations.split(","))),
        attempts=job.attempts,
        roles=json.loads(job.roles) if job.roles else {},
    )
