"""The audit trail: who did what, when, as rows of ``audit_events``.

Each :class:`AuditEvent` is one row (``at`` naive UTC, ``event``, ``actor``,
``client``, ``study_uid``, ``details`` as JSON text) and one structlog line
``audit`` with the same fields; an Index may also hand each event to sinks
(:meth:`AuditQueries.add_audit_sink`; :mod:`node.audit` forwards them as
syslog).

Who writes what:

- associations accepted or rejected (PS3.8 7.1.1): ``association_opened``,
  in its transaction; actor the Calling AE Title, client the peer address;
- instances stored (``record_instance``, in its transaction: one INSERT
  more on the ingest hot path) or quarantined (:mod:`node.ingest`);
- jobs queued, started, finished, and deliveries delivered or failed: from
  their ``transitions`` rows, in the same flush (:meth:`_audit_transitions`),
  so every path that changes a state (the router, the runner, recovery,
  an operator's retry) is audited without a call of its own;
- operator actions (node/actions.py) and the configuration loaded
  (:func:`node.audit.audit_config_loaded`) call :meth:`AuditQueries.audit`.

The table is append-only, and the database enforces it: triggers refuse
UPDATE and DELETE (and TRUNCATE on PostgreSQL) with "audit_events is
append-only". They are created with the table and, for a database created
before them, at start-up (:func:`ensure_append_only`). A database owner can
still drop the triggers; the syslog copy is what a separate repository
keeps. Retention never deletes audit rows: how long the trail is kept is the
database administrator's decision.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import structlog
from sqlalchemy import DDL, DateTime, Integer, String, Text, event, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from node.index.core import IndexCore
from node.index.schema import UID, Base, Delivery, Job, Transition, utcnow
from node.index.views import InstanceRecord


class AuditEvent(StrEnum):
    """What an ``audit_events`` row records (``audit_events.event``)."""

    ASSOCIATION_ACCEPTED = "association_accepted"
    #: A-ASSOCIATE-RJ (PS3.8 9.3.4); ``details.reason`` says why.
    ASSOCIATION_REJECTED = "association_rejected"
    INSTANCE_STORED = "instance_stored"
    #: Refused (0xA900, 0xC210) and kept in ``quarantine/``.
    INSTANCE_QUARANTINED = "instance_quarantined"
    JOB_QUEUED = "job_queued"
    JOB_STARTED = "job_started"
    #: done, failed, not_applicable (``details.state``).
    JOB_FINISHED = "job_finished"
    DELIVERY_DELIVERED = "delivery_delivered"
    #: Retries used up, or a permanent failure.
    DELIVERY_FAILED = "delivery_failed"
    #: ``details``: action, target, reason; actor the token's name.
    OPERATOR_ACTION = "operator_action"
    #: ``details``: the file and its SHA-256, the effective configuration's SHA-256.
    CONFIG_LOADED = "config_loaded"


class AuditRecord(Base):
    """One audit event (append-only: see the module docstring)."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(32), index=True)
    actor: Mapped[str | None] = mapped_column(String(64))  # AE title, token name
    client: Mapped[str | None] = mapped_column(String(64))  # peer address
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    details: Mapped[str | None] = mapped_column(Text)  # JSON object

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready values; ``at`` ISO 8601 UTC with ``Z``."""
        return {
            "id": self.id,
            "at": self.at.isoformat(timespec="microseconds") + "Z",
            "event": self.event,
            "actor": self.actor,
            "client": self.client,
            "study_uid": self.study_uid,
            "details": json.loads(self.details) if self.details else {},
        }


# -- append-only, enforced by the database ----------------------------------------------

_MESSAGE = "audit_events is append-only"
_SQLITE = [
    f"CREATE TRIGGER IF NOT EXISTS audit_events_no_{op.lower()} BEFORE {op} ON audit_events "
    f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END"
    for op in ("UPDATE", "DELETE")
]
_PG_FUNCTION = (
    "CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    f"$body$ BEGIN RAISE EXCEPTION '{_MESSAGE}'; END $body$"
)
_PG_TRIGGERS = {
    "audit_events_no_change": "CREATE TRIGGER audit_events_no_change BEFORE UPDATE OR DELETE ON audit_events "
    "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()",
    "audit_events_no_truncate": "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()",
}

for _sql in _SQLITE:
    event.listen(AuditRecord.__table__, "after_create", DDL(_sql).execute_if(dialect="sqlite"))
for _sql in (_PG_FUNCTION, *_PG_TRIGGERS.values()):
    event.listen(AuditRecord.__table__, "after_create", DDL(_sql).execute_if(dialect="postgresql"))


def ensure_append_only(engine: Engine) -> None:
    """Create the append-only triggers where they are missing (a database
    made before them; ``create_all`` makes them with a new table).
    Idempotent. Other dialects get none (documented, not enforced)."""
    with engine.begin() as c:
        if c.dialect.name == "sqlite":
            for sql in _SQLITE:
                c.exec_driver_sql(sql)
        elif c.dialect.name == "postgresql":
            have = set(
                c.scalars(text("SELECT tgname FROM pg_trigger WHERE tgrelid = 'audit_events'::regclass"))
            )
            missing = [sql for name, sql in _PG_TRIGGERS.items() if name not in have]
            if missing:
                c.exec_driver_sql(_PG_FUNCTION)
                for sql in missing:
                    c.exec_driver_sql(sql)


# -- writing and reading ------------------------------------------------------------------

#: Receives each event as :meth:`AuditRecord.as_dict` gives it (no ``id``); must not block.
AuditSink = Callable[[dict[str, Any]], None]
_DETAIL_TEXT = 500  # characters of an error or reason kept in ``details``
_INSERT = insert(AuditRecord)  # with parameters at execute: compiled once


def instance_audit(rec: InstanceRecord) -> dict[str, Any]:
    """``audit`` keywords of an instance stored: actor the Calling AE Title,
    client the peer address (both None for an instance re-indexed at start-up)."""
    details = {
        "sop_instance_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid, "series_uid": rec.series_uid,
        "source": rec.source, "association_id": rec.association_id,
    }
    return {"actor": rec.calling_ae, "client": rec.peer_address, "study_uid": rec.study_uid, "details": details}


def audit_quietly(index: Any, event: AuditEvent, **fields: Any) -> None:
    """``index.audit(event, **fields)``, a failure logged (``audit_failed``)
    rather than raised: for paths that must answer anyway (a refusal)."""
    try:
        index.audit(event, **fields)
    except Exception as exc:  # the index is down: the log line of the caller stands
        structlog.get_logger("node.audit").error("audit_failed", audit_event=str(event), error=repr(exc))


class AuditQueries(IndexCore):
    """``audit`` and ``audit_events``; job and delivery events from their transitions."""

    def __init__(self, url: str):
        super().__init__(url)
        ensure_append_only(self.engine)
        self._audit_sinks: list[AuditSink] = []
        self._audit_log = structlog.get_logger("node.audit")
        event.listen(self._session, "before_flush", self._audit_transitions)

    def add_audit_sink(self, sink: AuditSink) -> None:
        """Hand every later event to ``sink`` too (after its row is written)."""
        self._audit_sinks.append(sink)

    def close(self) -> None:
        """Close the sinks that have a ``close`` (flushing them), then the engine."""
        for sink in self._audit_sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()
        self._audit_sinks.clear()
        super().close()

    def audit(
        self,
        event: AuditEvent,
        *,
        actor: str | None = None,
        client: str | None = None,
        study_uid: str | None = None,
        details: dict | None = None,
        session: Session | Connection | None = None,
    ) -> None:
        """Write one audit row and its ``audit`` log line.

        ``session``: a Session or Connection whose transaction the row joins
        (it commits or rolls back with it; the log line is written at once).
        Without, the row is committed on its own. ``actor`` and ``client``
        are clipped to 64 characters. Raises ValueError for an event that is
        not an AuditEvent, sqlalchemy.exc.OperationalError when the database
        cannot be written.
        """
        values = {
            "at": utcnow(),
            "event": AuditEvent(event).value,
            "actor": None if actor is None else str(actor)[:64],
            "client": None if client is None else str(client)[:64],
            "study_uid": study_uid,
            "details": json.dumps(details or {}, default=str, sort_keys=True),
        }
        # One prepared INSERT with parameters: ``.values()`` would build (and
        # cache-key) a new statement each call, 8x slower on the ingest path.
        if session is not None:
            session.execute(_INSERT, values)
            self._emit(values, details or {})
            return
        with self._write_lock, self._session.begin() as s:
            s.execute(_INSERT, values)
            self._emit(values, details or {})  # under the lock: sinks see SQLite's row order

    def _emit(self, values: dict[str, Any], details: dict) -> None:
        record = {**values, "at": values["at"].isoformat(timespec="microseconds") + "Z", "details": details}
        self._audit_log.info("audit", **{("audit_event" if k == "event" else k): v for k, v in record.items()})
        for sink in self._audit_sinks:
            try:
                sink(record)
            except Exception as exc:  # a sink never stops the node; the row stands
                self._audit_log.error("audit_sink_failed", sink=repr(sink), error=repr(exc))

    def audit_events(
        self,
        since: dt.datetime | None = None,
        study_uid: str | None = None,
        event: AuditEvent | str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[AuditRecord]:
        """Audit rows, newest first (detached), optionally only those at or
        after ``since`` (naive UTC, or aware: converted), of ``study_uid``,
        of ``event``; at most ``limit`` after skipping ``offset``. Raises
        ValueError for an event that is not an AuditEvent, a ``limit`` below
        1 or an ``offset`` below 0."""
        if limit < 1 or offset < 0:
            raise ValueError(f"limit must be >= 1 and offset >= 0, got limit={limit}, offset={offset}")
        q = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit).offset(offset)
        if since is not None:
            if since.tzinfo is not None:
                since = since.astimezone(dt.UTC).replace(tzinfo=None)
            q = q.where(AuditRecord.at >= since)
        if study_uid is not None:
            q = q.where(AuditRecord.study_uid == study_uid)
        if event is not None:
            q = q.where(AuditRecord.event == AuditEvent(event).value)
        with self._session() as s:
            return list(s.scalars(q))

    # -- job and delivery events, from their transitions ------------------------------

    def _audit_transitions(self, session: Session, _context: Any, _instances: Any) -> None:
        """Before a flush: an audit row for each new ``transitions`` row of a
        job (queued, started, finished) or a delivery (delivered, failed),
        added to the same flush, so it commits with the state change."""
        for obj in list(session.new):
            if not isinstance(obj, Transition) or obj.entity not in ("job", "delivery"):
                continue
            with session.no_autoflush:
                found = self._transition_event(session, obj)
            if found is None:
                continue
            kind, study_uid, details = found
            row = AuditRecord(
                at=obj.at or utcnow(), event=kind.value, study_uid=study_uid,
                details=json.dumps(details, default=str, sort_keys=True),
            )
            session.add(row)
            values = {"at": row.at, "event": row.event, "actor": None, "client": None, "study_uid": study_uid}
            self._emit(values, details)

    @staticmethod
    def _transition_event(session: Session, t: Transition) -> tuple[AuditEvent, str | None, dict] | None:
        reason = (t.reason or "")[:_DETAIL_TEXT] or None
        if t.entity == "job":
            job = session.get(Job, int(t.entity_id))
            if job is None:
                return None
            kind = {"queued": AuditEvent.JOB_QUEUED, "running": AuditEvent.JOB_STARTED}.get(
                str(t.to_state), AuditEvent.JOB_FINISHED
            )
            details = {
                "job_id": job.id, "pipeline": job.pipeline, "route": job.route, "series_uid": job.series_uid,
                "from_state": t.from_state, "state": str(t.to_state), "attempts": job.attempts, "reason": reason,
            }
            return kind, job.study_uid, details
        kinds = {"delivered": AuditEvent.DELIVERY_DELIVERED, "failed": AuditEvent.DELIVERY_FAILED}
        delivery_kind = kinds.get(str(t.to_state))
        if delivery_kind is None:
            return None
        delivery = session.get(Delivery, int(t.entity_id))
        if delivery is None:
            return None
        job = session.get(Job, delivery.job_id)
        details = {
            "delivery_id": delivery.id, "job_id": delivery.job_id, "destination": delivery.destination,
            "sop_instance_uid": delivery.sop_instance_uid, "attempts": delivery.attempts,
            "error": (delivery.last_error or "")[:_DETAIL_TEXT] or None,
        }
        return delivery_kind, None if job is None else job.study_uid, details


__all__ = ["AuditEvent", "AuditQueries", "AuditRecord", "AuditSink", "audit_quietly", "ensure_append_only", "instance_audit"]
