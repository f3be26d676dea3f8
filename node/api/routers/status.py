"""``GET /status`` (scope ``read``): counts of series, jobs and deliveries by
state, the latest jobs and deliveries (:func:`node.service.status_report`),
and each destination: ``ok``, ``degraded`` (its last check or its last
delivery attempt failed) or ``paused``, with its last check
(:mod:`node.monitor`); times are ISO 8601, UTC."""

from __future__ import annotations

from fastapi import APIRouter

from node.api.auth import Scope, requires
from node.api.deps import NodeDep
from node.api.models import ERRORS, Status

router = APIRouter(tags=["status"], dependencies=[requires(Scope.READ)], responses=ERRORS)


@router.get("/status", response_model=Status)
def status(node: NodeDep) -> Status:
    return Status.model_validate(node.status())
