"""Operator actions (scope ``operator``), each with a body
``{"reason": "..."}`` and recorded in the audit trail with the token's name,
the client's address, when, what and why (:mod:`node.actions`).

- ``POST /api/studies/{uid}/rerun`` (``{"reason", "route"?}``): new jobs
  through the router;
- ``POST /api/studies/{uid}/purge``: forget the study's instances and delete
  its spool files (409 while work on it is not over, as retention);
- ``POST /api/jobs/{id}/cancel``: ``queued`` -> ``cancelled``;
- ``POST /api/deliveries/{id}/resend``: back to ``pending``, due now;
- ``POST /api/destinations/{name}/pause`` and ``/resume``.

Answers: 200 ``{action, target, details}``; 404 no such target; 409 its
state forbids it; 422 no reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool

from node import actions
from node.api.auth import Scope, requires
from node.api.deps import NodeDep
from node.api.models import CONFLICT, ERRORS, NOT_FOUND, ActionDone, ActionRequest, RerunRequest
from node.config import ApiToken

router = APIRouter(prefix="/api", tags=["actions"], responses=ERRORS | NOT_FOUND | CONFLICT)

Operator = Annotated[ApiToken | None, requires(Scope.OPERATOR)]
Id = Annotated[int, Path(ge=0, le=2**62)]


async def _act(request: Request, caller: ApiToken | None, name: str, target: str, call: Callable[[actions.Actor], dict]) -> ActionDone:
    client = request.client
    actor = actions.Actor(caller.name if caller else "anonymous", client.host if client else None)
    try:
        details = await run_in_threadpool(call, actor)
    except actions.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except actions.Conflict as exc:
        raise HTTPException(409, str(exc)) from None
    return ActionDone(action=name, target=target, details=details)


@router.post("/studies/{study_uid}/rerun", response_model=ActionDone)
async def rerun(study_uid: str, body: RerunRequest, request: Request, node: NodeDep, caller: Operator) -> ActionDone:
    return await _act(request, caller, "rerun_study", study_uid,
                      lambda a: actions.rerun_study(node, a, study_uid, body.reason, body.route))


@router.post("/studies/{study_uid}/purge", response_model=ActionDone)
async def purge(study_uid: str, body: ActionRequest, request: Request, node: NodeDep, caller: Operator) -> ActionDone:
    return await _act(request, caller, "purge_study", study_uid,
                      lambda a: actions.purge_study(node, a, study_uid, body.reason))


@router.post("/jobs/{job_id}/cancel", response_model=ActionDone)
async def cancel(job_id: Id, body: ActionRequest, request: Request, node: NodeDep, caller: Operator) -> ActionDone:
    return await _act(request, caller, "cancel_job", str(job_id), lambda a: actions.cancel_job(node, a, job_id, body.reason))


@router.post("/deliveries/{delivery_id}/resend", response_model=ActionDone)
async def resend(delivery_id: Id, body: ActionRequest, request: Request, node: NodeDep, caller: Operator) -> ActionDone:
    return await _act(request, caller, "resend_delivery", str(delivery_id),
                      lambda a: actions.resend_delivery(node, a, delivery_id, body.reason))


@router.post("/destinations/{name}/pause", response_model=ActionDone)
async def pause(name: str, body: ActionRequest, request: Request, node: NodeDep, caller: Operator) -> ActionDone:
    return await _act(request, caller, "pause_destination", name,
                      lambda a: actions.pause_destination(node, a, name, body.reason))


@router.post("/destinations/{name}/resume", response_model=ActionDone)
async def resume(name: str, body: ActionRequest, request: Request, node: NodeDep, caller: Operator) -> ActionDone:
    return await _act(request, caller, "resume_destination", name,
                      lambda a: actions.resume_destination(node, a, name, body.reason))
