"""Deliveries: due work per destination, attempts, and re-sends."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import func, select

from node.index.core import IndexCore
from node.index.schema import Delivery, DeliveryAttempt, DeliveryState, utcnow
from node.index.views import DeliveryView


class DeliveryQueries(IndexCore):
    """Deliveries of results to destinations (node/dispatch.py, ``ainode deliveries``)."""

    def due_deliveries(self, destination: str, now: dt.datetime, limit: int = 100) -> list[DeliveryView]:
        """At most ``limit`` pending deliveries to ``destination`` due at
        ``now`` (naive UTC) or earlier, oldest first."""
        with self._session() as s:
            rows = s.scalars(
                select(Delivery)
                .where(
                    Delivery.destination == destination,
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= now,
                )
                .order_by(Delivery.id)
                .limit(limit)
            )
            return [
                DeliveryView(d.id, d.job_id, d.sop_instance_uid, d.destination, d.path, d.attempts) for d in rows
            ]

    def next_delivery_time(self, destination: str) -> dt.datetime | None:
        """When the next pending delivery to ``destination`` is due (naive
        UTC), or None when none is pending."""
        with self._session() as s:
            return s.scalar(
                select(func.min(Delivery.next_attempt_at)).where(
                    Delivery.destination == destination, Delivery.state == DeliveryState.PENDING
                )
            )

    def pending_deliveries(self) -> dict[str, int]:
        """Pending deliveries (due now or awaiting a retry) per destination;
        destinations with none are absent (``ainode_outbox_pending``)."""
        with self._session() as s:
            rows = s.execute(
                select(Delivery.destination, func.count())
                .where(Delivery.state == DeliveryState.PENDING)
                .group_by(Delivery.destination)
            )
            return {destination: n for destination, n in rows}

    def record_attempt(
        self,
        delivery_id: int,
        *,
        ok: bool,
        status: str | None,
        error: str | None,
        seconds: float,
        next_attempt_at: dt.datetime | None,
    ) -> DeliveryState:
        """Record one delivery attempt: ``ok``, the DIMSE status (``0xNNNN``)
        or HTTP status code, the error and how long it took (seconds). A
        failure with ``next_attempt_at`` (naive UTC) stays pending until
        then; with ``next_attempt_at=None`` the retries are used up and it
        fails. Returns the new state. Raises LookupError for an unknown
        delivery."""
        with self._write_lock, self._session.begin() as s:
            d = self._row(s, Delivery, delivery_id)
            d.attempts += 1
            s.add(
                DeliveryAttempt(delivery_id=delivery_id, attempt=d.attempts, ok=ok, status=status, error=error, seconds=seconds)
            )
            if ok:
                new = DeliveryState.DELIVERED
                d.delivered_at = utcnow()
                d.last_error = None
            elif next_attempt_at is None:
                new = DeliveryState.FAILED
                d.last_error = error
            else:
                new = DeliveryState.PENDING
                d.last_error = error
                d.next_attempt_at = next_attempt_at
            self._set_state(s, d, new, error)
            return new

    def deliveries(self, limit: int = 50, state: DeliveryState | str | None = None) -> list[Delivery]:
        """The latest ``limit`` deliveries (detached rows), newest first,
        optionally only those in ``state``. Raises ValueError for a state
        that is not a DeliveryState."""
        with self._session() as s:
            q = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
            if state:
                q = q.where(Delivery.state == DeliveryState(state))
            return list(s.scalars(q))

    def attempts(self, delivery_id: int) -> list[DeliveryAttempt]:
        """Every attempt of a delivery (detached rows), first first; empty
        for an unknown delivery."""
        with self._session() as s:
            return list(
                s.scalars(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery_id).order_by(DeliveryAttempt.id))
            )

    def delivery(self, delivery_id: int) -> Delivery | None:
        """The delivery row ``delivery_id``, or None."""
        with self._session() as s:
            return s.get(Delivery, delivery_id)

    def resend_deliveries(
        self,
        ids: Sequence[int] = (),
        *,
        failed: bool = False,
        destination: str | None = None,
        since: dt.datetime | None = None,
        by: str,
        reason: str = "manual re-send",
    ) -> tuple[list[int], list[int]]:
        """Put deliveries back to ``pending``, due now, for a new cycle of attempts.

        Select either ``ids`` (deliveries in any state: a delivered one is
        sent again, the same file with the same SOP Instance UID, which a
        PACS stores once), or ``failed=True``: every ``failed`` delivery,
        narrowed to ``destination`` and to those whose last attempt was at or
        after ``since`` (naive UTC, as the index stores times).

        ``attempts`` restarts at 0, so the retry policy counts from the
        first attempt again; earlier attempts stay in ``delivery_attempts``
        (their numbers restart too) and ``last_error`` keeps the last error
        until the next attempt. Each re-queued delivery gets a
        ``transitions`` row (``delivery``, old state -> ``pending``, reason
        ``resend by BY: REASON``, at now), in the same transaction. A running
        node's dispatch thread polls due deliveries every second and picks
        them up without a restart.

        Returns
        -------
        (re-queued ids, ids not found)

        Raises
        ------
        ValueError
            Neither or both of ``ids`` and ``failed``; ``destination`` or
            ``since`` with ``ids``; an empty ``by`` or ``reason``.
        """
        if bool(ids) == failed:
            raise ValueError("give delivery ids or failed=True, not both and not neither")
        if ids and (destination is not None or since is not None):
            raise ValueError("destination and since narrow failed=True only, not delivery ids")
        if not by.strip() or not reason.strip():
            raise ValueError("by and reason must not be empty")
        note = f"resend by {by.strip()}: {reason.strip()}"
        now = utcnow()
        with self._write_lock, self._session.begin() as s:
            q = select(Delivery).order_by(Delivery.id)
            if ids:
                q = q.where(Delivery.id.in_(list(ids)))
            else:
                q = q.where(Delivery.state == DeliveryState.FAILED)
                if destination is not None:
                    q = q.where(Delivery.destination == destination)
                if since is not None:
                    last_at = (
                        select(DeliveryAttempt.delivery_id)
                        .group_by(DeliveryAttempt.delivery_id)
                        .having(func.max(DeliveryAttempt.at) >= since)
                    )
                    q = q.where(Delivery.id.in_(last_at))
            rows = list(s.scalars(q))
            for d in rows:
                # always: re-queuing a pending one restarts its attempts, worth its row
                self._set_state(s, d, DeliveryState.PENDING, note, at=now, always=True)
                d.attempts, d.next_attempt_at, d.delivered_at = 0, now, None
            found = {d.id for d in rows}
            return [d.id for d in rows], [i for i in dict.fromkeys(ids) if i not in found]
