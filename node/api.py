"""API: HTTP health, status and Prometheus metrics.

- ``GET /health``: 200 when the SCP listens and the index answers, else 503.
- ``GET /status``: JSON counts of series, jobs and deliveries by state, and the
  latest jobs and deliveries.
- ``GET /metrics``: Prometheus text format.

Metrics live in a registry owned by the node, not in the global one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest


class Metrics:
    """The node's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter("ainode_instances_received", "Instances stored and indexed", registry=r)
        self.instances_duplicate = Counter("ainode_instances_duplicate", "Instances received again (stored once)", registry=r)
        self.instances_refused = Counter(
            "ainode_instances_refused", "Instances refused, by DIMSE status", ["status"], registry=r
        )
        self.associations_rejected = Counter("ainode_associations_rejected", "A-ASSOCIATE-RJ sent", registry=r)
        self.store_seconds = Histogram(
            "ainode_store_seconds", "C-STORE handling time (spool + index)", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.jobs = Counter("ainode_jobs", "Jobs finished, by pipeline and state", ["pipeline", "state"], registry=r)
        self.job_seconds = Histogram(
            "ainode_job_seconds", "Job wall time", ["pipeline"], registry=r,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )
        self.deliveries = Counter(
            "ainode_delivery_attempts", "Delivery attempts, by destination and outcome", ["destination", "outcome"], registry=r
        )


class ApiServer:
    """A small threaded HTTP server for operators and monitoring.

    Parameters
    ----------
    address:
        (host, port); port 0 picks a free one.
    health, status:
        Callables returning (ok, dict) and dict.
    metrics:
        The node's :class:`Metrics`.
    """

    def __init__(self, address: tuple[str, int], health: Callable[[], tuple[bool, dict]], status: Callable[[], dict], metrics: Metrics):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/health":
                    ok, body = api.health()
                    self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
                elif path == "/status":
                    self._send(200, json.dumps(api.status(), default=str).encode(), "application/json")
                elif path == "/metrics":
                    self._send(200, generate_latest(api.metrics.registry), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b'{"error": "not found"}', "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # access logs would drown the JSON log
                pass

        self.health = health
        self.status = status
        self.metrics = metrics
        self.server = ThreadingHTTPServer(address, Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever(): only if it runs
            self.server.shutdown()
            self._thread = None
        self.server.server_close()
