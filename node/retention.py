"""Retention: delete old files from the spool, the quarantine and the outbox.

``[retention]`` gives an age per folder in days; 0 keeps that folder's files
forever. The node runs :meth:`Retention.run` from its apscheduler once at
start-up and every ``interval_minutes``:

- **spool**: every instance of a study whose last instance came more than
  ``spool_days`` ago. The index forgets the instances and marks the series
  ``purged`` in the same transaction that checks the study is idle; only the
  files of the instances it forgot are deleted.
- **quarantine**: refused instances and their ``.json`` reasons older than
  ``quarantine_days`` (file modification time).
- **outbox**: results (SEG, SR) older than ``outbox_days``.

A study with queued or running jobs, pending deliveries, series still
arriving or not yet routed, or an open study assembly is never purged, from
the spool or the outbox (:meth:`node.index.Index.study_busy`). Each clean-up
logs what it removed: files and bytes per folder.

Series that no routing rule matched are deleted sooner, by
``[completion] unmatched_retention_hours`` (:mod:`node.complete`).

The audit trail (``audit_events``, :mod:`node.index.audit`) is never deleted:
it is append-only, and how long it is kept is the database administrator's decision.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from node.config import RetentionSection
from node.index import Index, utcnow
from node.spool import Spool, is_safe_uid

_DAY = dt.timedelta(days=1)


@dataclass
class Removed:
    """What one clean-up of one folder removed."""

    files: int = 0
    bytes: int = 0
    studies: int = 0
    kept_busy: int = 0  # studies old enough, kept because work on them is not over

    def add(self, path: Path, size: int | None = None) -> None:
        try:
            size = path.stat().st_size if size is None else size
            path.unlink()
        except FileNotFoundError:
            return
        self.files += 1
        self.bytes += size


def _remove_empty_dirs(root: Path) -> None:
    """Remove the empty folders under ``root`` (not ``root`` itself)."""
    for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if Path(folder) != root:
            try:
                os.rmdir(folder)
            except OSError:
                pass  # not empty


class Retention:
    """The periodic clean-up.

    Parameters
    ----------
    settings:
        The ``[retention]`` section.
    index, spool:
        The node's state; the index says which studies are idle and not busy.
    """

    def __init__(self, settings: RetentionSection, index: Index, spool: Spool):
        self.settings = settings
        self.index = index
        self.spool = spool
        self.log = structlog.get_logger("node.retention")
        self._lock = threading.Lock()

    def run(self, now: dt.datetime | None = None) -> dict[str, dict[str, int]]:
        """Clean every folder whose retention is not 0. ``now`` is naive UTC.

        Returns folder name -> :class:`Removed` as a dict; folders kept
        forever are left out.
        """
        now = now or utcnow()
        report: dict[str, dict[str, int]] = {}
        with self._lock:
            for name, days, clean in (
                ("spool", self.settings.spool_days, self._clean_spool),
                ("quarantine", self.settings.quarantine_days, self._clean_quarantine),
                ("outbox", self.settings.outbox_days, self._clean_outbox),
            ):
                if days <= 0:
                    continue
                try:
                    removed = clean(now - days * _DAY, days)
                except Exception:  # the next run tries again; the node keeps serving
                    self.log.exception("retention_failed", folder=name)
                    continue
                report[name] = asdict(removed)
                self.log.info("retention_cleaned", folder=name, days=days, **report[name])
        return report

    def _clean_spool(self, cutoff: dt.datetime, days: float) -> Removed:
        removed = Removed()
        for study_uid in self.index.idle_studies(cutoff):
            if not self.purge_study(study_uid, cutoff, f"retention: no instance for {days:g} days", removed):
                removed.kept_busy += 1
        return removed

    def purge_study(self, study_uid: str, cutoff: dt.datetime, reason: str, removed: Removed) -> bool:
        """Forget the study's instances and delete their spool files (adding
        them to ``removed``), if it is not busy and received nothing after
        ``cutoff`` (naive UTC) (:meth:`node.index.Index.purge_study`).
        Returns False, removing nothing, otherwise. Also an operator's purge
        (:func:`node.actions.purge_study`, cutoff now)."""
        files = self.index.purge_study(study_uid, cutoff, reason)
        if files is None:
            return False
        for path, size in files:
            removed.add(path, size)
        removed.studies += 1
        if is_safe_uid(study_uid):
            study_dir = self.spool.spool_dir / study_uid
            _remove_empty_dirs(study_dir)
            try:
                study_dir.rmdir()
            except OSError:
                pass  # something new arrived, or not there
        return True

    def _clean_quarantine(self, cutoff: dt.datetime, days: float) -> Removed:
        removed = Removed()
        limit = cutoff.replace(tzinfo=dt.UTC).timestamp()
        for folder, _, names in os.walk(self.spool.quarantine_dir):
            for name in names:
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                if stat.st_mtime <= limit:
                    removed.add(path, stat.st_size)
        _remove_empty_dirs(self.spool.quarantine_dir)
        return removed

    def _clean_outbox(self, cutoff: dt.datetime, days: float) -> Removed:
        removed = Removed()
        limit = cutoff.replace(tzinfo=dt.UTC).timestamp()
        for study_dir in sorted(p for p in self.spool.outbox_dir.iterdir() if p.is_dir()):
            old = [(p, st) for p in study_dir.rglob("*") if p.is_file() and (st := p.stat()).st_mtime <= limit]
            if not old:
                continue
            if self.index.study_busy(study_dir.name):
                removed.kept_busy += 1
                continue
            for path, st in old:
                removed.add(path, st.st_size)
            removed.studies += 1
            _remove_empty_dirs(study_dir)
            try:
                study_dir.rmdir()
            except OSError:
                pass
        return removed
