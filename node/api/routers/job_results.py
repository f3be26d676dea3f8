"""``POST /api/jobs/{job_id}/results/studies``: a Celery worker's results
for one job, by STOW-RS (PS3.18 10.5; :class:`node.worker.io.StowSink`),
scope ``ingest``.

The body is a STOW-RS request (``multipart/related;
type="application/dicom"``), one part per result object (SEG, SR). The
node writes them to its outbox and marks the job ``done`` with one
delivery per result and destination, in one transaction, exactly as for a
job it ran itself (:class:`node.run.OutboxSink`); dispatch then delivers
them. Headers: ``X-Ainode-Worker`` (required: the claim is checked),
``X-Ainode-Timings`` (JSON object, stage -> seconds) and ``X-Ainode-Note``
(JSON string or null: intended-use warnings for the ``done`` transition).

Answers:

- 200: the Store Instances Response Module (PS3.18 10.5.3), every part
  referenced;
- 400: not multipart, no part, a part that is not DICOM, bad headers;
- 404: no such job;
- 409: the job is no longer that worker's (its heartbeat went stale and
  the node queued it again, or it ended): the results are dropped;
- 413: beyond ``[api] stow_max_request_mb``;
- 503: the outbox or index could not be written; the worker retries.
"""

from __future__ import annotations

import json
from typing import Annotated

import pydicom
import structlog
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from node.api.auth import Scope, requires
from node.api.deps import NodeDep
from node.api.models import CONFLICT, ERRORS, NOT_FOUND, Error
from node.api.routers.stow import DICOM, DICOM_JSON, _Parts
from node.config import ApiToken
from node.index import ClaimLost, JobState
from node.index.views import _job_view
from node.run import OutboxSink

router = APIRouter(prefix="/api", tags=["workers"], responses=ERRORS | NOT_FOUND | CONFLICT | {
    400: {"model": Error, "description": "Not a STOW-RS body of DICOM parts, or bad X-Ainode-* headers"},
    413: {"model": Error, "description": "Beyond [api] stow_max_request_mb"},
    503: {"model": Error, "description": "The outbox cannot be written; retry"},
})
IngestCaller = Annotated[ApiToken | None, requires(Scope.INGEST)]
log = structlog.get_logger("node.api.job_results")


@router.post("/jobs/{job_id}/results/studies")
async def store_job_results(job_id: int, request: Request, node: NodeDep, caller: IngestCaller) -> Response:
    worker_id = request.headers.get("x-ainode-worker", "")
    try:
        timings = json.loads(request.headers.get("x-ainode-timings") or "{}")
        note = json.loads(request.headers.get("x-ainode-note") or "null")
    except ValueError:
        return _answer(400, "X-Ainode-Timings and X-Ainode-Note must be JSON")
    if not worker_id or not isinstance(timings, dict) or not (note is None or isinstance(note, str)):
        return _answer(400, "X-Ainode-Worker is required; X-Ainode-Timings is a JSON object, X-Ainode-Note a string")
    job = await run_in_threadpool(node.index.job, job_id)
    if job is None:
        return _answer(404, f"no job {job_id}")
    if job.state != JobState.RUNNING or job.worker_id != worker_id:
        return _answer(409, f"job {job_id} is {job.state} under {job.worker_id or 'no worker'}, not {worker_id}'s")
    datasets = await _read(request, node)
    if isinstance(datasets, Response):
        return datasets
    sink = OutboxSink(node.config, node.spool, node.queue)  # as for a job the node ran itself
    try:
        stored = await run_in_threadpool(sink.deliver, _job_view(job), datasets, timings, note, worker_id)
    except ClaimLost as exc:
        return _answer(409, str(exc))
    except OSError as exc:
        log.error("job_results_unwritable", job_id=job_id, error=str(exc))
        return _answer(503, f"the outbox cannot be written: {exc}")
    node.dispatcher.wake()
    log.info("job_results_stored", job_id=job_id, worker_id=worker_id, results=len(datasets), deliveries=stored,
             token_name=caller.name if caller else None)
    ds = Dataset()
    ds.ReferencedSOPSequence = [_item(d) for d in datasets]
    return JSONResponse(ds.to_json_dict(), media_type=DICOM_JSON)


async def _read(request: Request, node) -> list[Dataset] | Response:
    """The request's parts as datasets, or the error answer."""
    media, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if media != b"multipart/related" or params.get(b"type", DICOM).lower() != DICOM or not boundary:
        return _answer(400, 'expected Content-Type: multipart/related; type="application/dicom"; boundary=...')
    limit = int(node.config.api.stow_max_request_mb * 2**20)
    parts = _Parts(node.spool)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                return _answer(413, "beyond [api] stow_max_request_mb")
            await run_in_threadpool(parser.write, chunk)
        await run_in_threadpool(parser.finalize)
        parts.close()
        if not parts.parts or not all(p.complete for p in parts.parts):
            return _answer(400, "no complete part")
        return [pydicom.dcmread(p.path) for p in parts.parts]
    except (MultipartParseError, InvalidDicomError) as exc:
        return _answer(400, f"the body cannot be read: {exc}")
    finally:
        parts.remove()


def _item(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _answer(status: int, detail: str) -> Response:
    if status >= 400:
        log.warning("job_results_refused", status=status, detail=detail)
    return JSONResponse({"detail": detail}, status_code=status)
