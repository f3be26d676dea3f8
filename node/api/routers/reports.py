"""Read-only views (scope ``read``): studies, series, jobs and deliveries
with filters and paging, a study's timeline, a job's results and the
result files.

Lists take ``limit`` (1-500, default 50) and ``offset`` and answer
``{total, limit, offset, items}``, newest first. Times given (``since``,
``until``) are ISO 8601; one without an offset is UTC. Patient's Name is
left out unless ``[api] show_patient_names = true``: lists show Patient ID
and Study Date.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import structlog
from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from node.api.auth import Scope, requires
from node.api.deps import NodeDep
from node.api.models import (
    ERRORS,
    NOT_FOUND,
    DeliveryPage,
    JobPage,
    JobResults,
    ResultObject,
    SeriesPage,
    StudyOut,
    StudyPage,
    Timeline,
)
from node.findings import read_finding
from node.index import DeliveryState, JobState, SeriesState

log = structlog.get_logger("node.api")

router = APIRouter(prefix="/api", tags=["reports"], dependencies=[requires(Scope.READ)], responses=ERRORS)

Limit = Annotated[int, Query(ge=1, le=500, description="Rows per page.")]
Offset = Annotated[int, Query(ge=0, le=2**31, description="Rows to skip.")]


def _utc(t: dt.datetime | None) -> dt.datetime | None:
    """An API time -> the index's naive UTC."""
    if t is None or t.tzinfo is None:
        return t
    return t.astimezone(dt.UTC).replace(tzinfo=None)


@router.get("/studies", response_model=StudyPage)
def studies(
    node: NodeDep,
    state: Annotated[SeriesState | None, Query(description="One of its series is in this state.")] = None,
    since: Annotated[dt.datetime | None, Query(description="Last instance received at or after.")] = None,
    until: Annotated[dt.datetime | None, Query(description="Last instance received at or before.")] = None,
    patient_id: Annotated[str | None, Query(max_length=64)] = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> StudyPage:
    total, rows = node.index.study_list(
        state=state, since=_utc(since), until=_utc(until), patient_id=patient_id, modality=modality,
        limit=limit, offset=offset,
    )
    names = node.config.api.show_patient_names
    items = [
        StudyOut(
            study_uid=r.study.study_uid,
            patient_id=r.study.patient_id,
            patient_name=r.study.patient_name if names else None,
            study_date=r.study.study_date,
            accession_number=r.study.accession_number,
            first_received_at=r.study.first_received_at,
            last_received_at=r.study.last_received_at,
            series=r.series,
            instances=r.instances,
            modalities=r.modalities,
            series_states=r.series_states,
            job_states=r.job_states,
        )
        for r in rows
    ]
    return StudyPage(total=total, limit=limit, offset=offset, items=items)


@router.get("/series", response_model=SeriesPage)
def series(
    node: NodeDep,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    state: SeriesState | None = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> SeriesPage:
    total, rows = node.index.series_list(study_uid=study_uid, state=state, modality=modality, limit=limit, offset=offset)
    return SeriesPage.model_validate({"total": total, "limit": limit, "offset": offset, "items": rows})


@router.get("/jobs", response_model=JobPage)
def jobs(
    node: NodeDep,
    state: Annotated[JobState | None, Query(description="not_applicable and cancelled included.")] = None,
    pipeline: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[dt.datetime | None, Query(description="Created at or after.")] = None,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobPage:
    total, rows = node.index.job_list(
        state=state, pipeline=pipeline, since=_utc(since), study_uid=study_uid, limit=limit, offset=offset
    )
    return JobPage.model_validate({"total": total, "limit": limit, "offset": offset, "items": rows})


@router.get("/deliveries", response_model=DeliveryPage)
def deliveries(
    node: NodeDep,
    state: DeliveryState | None = None,
    destination: Annotated[str | None, Query(max_length=64)] = None,
    job_id: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> DeliveryPage:
    total, rows = node.index.delivery_list(state=state, destination=destination, job_id=job_id, limit=limit, offset=offset)
    return DeliveryPage.model_validate({"total": total, "limit": limit, "offset": offset, "items": rows})


@router.get("/studies/{study_uid}/timeline", response_model=Timeline, responses=NOT_FOUND)
def timeline(study_uid: str, node: NodeDep) -> Timeline:
    """Instance batches (per association or STOW-RS, per series: first and
    last arrival, count, calling AE), every state change (completion, the
    routing decision, jobs queued, started, finished; deliveries), the
    pipeline stages of each job (seconds) and every delivery attempt,
    oldest first."""
    events = node.index.study_timeline(study_uid)
    if events is None:
        raise HTTPException(404, f"no study {study_uid}")
    return Timeline.model_validate({"study_uid": study_uid, "events": events})


@router.get("/jobs/{job_id}/results", response_model=JobResults, responses=NOT_FOUND)
async def job_results(job_id: Annotated[int, PathParam(ge=0, le=2**62)], node: NodeDep) -> JobResults:
    """The job's result objects (links to the files) and the values of its
    SR, read from the outbox with highdicom."""
    job = node.index.job(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    rows = node.index.job_results(job_id)
    measurements: list = []
    evaluations: list = []
    for row in rows:
        if row.modality == "SR" and Path(row.path).is_file():
            try:
                finding = await run_in_threadpool(read_finding, Path(row.path))
            except Exception as exc:  # an SR another tool wrote, damaged on disk: links still help
                log.warning("result_sr_unreadable", path=row.path, error=f"{type(exc).__name__}: {exc}")
                continue
            measurements += [asdict(m) for m in finding.measurements]
            evaluations += [asdict(e) for e in finding.evaluations]
    objects = [
        ResultObject(
            sop_instance_uid=r.sop_instance_uid, sop_class_uid=r.sop_class_uid, modality=r.modality,
            series_uid=r.series_uid, created_at=r.created_at, file=f"/api/results/{r.sop_instance_uid}/file",
        )
        for r in rows
    ]
    return JobResults(job_id=job.id, pipeline=job.pipeline, state=job.state, objects=objects,
                      measurements=measurements, evaluations=evaluations)


@router.get(
    "/results/{sop_uid}/file",
    response_class=FileResponse,
    responses={**NOT_FOUND, 200: {"content": {"application/dicom": {}}, "description": "The DICOM file (PS3.10)"}},
)
def result_file(sop_uid: str, node: NodeDep) -> FileResponse:
    """A result object (SEG, SR) from the outbox, as a PS3.10 file."""
    row = node.index.result(sop_uid)
    path = Path(row.path) if row is not None else None
    outbox = node.spool.outbox_dir.resolve()
    if path is None or not path.is_file() or not path.resolve().is_relative_to(outbox):
        raise HTTPException(404, f"no result file for {sop_uid}")
    return FileResponse(path, media_type="application/dicom", filename=f"{sop_uid}.dcm")
