"""The job-queue interface both back-ends share (:mod:`node.queue`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.index import Index, JobState, JobView

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.metrics import Metrics


class JobQueue(ABC):
    """Hands queued jobs to workers; the claims and outcomes are rows of the
    index (:mod:`node.index.queue`), the same for every back-end.

    ``enqueue`` is what differs: waking the node's threads, or publishing to
    a broker. The rest is the index's, so a worker of either kind claims
    (``queued -> running``, worker id, heartbeat) in one transaction before
    it works, and reports only on a job it still holds
    (:class:`node.index.ClaimLost` otherwise).
    """

    def __init__(self, index: Index):
        self.index = index

    @abstractmethod
    def enqueue(self) -> None:
        """Hand the queued jobs to the workers now (the router calls it after
        it queued one). Never raises: what cannot be handed over now is
        handed over by the next sweep."""

    def start(self) -> None:  # noqa: B027 - optional: the embedded queue has nothing to start
        """Start whatever runs in the background (a publisher, a sweep)."""

    def stop(self) -> None:  # noqa: B027
        """Stop it; jobs stay in the index."""

    def unserved(self) -> list[str]:
        """Queues the routes need that no live worker consumes (``/ready``)."""
        return []

    def claim(self, worker_id: str, job_id: int | None = None) -> JobView | None:
        """``queued -> running`` under ``worker_id``: :meth:`Index.claim_job`."""
        return self.index.claim_job(worker_id, job_id)

    def heartbeat(self, job_id: int, worker_id: str) -> bool:
        """Still working on it; False when the job is no longer this worker's."""
        return self.index.heartbeat_job(job_id, worker_id)

    def complete(
        self, job_id: int, results: Sequence[tuple[Any, Path, Sequence[str]]], timings: str | None,
        note: str | None, worker_id: str | None,
    ) -> None:
        """``running -> done`` with its results' deliveries: :meth:`Index.finish_job`."""
        self.index.finish_job(job_id, results, timings, note, worker_id=worker_id)

    def fail(
        self, job_id: int, reason: str, traceback: str | None, timings: str | None, state: JobState,
        worker_id: str | None,
    ) -> None:
        """``running -> failed | not_applicable | out_of_scope``: :meth:`Index.fail_job`."""
        self.index.fail_job(job_id, reason, traceback, timings, state=state, worker_id=worker_id)


def make_queue(config: NodeConfig, index: Index, metrics: Metrics | None = None) -> JobQueue:
    """The back-end ``[worker] backend`` names."""
    from node.config import WorkerBackend
    from node.queue.celery_queue import CeleryQueue
    from node.queue.embedded import EmbeddedQueue

    if config.worker.backend == WorkerBackend.CELERY:
        return CeleryQueue(config, index, metrics=metrics)
    return EmbeddedQueue(index)
