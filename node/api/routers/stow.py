"""STOW-RS into the node (PS3.18 10.5, Store Transaction), scope ``ingest``.

- ``POST /dicom-web/studies``: store the instances of the request;
- ``POST /dicom-web/studies/{StudyInstanceUID}``: the same, and an
  instance of another study is refused with Failure Reason 0xA900.

The body is ``multipart/related; type="application/dicom"``, each part one
DICOM file (PS3.10). It is parsed as it streams in (python-multipart's
``MultipartParser``), each part written to a temporary file in the spool
folder, so no request is held in memory whole; chunked transfer encoding (as
Orthanc sends) is read as any other. Once the body is in, each part takes
the path of a C-STORE instance (:meth:`node.ingest.Ingest.store`): the same
checks, refusals and quarantine, durable spool and index. A series received
this way completes after ``[completion] stow_idle_seconds`` of silence, not
at the end of the request.

Answers (PS3.18 Table 10.5.3-1; body ``application/dicom+json``, the Store
Instances Response Module: Referenced SOP Sequence (0008,1199), Failed SOP
Sequence (0008,1198) with a Failure Reason (0008,1197) per refused part):

- 200: every part stored (a duplicate counts: it is stored once);
- 202: some stored, some refused;
- 409: none stored, for faults in the data;
- 503 (with ``Retry-After``): none stored, every failure our own (0xA700:
  disk short of space, disk or index failing), so the sender retries; also
  before reading the body when the disk is short of space;
- 400: no boundary, a body that is not multipart, no part, or a Study
  Instance UID in the path that is no UID;
- 413: a body beyond ``[api] stow_max_request_mb``; nothing of that request
  is stored (parts are stored only once the whole body is in);
- 415: a media type other than ``multipart/related`` of
  ``application/dicom``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO

import structlog
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydicom import Dataset
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from node.api.auth import Scope, requires
from node.api.deps import NodeDep
from node.config import ApiToken
from node.ingest import Ingest, Outcome, Source, Status
from node.spool import Spool, is_safe_uid

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = structlog.get_logger("node.api.stow")

router = APIRouter(prefix="/dicom-web", tags=["stow-rs"])
#: The calling token, which must hold the ``ingest`` scope (401/403 otherwise).
IngestCaller = Annotated[ApiToken | None, requires(Scope.INGEST)]

DICOM = b"application/dicom"
DICOM_JSON = "application/dicom+json"
#: After the limit is passed, read (and drop) at most this much more before
#: answering 413, so that the client, still sending, reads the answer
#: instead of a connection reset.
DRAIN_BYTES = 64 * 2**20


@router.post("/studies")
async def store_instances(request: Request, node: NodeDep, caller: IngestCaller) -> Response:
    return await _store(request, node, caller, None)


@router.post("/studies/{study_uid}")
async def store_study_instances(study_uid: str, request: Request, node: NodeDep, caller: IngestCaller) -> Response:
    if not is_safe_uid(study_uid):
        return _answer(400, {"detail": f"{study_uid!r} is not a Study Instance UID (PS3.5 9.1)"})
    return await _store(request, node, caller, study_uid)


@dataclass
class _Part:
    path: Path
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0
    complete: bool = False


class _Parts:
    """python-multipart callbacks: each part's headers, and its body to a
    temporary file in the spool folder."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.parts: list[_Part] = []
        self._file: BinaryIO | None = None
        self._field = self._value = b""

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._add("_field", data[start:end]),
            "on_header_value": lambda data, start, end: self._add("_value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _add(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)

    def _begin(self) -> None:
        self.parts.append(_Part(self.spool.temporary_path()))

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        self._file = open(self.parts[-1].path, "wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._file is not None  # python-multipart calls on_headers_finished first
        self._file.write(data[start:end])
        self.parts[-1].size += end - start

    def _end(self) -> None:
        self.close()
        self.parts[-1].complete = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        for part in self.parts:
            part.path.unlink(missing_ok=True)


async def _store(request: Request, node, caller: ApiToken | None, study_uid: str | None) -> Response:
    """Read the body into parts, store each, answer with the response module."""
    media, params = parse_options_header(request.headers.get("content-type", ""))
    kind = params.get(b"type", DICOM).lower()
    if media != b"multipart/related" or kind != DICOM:
        return _answer(415, {"detail": 'expected Content-Type: multipart/related; type="application/dicom" (PS3.18 10.5.1)'})
    boundary = params.get(b"boundary")
    if not boundary:
        return _answer(400, {"detail": "multipart/related without a boundary (RFC 2046 5.1.1)"})
    limit = int(node.config.api.stow_max_request_mb * 2**20)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
        return _too_large(limit, closing=True)

    client = request.client
    peer = {
        "peer_address": client.host if client else None,
        "peer_port": client.port if client else None,
        "token_name": caller.name if caller else None,
        "stow_request_id": str(uuid.uuid4()),
        "request_study_uid": study_uid,
    }
    ingest: Ingest = node.ingest
    if not ingest.free_space.ok():  # before any part is written to the disk
        return _busy(f"too little free disk: {ingest.free_space.reason}", peer)
    parts = _Parts(ingest.spool)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                if received > limit + DRAIN_BYTES:
                    return _too_large(limit, closing=True)
                continue  # drained, not stored
            await run_in_threadpool(parser.write, chunk)
        if received > limit:
            return _too_large(limit, closing=False)
        await run_in_threadpool(parser.finalize)
        parts.close()
        if not parts.parts:
            return _answer(400, {"detail": "the multipart body holds no part"})
        outcomes = [await run_in_threadpool(_store_part, ingest, part, peer, study_uid) for part in parts.parts]
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    except MultipartParseError as exc:
        return _answer(400, {"detail": f"the multipart body cannot be parsed: {exc}"})
    except ClientDisconnect:
        log.warning("stow_client_disconnected", **peer)
        return Response(status_code=400)
    except OSError as exc:  # our disk, writing a part's temporary file
        return _busy(f"the spool folder cannot be written: {exc}", peer)
    finally:
        parts.remove()
    return _response(node, outcomes, peer | {"bytes": received, "chunked": chunked})


def _store_part(ingest: Ingest, part: _Part, peer: dict, study_uid: str | None) -> Outcome:
    """One part through the ingest step (read once; the temp file goes after)."""
    try:
        encoded = part.path.read_bytes()
    except OSError as exc:  # our disk: the client retries
        log.error("stow_part_unreadable", path=str(part.path), error=str(exc), **peer)
        return Outcome(Status.OUT_OF_RESOURCES, f"the part's temporary file cannot be read: {exc}")
    media, _ = parse_options_header(part.headers.get("content-type", "application/dicom"))
    if not part.complete:
        reason = "the request body ended inside this part (no closing boundary)"
        return ingest.refuse(encoded, Status.CANNOT_UNDERSTAND, reason, source=Source.STOW_RS, peer=peer)
    if media != DICOM:
        reason = f"part Content-Type {media.decode('latin-1')!r} is not application/dicom"
        return ingest.refuse(encoded, Status.CANNOT_UNDERSTAND, reason, source=Source.STOW_RS, peer=peer)
    return ingest.store(encoded, None, source=Source.STOW_RS, peer=peer, expected_study=study_uid)


def _response(node, outcomes: list[Outcome], peer: dict) -> Response:
    """The Store Instances Response Module (PS3.18 10.5.3) and its status."""
    stored = [o for o in outcomes if o.stored]
    failed = [o for o in outcomes if not o.stored]
    ds = Dataset()
    if stored:
        ds.ReferencedSOPSequence = [_item(o) for o in stored]
    if failed:
        ds.FailedSOPSequence = [_item(o, failure=True) for o in failed]
    headers = {}
    if not failed:
        status = 200
    elif stored:
        status = 202
    elif all(o.status == Status.OUT_OF_RESOURCES for o in failed):
        status, headers = 503, {"Retry-After": "30"}
    else:
        status = 409
    node.metrics.stow_requests.labels(status=str(status)).inc()
    (log.info if status == 200 else log.warning)(
        "stow_request", status=status, stored=len(stored), new=sum(o.new for o in stored), failed=len(failed),
        failure_reasons=sorted({o.status.code for o in failed}), **peer,
    )
    return JSONResponse(ds.to_json_dict(), status_code=status, media_type=DICOM_JSON, headers=headers)


def _item(outcome: Outcome, *, failure: bool = False) -> Dataset:
    """A Referenced (or Failed) SOP Sequence item: the UIDs as far as known
    (empty where the part did not tell them), and the Failure Reason."""
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid or ""
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid or ""
    if failure:
        item.FailureReason = int(outcome.status)
    return item


def _busy(reason: str, peer: dict) -> Response:
    """503 for our own fault before any part is stored: the client retries."""
    log.error("stow_request_refused", status=503, reason=reason, **peer)
    return _answer(503, {"detail": reason}, {"Retry-After": "30"})


def _too_large(limit: int, *, closing: bool) -> Response:
    log.warning("stow_request_too_large", limit_bytes=limit)
    headers = {"Connection": "close"} if closing else {}
    detail = f"the request body is beyond [api] stow_max_request_mb ({limit / 2**20:g} MiB); nothing was stored"
    return _answer(413, {"detail": detail}, headers)


def _answer(status: int, body: dict, headers: dict | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)
