"""Dispatch: deliver results from the outbox to each destination, with retries.

Each destination has its own queue (rows of ``deliveries``) and its own
thread, so one unreachable PACS never holds back another (the Orthanc Lua
routing pitfall). A failed attempt is retried with exponential backoff
(``[retry]``, or the destination's own ``retry``); every attempt's outcome is
a row of ``delivery_attempts``. When the attempts are used up the delivery is
``failed`` with its last error: never silently dropped.

Two kinds of destination:

- ``dicom``: C-STORE SCU (pynetdicom), one association per batch
  (PS3.4 Annex B);
- ``dicomweb``: STOW-RS (dicomweb-client), one multipart request per batch
  (PS3.18 10.5), with optional basic or bearer authentication.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from node.config import DicomDestination, DicomWebDestination, NodeConfig, RetryPolicy
from node.index import DeliveryView, Index, utcnow


@dataclass(frozen=True)
class Outcome:
    """The result of sending one file."""

    ok: bool
    status: str | None = None  # "0x0000" (DIMSE) or "200" (HTTP)
    error: str | None = None


class DicomSender:
    """C-STORE SCU to one destination."""

    def __init__(self, dest: DicomDestination, calling_ae: str):
        self.dest = dest
        self.calling_ae = calling_ae

    def send(self, paths: Sequence[Path]) -> list[Outcome]:
        datasets = [pydicom.dcmread(p) for p in paths]
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout_seconds
        contexts = {}
        for ds in datasets:
            ts = ds.file_meta.TransferSyntaxUID
            syntaxes = [ts] if ts.is_compressed else [ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            contexts.setdefault(ds.SOPClassUID, [])
            for s in syntaxes:
                if s not in contexts[ds.SOPClassUID]:
                    contexts[ds.SOPClassUID].append(s)
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, syntaxes)
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
            err = f"association to {self.dest.ae_title}@{self.dest.host}:{self.dest.port} failed: {why}"
            return [Outcome(False, None, err) for _ in paths]
        outcomes = []
        try:
            for ds in datasets:
                try:
                    status = assoc.send_c_store(ds)
                except (RuntimeError, ValueError) as exc:  # no accepted presentation context, etc.
                    outcomes.append(Outcome(False, None, f"C-STORE not sent: {exc}"))
                    continue
                if not status or "Status" not in status:
                    outcomes.append(Outcome(False, None, "no C-STORE response (connection lost or timed out)"))
                    continue
                code = int(status.Status)
                # 0x0000 success; 0xB000/0xB006/0xB007 warnings: stored all the same (PS3.4 B.2.3).
                ok = code == 0x0000 or (code & 0xF000) == 0xB000
                text = status.get("ErrorComment") or None
                outcomes.append(Outcome(ok, f"0x{code:04X}", None if ok else f"C-STORE status 0x{code:04X} {text or ''}".strip()))
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes


class StowSender:
    """STOW-RS client to one destination."""

    def __init__(self, dest: DicomWebDestination):
        from dicomweb_client.api import DICOMwebClient

        self.dest = dest
        session = requests.Session()
        session.verify = dest.verify_tls
        if dest.auth is not None and dest.auth.type == "basic":
            session.auth = (dest.auth.username, dest.auth.password)
        headers = {"Authorization": f"Bearer {dest.auth.token}"} if dest.auth is not None and dest.auth.type == "bearer" else None
        self.client = DICOMwebClient(dest.url, session=session, headers=headers, timeout=dest.timeout_seconds)

    def send(self, paths: Sequence[Path]) -> list[Outcome]:
        datasets = [pydicom.dcmread(p) for p in paths]
        try:
            response = self.client.store_instances(datasets)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else None
            return [Outcome(False, str(code), f"STOW-RS HTTP {code}: {exc}") for _ in paths]
        except requests.RequestException as exc:
            return [Outcome(False, None, f"STOW-RS request failed: {exc}") for _ in paths]
        failed = {}
        for item in (response or pydicom.Dataset()).get("FailedSOPSequence", []):
            failed[item.ReferencedSOPInstanceUID] = int(item.get("FailureReason", 0x0110))
        stored = {item.ReferencedSOPInstanceUID for item in (response or pydicom.Dataset()).get("ReferencedSOPSequence", [])}
        outcomes = []
        for ds in datasets:
            uid = ds.SOPInstanceUID
            if uid in failed:
                outcomes.append(Outcome(False, f"0x{failed[uid]:04X}", f"STOW-RS failure reason 0x{failed[uid]:04X}"))
            elif uid in stored or response is None:
                # A 200 without a body means all stored (some servers omit it).
                outcomes.append(Outcome(True, "200"))
            else:
                outcomes.append(Outcome(False, "200", "STOW-RS response lists neither success nor failure"))
        return outcomes


def make_sender(config: NodeConfig, name: str):
    dest = config.destinations[name]
    if isinstance(dest, DicomDestination):
        return DicomSender(dest, config.node.ae_title)
    return StowSender(dest)


class Dispatcher:
    """One delivery thread per destination.

    Parameters
    ----------
    config, index:
        The node's configuration and state.
    metrics:
        A :class:`node.api.Metrics`, or None.
    batch_size:
        Deliveries sent per association or STOW-RS request.
    """

    def __init__(self, config: NodeConfig, index: Index, *, metrics=None, batch_size: int = 50):
        self.config = config
        self.index = index
        self.metrics = metrics
        self.batch_size = batch_size
        self.log = structlog.get_logger("node.dispatch")
        self._stop = threading.Event()
        self._wake = {name: threading.Event() for name in config.destinations}
        self._threads: list[threading.Thread] = []
        self._rng = random.Random()

    def wake(self) -> None:
        for ev in self._wake.values():
            ev.set()

    def start(self) -> None:
        for name in self.config.destinations:
            t = threading.Thread(target=self._loop, args=(name,), name=f"dispatch-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.wake()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _loop(self, name: str) -> None:
        sender = make_sender(self.config, name)
        wake = self._wake[name]
        while not self._stop.is_set():
            try:
                sent = self.deliver_due(name, sender)
            except Exception:
                self.log.exception("dispatch_loop_error", destination=name)
                sent = 0
            if sent:
                continue
            nxt = self.index.next_delivery_time(name)
            wait = 1.0 if nxt is None else min(1.0, max(0.0, (nxt - utcnow()).total_seconds()))
            wake.wait(wait)
            wake.clear()

    def deliver_due(self, name: str, sender) -> int:
        """Send what is due for ``name`` now; returns how many were tried."""
        due = self.index.due_deliveries(name, utcnow(), limit=self.batch_size)
        if not due:
            return 0
        present = [d for d in due if Path(d.path).is_file()]
        for d in due:
            if d not in present:  # the result file is gone: nothing to retry with
                self._record(name, d, Outcome(False, None, f"result file missing: {d.path}"), 0.0, final=True)
        if not present:
            return len(due)
        t = time.perf_counter()
        outcomes = sender.send([Path(d.path) for d in present])
        seconds = (time.perf_counter() - t) / max(1, len(present))
        for d, outcome in zip(present, outcomes, strict=True):
            self._record(name, d, outcome, seconds)
        return len(due)

    def _record(self, name: str, d: DeliveryView, outcome: Outcome, seconds: float, final: bool = False) -> None:
        policy: RetryPolicy = self.config.retry_for(name)
        attempt = d.attempts + 1
        next_at = None
        if not outcome.ok and not final and attempt < policy.max_attempts:
            delay = policy.delay(attempt) * (1 + self._rng.uniform(-policy.jitter, policy.jitter))
            next_at = utcnow() + dt.timedelta(seconds=delay)
        state = self.index.record_attempt(
            d.id, ok=outcome.ok, status=outcome.status, error=outcome.error, seconds=seconds, next_attempt_at=next_at
        )
        log = self.log.bind(destination=name, delivery_id=d.id, job_id=d.job_id, sop_instance_uid=d.sop_instance_uid)
        if outcome.ok:
            log.info("delivered", attempt=attempt, status=outcome.status)
        elif state == "failed":
            log.error("delivery_failed", attempt=attempt, error=outcome.error)
        else:
            log.warning("delivery_retry", attempt=attempt, error=outcome.error, next_attempt_at=str(next_at))
        if self.metrics:
            self.metrics.deliveries.labels(destination=name, outcome="delivered" if outcome.ok else state).inc()
