"""What an operator may do to a running node, with who, when and why.

Each function takes the node (:class:`node.service.Node`: its index, router,
retention, dispatcher), an :class:`Actor` and a reason, does one thing, and
writes exactly one audit row (``AuditEvent.operator_action``, details
``action``, ``target``, ``reason``, ``outcome`` and what it changed), also
when it refuses. The HTTP API (``POST /api/...``, scope ``operator``) and
the command line call them.

A refusal raises :class:`NotFound` (no such study, job, delivery,
destination or route: HTTP 404) or :class:`Conflict` (the target is in a
state that forbids it: HTTP 409), with the reason in words.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from node.index import JobState, SeriesState, utcnow
from node.index.audit import AuditEvent
from node.retention import Removed
from node.route import assign_roles, rule_matches
from node.spool import read_header

if TYPE_CHECKING:
    from node.api.deps import NodeLike as Node  # node.service.Node, as the API sees it

log = structlog.get_logger("node.actions")


@dataclass(frozen=True)
class Actor:
    """Who acts: ``name`` (an API token's name, or an OS user) and
    ``client`` (the HTTP client's address; None from the command line)."""

    name: str
    client: str | None = None


class ActionError(Exception):
    """An action refused; ``str()`` says why."""


class NotFound(ActionError, LookupError):
    """The study, job, delivery, destination or route does not exist."""


class Conflict(ActionError):
    """The target's state forbids the action now."""


def _reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ValueError("reason: say why (it is kept in the audit trail)")
    return reason


def _audit(node: Node, actor: Actor, action: str, target: str, reason: str, outcome: str,
           study_uid: str | None = None, **details: Any) -> None:
    node.index.audit(
        AuditEvent.OPERATOR_ACTION,
        actor=actor.name,
        client=actor.client,
        study_uid=study_uid,
        details={"action": action, "target": target, "reason": reason, "outcome": outcome, **details},
    )


def _run(node: Node, actor: Actor, action: str, target: str, reason: str, study_uid: str | None, do) -> dict:
    """Run ``do()`` (returns the details of what changed), audit its outcome
    either way, log it, and return the details or raise the refusal."""
    reason = _reason(reason)
    try:
        details = do()
    except ActionError as exc:
        _audit(node, actor, action, target, reason, "refused", study_uid, error=str(exc))
        log.warning("operator_action_refused", action=action, target=target, actor=actor.name, error=str(exc))
        raise
    _audit(node, actor, action, target, reason, "done", study_uid, **details)
    log.info("operator_action", action=action, target=target, actor=actor.name, reason=reason, **details)
    return details


# -- jobs ---------------------------------------------------------------------------


def rerun_study(node: Node, actor: Actor, study_uid: str, reason: str, route: str | None = None) -> dict:
    """Queue new jobs for a study through the router: each series-level rule
    (``route``: only that one) matching one of its series, and each
    study-level rule whose roles its series fill. Refused while a job of the
    study is queued or running, when its instances are purged, or when no
    rule matches. Returns ``{"jobs": [ids]}``."""
    def do() -> dict:
        study = node.index.study_info(study_uid)
        if study is None:
            raise NotFound(f"no study {study_uid}")
        rules = [r for r in node.config.routes if route is None or r.name == route]
        if not rules:
            raise NotFound(f"no route named {route!r}; the routes are {[r.name for r in node.config.routes]}")
        _, busy = node.index.job_list(study_uid=study_uid, state=JobState.QUEUED, limit=1)
        _, running = node.index.job_list(study_uid=study_uid, state=JobState.RUNNING, limit=1)
        if busy or running:
            raise Conflict("a job of this study is queued or running")
        jobs = _queue(node, study_uid, rules, f"rerun by {actor.name}: {reason.strip()}")
        if not jobs:
            raise Conflict("no routing rule matches the study's series (or its instances were purged)")
        node.runner.wake()
        return {"jobs": jobs}

    return _run(node, actor, "rerun_study", study_uid, reason, study_uid, do)


def _queue(node: Node, study_uid: str, rules, why: str) -> list[int]:
    jobs = []
    series = [s for s in node.index.study_series(study_uid) if s.state != SeriesState.PURGED]
    for info in series:
        paths = node.index.instance_paths(info.series_uid)
        if not paths:
            continue
        header = read_header(paths[0])
        for rule in (r for r in rules if r.level == "series" and rule_matches(r, header)):
            jobs.append(node.index.create_job(
                pipeline=rule.pipeline, route=rule.name, level="series", study_uid=study_uid,
                series_uid=info.series_uid, destinations=rule.destinations,
            ))
    for rule in (r for r in rules if r.level == "study"):
        by_role, _ = node.router.candidates(study_uid, rule)
        roles, _ = assign_roles([c for found in by_role.values() for c in found], rule.required_roles, node.config.sequences)
        if len(roles) == len(rule.required_roles):
            jobs.append(node.router.queue_study(study_uid, rule.name))
    log.info("rerun_queued", study_uid=study_uid, jobs=jobs, why=why)
    return jobs


def cancel_job(node: Node, actor: Actor, job_id: int, reason: str) -> dict:
    """``queued`` -> ``cancelled``; a job already claimed (running) or
    finished is refused. Returns ``{"job": id, "state": "cancelled"}``."""
    def do() -> dict:
        try:
            state = node.index.cancel_job(job_id, f"cancelled by {actor.name}: {reason.strip()}")
        except LookupError:
            raise NotFound(f"no job {job_id}") from None
        if state is not None:
            raise Conflict(f"job {job_id} is {state}; only a queued job can be cancelled")
        return {"job": job_id, "state": str(JobState.CANCELLED)}

    job = node.index.job(job_id)
    return _run(node, actor, "cancel_job", str(job_id), reason, job.study_uid if job else None, do)


# -- deliveries and destinations ---------------------------------------------------------


def resend_delivery(node: Node, actor: Actor, delivery_id: int, reason: str) -> dict:
    """Put a delivery (in any state) back to ``pending``, due now, attempts
    from 0 (:meth:`node.index.Index.resend_deliveries`). Returns
    ``{"delivery": id, "state": "pending"}``."""
    def do() -> dict:
        requeued, _ = node.index.resend_deliveries([delivery_id], by=actor.name, reason=reason.strip())
        if not requeued:
            raise NotFound(f"no delivery {delivery_id}")
        node.dispatcher.wake()
        return {"delivery": delivery_id, "state": "pending"}

    d = node.index.delivery(delivery_id)
    job = node.index.job(d.job_id) if d else None
    return _run(node, actor, "resend_delivery", str(delivery_id), reason, job.study_uid if job else None, do)


def _set_paused(node: Node, actor: Actor, name: str, reason: str, paused: bool) -> dict:
    def do() -> dict:
        if name not in node.config.destinations:
            raise NotFound(f"no destination {name!r}; configured: {list(node.config.destinations)}")
        changed = node.index.set_destination_paused(name, paused, by=actor.name, reason=reason.strip())
        if not paused:
            node.dispatcher.wake()
        return {"destination": name, "paused": paused, "changed": changed}

    return _run(node, actor, "pause_destination" if paused else "resume_destination", name, reason, None, do)


def pause_destination(node: Node, actor: Actor, name: str, reason: str) -> dict:
    """Stop sending to ``name`` (persisted in the index: a restart keeps it
    paused); its deliveries stay pending. Pausing a paused one changes
    nothing (``changed`` False). Returns ``{"destination", "paused", "changed"}``."""
    return _set_paused(node, actor, name, reason, True)


def resume_destination(node: Node, actor: Actor, name: str, reason: str) -> dict:
    """Send to ``name`` again; what is due goes at once."""
    return _set_paused(node, actor, name, reason, False)


# -- spool --------------------------------------------------------------------------------


def purge_study(node: Node, actor: Actor, study_uid: str, reason: str, *, now: dt.datetime | None = None) -> dict:
    """Forget a study's instances and delete their spool files now, as
    retention would (:meth:`node.retention.Retention.purge_study`); refused
    while work on it is not over (queued or running jobs, pending
    deliveries, series arriving or not yet routed, an open study assembly).
    Its results in the outbox stay. Returns ``{"files", "bytes"}`` removed."""
    def do() -> dict:
        if node.index.study_info(study_uid) is None:
            raise NotFound(f"no study {study_uid}")
        busy = node.index.study_busy(study_uid)
        if busy:
            raise Conflict(f"the study has {busy}")
        removed = Removed()
        if not node.retention.purge_study(study_uid, now or utcnow(), f"purged by {actor.name}: {reason.strip()}", removed):
            raise Conflict("the study received instances or got work meanwhile")
        return {"files": removed.files, "bytes": removed.bytes}

    return _run(node, actor, "purge_study", study_uid, reason, study_uid, do)
