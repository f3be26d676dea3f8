"""Complete: decide when a series has all its instances.

DICOM has no "end of series" message, so every router guesses. Orthanc's
StableAge, mercure's series_complete_trigger and the MONAI Informatics
Gateway's idle timeout all wait for silence. This sweep completes a series when
either of these holds (``[completion]``):

- no instance arrived for ``series_idle_seconds``, or for
  ``stow_idle_seconds`` where the latest came by STOW-RS (a request's end
  is no series' end: many clients send one instance a request);
- ``complete_on_release`` is set and the association that delivered the
  series' latest instance was released (a sender closes its association once a
  series is sent, so there is nothing left to wait for).

An association that aborts does not complete anything: the sender may retry.
The sweep runs every ``sweep_interval_seconds`` (apscheduler) and at once after
each release. It also deletes unmatched series after their retention time.

Study-level rules (the brain MRI needs T1, T1c, T2 and FLAIR) add a second
stage: a study is complete when every required sequence role is filled by a
complete series, no series of the study is still arriving, and the study has
been quiet for ``study_idle_seconds``. If a role is still missing
``force_complete_seconds`` after the study's last instance, its job fails with
a reason naming the missing sequences, and nothing runs on the partial study.
"""

from __future__ import annotations

import datetime as dt
import threading

import structlog

from node.config import CompletionSection
from node.index import AssemblyState, Index, JobState, SeriesState, utcnow
from node.metrics import Metrics, since
from node.route import Router
from node.spool import Spool


class CompletionSweep:
    """Moves idle or released series from ``receiving`` to ``complete``.

    Parameters
    ----------
    settings:
        The ``[completion]`` section.
    index, spool:
        State to read and update; the spool for retention clean-up.
    router:
        The route step: complete series and studies are handed to it.
    metrics:
        The node's :class:`node.metrics.Metrics`; None: a private one.
        Each job routing queues is one observation of
        ``ainode_latency_to_complete_seconds`` for its pipeline.
    """

    def __init__(
        self, settings: CompletionSection, index: Index, spool: Spool, router: Router, *, metrics: Metrics | None = None
    ):
        self.settings = settings
        self.index = index
        self.spool = spool
        self.router = router
        self.metrics = metrics if metrics is not None else Metrics()
        self.log = structlog.get_logger("node.complete")
        self._lock = threading.Lock()  # one sweep at a time, scheduled or triggered

    def sweep(self, now: dt.datetime | None = None) -> list[str]:
        """Complete what is due; returns the series UIDs completed."""
        now = now or utcnow()
        done: list[str] = []
        with self._lock:
            due = self.index.series_to_complete(
                now, self.settings.series_idle_seconds, self.settings.complete_on_release,
                stow_idle_seconds=self.settings.stow_idle_seconds,
            )
            for series_uid in due:
                info = self.index.series_info(series_uid)
                if info is None:
                    continue
                idle = (now - info.last_received_at).total_seconds()
                stow = info.last_source == "stow-rs"
                limit = self.settings.stow_idle_seconds if stow else self.settings.series_idle_seconds
                why = "association released" if info.released and idle < limit else f"idle {idle:.1f} s"
                if stow:
                    why += " (STOW-RS)"
                if self.index.set_series_state(series_uid, SeriesState.COMPLETE, why, expect=SeriesState.RECEIVING):
                    self.log.info(
                        "series_complete",
                        study_uid=info.study_uid,
                        series_uid=series_uid,
                        instances=info.instance_count,
                        reason=why,
                    )
                    done.append(series_uid)
                    try:
                        self._observe_complete(self.router.route_series(series_uid))
                    except Exception:
                        # The series stays 'complete'; routing is retried on restart.
                        self.log.exception("route_failed", series_uid=series_uid)
            self._complete_studies(now)
            self._purge_unmatched(now)
        return done

    def _complete_studies(self, now: dt.datetime) -> None:
        for assembly in self.index.assemblies(AssemblyState.RECEIVING):
            study_uid, route = assembly.study_uid, assembly.route
            rule = self.router.study_routes.get(route)
            if rule is None:
                self.index.set_assembly_state(
                    study_uid, route, AssemblyState.FAILED, f"route {route!r} is no longer configured"
                )
                continue
            by_role, receiving = self.router.candidates(study_uid, rule)
            missing = [role for role, found in by_role.items() if not found]
            study = self.index.study_info(study_uid)
            assert study is not None  # an assembly is only made for a study the index holds
            idle = (now - study.last_received_at).total_seconds()
            if not missing and not receiving and idle >= self.settings.study_idle_seconds:
                self.index.set_assembly_state(
                    study_uid, route, AssemblyState.COMPLETE, f"all of {', '.join(by_role)} complete"
                )
                self.log.info("study_complete", study_uid=study_uid, route=route, idle_seconds=round(idle, 1))
                try:
                    self._observe_complete([self.router.queue_study(study_uid, route)])
                except Exception:
                    self.log.exception("route_failed", study_uid=study_uid, route=route)
            elif idle >= self.settings.force_complete_seconds:
                reason = (
                    f"study incomplete {idle:.0f} s after its last instance "
                    f"(force_complete_seconds={self.settings.force_complete_seconds:g}): "
                    f"missing {', '.join(missing) or 'none'}"
                )
                if receiving:
                    reason += f"; {len(receiving)} series still arriving"
                self.router.fail_study(study_uid, route, reason)

    def _observe_complete(self, job_ids: list[int]) -> None:
        """Seconds from each new job's last input instance to its queueing,
        per pipeline (the pipeline is known once routed, so observed here).
        A study failed at once (a role no series fills) is not observed."""
        for job_id in job_ids:
            job = self.index.job(job_id)
            if job is None or (job.state == JobState.FAILED and job.started_at is None):
                continue
            seconds = since(job.trigger_received_at, job.created_at)
            if seconds is not None:
                self.metrics.latency_complete.labels(pipeline=job.pipeline).observe(seconds)

    def _purge_unmatched(self, now: dt.datetime) -> None:
        cutoff = now - dt.timedelta(hours=self.settings.unmatched_retention_hours)
        for series in self.index.series_in_state(SeriesState.UNMATCHED, older_than=cutoff):
            removed = self.spool.remove_series(series.study_uid, series.series_uid)
            self.index.purge_series(series.series_uid, f"unmatched for {self.settings.unmatched_retention_hours} h")
            self.log.info("series_purged", study_uid=series.study_uid, series_uid=series.series_uid, files=removed)
