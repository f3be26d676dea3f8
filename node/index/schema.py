r"""The index's tables (SQLAlchemy ORM), its state vocabularies, and the
column migration of an older database.

States (each change is one ``transitions`` row, written by
:meth:`node.index.core.IndexCore._set_state`)::

    series:   receiving -> complete -> queued -> running -> done | failed | not_applicable
                                    |-> assigned | unused       (a study-level rule)
                                    \-> unmatched -> purged     (-> purged by retention)
    study:    receiving -> complete -> queued -> running -> done | failed | not_applicable
    job:      queued -> running -> done | failed | not_applicable | out_of_scope
              queued -> cancelled (an operator; node/actions.py)
              (running -> queued on recovery or a worker's stale heartbeat;
              failed | not_applicable -> queued
              by an operator's ``ainode jobs retry``)
    delivery: pending -> delivered | failed
              (delivered | failed -> pending by ``ainode deliveries resend``)
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any, TypeVar

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

UID = String(64)


def utcnow() -> dt.datetime:
    """Now, in UTC, without tzinfo: the index stores naive UTC times."""
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
    CANCELLED = "cancelled"  # by an operator while queued (POST /api/jobs/{id}/cancel)
    #: Outside the model card's intended use, refused by configuration
    #: (node.guard): no result; the reason names the rules and values.
    OUT_OF_SCOPE = "out_of_scope"


class SeriesState(enum.StrEnum):
    """States of a series (``series.state``)."""

    #: Instances are arriving; a new instance reopens a series in any state.
    RECEIVING = "receiving"
    #: Idle long enough, or its association released: to be routed.
    COMPLETE = "complete"
    #: No routing rule matched; purged after ``unmatched_retention_hours``.
    UNMATCHED = "unmatched"
    #: A study-level rule matched and the series fills a sequence role.
    ASSIGNED = "assigned"
    #: A study-level rule matched but the series fills no role.
    UNUSED = "unused"
    # The states of its job, mirrored (JobState).
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"
    CANCELLED = "cancelled"
    OUT_OF_SCOPE = "out_of_scope"
    #: Its instances were forgotten and their files removed (retention).
    PURGED = "purged"


class AssemblyState(enum.StrEnum):
    """States of a study collected for a study-level rule
    (``study_assemblies.state``; ``transitions.entity`` ``study``)."""

    #: Waiting for a series per required role.
    RECEIVING = "receiving"
    #: Every role has a complete series: its job is to be queued.
    COMPLETE = "complete"
    # The states of its job, mirrored (JobState).
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"
    CANCELLED = "cancelled"
    OUT_OF_SCOPE = "out_of_scope"


class DeliveryState(enum.StrEnum):
    """States of a delivery of one result to one destination (``deliveries.state``)."""

    #: Due at ``next_attempt_at``.
    PENDING = "pending"
    DELIVERED = "delivered"
    #: Retries used up, or a permanent failure (node.outcome).
    FAILED = "failed"


class AssociationOutcome(enum.StrEnum):
    """``associations.outcome``: accepted while open, then released or
    aborted; rejected (A-ASSOCIATE-RJ) associations are recorded too."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RELEASED = "released"
    ABORTED = "aborted"


S = TypeVar("S", bound=enum.StrEnum)


class StateColumn(TypeDecorator[S]):
    """A state stored as its string (VARCHAR(16), as before the enums) and
    read back as the enum member. Writing or querying a value outside the
    enum raises ValueError (``'x' is not a valid SeriesState``)."""

    impl = String(16)
    cache_ok = True

    def __init__(self, states: type[S]):
        super().__init__()
        self.states = states

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.states(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> S | None:
        return None if value is None else self.states(value)


class Base(DeclarativeBase):
    pass


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
    outcome: Mapped[AssociationOutcome | None] = mapped_column(StateColumn(AssociationOutcome))
    reason: Mapped[str | None] = mapped_column(Text)  # why it was rejected
    instances: Mapped[int] = mapped_column(Integer, default=0)


class Study(Base):
    __tablename__ = "studies"
    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    patient_name: Mapped[str | None] = mapped_column(String(64))  # shown only with [api] show_patient_names
    study_date: Mapped[str | None] = mapped_column(String(8))  # DA, YYYYMMDD as received
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
    state: Mapped[SeriesState] = mapped_column(StateColumn(SeriesState), default=SeriesState.RECEIVING, index=True)
    state_changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    role: Mapped[str | None] = mapped_column(String(16))  # sequence role for study-level rules
    role_reason: Mapped[str | None] = mapped_column(Text)


class StudyAssembly(Base):
    """A study being collected for a study-level rule (AssemblyState)."""

    __tablename__ = "study_assemblies"
    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    route: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[AssemblyState] = mapped_column(
        StateColumn(AssemblyState), default=AssemblyState.RECEIVING, index=True
    )
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
    state: Mapped[JobState] = mapped_column(StateColumn(JobState), default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    trigger_received_at: Mapped[dt.datetime | None] = mapped_column(DateTime)  # last instance of its input
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[str | None] = mapped_column(Text)  # JSON: stage -> seconds
    # Who runs it (node.queue): the claiming worker, its last heartbeat, and
    # with Celery the queue and when a message was last published for it.
    worker_id: Mapped[str | None] = mapped_column(String(128), index=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    queue: Mapped[str | None] = mapped_column(String(64))
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Worker(Base):
    """A Celery worker process (``ainode worker``) and what it can run: it
    announces itself at start and heartbeats while it lives."""

    __tablename__ = "workers"
    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    queues: Mapped[str] = mapped_column(Text)  # JSON list of queue names
    pipelines: Mapped[str] = mapped_column(Text)  # JSON: pipeline -> model version
    device: Mapped[str] = mapped_column(String(32))
    precision: Mapped[str] = mapped_column(String(8))
    input: Mapped[str] = mapped_column(String(16))
    metrics_url: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


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
    state: Mapped[DeliveryState] = mapped_column(StateColumn(DeliveryState), default=DeliveryState.PENDING, index=True)
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
    entity: Mapped[str] = mapped_column(String(16))  # series | study | job | delivery
    entity_id: Mapped[str] = mapped_column(String(64), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text)



def _add_missing_columns(c: Connection) -> None:
    """Add columns a newer node defines to tables an older one created
    (``create_all`` creates missing tables only), in the transaction of
    ``c``. New columns are nullable, so ``ALTER TABLE ... ADD COLUMN`` works
    on SQLite and PostgreSQL."""
    from sqlalchemy import inspect

    inspector = inspect(c)
    for table in Base.metadata.sorted_tables:
        have = {col["name"] for col in inspector.get_columns(table.name)}
        for col in table.columns:
            if col.name not in have and col.nullable:
                c.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {col.type.compile(c.dialect)}')
