"""Pydantic models of the API's JSON answers and action requests: the
OpenAPI document (``/openapi.json``) is built from them, and every answer is
validated against them. Times are UTC (ISO 8601, without an offset: the
index's clock, given here with its offset, ``Z``, as RFC 3339 date-time requires)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, field_validator

from node.index import DeliveryState, JobState, SeriesState
from node.monitor import DestinationHealth


def _aware(t: dt.datetime) -> dt.datetime:
    """The index's naive UTC -> UTC with its offset (RFC 3339 5.6 needs one)."""
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t


#: A time in UTC; the index's naive values get their offset.
Time = Annotated[dt.datetime, AfterValidator(_aware)]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Error(BaseModel):
    """A refusal: 401, 403, 404 or 409, with the reason in words."""

    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "No token, or an unknown one (RFC 6750 3)"},
    403: {"model": Error, "description": "The token lacks the scope"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Error, "description": "No such object"}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": Error, "description": "Its state forbids the action now"}}


class Checks(RootModel[dict[str, bool]]):
    """``/health``: check name -> passed."""


class ReadyCheck(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, ReadyCheck]


# -- lists ------------------------------------------------------------------------


class Page(BaseModel):
    total: int = Field(description="Rows matching the filters, all pages together.")
    limit: int
    offset: int


class StudyOut(BaseModel):
    study_uid: str
    patient_id: str | None
    patient_name: str | None = Field(None, description="Only with [api] show_patient_names = true.")
    study_date: str | None = Field(description="Study Date (0008,0020), YYYYMMDD as received.")
    accession_number: str | None
    first_received_at: Time
    last_received_at: Time
    series: int
    instances: int
    modalities: list[str]
    series_states: dict[str, int]
    job_states: dict[str, int]


class StudyPage(Page):
    items: list[StudyOut]


class SeriesOut(_Out):
    series_uid: str
    study_uid: str
    modality: str | None
    series_description: str | None
    sop_class_uid: str | None
    instance_count: int
    state: SeriesState
    role: str | None
    first_received_at: Time
    last_received_at: Time


class SeriesPage(Page):
    items: list[SeriesOut]


class JobOut(_Out):
    id: int
    pipeline: str
    route: str
    level: str
    study_uid: str
    series_uid: str | None
    destinations: str = Field(description="Comma-separated destination names.")
    state: JobState
    attempts: int
    created_at: Time
    started_at: Time | None
    finished_at: Time | None
    error: str | None


class JobPage(Page):
    items: list[JobOut]


class DeliveryOut(_Out):
    id: int
    job_id: int
    sop_instance_uid: str
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: Time
    created_at: Time
    delivered_at: Time | None
    last_error: str | None


class DeliveryPage(Page):
    items: list[DeliveryOut]


# -- timeline and results --------------------------------------------------------------


class TimelineEventOut(_Out):
    at: Time
    event: str = Field(description="instances_received, series_state, study_state, job_state, job_stages, "
                       "delivery_state or delivery_attempt")
    data: dict[str, Any]

    @field_validator("data")
    @classmethod
    def _times(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {k: _aware(x) if isinstance(x, dt.datetime) else x for k, x in v.items()}


class Timeline(BaseModel):
    study_uid: str
    events: list[TimelineEventOut]


class ResultObject(BaseModel):
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    series_uid: str
    created_at: Time
    file: str = Field(description="Path of GET /api/results/{sop_uid}/file (the DICOM file, scope read).")


class Measurement(BaseModel):
    group: str | None = Field(description="The measurement group's Tracking Identifier (TID 1410/1411/1501).")
    name: str = Field(description="Concept Name code meaning, e.g. Probability, Volume.")
    value: float
    unit: str | None = Field(description="UCUM code, e.g. ml, {probability}.")


class Evaluation(BaseModel):
    group: str | None
    name: str
    value: str


class JobResults(BaseModel):
    job_id: int
    pipeline: str
    state: JobState
    objects: list[ResultObject]
    measurements: list[Measurement] = Field(description="Read from the job's SR in the outbox.")
    evaluations: list[Evaluation]


# -- status -------------------------------------------------------------------------------


class CheckOut(_Out):
    at: Time
    ok: bool
    status: str | None
    detail: str | None
    seconds: float


class AttemptOut(_Out):
    at: Time
    ok: bool
    status: str | None
    error: str | None


class DestinationOut(BaseModel):
    name: str
    kind: str
    target: str
    state: DestinationHealth
    reason: str | None
    last_check: CheckOut | None = Field(description="The last periodic check (C-ECHO for DICOM).")
    last_attempt: AttemptOut | None
    pending: int


class JobSummary(BaseModel):
    id: int
    pipeline: str
    state: JobState
    study_uid: str
    series_uid: str | None
    attempts: int
    created_at: Time
    finished_at: Time | None
    error: str | None


class DeliverySummary(BaseModel):
    id: int
    job_id: int
    destination: str
    sop_instance_uid: str
    state: DeliveryState
    attempts: int
    delivered_at: Time | None
    last_error: str | None


class WorkerOut(BaseModel):
    """A live Celery worker (``[worker] backend = "celery"``) as it announced itself."""

    worker_id: str
    hostname: str
    queues: list[str]
    pipelines: dict[str, str] = Field(description="pipeline -> model version loaded")
    device: str
    precision: str
    input: str
    metrics_url: str | None = None
    heartbeat_at: dt.datetime | None = None


class Status(BaseModel):
    counts: dict[str, dict[str, int]]
    jobs: list[JobSummary]
    deliveries: list[DeliverySummary]
    destinations: list[DestinationOut] = []
    workers: list[WorkerOut] = Field(default=[], description="Live Celery workers; empty in embedded mode.")
    unserved_queues: list[str] = Field(default=[], description="Routed Celery queues no live worker consumes.")


# -- actions ---------------------------------------------------------------------------------


class ActionRequest(BaseModel):
    """The body of every action: why (kept in the audit trail)."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=1000, pattern=r"\S")


class RerunRequest(ActionRequest):
    route: str | None = Field(None, description="Only this [[routes]] rule; default: every rule that matches.")


class ActionDone(BaseModel):
    action: str
    target: str
    details: dict[str, Any]
