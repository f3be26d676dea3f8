"""Dispatch: deliver results from the outbox to each destination, with retries.

Each destination has its own queue (rows of ``deliveries``) and its own
thread, so one unreachable PACS never holds back another (the Orthanc Lua
routing pitfall). A failed attempt is retried with exponential backoff
(``[retry]``, or the destination's own ``retry``); every attempt's outcome is
a row of ``delivery_attempts``. When the attempts are used up the delivery is
``failed`` with its last error: never silently dropped. A permanent failure
(:mod:`node.outcome`: e.g. C-STORE 0xA900 or 0x0122, A-ASSOCIATE-RJ
rejected-permanent, HTTP 400) fails the delivery at its first attempt;
``ainode deliveries resend`` queues it again once the cause is fixed.

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
from node.outcome import AssociationWatch, OutcomeClass, classify_dimse, classify_http, dimse_status_text
from node.tls import tls_args


@dataclass(frozen=True)
class Outcome:
    """The result of sending one file."""

    ok: bool
    status: str | None = None  # "0x0000" (DIMSE) or "200" (HTTP)
    error: str | None = None
    permanent: bool = False  # no retry can succeed: the delivery fails at once

    @classmethod
    def of(cls, outcome: OutcomeClass, status: str | None, error: str | None) -> Outcome:
        """An outcome classified by :mod:`node.outcome`; a permanent error says so."""
        if outcome == OutcomeClass.SUCCESS:
            return cls(True, status)
        permanent = outcome == OutcomeClass.PERMANENT
        return cls(False, status, f"{error} [permanent: not retried]" if permanent else error, permanent)


class DicomSender:
    """C-STORE SCU to one destination."""

    def __init__(self, dest: DicomDestination, calling_ae: str):
        self.dest = dest
        self.calling_ae = calling_ae
        # DICOM TLS (PS3.15 B.9) when the destination has a tls table; built once.
        self.tls_args = tls_args(dest.tls, dest.host)

    def send(self, paths: Sequence[Path]) -> list[Outcome]:
        datasets = [pydicom.dcmread(p) for p in paths]
        ae = AE(ae_title=self.calling_ae)
        # connection_timeout bounds the TCP connect and the TLS handshake too.
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout_seconds
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
        watch = AssociationWatch(self.dest.host, self.dest.port, self.dest.timeout_seconds, self.tls_args)
        assoc = ae.associate(
            self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=self.tls_args,
            evt_handlers=watch.handlers,
        )
        failure = watch.explain(assoc)
        if failure is not None:
            why = failure.reason
            if self.tls_args and watch.probe_tcp_ok:
                why += " (DICOM TLS: pynetdicom's log has the handshake error)"
            err = f"association to {self.dest.ae_title}@{self.dest.host}:{self.dest.port} failed: {why}"
            return [Outcome.of(failure.outcome, None, err) for _ in paths]
        outcomes = []
        try:
            for ds in datasets:
                try:
                    status = assoc.send_c_store(ds)
                except (AttributeError, ValueError) as exc:
                    # No accepted presentation context for this SOP class and transfer
                    # syntax, or a data set that cannot be encoded: a retry sends the same.
                    outcomes.append(Outcome.of(OutcomeClass.PERMANENT, None, f"C-STORE not sent: {exc}"))
                    continue
                except RuntimeError as exc:  # the association ended (peer abort) mid-batch
                    outcomes.append(Outcome(False, None, f"C-STORE not sent: {exc}"))
                    continue
                if not status or "Status" not in status:
                    outcomes.append(Outcome(False, None, "no C-STORE response (connection lost or timed out)"))
                    continue
                code = int(status.Status)
                text = status.get("ErrorComment") or None
                error = f"C-STORE status {dimse_status_text(code)} {text or ''}".strip()
                outcomes.append(Outcome.of(classify_dimse(code), f"0x{code:04X}", error))
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
            session.auth = (dest.auth.username, dest.auth.password.get_secret_value())
        headers = None
        if dest.auth is not None and dest.auth.type == "bearer":
            headers = {"Authorization": f"Bearer {dest.auth.token.get_secret_value()}"}
        self.client = DICOMwebClient(dest.url, session=session, headers=headers, timeout=dest.timeout_seconds)
        # Dispatch owns retries (backoff, attempts recorded): dicomweb-client's own
        # would silently repeat a 503 five times within one attempt.
        self.client.set_http_retry_params(retry=False)

    def send(self, paths: Sequence[Path]) -> list[Outcome]:
        datasets = [pydicom.dcmread(p) for p in paths]
        try:
            response = self.client.store_instances(datasets)
        except requests.HTTPError as exc:
            if exc.response is None:
                return [Outcome(False, None, f"STOW-RS HTTP error: {exc}") for _ in paths]
            code = exc.response.status_code
            body = _stow_response_body(exc.response) if code == 409 else None
            if body is None:  # 409 Conflict lists why each instance failed (PS3.18 10.5.3)
                return [Outcome.of(classify_http(code), str(code), f"STOW-RS HTTP {code}: {exc}") for _ in paths]
            response = body
        except requests.RequestException as exc:
            return [Outcome(False, None, f"STOW-RS request failed: {_request_error_text(exc)}") for _ in paths]
        failed = {}
        for item in (response or pydicom.Dataset()).get("FailedSOPSequence", []):
            failed[item.ReferencedSOPInstanceUID] = int(item.get("FailureReason", 0x0110))
        stored = {item.ReferencedSOPInstanceUID for item in (response or pydicom.Dataset()).get("ReferencedSOPSequence", [])}
        outcomes = []
        for ds in datasets:
            uid = ds.SOPInstanceUID
            if uid in failed:
                code = failed[uid]
                error = f"STOW-RS failure reason {dimse_status_text(code)}"
                outcomes.append(Outcome.of(classify_dimse(code), f"0x{code:04X}", error))
            elif uid in stored or not response:
                # A 200 without a body means all stored (some servers omit it).
                outcomes.append(Outcome(True, "200"))
            else:
                outcomes.append(Outcome(False, "200", "STOW-RS response lists neither success nor failure"))
        return outcomes


def _stow_response_body(response: requests.Response) -> pydicom.Dataset | None:
    """The DICOM JSON Store Instances Response Module of an error response, or None."""
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in ("application/dicom+json", "application/json"):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _request_error_text(exc: requests.RequestException) -> str:
    """``connection refused: ...`` / ``timed out: ...`` where that is the cause, else requests' message."""
    causes, e = [], exc
    while e is not None and len(causes) < 8:  # requests -> urllib3 MaxRetryError -> reason -> socket error
        causes.append(e)
        e = getattr(e, "reason", None) or e.__cause__ or (e.args[0] if e.args and isinstance(e.args[0], BaseException) else None)
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"connection refused: {exc}"
    if isinstance(exc, requests.Timeout) or any(isinstance(c, TimeoutError) for c in causes):
        return f"timed out: {exc}"
    return str(exc)


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
        if not outcome.ok and not final and not outcome.permanent and attempt < policy.max_attempts:
            delay = policy.delay(attempt) * (1 + self._rng.uniform(-policy.jitter, policy.jitter))
            next_at = utcnow() + dt.timedelta(seconds=delay)
        state = self.index.record_attempt(
            d.id, ok=outcome.ok, status=outcome.status, error=outcome.error, seconds=seconds, next_attempt_at=next_at
        )
        log = self.log.bind(destination=name, delivery_id=d.id, job_id=d.job_id, sop_instance_uid=d.sop_instance_uid)
        if outcome.ok:
            log.info("delivered", attempt=attempt, status=outcome.status)
        elif state == "failed":
            log.error("delivery_failed", attempt=attempt, error=outcome.error, permanent=outcome.permanent)
        else:
            log.warning("delivery_retry", attempt=attempt, error=outcome.error, next_attempt_at=str(next_at))
        if self.metrics:
            self.metrics.deliveries.labels(destination=name, outcome="delivered" if outcome.ok else state).inc()
