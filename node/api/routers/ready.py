"""``GET /ready``: readiness, needs no token (load balancers, orchestrators).

200 when the node can take and process work: the index answers, the spool
is writable, the disk is above ``[storage] min_free_mb`` and
``min_free_percent``, and the job workers, dispatch threads, scheduler and
SCP are alive; else 503 naming each check with ``ok`` and ``detail``.
Destinations are not part of it (see ``/status``): an unreachable PACS must
not stop the node receiving, and dispatch retries.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from node.api.deps import NodeDep
from node.api.models import Readiness
from node.monitor import readiness

router = APIRouter(tags=["health"])


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
async def ready(node: NodeDep) -> JSONResponse:
    checks = await run_in_threadpool(readiness, node)
    ok = all(c["ok"] for c in checks.values())
    body = Readiness.model_validate({"ready": ok, "checks": checks})
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)
