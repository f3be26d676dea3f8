"""Notifications: the node's events to the notification destinations
(``kind = "webhook"``, :mod:`node.destinations.webhook`) subscribed to them.

The runner (``job.done``, ``job.failed``, ``job.not_applicable``), dispatch
(``delivery.failed``) and the free-disk guard (``disk.low``,
``disk.recovered``) each call one method of :class:`Notifier`, which never
blocks and never raises: the event is put on a bounded in-memory queue per
destination (``queue_size``; when full the oldest event is dropped and
logged) and that destination's own thread sends it, retrying a transient
failure with exponential backoff (the destination's ``retry``, by default 5
attempts 1 s doubling to 60 s), then gives up with ``notification_failed``
in the log. A receiver that is down holds back neither jobs, nor
deliveries of results, nor the other receivers.

An event::

    {"id": "<UUID>", "type": "job.failed", "time": "2025-01-01T12:00:00.123Z",
     "node": {"ae_title": "AINODE"},
     "data": {"job_id": 7, "pipeline": "pneumonia", "route": "chest", "state": "failed",
              "reason": "...", "attempts": 1, "destinations": ["pacs"]}}

It carries no patient data: never a Patient's Name or ID, nor any other
attribute of the images. Study, Series and SOP Instance UIDs identify no one
by themselves but can be linked to a patient, so they are added
(``study_uid``, ``series_uid``, ``sop_instance_uid``) only where the
destination has ``include_uids = true``; otherwise UIDs in a ``reason`` are
replaced by ``<UID>``. A ``reason`` is the node's own error text, at most
:data:`MAX_REASON` characters, never a traceback.

Events are not kept across a restart: what they report is already durable
in the index (the job's and the delivery's state and error, ``ainode
status``, ``/metrics``), and the free-disk guard checks again at start-up,
so ``disk.low`` is sent again if space is still short. A durable queue in the
index would fail exactly when ``disk.low`` matters (the index's disk full),
and would put a write on the runner's and dispatch's path. On ``stop`` each
destination gets a few seconds to send what is queued (one attempt each).
"""

from __future__ import annotations

import datetime as dt
import random
import re
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog

from node.destinations.base import NotificationEvent, NotificationKind, RetryPolicy
from node.outcome import Outcome, OutcomeClass

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.index import DeliveryView, JobView

#: Longest ``reason`` sent, characters.
MAX_REASON = 500
_UID = re.compile(r"(?<![\d.])[0-2](?:\.\d+){3,}(?![\d.])")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Channel:
    """One notification destination: its queue, its thread, its retries."""

    def __init__(self, name: str, sender: NotificationKind, policy: RetryPolicy):
        self.name, self.sender, self.policy = name, sender, policy
        self.events = frozenset(sender.config.events)
        self.include_uids = sender.config.include_uids
        self.queue: deque[dict[str, Any]] = deque()
        self.maxlen = sender.config.queue_size
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.sent = self.failed = self.dropped = 0
        self.log = structlog.get_logger("node.notify").bind(destination=name, target=sender.target)
        self._rng = random.Random()

    def offer(self, event: dict[str, Any]) -> None:
        with self.cond:
            if len(self.queue) >= self.maxlen:
                old = self.queue.popleft()
                self.dropped += 1
                self.log.warning("notification_dropped", event_type=old["type"], event_id=old["id"], queue_size=self.maxlen)
            self.queue.append(event)
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping.is_set():
                    self.cond.wait()
                if not self.queue:
                    return
                event = self.queue.popleft()
            if not self.deliver(event) and self.stopping.is_set():
                return  # the receiver is down: the rest is logged as lost, not tried one by one

    def deliver(self, event: dict[str, Any]) -> bool:
        """Send one event with retries; True once the receiver took it."""
        attempt = 0
        while True:
            attempt += 1
            try:
                outcome = self.sender.post(event)
            except Exception as exc:  # a kind's bug must not end the thread
                outcome = Outcome(OutcomeClass.TRANSIENT, None, f"{type(exc).__name__}: {exc}")
            log = self.log.bind(event_type=event["type"], event_id=event["id"], attempt=attempt)
            if outcome.ok:
                self.sent += 1
                log.info("notification_sent", status=outcome.status)
                return True
            if outcome.permanent or attempt >= self.policy.max_attempts or self.stopping.is_set():
                break
            delay = self.policy.delay(attempt) * (1 + self._rng.uniform(-self.policy.jitter, self.policy.jitter))
            log.warning("notification_retry", error=outcome.error, retry_in_seconds=round(delay, 3))
            if self.stopping.wait(delay):  # stopping: no more waiting, the last attempt was it
                break
        self.failed += 1
        log.error("notification_failed", error=outcome.error, permanent=outcome.permanent)
        return False


class Notifier:
    """The node's events to the notification destinations subscribed to them.

    Parameters
    ----------
    config:
        The node's configuration; its destinations whose kind is a
        :class:`~node.destinations.base.NotificationKind` are the targets.
        None: a notifier with no targets (every call does nothing).
    """

    def __init__(self, config: NodeConfig | None = None):
        from node.destinations import DestinationContext
        from node.destinations.registry import registry

        self.ae_title = config.node.ae_title if config else ""
        self.channels: list[_Channel] = []
        for name, d in (config.destinations if config else {}).items():
            if registry().kind(d.kind).carries_results:
                continue
            sender = registry().sender(d, DestinationContext(name=name, calling_ae=self.ae_title))
            assert isinstance(sender, NotificationKind)
            self.channels.append(_Channel(name, sender, config.retry_for(name)))  # type: ignore[union-attr]
        self.log = structlog.get_logger("node.notify")

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        for ch in self.channels:
            ch.stopping.clear()
            ch.thread = threading.Thread(target=ch.run, name=f"notify-{ch.name}", daemon=True)
            ch.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (one attempt each, no more backoff), for at most
        ``timeout`` seconds in all; what is left is logged as lost."""
        for ch in self.channels:
            with ch.cond:
                ch.stopping.set()
                ch.cond.notify_all()
        deadline = time.monotonic() + timeout
        for ch in self.channels:
            if ch.thread is not None:
                ch.thread.join(max(0.0, deadline - time.monotonic()))
            if ch.queue:
                ch.log.warning("notifications_lost", count=len(ch.queue), reason="the node stopped")

    # -- events -----------------------------------------------------------------------

    def emit(self, event: NotificationEvent, data: dict[str, Any], uids: dict[str, str | None] | None = None) -> None:
        """Queue ``event`` for each destination subscribed to it; never blocks or raises.

        ``data`` must hold no patient data; ``uids`` go only where
        ``include_uids`` is set, and UIDs in ``data["reason"]`` are masked elsewhere.
        """
        try:
            for ch in self.channels:
                if event not in ch.events:
                    continue
                body = dict(data)
                if isinstance(body.get("reason"), str):
                    reason = body["reason"] if ch.include_uids else _UID.sub("<UID>", body["reason"])
                    body["reason"] = reason[:MAX_REASON]
                if ch.include_uids and uids:
                    body.update({k: v for k, v in uids.items() if v})
                ch.offer({
                    "id": str(uuid.uuid4()), "type": str(event), "time": _now(),
                    "node": {"ae_title": self.ae_title}, "data": body,
                })
        except Exception:  # a notification must never cost a job or a delivery
            self.log.exception("notification_not_queued", event_type=str(event))

    def job(self, job: JobView, state: str, reason: str | None = None, results: int = 0) -> None:
        """A job ended ``done``, ``failed`` or ``not_applicable`` (:class:`node.index.JobState`)."""
        data = {
            "job_id": job.id, "pipeline": job.pipeline, "route": job.route, "level": job.level,
            "state": str(state), "attempts": job.attempts, "destinations": list(job.destinations),
        }
        data.update({"results": results} if reason is None else {"reason": reason})
        self.emit(NotificationEvent(f"job.{state}"), data, {"study_uid": job.study_uid, "series_uid": job.series_uid})

    def delivery_failed(self, destination: str, delivery: DeliveryView, attempts: int, error: str | None) -> None:
        """A delivery reached state ``failed`` (attempts used up, or a permanent failure)."""
        data = {
            "delivery_id": delivery.id, "job_id": delivery.job_id, "destination": destination,
            "state": "failed", "attempts": attempts, "reason": error or "",
        }
        self.emit(NotificationEvent.DELIVERY_FAILED, data, {"sop_instance_uid": delivery.sop_instance_uid})

    def disk(self, path: str, reason: str | None, free_bytes: int) -> None:
        """The free-disk guard changed state: ``reason`` why space is short, None once it returned."""
        data: dict[str, Any] = {"path": path, "free_bytes": free_bytes}
        if reason is not None:
            data["reason"] = reason
        self.emit(NotificationEvent.DISK_LOW if reason else NotificationEvent.DISK_RECOVERED, data)
