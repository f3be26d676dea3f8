"""``[worker] backend = "celery"``, the node's side: publish queued jobs,
re-queue those whose worker went silent, and know which queues are served.

One background thread, woken by :meth:`CeleryQueue.enqueue` (a job was just
queued) and at least every ``heartbeat_seconds``, does in order:

1. **stale sweep**: a ``running`` job whose heartbeat is older than
   ``stale_after_seconds`` goes back to ``queued`` (or ``failed`` after
   ``max_job_attempts``); this, not the broker, recovers a SIGKILLed worker,
   whose message Redis would hold until the visibility timeout;
2. **publish**: each ``queued`` job never published, or published longer
   ago than the visibility timeout and still unclaimed, is sent to its queue
   (``<pipeline>.<cpu|gpu>``) when a live worker consumes that queue; a
   queue nobody serves gets nothing, is logged once and named in ``/ready``.

A broker that is down makes publishing fail: the job keeps no publish time
and goes out at the next pass, once the broker is back.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import structlog

from node.config import DeviceClass, NodeConfig, queue_name
from node.index import Index, JobView, utcnow
from node.queue.base import JobQueue
from node.queue.celery_app import TASK_NAME, make_celery_app

if TYPE_CHECKING:
    from node.metrics import Metrics


class CeleryQueue(JobQueue):
    """Publishes job ids to Celery; claims and outcomes stay in the index.

    Parameters
    ----------
    config, index:
        The node's configuration and its PostgreSQL index.
    metrics:
        Counts published messages and re-queued stale jobs, when given.
    """

    def __init__(self, config: NodeConfig, index: Index, *, metrics: Metrics | None = None):
        super().__init__(index)
        self.config = config
        self.worker = config.worker
        self.metrics = metrics
        self.app = make_celery_app(config)
        self.log = structlog.get_logger("node.queue")
        self._routes = {r.name: r.worker for r in config.routes}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unserved: set[str] = set()
        self._broker_down = False

    def enqueue(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="celery-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.app.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_for(self, job: JobView) -> str:
        """``<pipeline>.<cpu|gpu>``: the route's ``worker`` class (cpu when the route is gone)."""
        return queue_name(job.pipeline, self._routes.get(job.route, DeviceClass.CPU))

    def needed_queues(self) -> set[str]:
        return {queue_name(r.pipeline, r.worker) for r in self.config.routes}

    def unserved(self) -> list[str]:
        """Routed queues no live worker consumes, from the workers' announcements."""
        served = self.index.served_queues(self.worker.stale_after_seconds)
        return sorted(self.needed_queues() - served)

    def _loop(self) -> None:
        interval = min(self.worker.heartbeat_seconds, 5.0)
        while not self._stop.is_set():
            try:
                self.pass_once()
            except Exception:
                self.log.exception("queue_pass_failed")
            self._wake.wait(interval)
            self._wake.clear()

    def pass_once(self) -> dict[str, int]:
        """One stale sweep and one publishing pass; returns the counts."""
        requeued, failed = self.index.requeue_stale_jobs(self.worker.stale_after_seconds, self.worker.max_job_attempts)
        for job_id in requeued:
            self.log.warning("job_requeued_stale_worker", job_id=job_id, stale_after=self.worker.stale_after_seconds)
        for job_id in failed:
            self.log.error("job_failed_stale_worker", job_id=job_id, attempts=self.worker.max_job_attempts)
        if self.metrics is not None and (requeued or failed):
            self.metrics.jobs_requeued_stale.inc(len(requeued) + len(failed))
        published = self.publish()
        return {"requeued": len(requeued), "failed": len(failed), "published": published}

    def publish(self) -> int:
        """Publish what :meth:`Index.jobs_to_publish` returns to served queues."""
        served = self.index.served_queues(self.worker.stale_after_seconds)
        sent = 0
        unserved = self.needed_queues() - served
        routes = [r.name for r in self.config.routes if queue_name(r.pipeline, r.worker) in served]
        known = [r.name for r in self.config.routes]
        for job in self.index.jobs_to_publish(self.worker.celery.visibility_timeout_seconds, routes, known_routes=known):
            queue = self.queue_for(job)  # a removed route's job: its pipeline's cpu queue
            if queue not in served:
                continue
            at = utcnow()  # before the send: a worker may claim before it returns
            if not self._send(job, queue):
                break  # the broker is down: the rest wait for the next pass
            self.index.mark_published(job.id, queue, at)
            sent += 1
            if job.enqueued_at is not None:  # published before, never claimed: the broker lost it
                self.log.warning("job_republished", job_id=job.id, queue=queue, first_published=str(job.enqueued_at),
                                 visibility_timeout=self.worker.celery.visibility_timeout_seconds)
                if self.metrics is not None:
                    self.metrics.jobs_republished.inc()
        for queue in sorted(unserved - self._unserved):
            self.log.warning("queue_unserved", queue=queue, detail="no live worker consumes it; its jobs stay queued")
        self._unserved = unserved
        return sent

    def _send(self, job: JobView, queue: str) -> bool:
        t = time.perf_counter()
        try:
            self.app.send_task(
                TASK_NAME, args=[job.id], queue=queue, routing_key=queue,
                retry=True, retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2},
            )
        except Exception as exc:  # kombu raises OperationalError and socket errors alike
            if not self._broker_down:
                self.log.error("broker_unavailable", job_id=job.id, queue=queue, error=f"{type(exc).__name__}: {exc}")
            self._broker_down = True
            return False
        if self._broker_down:
            self.log.info("broker_available")
        self._broker_down = False
        self.log.info("job_published", job_id=job.id, queue=queue, ms=round(1000 * (time.perf_counter() - t), 1))
        if self.metrics is not None:
            self.metrics.jobs_published.labels(queue=queue).inc()
        return True
