"""``GET /health``: liveness for load balancers and systemd; needs no token."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from node.api.deps import NodeDep
from node.api.models import Checks

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Checks, responses={503: {"model": Checks, "description": "A check failed"}})
def health(node: NodeDep) -> JSONResponse:
    """200 with each check (``scp``, ``scheduler``, ``index``: true/false)
    when all pass, else 503 with the same body."""
    ok, checks = node.health()
    return JSONResponse(checks, status_code=200 if ok else 503)
