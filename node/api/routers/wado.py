"""WADO-RS out of the node (PS3.18 10.4, Retrieve Transaction), scope ``read``:
what the spool holds, byte for byte, for workers and other DICOMweb clients.

- ``GET /dicom-web/studies/{Study}[/series/{Series}[/instances/{SOP}]]``:
  the instances, ``multipart/related; type="application/dicom"``, each part
  the stored DICOM file (PS3.10) as received, its ``Content-Type`` naming the
  stored ``transfer-syntax``; streamed from the files in chunks, so a large
  series is never held in memory;
- ``GET .../metadata`` at the same three levels: ``application/dicom+json``
  (PS3.18 F.2), an array of one dataset per instance; Pixel Data and binary
  values over :data:`INLINE_MAX_BYTES` are left out, smaller ones are
  InlineBinary.

The node never transcodes (PS3.18 8.7.3.5): each ``Accept`` media range of
``multipart/related; type="application/dicom"`` names a ``transfer-syntax``,
``*`` (the stored one, whatever it is) or none, which means Explicit VR
Little Endian (PS3.18 8.7.3.5.2). The stored bytes are served when every
instance's stored syntax is one the request accepts; otherwise 406.

Answers: 200; 400 for a path UID that is no UID; 404 for a study, series or
instance the spool does not hold (the series must be of that study); 406 as
above; 503 (``Retry-After``) when some, not all, indexed files are missing,
rather than a partial series; 401/403 for the token (:mod:`node.api.auth`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

import pydicom
import structlog
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from python_multipart.multipart import parse_options_header

from node.api.auth import Scope, requires
from node.api.deps import NodeDep
from node.config import ApiToken
from node.index.wado import StoredInstance
from node.spool import is_safe_uid

log = structlog.get_logger("node.api.wado")

router = APIRouter(prefix="/dicom-web", tags=["wado-rs"])
#: The calling token, which must hold the ``read`` scope (401/403 otherwise).
ReadCaller = Annotated[ApiToken | None, requires(Scope.READ)]

DICOM_JSON = "application/dicom+json"
CHUNK_BYTES = 1 << 20  # read and sent 1 MiB at a time
#: Metadata: binary values (OB, OW, OD, OF, OL, OV, UN) up to this many
#: bytes are InlineBinary; longer ones are left out.
INLINE_MAX_BYTES = 1024
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_ANY = "*"


# -- instances (multipart/related) -------------------------------------------------


@router.get("/studies/{study_uid}")
async def retrieve_study(study_uid: str, request: Request, node: NodeDep, caller: ReadCaller) -> Response:
    return await _retrieve(request, node, caller, study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}")
async def retrieve_series(study_uid: str, series_uid: str, request: Request, node: NodeDep, caller: ReadCaller) -> Response:
    return await _retrieve(request, node, caller, study_uid, series_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}")
async def retrieve_instance(
    study_uid: str, series_uid: str, sop_uid: str, request: Request, node: NodeDep, caller: ReadCaller
) -> Response:
    return await _retrieve(request, node, caller, study_uid, series_uid, sop_uid)


# -- metadata (application/dicom+json) ---------------------------------------------


@router.get("/studies/{study_uid}/metadata")
async def study_metadata(study_uid: str, node: NodeDep, caller: ReadCaller) -> Response:
    return await _metadata(node, caller, study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/metadata")
async def series_metadata(study_uid: str, series_uid: str, node: NodeDep, caller: ReadCaller) -> Response:
    return await _metadata(node, caller, study_uid, series_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata")
async def instance_metadata(study_uid: str, series_uid: str, sop_uid: str, node: NodeDep, caller: ReadCaller) -> Response:
    return await _metadata(node, caller, study_uid, series_uid, sop_uid)


# -- the work ----------------------------------------------------------------------


def accepted_syntaxes(accept: str | None) -> set[str] | None:
    """The transfer syntax UIDs an ``Accept`` header takes for DICOM
    instances (``"*"`` for any), or None where no media range of it is
    ``multipart/related`` of ``application/dicom`` (nor ``*/*``).

    A range without ``transfer-syntax`` means Explicit VR Little Endian
    (PS3.18 8.7.3.5.2); no header at all is taken as such a range.
    Quality values are not weighed: the node has one representation."""
    if not accept or not accept.strip():
        return {ExplicitVRLittleEndian}
    found: set[str] | None = None
    for media_range in accept.split(","):
        media, params = parse_options_header(media_range.strip())
        kind = params.get(b"type", b"application/dicom").lower()
        if media not in (b"multipart/related", b"multipart/*", b"*/*") or kind not in (b"application/dicom", b"*/*"):
            continue
        syntax = params.get(b"transfer-syntax", ExplicitVRLittleEndian.encode()).decode("latin-1").strip()
        found = (found or set()) | {syntax}
    return found


async def _retrieve(request: Request, node, caller: ApiToken | None, *uids: str) -> Response:
    """The stored files of the instances under ``uids`` as one multipart body."""
    instances, refusal = await run_in_threadpool(_held, node, *uids)
    if refusal is not None:
        return refusal
    accept = request.headers.get("accept")
    wanted = accepted_syntaxes(accept)
    peer = {"client": request.client.host if request.client else None, "token_name": caller.name if caller else None}
    if wanted is None:
        return _refuse(406, f'Accept {accept!r} names no multipart/related; type="application/dicom" (PS3.18 10.4.1)',
                       uids, peer)
    if _ANY not in wanted:
        stored = sorted({i.transfer_syntax_uid for i in instances} - wanted)
        if stored:
            detail = (f"stored in transfer syntax {', '.join(stored)}, not in {', '.join(sorted(wanted))}; "
                      'the node does not transcode: ask for transfer-syntax=* (PS3.18 8.7.3.5)')
            return _refuse(406, detail, uids, peer)
    boundary = uuid.uuid4().hex
    log.info("wado_retrieve", uids=list(uids), instances=len(instances), bytes=sum(i.size for i in instances),
             accept=accept, **peer)
    return StreamingResponse(
        _multipart(instances, boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def _held(node, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None):
    """(instances, None) where the spool holds files under those UIDs, else
    ([], the 400 or 404 answer)."""
    uids = [u for u in (study_uid, series_uid, sop_uid) if u is not None]
    for uid in uids:
        if not is_safe_uid(uid):
            return [], JSONResponse({"detail": f"{uid!r} is not a UID (PS3.5 9.1)"}, status_code=400)
    indexed = node.index.stored_instances(study_uid, series_uid, sop_uid)
    instances = [i for i in indexed if i.path.is_file()]
    if instances and len(instances) < len(indexed):  # never a partial series: a worker would run on it
        missing = len(indexed) - len(instances)
        return [], JSONResponse({"detail": f"{missing} of {len(indexed)} indexed instances are missing from the spool"},
                                status_code=503, headers={"Retry-After": "30"})
    if not instances:
        level = "instance" if sop_uid else "series" if series_uid else "study"
        return [], JSONResponse({"detail": f"no such {level} in the node's spool: {'/'.join(uids)}"}, status_code=404)
    return instances, None


def _multipart(instances: list[StoredInstance], boundary: str) -> Iterator[bytes]:
    """The body (RFC 2387): each stored file, read in :data:`CHUNK_BYTES`
    chunks. Starlette iterates it in a worker thread. A file that goes
    between the listing and its turn (retention) ends the body short: the
    client sees no closing boundary, never a wrong instance."""
    delimiter = b"--" + boundary.encode()
    for inst in instances:
        head = f"\r\nContent-Type: application/dicom; transfer-syntax={inst.transfer_syntax_uid}\r\n\r\n"
        yield delimiter + head.encode()
        try:
            with open(inst.path, "rb") as fh:
                while chunk := fh.read(CHUNK_BYTES):
                    yield chunk
        except OSError as exc:
            log.error("wado_file_unreadable", path=str(inst.path), error=str(exc))
            return
        yield b"\r\n"
    yield delimiter + b"--\r\n"


async def _metadata(node, caller: ApiToken | None, *uids: str) -> Response:
    instances, refusal = await run_in_threadpool(_held, node, *uids)
    if refusal is not None:
        return refusal
    body = await run_in_threadpool(lambda: [instance_json(i) for i in instances])
    log.info("wado_metadata", uids=list(uids), instances=len(instances), token_name=caller.name if caller else None)
    return JSONResponse(body, media_type=DICOM_JSON)


def instance_json(inst: StoredInstance) -> dict:
    """The DICOM JSON model (PS3.18 F.2) of a stored instance's dataset (no
    file meta), without Pixel Data and binary values over
    :data:`INLINE_MAX_BYTES` (at any depth of sequences).

    Raises OSError where the file cannot be read (our disk)."""
    ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
    _drop_bulk(ds)
    return ds.to_json_dict(bulk_data_threshold=INLINE_MAX_BYTES, suppress_invalid_tags=True)


def _drop_bulk(ds: Dataset) -> None:
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                _drop_bulk(item)
        elif elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > INLINE_MAX_BYTES:
            del ds[elem.tag]


def _refuse(status: int, detail: str, uids: tuple[str, ...], peer: dict) -> Response:
    log.warning("wado_refused", status=status, reason=detail, uids=list(uids), **peer)
    return JSONResponse({"detail": detail}, status_code=status)
