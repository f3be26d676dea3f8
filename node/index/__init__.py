"""Index: the SQL record of every instance, series, study, job and delivery.

SQLite in WAL mode by default; any SQLAlchemy PostgreSQL URL works too.
Every state change of a series, study, job or delivery is also written as a
row of ``transitions`` in the same transaction, so the history of a study can
be audited (docs/architecture.md, "State, and why nothing is lost"). The
states are the StrEnums of :mod:`node.index.schema` (SeriesState,
AssemblyState, JobState, DeliveryState); ``IndexCore._set_state`` is the one
place they change.

The package: ``schema`` (tables, state enums, column migration), ``views``
(detached values), ``core`` (engine, sessions, transitions, reporting), and
the queries by topic, mixed into :class:`Index`: ``ingest`` (associations,
instances, series), ``studies`` (study assemblies, retention), ``jobs``,
``deliveries``.

SQLite runs with ``synchronous=NORMAL``: a power cut may lose the last
committed rows but never corrupts the file, and :meth:`Index.missing_paths`
lets the node re-index spool files whose rows were lost.
"""

from __future__ import annotations

from node.index.audit import AuditEvent, AuditQueries, AuditRecord
from node.index.core import IndexCore, make_engine
from node.index.dashboard import DashboardQueries
from node.index.deliveries import DeliveryQueries
from node.index.drift import DriftQueries
from node.index.ingest import IngestQueries
from node.index.jobs import ClaimLost, JobQueries
from node.index.operations import OperationQueries
from node.index.queue import QueueQueries, WorkerInfo
from node.index.replay import ReplayQueries
from node.index.reports import ReportQueries
from node.index.schema import (
    UID,
    AssemblyState,
    Association,
    AssociationOutcome,
    Base,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    SeriesState,
    StateColumn,
    Study,
    StudyAssembly,
    Transition,
    Worker,
    utcnow,
)
from node.index.studies import StudyQueries
from node.index.views import DeliveryView, InstanceRecord, JobView
from node.index.wado import StoredInstance, WadoQueries


class Index(
    ReplayQueries, DashboardQueries, ReportQueries, OperationQueries, IngestQueries, StudyQueries, QueueQueries,
    JobQueries, DeliveryQueries,
    AuditQueries, WadoQueries, DriftQueries, IndexCore,
):
    """All reads and writes of the node's SQL state, one transaction a call."""


__all__ = [
    "ClaimLost",
    "Worker",
    "WorkerInfo",
    "AuditEvent",
    "AuditRecord",
    "UID",
    "AssemblyState",
    "Association",
    "AssociationOutcome",
    "Base",
    "Delivery",
    "DeliveryAttempt",
    "DeliveryState",
    "DeliveryView",
    "Index",
    "IndexCore",
    "Instance",
    "InstanceRecord",
    "Job",
    "JobState",
    "JobView",
    "Result",
    "Series",
    "SeriesState",
    "StateColumn",
    "StoredInstance",
    "Study",
    "StudyAssembly",
    "Transition",
    "make_engine",
    "utcnow",
]
