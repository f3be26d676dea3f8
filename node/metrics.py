"""The node's Prometheus metrics, in a registry owned by the node (not the
global one), served by ``GET /metrics`` (:mod:`node.api.routers.metrics`).

No label carries a UID or any patient data: labels are pipeline, route
destination, DIMSE or HTTP status and state names only (each one from the
configuration or a fixed vocabulary), so the number of series stays bounded.

Latencies are measured from the *trigger*: the time the last instance of a
job's input (its series, or for a study-level job its study) was received
(``jobs.trigger_received_at``), in seconds, at the moment of each event:

- ``ainode_latency_to_complete_seconds{pipeline}``: when the completion
  sweep has completed the series (or study) and routing has queued its job;
  observed there, because only routing knows the pipeline (a series no rule
  matches is not observed);
- ``ainode_latency_to_job_start_seconds{pipeline}``: when a worker starts
  the job;
- ``ainode_latency_to_job_end_seconds{pipeline}``: when the job ends, in
  any state;
- ``ainode_latency_to_delivered_seconds{pipeline,destination}``: once per
  delivered result object per destination (one ``deliveries`` row reaching
  ``delivered``; a SEG and an SR of one job to one PACS are two
  observations; a result re-sent by ``ainode deliveries resend`` is
  observed again when delivered again).

``ainode_intended_use_decisions_total{pipeline,rule,action}``: one per
intended-use rule an input of a job fell outside (:mod:`node.guard`), with
the configured action, ``warn`` or ``refuse``; rule names come from the
model cards.

Input drift (:mod:`node.drift`), per pipeline and model version (its
card's name and version, from the configuration):
``ainode_input_drift{pipeline,model_version,feature,statistic}`` (``psi``
for a categorical feature, ``ks`` for a numerical one; set once the window
holds ``[drift] min_count`` jobs), ``ainode_input_drift_alert{...,feature}``
(1 above the feature's threshold) and ``ainode_input_drift_window_jobs``.

Scrape-time values (:meth:`Metrics.watch`): pending deliveries per
destination (``ainode_outbox_pending``) and free bytes in the spool's file
system (``ainode_spool_free_bytes``), read when Prometheus scrapes, so they
are never stale.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: The states a job ends in (``ainode_jobs_total{state}``): a finished job is
#: never ``queued`` nor ``running``.
JOB_OUTCOMES = ("done", "failed", "not_applicable", "out_of_scope")
#: ``ainode_delivery_attempts_total{outcome}``: the DeliveryState after the
#: attempt (``pending`` = failed, retried later).
DELIVERY_OUTCOMES = ("delivered", "pending", "failed")
#: Seconds, for latencies from the last instance: 0.5 s .. 30 min.
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1200, 1800)


def since(trigger: dt.datetime | None, now: dt.datetime) -> float | None:
    """Seconds from ``trigger`` to ``now`` (both naive UTC, as the index
    stores them), never negative; None when there is no trigger."""
    if trigger is None:
        return None
    return max(0.0, (now - trigger).total_seconds())


class Metrics:
    """The node's Prometheus metrics, in their own registry.

    A step built without metrics (``metrics=None``: unit tests, ``ainode
    run``) builds a ``Metrics()`` of its own rather than a null object:
    making one costs a few microseconds, keeps one class to maintain instead
    of two that must mirror each other, and keeps prometheus_client's label
    checks (a wrong label name raises ValueError) in every test.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter("ainode_instances_received", "Instances stored and indexed", registry=r)
        self.instances_duplicate = Counter("ainode_instances_duplicate", "Instances received again (stored once)", registry=r)
        self.instances_refused = Counter(
            "ainode_instances_refused", "Instances refused, by DIMSE status", ["status"], registry=r
        )
        self.associations_rejected = Counter("ainode_associations_rejected", "A-ASSOCIATE-RJ sent", registry=r)
        self.associations_open = Gauge("ainode_associations_open", "DICOM associations accepted and not yet closed", registry=r)
        self.stow_requests = Counter(
            "ainode_stow_requests", "STOW-RS requests answered, by HTTP status", ["status"], registry=r
        )
        self.store_seconds = Histogram(
            "ainode_store_seconds", "C-STORE handling time (spool + index)", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.jobs = Counter(
            "ainode_jobs", "Jobs finished, by pipeline and state (done, failed, not_applicable, out_of_scope)", ["pipeline", "state"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "ainode_job_seconds", "Job wall time", ["pipeline"], registry=r,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )
        self.jobs_published = Counter(
            "ainode_jobs_published", "Job messages published to a Celery queue ([worker] backend = celery)", ["queue"],
            registry=r,
        )
        self.messages_dropped = Counter(
            "ainode_worker_messages_dropped", "Celery messages for jobs not queued (done, or held by another worker)",
            registry=r,
        )
        self.claim_seconds = Histogram(
            "ainode_worker_claim_seconds", "Time to claim a job row", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.jobs_republished = Counter(
            "ainode_jobs_republished",
            "Queued jobs published again after the broker's visibility timeout without a claim (the broker lost them)",
            registry=r,
        )
        self.jobs_requeued_stale = Counter(
            "ainode_jobs_requeued_stale", "Running jobs taken back from a worker whose heartbeat went stale", registry=r
        )
        self.intended_use = Counter(
            "ainode_intended_use_decisions",
            "Inputs outside a model card's intended-use rule, by pipeline, rule and action (warn, refuse)",
            ["pipeline", "rule", "action"], registry=r,
        )
        # Input drift (node.drift): per model and feature, over the sliding window of its last jobs.
        self.input_drift = Gauge(
            "ainode_input_drift", "Input drift of a feature against the model card's reference (PSI or KS statistic)",
            ["pipeline", "model_version", "feature", "statistic"], registry=r,
        )
        self.input_drift_alert = Gauge(
            "ainode_input_drift_alert", "1 when a feature's drift statistic is above its [drift] threshold, else 0",
            ["pipeline", "model_version", "feature"], registry=r,
        )
        self.input_drift_jobs = Gauge(
            "ainode_input_drift_window_jobs", "Jobs in a model's input-drift window", ["pipeline", "model_version"], registry=r,
        )
        self.deliveries = Counter(
            "ainode_delivery_attempts", "Delivery attempts, by destination and outcome", ["destination", "outcome"], registry=r
        )

        def latency(event: str, help_text: str, labels: list[str]) -> Histogram:
            return Histogram(
                f"ainode_latency_to_{event}_seconds", help_text, labels, registry=r, buckets=LATENCY_BUCKETS
            )

        self.latency_complete = latency(
            "complete", "Seconds from the last instance of a series or study to its job queued (complete and routed)",
            ["pipeline"],
        )
        self.latency_job_start = latency("job_start", "Seconds from the last instance of a job's input to its start", ["pipeline"])
        self.latency_job_end = latency("job_end", "Seconds from the last instance of a job's input to its end", ["pipeline"])
        self.latency_delivered = latency(
            "delivered", "Seconds from the last instance of a job's input to each result delivered, per destination",
            ["pipeline", "destination"],
        )

    def declare(self, routes: Mapping[str, Iterable[str]], refusal_statuses: Iterable[str] = ()) -> None:
        """Create the labelled series of the configuration at 0, so that
        dashboards and alerts see them before the first event: for each
        pipeline (``routes``: pipeline -> its routes' destinations), every
        job outcome, the latencies, and each destination's delivery
        outcomes; every refusal status in ``refusal_statuses`` (``0xA900``)."""
        for pipeline, destinations in routes.items():
            for state in JOB_OUTCOMES:
                self.jobs.labels(pipeline=pipeline, state=state)
            self.job_seconds.labels(pipeline=pipeline)
            for h in (self.latency_complete, self.latency_job_start, self.latency_job_end):
                h.labels(pipeline=pipeline)
            for destination in destinations:
                self.latency_delivered.labels(pipeline=pipeline, destination=destination)
                for outcome in DELIVERY_OUTCOMES:
                    self.deliveries.labels(destination=destination, outcome=outcome)
        for status in refusal_statuses:
            self.instances_refused.labels(status=status)

    def watch(self, pending: Callable[[], Mapping[str, int]], destinations: Iterable[str], spool_dir: Path) -> None:
        """Add the scrape-time gauges: ``pending()`` (destination -> pending
        deliveries, e.g. :meth:`node.index.Index.pending_deliveries`) for
        each of ``destinations``, and the free bytes of ``spool_dir``'s
        file system. A gauge whose source fails at scrape time is left out
        of that scrape (and logged); the others are still served."""
        self.registry.register(_StateCollector(pending, tuple(destinations), Path(spool_dir)))


class _StateCollector(Collector):
    """``ainode_outbox_pending{destination}`` and ``ainode_spool_free_bytes``,
    read at each scrape."""

    def __init__(self, pending: Callable[[], Mapping[str, int]], destinations: tuple[str, ...], spool_dir: Path):
        self.pending = pending
        self.destinations = destinations
        self.spool_dir = spool_dir
        self.log = structlog.get_logger("node.metrics")

    def describe(self):
        yield GaugeMetricFamily("ainode_outbox_pending", _PENDING_HELP, labels=["destination"])
        yield GaugeMetricFamily("ainode_spool_free_bytes", _FREE_HELP)

    def collect(self):
        try:
            counts = self.pending()
        except Exception as exc:  # the index is down: serve the other metrics
            self.log.error("metrics_outbox_unavailable", error=repr(exc))
        else:
            family = GaugeMetricFamily("ainode_outbox_pending", _PENDING_HELP, labels=["destination"])
            for name in dict.fromkeys([*self.destinations, *counts]):
                family.add_metric([name], counts.get(name, 0))
            yield family
        try:
            free = shutil.disk_usage(self.spool_dir).free
        except OSError as exc:
            self.log.error("metrics_spool_free_unavailable", path=str(self.spool_dir), error=repr(exc))
        else:
            yield GaugeMetricFamily("ainode_spool_free_bytes", _FREE_HELP, value=free)


_PENDING_HELP = "Deliveries pending (queued or awaiting a retry), by destination"
_FREE_HELP = "Free bytes on the spool's file system"
