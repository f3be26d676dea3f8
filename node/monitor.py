"""What the node reports of its destinations and of itself: the periodic
check of each destination, and readiness.

Destinations are not part of readiness (an unreachable PACS must not take
the node out of a load balancer: it still receives, and dispatch retries).
Each destination is reported as

- ``paused``: an operator paused it (``POST /api/destinations/{name}/pause``);
- ``degraded``: its last check failed, or its last delivery attempt did;
- ``ok``: otherwise (also before its first check).

The check is each kind's :meth:`~node.destinations.base.DestinationKind.echo`
(C-ECHO, PS3.7 9.1.5, for ``dicom``; an HTTP request for ``dicomweb``; a
test write for ``folder``), run by the node's apscheduler every ``[api]
destination_check_seconds``, all destinations at once so that one slow peer
does not delay the others.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from node.index import utcnow
from node.queue import CeleryQueue

if TYPE_CHECKING:
    from node.api.deps import NodeLike as Node  # node.service.Node, as the API sees it
    from node.config import NodeConfig
    from node.index import Index


class DestinationHealth(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    PAUSED = "paused"


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``at`` (naive UTC), ``ok``, the peer's status
    (``0x0000``, ``200``), ``detail`` in words, ``seconds`` it took."""

    at: dt.datetime
    ok: bool
    status: str | None
    detail: str | None
    seconds: float


class DestinationMonitor:
    """The last check of each destination, and their report for ``/status``."""

    def __init__(self, config: NodeConfig, index: Index):
        self.config = config
        self.index = index
        self.checks: dict[str, Check] = {}
        self.log = structlog.get_logger("node.monitor")

    def _check(self, name: str) -> Check:
        from node.dispatch import sender_for

        t, at = time.perf_counter(), utcnow()
        try:
            outcome = sender_for(self.config, name).echo()
            ok, status, detail = outcome.ok, outcome.status, outcome.text
        except Exception as exc:  # a kind's bug must not stop the checks of the others
            ok, status, detail = False, None, f"{type(exc).__name__}: {exc}"
        return Check(at, ok, status, detail, round(time.perf_counter() - t, 3))

    def check_all(self) -> dict[str, Check]:
        """Check every destination now (in parallel); returns and keeps the outcomes."""
        from node.destinations.registry import registry

        # Result destinations only: a webhook's check is a signed ping its
        # receiver may post somewhere, not to be sent every minute.
        names = [n for n, d in self.config.destinations.items() if registry().kind(d.kind).carries_results]
        if not names:
            return {}
        with ThreadPoolExecutor(max_workers=min(8, len(names)), thread_name_prefix="destination-check") as pool:
            results = dict(zip(names, pool.map(self._check, names), strict=True))
        for name, check in results.items():
            before = self.checks.get(name)
            if before is None or before.ok != check.ok:
                log = self.log.info if check.ok else self.log.warning
                log("destination_check", destination=name, ok=check.ok, status=check.status, detail=check.detail)
        self.checks.update(results)
        return results

    def report(self) -> list[dict[str, Any]]:
        """Per destination: name, kind, target, state (:class:`DestinationHealth`),
        why, its last check, its last delivery attempt, pending deliveries."""
        from node.dispatch import sender_for

        paused = self.index.paused_destinations()
        attempts = self.index.last_attempts()
        pending = self.index.pending_deliveries()
        out = []
        for name, dest in self.config.destinations.items():
            check, attempt = self.checks.get(name), attempts.get(name)
            why = []
            if check is not None and not check.ok:
                why.append(f"last check failed: {check.detail}")
            if attempt is not None and not attempt.ok:
                why.append(f"last delivery attempt failed: {attempt.error}")
            state = DestinationHealth.DEGRADED if why else DestinationHealth.OK
            if name in paused:
                state = DestinationHealth.PAUSED
                why.insert(0, f"paused by {paused[name].changed_by}: {paused[name].reason}")
            try:
                target = sender_for(self.config, name).target
            except Exception as exc:
                target = f"(unavailable: {exc})"
            out.append({
                "name": name,
                "kind": dest.kind,
                "target": target,
                "state": state,
                "reason": "; ".join(why) or None,
                "last_check": check,
                "last_attempt": attempt,
                "pending": pending.get(name, 0),
            })
        return out


def readiness(node: Node) -> dict[str, dict[str, Any]]:
    """Each readiness check of ``node`` -> ``{"ok": bool, "detail": str}``:
    ``index`` answers, ``spool`` is writable, ``disk`` is above ``[storage]
    min_free_mb``/``min_free_percent``, ``workers`` (job threads),
    ``dispatchers`` (one thread per destination); with ``[worker] backend
    = "celery"`` ``workers`` says whether a live worker consumes each routed
    queue (``queues`` lists them), ``scheduler`` runs, ``scp``
    listens."""
    checks: dict[str, dict[str, Any]] = {}

    def put(name: str, ok: bool, detail: str) -> None:
        checks[name] = {"ok": bool(ok), "detail": detail}

    try:
        put("index", node.index.ping(), "the index answers")
    except Exception as exc:
        put("index", False, f"the index does not answer: {type(exc).__name__}: {exc}")
    try:
        with tempfile.NamedTemporaryFile(dir=node.spool.spool_dir, prefix=".ready-", suffix=".tmp"):
            pass
        put("spool", True, f"{node.spool.spool_dir} is writable")
    except OSError as exc:
        put("spool", False, f"{node.spool.spool_dir} cannot be written: {exc}")
    free = node.ingest.free_space
    ok = free.ok()
    put("disk", ok, "enough free space" if ok else f"too little free disk: {free.reason}")
    if isinstance(node.queue, CeleryQueue):  # workers are other processes: is every routed queue served?
        unserved = node.queue.unserved()
        put("workers", not unserved and node.queue.alive(),
            f"no live worker consumes {', '.join(unserved)}; their jobs stay queued" if unserved
            else "every routed queue has a live worker" if node.queue.alive() else "the publisher thread is not running")
        put("queues", True, f"routed: {', '.join(sorted(node.queue.needed_queues())) or 'none'}")
    else:
        alive, expected = node.runner.alive()
        put("workers", alive == expected, f"{alive} of {expected} threads alive")
    alive, expected = node.dispatcher.alive()
    put("dispatchers", alive == expected, f"{alive} of {expected} threads alive")
    put("scheduler", node.scheduler.running, "running" if node.scheduler.running else "not running")
    listening = node.receiver._server is not None
    put("scp", listening, "listening" if listening else "not listening")
    return checks
