"""The engine, the sessions and the transitions record every query uses."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Collection
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.index.schema import (
    AssemblyState,
    Base,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
    StudyAssembly,
    Transition,
    _add_missing_columns,
    utcnow,
)

R = TypeVar("R", bound=Base)

#: The tables whose rows have a state (``transitions.entity``).
Stateful = Series | StudyAssembly | Job | Delivery


def _entity(obj: Stateful) -> tuple[str, str, type[StrEnum]]:
    """``transitions.entity``, ``transitions.entity_id`` and the states of ``obj``."""
    if isinstance(obj, Series):
        return "series", obj.series_uid, SeriesState
    if isinstance(obj, StudyAssembly):
        return "study", f"{obj.study_uid}/{obj.route}", AssemblyState
    if isinstance(obj, Job):
        return "job", str(obj.id), JobState
    if isinstance(obj, Delivery):
        return "delivery", str(obj.id), DeliveryState
    raise TypeError(f"{type(obj).__name__} has no state")


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



#: pg_advisory_xact_lock key of the schema step ("ainode" in ASCII).
SCHEMA_LOCK_KEY = 0x61696E6F6465


class IndexCore:
    """The engine and sessions of the index; the query mixins build on it."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._create_schema()
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite allows one writer; serialising here avoids busy waits.
        self._write_lock = threading.RLock() if url.startswith("sqlite") else _NullLock()

    def _create_schema(self) -> None:
        """Create missing tables and columns. On PostgreSQL under an advisory
        lock held for the transaction: a node and its workers starting at
        once would otherwise race to create the same table."""
        with self.engine.begin() as c:
            if c.dialect.name == "postgresql":
                c.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")
            Base.metadata.create_all(c)
            _add_missing_columns(c)

    def close(self) -> None:
        """Close the engine's pooled connections."""
        self.engine.dispose()

    def _set_state(
        self,
        s: Session,
        obj: Stateful,
        new: str,
        reason: str | None = None,
        *,
        expect: str | Collection[str] | None = None,
        created: bool = False,
        always: bool = False,
        at: dt.datetime | None = None,
    ) -> bool:
        """Move ``obj`` (a Series, StudyAssembly, Job or Delivery of session
        ``s``) to state ``new`` and add its ``transitions`` row, both in
        ``s``'s transaction: the one place a state changes.

        ``expect``: a state, or several, ``obj`` must be in, else nothing
        changes and the result is False. Moving to the state it is in changes
        nothing (no row) and is True, unless ``always`` (an operator's
        re-queue). ``created``: ``obj`` was just added, so its row starts
        from no state. ``at``: when (naive UTC; default now),
        also ``state_changed_at`` where the table has one.

        Raises ValueError if ``new`` is not one of the entity's states
        (SeriesState, AssemblyState, JobState, DeliveryState).
        """
        entity, entity_id, states = _entity(obj)
        new = states(new)
        old = None if created else obj.state
        if expect is not None and old not in ((expect,) if isinstance(expect, str) else tuple(expect)):
            return False
        if old == new and not (created or always):
            return True
        at = at or utcnow()
        s.add(Transition(entity=entity, entity_id=entity_id, from_state=old, to_state=new, at=at, reason=reason))
        obj.state = new  # type: ignore[assignment]  # each entity's own enum, checked above
        if isinstance(obj, Series | StudyAssembly):
            obj.state_changed_at = at
        return True

    @staticmethod
    def _row(s: Session, model: type[R], key: Any) -> R:
        """The row of ``model`` with primary key ``key``; LookupError if none."""
        row = s.get(model, key)
        if row is None:
            raise LookupError(f"no {model.__tablename__} row {key!r}")
        return row

    # -- reporting -----------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per state of ``series``, ``jobs``, ``deliveries`` and
        ``study_assemblies`` (state value -> count; states with no row are
        absent), and the totals of ``instances`` and ``studies``."""
        out: dict[str, dict[str, int]] = {}
        with self._session() as s:
            for name, model in (("series", Series), ("jobs", Job), ("deliveries", Delivery)):
                rows = s.execute(select(model.state, func.count()).group_by(model.state))
                out[name] = {str(state): n for state, n in rows}
            rows = s.execute(select(StudyAssembly.state, func.count()).group_by(StudyAssembly.state))
            out["study_assemblies"] = {str(state): n for state, n in rows}
            out["instances"] = {"total": s.scalar(select(func.count()).select_from(Instance)) or 0}
            out["studies"] = {"total": s.scalar(select(func.count()).select_from(Study)) or 0}
        return out

    def transitions(self, entity: str, entity_id: Any) -> list[Transition]:
        """The state changes of one row, oldest first: ``entity`` ``series``
        (Series Instance UID), ``study`` (``<Study Instance UID>/<route>``),
        ``job`` or ``delivery`` (id)."""
        with self._session() as s:
            return list(
                s.scalars(
                    select(Transition)
                    .where(Transition.entity == entity, Transition.entity_id == str(entity_id))
                    .order_by(Transition.id)
                )
            )

    def ping(self) -> bool:
        """True when the database answers; raises sqlalchemy.exc.OperationalError when it cannot be reached."""
        with self._session() as s:
            return s.scalar(select(1)) == 1


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

