"""The dashboard: ``GET /`` (scope ``read``), server-rendered (Jinja2).

- ``GET /``: the page; ``GET /dashboard/live``: its live part, which the
  page's script fetches every 5 s; ``GET /previews/{job_id}.png``: a job's
  SEG drawn on its source (:mod:`node.previews`).
- ``GET|POST /login``, ``POST /logout``: a token from ``[[api.tokens]]``
  exchanged for a session cookie (:mod:`node.api.session`).
- ``POST /dashboard/...``: operator actions (re-send a delivery, pause or
  resume a destination, re-run a failed job's study), each through
  :mod:`node.actions` (one audit row each), each needing the ``operator``
  scope, the session's CSRF token and a same-origin ``Origin``; answered
  303 back to ``/`` with what happened.

Who may look: a session cookie, or ``Authorization: Bearer`` with ``read``;
on loopback with no token configured, anyone (read only: actions still need
an operator token). Otherwise ``/`` redirects to ``/login``, and the other
GETs answer 401.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlencode

import structlog
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from node.api import charts
from node.api.routers.drift import drift_report
from node.api.session import OPEN_VIEWER, Sessions, Viewer
from node.config import Scope
from node.findings import FindingCache
from node.index import utcnow
from node.previews import PreviewError, Previews

if TYPE_CHECKING:
    from node.service import Node

log = structlog.get_logger("node.api.dashboard")

router = APIRouter(tags=["dashboard"], include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parent.parent / "templates")
POLL_SECONDS = 5


class _State:
    """Per-app dashboard state: sessions, SR findings and previews caches."""

    def __init__(self, node: Node):
        api = node.config.api
        self.sessions = Sessions(secure=api.tls is not None, max_age_seconds=api.dashboard_session_hours * 3600)
        self.findings = FindingCache()
        self.previews = Previews(node.index.spool_paths_of)


def _state(request: Request) -> _State:
    app = request.app
    if not hasattr(app.state, "dashboard"):
        app.state.dashboard = _State(app.state.node)
    return app.state.dashboard


def _viewer(request: Request) -> Viewer | None:
    """The session, a bearer token with ``read``, the open read, or None."""
    viewer = _state(request).sessions.read(request)
    if viewer is not None:
        return viewer
    auth = request.app.state.auth
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        token = auth.identify(header[7:].strip())
        return Viewer(token.name, frozenset(token.scopes)) if token else None
    return OPEN_VIEWER if auth.open_reads else None


def _reader(request: Request) -> Viewer | None:
    viewer = _viewer(request)
    return viewer if viewer is not None and Scope.READ in viewer.scopes else None


# -- pages ---------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def page(request: Request, msg: str | None = None, error: str | None = None) -> Response:
    viewer = _reader(request)
    if viewer is None:
        return RedirectResponse("/login", status_code=303)
    return templates.TemplateResponse(
        request, "dashboard.html", _context(request, viewer) | {"msg": msg, "error": error, "poll": POLL_SECONDS}
    )


@router.get("/dashboard/live", response_class=HTMLResponse)
def live(request: Request) -> Response:
    viewer = _reader(request)
    if viewer is None:
        return Response("session ended", status_code=401)
    return templates.TemplateResponse(request, "live.html", _context(request, viewer))


@router.get("/previews/{job_id}.png")
def preview(request: Request, job_id: int) -> Response:
    if _reader(request) is None:
        return Response("log in at /login", status_code=401)
    node: Node = request.app.state.node
    job = node.index.dashboard_job(job_id)
    seg = next((r for r in job.results if r.modality == "SEG"), None) if job else None
    if seg is None:
        return Response(f"job {job_id} has no SEG", status_code=404, media_type="text/plain")
    try:
        png = _state(request).previews.png(seg.sop_instance_uid, seg.path)
    except PreviewError as exc:
        log.warning("preview_failed", job_id=job_id, error=str(exc))
        return Response(str(exc), status_code=404, media_type="text/plain")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def _context(request: Request, viewer: Viewer) -> dict:
    node: Node = request.app.state.node
    index, now = node.index, utcnow()
    day = now - dt.timedelta(hours=24)
    studies = index.recent_studies()
    findings = {}
    for study in studies:
        for job in study.jobs[:1]:
            sr = next((r for r in job.results if r.modality == "SR"), None)
            if sr is not None:
                findings[job.id] = _state(request).findings.get(sr.sop_instance_uid, sr.path)
    samples = index.latency_samples(day)
    seconds = [s.seconds for s in samples]
    paused = index.paused_destinations() if hasattr(index, "paused_destinations") else {}
    return {
        "viewer": viewer,
        "node_name": node.config.node.ae_title,
        "now": now,
        "counts": index.live_counts(now),
        "studies": studies,
        "findings": findings,
        "timeline": charts.timeline_svg,
        "destinations": index.destination_health(list(node.config.destinations)),
        "paused": paused,
        "failed_jobs": index.failed_jobs(),
        "failed_deliveries": index.failed_deliveries(),
        "throughput": charts.throughput_svg(index.finished_jobs_since(day), now),
        "latency": charts.latency_svg(samples, now),
        "latency_n": len(seconds),
        "median": charts.percentile(seconds, 50),
        "p95": charts.percentile(seconds, 95),
        "ohif_url": (node.config.api.ohif_url or "").rstrip("/") or None,
        "csrf": viewer.csrf,
        "login_possible": bool(request.app.state.auth.tokens),
        "drift": drift_report(node),
    }


# -- login -------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, error: str | None = None) -> Response:
    return templates.TemplateResponse(
        request, "login.html", {"error": error, "tokens": bool(request.app.state.auth.tokens)}
    )


@router.post("/login")
def login(request: Request, token: Annotated[str, Form()] = "") -> Response:
    state, client = _state(request), request.client
    found = request.app.state.auth.identify(token.strip()) if token.strip() else None
    reason = None
    if not state.sessions.same_origin(request):
        reason = "the request's Origin is not this dashboard"
    elif found is None:
        reason = "unknown token"
    elif Scope.READ not in found.scopes:
        reason = f"token {found.name!r} lacks scope read"
    if reason is not None or found is None:
        log.warning("dashboard_login_refused", client=client.host if client else None, reason=reason,
                    token_name=found.name if found else None)
        return templates.TemplateResponse(request, "login.html", {"error": reason, "tokens": True}, status_code=403)
    response = RedirectResponse("/", status_code=303)
    viewer = state.sessions.issue(response, found)
    log.info("dashboard_login", client=client.host if client else None, token_name=viewer.name,
             scopes=sorted(viewer.scopes))
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    _state(request).sessions.clear(response)
    return response


# -- actions -----------------------------------------------------------------------------


def _act(request: Request, csrf: str, do) -> Response:
    """Check the session (operator), CSRF and Origin, run ``do(node, actor)``
    (a :mod:`node.actions` call returning a message), redirect to ``/``."""
    from node.actions import ActionError, Actor

    state = _state(request)
    viewer = state.sessions.read(request)
    if viewer is None or not viewer.operator:
        why = "log in with a token that has the operator scope" if viewer is None else (
            f"token {viewer.name!r} lacks scope operator")
        return Response(why, status_code=403 if viewer else 401, media_type="text/plain")
    refused = state.sessions.check_form(request, viewer, csrf)
    if refused is not None:
        log.warning("dashboard_form_refused", reason=refused, token_name=viewer.name)
        return Response(refused, status_code=403, media_type="text/plain")
    client = request.client
    try:
        query = {"msg": do(request.app.state.node, Actor(viewer.name or "", client.host if client else None))}
    except (ActionError, ValueError) as exc:
        query = {"error": str(exc)}
    return RedirectResponse("/?" + urlencode(query), status_code=303)


Csrf = Annotated[str, Form()]
Reason = Annotated[str, Form()]


@router.post("/dashboard/deliveries/{delivery_id}/resend")
def resend(request: Request, delivery_id: int, csrf: Csrf = "", reason: Reason = "") -> Response:
    from node.actions import resend_delivery

    def do(node, actor) -> str:
        resend_delivery(node, actor, delivery_id, reason)
        return f"delivery {delivery_id} queued to be sent again"

    return _act(request, csrf, do)


@router.post("/dashboard/destinations/{name}/{action}")
def pause_or_resume(request: Request, name: str, action: str, csrf: Csrf = "", reason: Reason = "") -> Response:
    from node.actions import pause_destination, resume_destination

    if action not in ("pause", "resume"):
        return Response(f"no action {action!r}", status_code=404)

    def do(node, actor) -> str:
        (pause_destination if action == "pause" else resume_destination)(node, actor, name, reason)
        return f"destination {name} {'paused' if action == 'pause' else 'resumed'}"

    return _act(request, csrf, do)


@router.post("/dashboard/jobs/{job_id}/retry")
def retry(request: Request, job_id: int, csrf: Csrf = "", reason: Reason = "") -> Response:
    from node.actions import NotFound, rerun_study

    def do(node, actor) -> str:
        job = node.index.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        queued = rerun_study(node, actor, job.study_uid, reason, route=job.route)
        return f"study of job {job_id} queued again: jobs {queued.get('jobs')}"

    return _act(request, csrf, do)
