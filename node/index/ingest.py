"""Associations, instances and series: the receive side of the index."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.index.audit import AuditEvent, AuditQueries, instance_audit
from node.index.schema import Association, AssociationOutcome, Instance, Series, SeriesState, Study, utcnow
from node.index.views import InstanceRecord

#: ``series.last_source`` of STOW-RS (node.ingest.Source.STOW_RS; node.ingest imports this package).
_STOW_RS = "stow-rs"


class IngestQueries(AuditQueries):
    """Associations, instances and series (node/receive.py, node/ingest.py, node/complete.py)."""

    # -- associations -----------------------------------------------------------

    def association_opened(
        self,
        assoc_id: str,
        calling_ae: str,
        address: str,
        port: int,
        *,
        called_ae: str | None = None,
        tls: bool | None = None,
        client_cert_subject: str | None = None,
        outcome: AssociationOutcome = AssociationOutcome.ACCEPTED,
        reason: str | None = None,
    ) -> None:
        """Record an association request (PS3.8 7.1.1) and its outcome:
        accepted, or rejected (A-ASSOCIATE-RJ; then it is closed at once, with
        ``reason``). AE titles are clipped to 16 characters (PS3.5 6.2, AE).
        Raises sqlalchemy.exc.IntegrityError for an ``assoc_id`` recorded before."""
        rejected = outcome == AssociationOutcome.REJECTED
        with self._write_lock, self._session.begin() as s:
            s.add(
                Association(
                    id=assoc_id,
                    calling_ae=calling_ae[:16],
                    called_ae=None if called_ae is None else called_ae[:16],
                    peer_address=address,
                    peer_port=port,
                    tls=tls,
                    client_cert_subject=client_cert_subject,
                    outcome=outcome,
                    reason=reason,
                    closed_at=utcnow() if rejected else None,
                )
            )
            kind = AuditEvent.ASSOCIATION_REJECTED if rejected else AuditEvent.ASSOCIATION_ACCEPTED
            peer = {"association_id": assoc_id, "called_ae": called_ae, "peer_port": port, "tls": tls}
            details = {**peer, "client_cert_subject": client_cert_subject, "reason": reason}
            self.audit(kind, actor=calling_ae, client=address, details=details, session=s)

    def associations(self, limit: int = 50) -> list[Association]:
        """The latest ``limit`` association records, newest first (detached rows)."""
        with self._session() as s:
            return list(s.scalars(select(Association).order_by(Association.opened_at.desc()).limit(limit)))

    def association_closed(self, assoc_id: str, outcome: AssociationOutcome | str) -> int:
        """Record the end of an association: ``released`` (A-RELEASE) or
        ``aborted`` (A-ABORT, or the connection lost); a closed one is left
        alone. A release marks the series still receiving whose latest
        instance came on it as released (node/complete.py may complete them
        at once). Returns how many series were marked. Raises ValueError for
        an outcome that is not an AssociationOutcome."""
        outcome = AssociationOutcome(outcome)
        with self._write_lock, self._session.begin() as s:
            s.execute(
                update(Association)
                .where(Association.id == assoc_id, Association.closed_at.is_(None))
                .values(closed_at=utcnow(), outcome=outcome)
            )
            if outcome != AssociationOutcome.RELEASED:
                return 0
            res = s.connection().execute(
                update(Series)
                .where(Series.last_association_id == assoc_id, Series.state == SeriesState.RECEIVING)
                .values(released=True)
            )
            return res.rowcount or 0

    # -- instances ----------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether the SOP Instance UID is indexed (a second copy is a duplicate)."""
        with self._session() as s:
            return s.get(Instance, sop_instance_uid) is not None

    def record_instance(self, rec: InstanceRecord) -> bool:
        """Index a spooled instance; create or reopen its series and study.

        Returns False when the SOP Instance UID was already indexed (a
        duplicate: stored once, nothing changes).

        This is the ingest hot path: the common case (a known series still
        receiving) takes four Core statements in one transaction. Raises
        RuntimeError when three attempts collide with concurrent writers
        (PostgreSQL), sqlalchemy.exc.OperationalError when the database
        cannot be written (the caller answers 0xA700, PS3.4 B.2.3).
        """
        now = utcnow()
        for _ in range(3):
            try:
                with self._write_lock, self.engine.begin() as c:
                    touched = c.execute(
                        update(Series)
                        .where(Series.series_uid == rec.series_uid, Series.state == SeriesState.RECEIVING)
                        .values(
                            instance_count=Series.instance_count + 1,
                            last_received_at=now,
                            last_association_id=rec.association_id,
                            released=False,
                            last_source=rec.source,
                        )
                    ).rowcount
                    if touched:
                        c.execute(update(Study).where(Study.study_uid == rec.study_uid).values(last_received_at=now))
                    else:
                        self._new_or_reopened_series(c, rec, now)
                    # Last: a duplicate SOP Instance UID fails here and rolls back the counts.
                    c.execute(
                        insert(Instance).values(
                            sop_instance_uid=rec.sop_instance_uid,
                            series_uid=rec.series_uid,
                            study_uid=rec.study_uid,
                            sop_class_uid=rec.sop_class_uid,
                            transfer_syntax_uid=rec.transfer_syntax_uid,
                            instance_number=rec.instance_number,
                            path=str(rec.path),
                            size=rec.size,
                            received_at=now,
                            calling_ae=rec.calling_ae,
                            peer_address=rec.peer_address,
                            association_id=rec.association_id,
                            clipped=rec.clipped,
                            source=rec.source,
                        )
                    )
                    self.audit(AuditEvent.INSTANCE_STORED, session=c, **instance_audit(rec))
                    if rec.association_id:
                        c.execute(
                            update(Association)
                            .where(Association.id == rec.association_id)
                            .values(instances=Association.instances + 1)
                        )
                return True
            except IntegrityError:
                if self.has_instance(rec.sop_instance_uid):
                    return False
                # Another association created the same study or series first
                # (PostgreSQL runs writers concurrently): try again.
        raise RuntimeError(f"could not index {rec.sop_instance_uid} after 3 attempts")

    def _new_or_reopened_series(self, c: Connection, rec: InstanceRecord, now: dt.datetime) -> None:
        """First instance of a series (and maybe of its study), or new content
        for a series that was already complete: it is processed again."""
        if c.execute(update(Study).where(Study.study_uid == rec.study_uid).values(last_received_at=now)).rowcount == 0:
            c.execute(
                insert(Study).values(
                    study_uid=rec.study_uid,
                    patient_id=rec.patient_id,
                    accession_number=rec.accession_number or None,
                    patient_name=rec.patient_name or None,
                    study_date=rec.study_date or None,
                    first_received_at=now,
                    last_received_at=now,
                )
            )
        # A session on ``c`` joins its transaction and commits nothing itself.
        with Session(bind=c) as s:
            series = s.get(Series, rec.series_uid)
            created = series is None
            if series is None:
                series = Series(
                    series_uid=rec.series_uid,
                    study_uid=rec.study_uid,
                    modality=rec.modality,
                    series_description=(rec.series_description or "")[:64],
                    sop_class_uid=rec.sop_class_uid,
                    instance_count=1,
                    first_received_at=now,
                )
                s.add(series)
            else:  # counted in SQL: a concurrent writer (PostgreSQL) must not lose an instance
                series.instance_count = Series.instance_count + 1
            series.last_received_at, series.last_association_id = now, rec.association_id
            series.released, series.last_source = False, rec.source
            reason = "first instance" if created else "new instance"
            self._set_state(s, series, SeriesState.RECEIVING, reason, created=created, at=now)
            s.flush()

    def missing_paths(self, paths: Iterable[Path]) -> list[Path]:
        """Of ``paths`` (spool files), those with no instance row, in their order."""
        paths = list(paths)
        with self._session() as s:
            known = set(s.scalars(select(Instance.path)))
        return [p for p in paths if str(p) not in known]

    def instance_paths(self, series_uid: str) -> list[Path]:
        """A series' spool files, by Instance Number (absent ones last) then
        SOP Instance UID; empty for an unknown or purged series."""
        with self._session() as s:
            rows = list(
                s.execute(
                    select(Instance.path, Instance.instance_number, Instance.sop_instance_uid).where(
                        Instance.series_uid == series_uid
                    )
                )
            )
        rows.sort(key=lambda r: (r[1] is None, r[1] or 0, r[2]))
        return [Path(r[0]) for r in rows]

    # -- series --------------------------------------------------------------------

    def series_to_complete(
        self, now: dt.datetime, idle_seconds: float, on_release: bool, *, stow_idle_seconds: float | None = None
    ) -> list[str]:
        """UIDs of the series ``receiving`` whose latest instance is at least
        ``idle_seconds`` (seconds) before ``now`` (naive UTC), or, with
        ``on_release``, whose association was released. With
        ``stow_idle_seconds``, a series whose latest instance came by STOW-RS
        (``last_source``) waits that long instead of ``idle_seconds``."""
        cutoff = now - dt.timedelta(seconds=idle_seconds)
        with self._session() as s:
            q = select(Series.series_uid).where(Series.state == SeriesState.RECEIVING)
            cond = Series.last_received_at <= cutoff
            if stow_idle_seconds is not None:
                stow = Series.last_source == _STOW_RS
                stow_cutoff = now - dt.timedelta(seconds=stow_idle_seconds)
                cond = (stow & (Series.last_received_at <= stow_cutoff)) | (
                    (Series.last_source.is_(None) | ~stow) & cond
                )
            if on_release:
                cond = cond | (Series.released.is_(True))
            return list(s.scalars(q.where(cond)))

    def set_series_state(
        self, series_uid: str, new: SeriesState | str, reason: str | None = None, *, expect: SeriesState | str | None = None
    ) -> bool:
        """Move a series to ``new`` (with its ``transitions`` row); with
        ``expect``, only from that state. Returns False for an unknown series
        or one not in ``expect``; True otherwise, also when it is in ``new``
        already. Raises ValueError for a state that is not a SeriesState."""
        new = SeriesState(new)
        with self._write_lock, self._session.begin() as s:
            series = s.get(Series, series_uid)
            return series is not None and self._set_state(s, series, new, reason, expect=expect)

    def series_info(self, series_uid: str) -> Series | None:
        """The series row (detached), or None."""
        with self._session() as s:
            return s.get(Series, series_uid)

    def series_in_state(self, state: SeriesState | str, older_than: dt.datetime | None = None) -> list[Series]:
        """The series in ``state``, optionally only those in it since
        ``older_than`` (naive UTC) or earlier. Raises ValueError for a state
        that is not a SeriesState."""
        state = SeriesState(state)
        with self._session() as s:
            q = select(Series).where(Series.state == state)
            if older_than is not None:
                q = q.where(Series.state_changed_at <= older_than)
            return list(s.scalars(q))

    def purge_series(self, series_uid: str, reason: str) -> None:
        """Forget a series' instances; it becomes ``purged`` (their files are
        removed by the caller). An unknown series is left alone."""
        with self._write_lock, self._session.begin() as s:
            series = s.get(Series, series_uid)
            if series is None:
                return
            s.execute(delete(Instance).where(Instance.series_uid == series_uid))
            self._set_state(s, series, SeriesState.PURGED, reason)
            series.instance_count = 0

