"""``GET /status`` (scope ``read``): counts of series, jobs and deliveries by
state, and the latest jobs and deliveries (:func:`node.service.status_report`);
times are ISO 8601."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from node.api.auth import Scope, requires
from node.api.deps import NodeDep

router = APIRouter(tags=["status"], dependencies=[requires(Scope.READ)])


@router.get("/status")
def status(node: NodeDep) -> JSONResponse:
    return JSONResponse(jsonable_encoder(node.status()))
