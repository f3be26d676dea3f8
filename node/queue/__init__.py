"""The job queue: one interface (:class:`JobQueue`: enqueue, claim,
heartbeat, complete, fail), two back-ends chosen by ``[worker] backend``:

- ``embedded`` (:class:`EmbeddedQueue`): the node's own worker threads poll
  the index; no broker;
- ``celery`` (:class:`CeleryQueue`): the node publishes each queued job's id
  to a Celery queue per pipeline and device class, and ``ainode worker``
  processes on any machine claim the row and run it (:mod:`node.worker`).

Either way the job rows in the index are the source of truth
(:mod:`node.index.queue`); the broker is only the doorbell.
"""

from node.queue.base import JobQueue, make_queue
from node.queue.celery_queue import CeleryQueue
from node.queue.embedded import EmbeddedQueue

__all__ = ["CeleryQueue", "EmbeddedQueue", "JobQueue", "make_queue"]
