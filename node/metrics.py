"""The node's Prometheus metrics, in a registry owned by the node (not the
global one), served by ``GET /metrics`` (:mod:`node.api.routers.metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


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
        self.stow_requests = Counter(
            "ainode_stow_requests", "STOW-RS requests answered, by HTTP status", ["status"], registry=r
        )
        self.store_seconds = Histogram(
            "ainode_store_seconds", "C-STORE handling time (spool + index)", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.jobs = Counter(
            "ainode_jobs", "Jobs finished, by pipeline and state (done, failed, not_applicable)", ["pipeline", "state"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "ainode_job_seconds", "Job wall time", ["pipeline"], registry=r,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )
        self.deliveries = Counter(
            "ainode_delivery_attempts", "Delivery attempts, by destination and outcome", ["destination", "outcome"], registry=r
        )
