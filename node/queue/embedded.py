"""``[worker] backend = "embedded"``: the node's own worker threads
(:class:`node.run.Runner`) poll the index; ``enqueue`` wakes them."""

from __future__ import annotations

import threading

from node.index import Index
from node.queue.base import JobQueue


class EmbeddedQueue(JobQueue):
    """No broker: the workers claim the oldest queued job, polling at least
    once a second and at once after :meth:`enqueue`."""

    def __init__(self, index: Index):
        super().__init__(index)
        self._wake = threading.Event()

    def enqueue(self) -> None:
        self._wake.set()

    def wait(self, timeout: float) -> None:
        """Block until :meth:`enqueue` or ``timeout`` seconds (a worker's poll)."""
        self._wake.wait(timeout)
        self._wake.clear()
