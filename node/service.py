"""The node in one process: receive -> spool/index -> complete -> route -> run -> dispatch.

:class:`Node` builds each step from the one configuration object, recovers
what a previous process left on disk, and starts the threads:

- the SCP (pynetdicom's server threads);
- the completion sweep (apscheduler, every ``sweep_interval_seconds`` and at
  once after each association release);
- the retention clean-up (apscheduler, at start-up and every
  ``[retention] interval_minutes``; :mod:`node.retention`);
- the job workers, or with ``[worker] backend = "celery"`` the publisher
  and stale-job sweep that feed ``ainode worker`` processes (:mod:`node.queue`);
- one dispatch thread per destination of results;
- one notification thread per webhook destination (:mod:`node.notify`);
- the HTTP API.

Each step wakes the next directly, so a released association leads to a
running job within milliseconds, not at the next poll.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import signal
import threading

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from node.api import ApiServer, Metrics, create_app
from node.audit import audit_config_loaded
from node.complete import CompletionSweep
from node.config import NodeConfig
from node.dispatch import Dispatcher
from node.index import AssemblyState, Index, InstanceRecord, SeriesState
from node.ingest import Ingest, Status
from node.monitor import DestinationMonitor
from node.notify import Notifier
from node.queue import CeleryQueue, make_queue
from node.receive import Receiver
from node.retention import Retention
from node.route import Router
from node.run import Runner
from node.spool import INDEX_KEYWORDS, FreeSpace, Spool, read_header


class Node:
    """The whole node. ``start()`` returns once it listens; ``stop()`` ends it."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.log = structlog.get_logger("node.service")
        st = config.storage
        self.metrics = Metrics()
        self.spool = Spool(st.spool_dir, st.quarantine_dir, st.outbox_dir, fsync=st.fsync)
        self.index = Index(st.engine_url())
        audit_config_loaded(self.index, config)  # [audit] syslog first, so it carries every event
        self._declare_metrics()
        self.notifier = Notifier(config)  # events to the webhook destinations (node.notify)
        self.dispatcher = Dispatcher(config, self.index, metrics=self.metrics, notifier=self.notifier)
        # [worker] backend: the node's own threads, or Celery workers elsewhere (node.queue).
        self.queue = make_queue(config, self.index, self.metrics)
        self.runner = Runner(
            config, self.index, self.spool, metrics=self.metrics, on_results=self.dispatcher.wake, notifier=self.notifier,
            queue=self.queue,
        )
        self.router = Router(config.routes, self.index, on_queued=self.queue.enqueue, sequences=config.sequences)
        self.sweep = CompletionSweep(config.completion, self.index, self.spool, self.router, metrics=self.metrics)
        self.retention = Retention(config.retention, self.index, self.spool)
        self.monitor = DestinationMonitor(config, self.index)  # periodic C-ECHO of each destination, for /status
        # The one ingest step of both sources: C-STORE (the receiver) and STOW-RS (the API).
        free_space = FreeSpace(self.spool.spool_dir, st.min_free_mb, st.min_free_percent, on_change=self.notifier.disk)
        self.ingest = Ingest(self.spool, self.index, free_space, metrics=self.metrics)
        self.receiver = Receiver(
            config, self.spool, self.index, metrics=self.metrics, on_release=self.trigger_sweep, ingest=self.ingest
        )
        self.scheduler = BackgroundScheduler(timezone=dt.UTC)
        self._sweep_job = None
        self.api: ApiServer | None = None
        if config.api.enabled:
            self.api = ApiServer(create_app(self), config.api)
        self._stopped = threading.Event()

    def _declare_metrics(self) -> None:
        """The configured pipelines' and destinations' series at 0, and the
        scrape-time gauges (outbox depth, spool free bytes): :mod:`node.metrics`."""
        routes: dict[str, list[str]] = {}
        for rule in self.config.routes:
            routes.setdefault(rule.pipeline, [])
            routes[rule.pipeline] += [d for d in rule.destinations if d not in routes[rule.pipeline]]
        self.metrics.declare(routes, [s.code for s in Status if s != Status.SUCCESS])
        self.metrics.watch(self.index.pending_deliveries, self.config.destinations, self.spool.spool_dir)

    # -- recovery -------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Pick up from what is on disk after a crash or restart.

        - spool files with no index row (the process died between the rename
          and the commit) are indexed;
        - jobs left ``running`` are queued again (or failed after
          ``max_job_attempts``); with Celery workers, which outlive the
          node, only by the stale-heartbeat sweep (:mod:`node.queue`);
        - series and studies left ``complete`` but never routed are routed;
        - temporary files of writes a kill interrupted (``.<SOP>.dcm.<hex>.tmp``
          in the spool, quarantine and outbox) are deleted, before the SCP
          listens (:meth:`node.spool.Spool.remove_temporary_files`);
        - pending deliveries need nothing: dispatch retries them.

        Returns counts: ``reindexed``, ``jobs_requeued``, ``jobs_failed``,
        ``series_routed``, ``temporary_files`` and ``temporary_bytes``.
        """
        temporary_files, temporary_bytes = self.spool.remove_temporary_files()
        reindexed = 0
        for path in self.index.missing_paths(self.spool.iter_instances()):
            try:
                header = read_header(path, INDEX_KEYWORDS)
                self.index.record_instance(InstanceRecord.from_header(header, path, path.stat().st_size))
                reindexed += 1
            except Exception as exc:
                self.log.error("recover_instance_failed", path=str(path), error=repr(exc))
        requeued = failed = 0
        if not isinstance(self.queue, CeleryQueue):
            requeued, failed = self.index.recover_jobs(self.config.worker.max_job_attempts)
        routed = 0
        for series in self.index.series_in_state(SeriesState.COMPLETE):
            self.router.route_series(series.series_uid)
            routed += 1
        for assembly in self.index.assemblies(AssemblyState.COMPLETE):  # complete, but its job was never queued
            self.router.queue_study(assembly.study_uid, assembly.route)
            routed += 1
        summary = {
            "reindexed": reindexed,
            "jobs_requeued": requeued,
            "jobs_failed": failed,
            "series_routed": routed,
            "temporary_files": temporary_files,
            "temporary_bytes": temporary_bytes,
        }
        self.log.info("recovered", **summary)
        return summary

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self.notifier.start()
        self.dispatcher.start()
        self.runner.drift.refresh()  # the drift windows as the index holds them (node.drift)
        self.queue.start()
        if isinstance(self.queue, CeleryQueue):
            self.log.info("celery_mode", queues=sorted(self.queue.needed_queues()), unserved=self.queue.unserved())
            # Workers in other processes write the drift observations: read them back now and then.
            self.scheduler.add_job(self.runner.drift.refresh, "interval", seconds=60, id="drift-refresh",
                                   max_instances=1, coalesce=True)
        else:  # the node runs the jobs itself
            self.runner.start()
            pipelines = sorted({r.pipeline for r in self.config.routes})
            threading.Thread(target=self.runner.warm_up, args=(pipelines,), name="warm-up", daemon=True).start()
        self._sweep_job = self.scheduler.add_job(
            self.sweep.sweep,
            "interval",
            seconds=self.config.completion.sweep_interval_seconds,
            id="completion-sweep",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.add_job(  # once now, then at a low rate: it walks the folders
            self.retention.run,
            "interval",
            minutes=self.config.retention.interval_minutes,
            next_run_time=dt.datetime.now(dt.UTC),
            id="retention",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.add_job(  # destinations' health for /status; not part of readiness
            self.monitor.check_all,
            "interval",
            seconds=self.config.api.destination_check_seconds,
            next_run_time=dt.datetime.now(dt.UTC),
            id="destination-check",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.start()
        self.receiver.start()
        if self.api is not None:
            self.api.start()
        self.log.info(
            "node_started",
            ae_title=self.config.node.ae_title,
            port=self.receiver.address[1] if self.config.node.plain else None,
            tls_port=self.receiver.tls_address[1] if self.config.node.tls else None,
            api_port=self.api.address[1] if self.api else None,
            routes=[r.name for r in self.config.routes],
            destinations=list(self.config.destinations),
            index=self.config.storage.index_url.split("@")[-1],
        )

    def trigger_sweep(self) -> None:
        """Run the completion sweep now (after an association release)."""
        if self._sweep_job is not None and self.scheduler.running:
            self._sweep_job.modify(next_run_time=dt.datetime.now(dt.UTC))

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.log.info("node_stopping")
        self.receiver.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.runner.stop()
        self.queue.stop()
        self.dispatcher.stop()
        self.notifier.stop()  # after the steps that emit: their last events still go out
        if self.api is not None:
            self.api.stop()
        self.index.close()
        self.log.info("node_stopped")

    def serve_forever(self) -> None:
        """Start, then block until SIGINT or SIGTERM, then stop cleanly."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        self.stop()

    # -- reporting ---------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict]:
        checks = {"scp": self.receiver._server is not None, "scheduler": self.scheduler.running}
        try:
            checks["index"] = self.index.ping()
        except Exception:
            checks["index"] = False
        return all(checks.values()), checks

    def status(self) -> dict:
        report = status_report(self.index) | {"destinations": self.monitor.report()}
        if isinstance(self.queue, CeleryQueue):
            live = self.index.live_workers(self.config.worker.stale_after_seconds)
            report["workers"] = [dataclasses.asdict(w) for w in live]
            report["unserved_queues"] = self.queue.unserved()
        return report


def status_report(index: Index, limit: int = 20) -> dict:
    """Counts by state plus the latest jobs and deliveries, for humans and /status."""
    return {
        "counts": index.counts(),
        "jobs": [
            {
                "id": j.id,
                "pipeline": j.pipeline,
                "state": j.state,
                "study_uid": j.study_uid,
                "series_uid": j.series_uid,
                "attempts": j.attempts,
                "created_at": j.created_at,
                "finished_at": j.finished_at,
                "error": j.error,
            }
            for j in index.jobs(limit)
        ],
        "deliveries": [
            {
                "id": d.id,
                "job_id": d.job_id,
                "destination": d.destination,
                "sop_instance_uid": d.sop_instance_uid,
                "state": d.state,
                "attempts": d.attempts,
                "delivered_at": d.delivered_at,
                "last_error": d.last_error,
            }
            for d in index.deliveries(limit)
        ],
    }

