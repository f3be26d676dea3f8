"""Dispatch: deliver results from the outbox to each destination, with retries.

Each destination has its own queue (rows of ``deliveries``) and its own
thread, so one unreachable PACS never holds back another (the Orthanc Lua
routing pitfall). A failed attempt is retried with exponential backoff
(``[retry]``, or the destination's own ``retry``); every attempt's outcome is
a row of ``delivery_attempts``. When the attempts are used up the delivery is
``failed`` with its last error: never silently dropped. A permanent failure
(:mod:`node.outcome`: e.g. C-STORE 0xA900 or 0x0122, A-ASSOCIATE-RJ
rejected-permanent, HTTP 400, EACCES) fails the delivery at its first
attempt; ``ainode deliveries resend`` queues it again once the cause is fixed.

Each destination's sender comes from its kind (:mod:`node.destinations`:
``dicom`` C-STORE SCU, ``dicomweb`` STOW-RS, ``folder``, and plug-ins);
dispatch knows none of them.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from pathlib import Path

import structlog

from node.config import NodeConfig, RetryPolicy
from node.destinations import DestinationContext, DestinationKind
from node.destinations.registry import registry as destination_registry
from node.index import DeliveryState, DeliveryView, Index, utcnow
from node.metrics import Metrics, since
from node.notify import Notifier
from node.outcome import Outcome, OutcomeClass


def sender_for(config: NodeConfig, name: str) -> DestinationKind:
    """The sender of destination ``name``, from its kind's registered class."""
    context = DestinationContext(name=name, calling_ae=config.node.ae_title)
    return destination_registry().sender(config.destinations[name], context)


class Dispatcher:
    """One delivery thread per destination.

    Parameters
    ----------
    config, index:
        The node's configuration and state.
    metrics:
        The node's :class:`node.metrics.Metrics`; None: a private one.
    notifier:
        The node's :class:`node.notify.Notifier` (``delivery.failed``); None: none.
    batch_size:
        Deliveries sent per association or STOW-RS request.
    """

    def __init__(
        self, config: NodeConfig, index: Index, *, metrics: Metrics | None = None, notifier: Notifier | None = None,
        batch_size: int = 50,
    ):
        self.config = config
        self.index = index
        self.notifier = notifier or Notifier()  # delivery.failed events (node.notify)
        self.metrics = metrics if metrics is not None else Metrics()
        self.batch_size = batch_size
        self.log = structlog.get_logger("node.dispatch")
        self._stop = threading.Event()
        # Destinations of results only: a notification kind (webhook) has its own thread in node.notify.
        kinds = destination_registry()
        self._wake = {n: threading.Event() for n, d in config.destinations.items() if kinds.kind(d.kind).carries_results}
        self._threads: list[threading.Thread] = []
        self._rng = random.Random()

    def wake(self) -> None:
        for ev in self._wake.values():
            ev.set()

    def start(self) -> None:
        for name in self._wake:
            t = threading.Thread(target=self._loop, args=(name,), name=f"dispatch-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.wake()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _loop(self, name: str) -> None:
        sender = sender_for(self.config, name)
        wake = self._wake[name]
        while not self._stop.is_set():
            if self._paused(name):  # an operator's pause (node/actions.py): deliveries stay pending
                wake.wait(1.0)
                wake.clear()
                continue
            try:
                sent = self.deliver_due(name, sender)
            except Exception:
                self.log.exception("dispatch_loop_error", destination=name)
                sent = 0
            if sent:
                continue
            nxt = self.index.next_delivery_time(name)
            wait = 1.0 if nxt is None else min(1.0, max(0.0, (nxt - utcnow()).total_seconds()))
            wake.wait(wait)
            wake.clear()

    def alive(self) -> tuple[int, int]:
        """(threads alive, threads expected): one per destination once started."""
        return sum(t.is_alive() for t in self._threads), len(self.config.destinations)

    def _paused(self, name: str) -> bool:
        try:
            return self.index.destination_paused(name)
        except Exception:  # the index is down: deliver_due will log it
            return False

    def deliver_due(self, name: str, sender) -> int:
        """Send what is due for ``name`` now; returns how many were tried."""
        due = self.index.due_deliveries(name, utcnow(), limit=self.batch_size)
        if not due:
            return 0
        present = [d for d in due if Path(d.path).is_file()]
        for d in due:
            if d not in present:  # the result file is gone: nothing to retry with
                missing = Outcome(OutcomeClass.PERMANENT, None, f"result file missing: {d.path}")
                self._record(name, d, missing, 0.0, final=True)
        if not present:
            return len(due)
        t = time.perf_counter()
        outcomes = sender.send([Path(d.path) for d in present])
        seconds = (time.perf_counter() - t) / max(1, len(present))
        for d, outcome in zip(present, outcomes, strict=True):
            self._record(name, d, outcome, seconds)
        return len(due)

    def _record(self, name: str, d: DeliveryView, outcome: Outcome, seconds: float, final: bool = False) -> None:
        policy: RetryPolicy = self.config.retry_for(name)
        attempt = d.attempts + 1
        next_at = None
        if not outcome.ok and not final and not outcome.permanent and attempt < policy.max_attempts:
            delay = policy.delay(attempt) * (1 + self._rng.uniform(-policy.jitter, policy.jitter))
            next_at = utcnow() + dt.timedelta(seconds=delay)
        error = f"{outcome.error} [permanent: not retried]" if outcome.permanent else outcome.error
        state = self.index.record_attempt(
            d.id, ok=outcome.ok, status=outcome.status, error=error, seconds=seconds, next_attempt_at=next_at
        )
        log = self.log.bind(destination=name, delivery_id=d.id, job_id=d.job_id, sop_instance_uid=d.sop_instance_uid)
        if outcome.ok:
            log.info("delivered", attempt=attempt, status=outcome.status)
        elif state == DeliveryState.FAILED:
            log.error("delivery_failed", attempt=attempt, error=error, permanent=outcome.permanent)
            self.notifier.delivery_failed(name, d, attempt, error)
        else:
            log.warning("delivery_retry", attempt=attempt, error=error, next_attempt_at=str(next_at))
        self.metrics.deliveries.labels(destination=name, outcome=DeliveryState.DELIVERED if outcome.ok else state).inc()
        if state == DeliveryState.DELIVERED:
            self._observe_delivered(name, d)

    def _observe_delivered(self, name: str, d: DeliveryView) -> None:
        """One ``ainode_latency_to_delivered_seconds`` observation per
        delivery (one result object to one destination) that reached
        ``delivered`` now: seconds from its job's last input instance."""
        job = self.index.job(d.job_id)
        seconds = since(job.trigger_received_at, utcnow()) if job is not None else None
        if job is not None and seconds is not None:
            self.metrics.latency_delivered.labels(pipeline=job.pipeline, destination=name).observe(seconds)
