"""Receive: the Storage and Verification SCP (pynetdicom).

Each handler does one thing and returns a status, as pynetdicom's examples do.
The C-STORE handler takes the fast path DESIGN.md describes: it writes the
dataset exactly as the peer encoded it, parses only the header up to the pixel
data, and answers 0x0000 only after the file is durable and indexed.

Refusals (PS3.4 Annex B.2.3 and PS3.7 C.4.2.1.4 for the status codes):

- a caller not on the allow-list: A-ASSOCIATE-RJ, rejected-permanent,
  service-user, "calling AE title not recognised" (PS3.8 9.3.4);
- a dataset that cannot be parsed: 0xC210 "Cannot understand";
- missing or malformed UIDs, or a dataset that contradicts the request's
  Affected SOP Class/Instance UID: 0xA900 "Data Set does not match SOP Class";
- the disk or index failing: 0xA700 "Out of resources", so the peer retries.

Refused datasets are kept in ``quarantine/`` with the reason.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import structlog
from pydicom import uid
from pydicom.uid import AllTransferSyntaxes, UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import NodeConfig
from node.index import Index, InstanceRecord
from node.spool import INDEX_KEYWORDS, Spool, is_safe_uid, read_header

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

_LOSSLESS = {
    uid.RLELossless,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
}
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def accepted_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data pydicom can decode here (installed
    plugins included).

    pynetdicom accepts, for each proposed context, the first syntax of this
    list that the requestor proposed. Compressed syntaxes come first: a
    sender that offers one usually holds its data that way and may be unable
    to transcode (dcmtk's storescu fails "unable to convert" when a JPEG file
    must go out uncompressed). Lossless before lossy, so a sender that offers
    both for uncompressed data is never pushed into lossy compression.
    """
    from pydicom.pixels.decoders.base import get_decoder

    out = []
    for ts in AllTransferSyntaxes:
        try:
            if get_decoder(ts).is_available:
                out.append(str(ts))
        except NotImplementedError:
            continue
    native = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian]
    out.sort(key=lambda ts: (not UID(ts).is_compressed, ts not in _LOSSLESS, native.index(ts) if ts in native else 9))
    return out


class Receiver:
    """The node's DICOM SCP.

    Parameters
    ----------
    config:
        Uses ``[node]`` (AE title, address, port, allow-list, timeouts).
    spool, index:
        Where instances are written and recorded.
    metrics:
        An :class:`node.api.Metrics`, or None.
    on_release:
        Called, with no argument, after an association is released, so the
        completion sweep can run at once instead of waiting for its interval.
    """

    def __init__(
        self,
        config: NodeConfig,
        spool: Spool,
        index: Index,
        *,
        metrics: Any = None,
        on_release: Callable[[], None] | None = None,
    ):
        self.config = config
        self.spool = spool
        self.index = index
        self.metrics = metrics
        self.on_release = on_release
        self.log = structlog.get_logger("node.receive")
        self._assoc_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._server = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        cfg = self.config.node
        ae = AE(ae_title=cfg.ae_title)
        syntaxes = accepted_transfer_syntaxes()
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.maximum_associations = cfg.maximum_associations
        ae.network_timeout = cfg.network_timeout_seconds
        ae.dimse_timeout = cfg.dimse_timeout_seconds
        ae.acse_timeout = 30
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs from the peer
        return ae

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("Receiver is not started")
        return self._server.server_address[:2]

    def start(self) -> None:
        cfg = self.config.node
        handlers = [
            (evt.EVT_CONN_OPEN, self.handle_conn_open),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
        ]
        self._server = self.ae.start_server((cfg.bind_address, cfg.port), block=False, evt_handlers=handlers)
        self.log.info("scp_listening", ae_title=cfg.ae_title, address=cfg.bind_address, port=self.address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- association handlers -----------------------------------------------------

    def handle_conn_open(self, event) -> None:
        """Disable Nagle's algorithm: pynetdicom writes a C-STORE response in
        pieces, and Nagle plus the peer's delayed ACK would hold each one
        ~40 ms, capping ingest at ~25 instances a second."""
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_requested(self, event) -> None:
        """Refuse callers not on the allow-list with A-ASSOCIATE-RJ."""
        rules = self.config.node.allowed_callers
        if not rules:
            return
        requestor = event.assoc.requestor
        # Only the A-ASSOCIATE-RQ primitive is known at this point.
        calling, address = requestor.primitive.calling_ae_title.strip(), requestor.address
        if any(rule.allows(calling, address) for rule in rules):
            return
        self.log.warning("association_rejected", calling_ae=calling, peer=address, reason="not on allowed_callers")
        if self.metrics:
            self.metrics.associations_rejected.inc()
        # rejected-permanent, DICOM UL service-user, calling AE title not recognised
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        # As pynetdicom does for its own rejections: let the DUL send the
        # A-ASSOCIATE-RJ before the socket closes, or the peer sees an abort.
        event.assoc.kill()

    def handle_accepted(self, event) -> None:
        requestor = event.assoc.requestor
        assoc_id = str(uuid.uuid4())
        with self._lock:
            self._assoc_ids[event.assoc] = assoc_id
        self.index.association_opened(assoc_id, requestor.ae_title.strip(), requestor.address, requestor.port)

    def _close(self, event, outcome: str) -> None:
        with self._lock:
            assoc_id = self._assoc_ids.pop(event.assoc, None)
        if assoc_id is None:
            return
        released = self.index.association_closed(assoc_id, outcome)
        self.log.info("association_closed", association_id=assoc_id, outcome=outcome, series_released=released)
        if released and self.on_release is not None:
            self.on_release()

    def handle_released(self, event) -> None:
        self._close(event, "released")

    def handle_aborted(self, event) -> None:
        self._close(event, "aborted")

    # -- DIMSE handlers ---------------------------------------------------------

    def handle_echo(self, event) -> int:
        return STATUS_SUCCESS

    def handle_store(self, event) -> int:
        """Spool, index, then answer; see the module docstring for refusals."""
        started = time.perf_counter()
        requestor = event.assoc.requestor
        calling, address = requestor.ae_title.strip(), requestor.address
        with self._lock:
            assoc_id = self._assoc_ids.get(event.assoc)
        request = event.request
        encoded = event.encoded_dataset(include_meta=True)
        peer = {
            "calling_ae": calling,
            "peer_address": address,
            "association_id": assoc_id,
            "affected_sop_instance_uid": str(request.AffectedSOPInstanceUID or ""),
            "affected_sop_class_uid": str(request.AffectedSOPClassUID or ""),
        }

        try:
            header = read_header(encoded, INDEX_KEYWORDS)
        except Exception as exc:  # any parse failure: pydicom raises many kinds
            return self._refuse(encoded, STATUS_CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}", peer)

        bad = [kw for kw in _REQUIRED_UIDS if not is_safe_uid(str(header.get(kw, "")))]
        if bad:
            return self._refuse(
                encoded, STATUS_DATASET_MISMATCH, f"missing or malformed {', '.join(bad)}", peer
            )
        if header.SOPInstanceUID != peer["affected_sop_instance_uid"]:
            return self._refuse(
                encoded,
                STATUS_DATASET_MISMATCH,
                f"SOPInstanceUID {header.SOPInstanceUID} differs from the request's "
                f"Affected SOP Instance UID {peer['affected_sop_instance_uid']}",
                peer,
            )
        if header.SOPClassUID != peer["affected_sop_class_uid"]:
            return self._refuse(
                encoded,
                STATUS_DATASET_MISMATCH,
                f"SOPClassUID {header.SOPClassUID} differs from the request's "
                f"Affected SOP Class UID {peer['affected_sop_class_uid']}",
                peer,
            )

        study_uid, series_uid, sop_uid = header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID
        log = self.log.bind(study_uid=study_uid, series_uid=series_uid, sop_instance_uid=sop_uid, calling_ae=calling)
        if self.index.has_instance(sop_uid):
            log.info("instance_duplicate")
            if self.metrics:
                self.metrics.instances_duplicate.inc()
            return STATUS_SUCCESS

        try:
            path = self.spool.store_instance(study_uid, series_uid, sop_uid, encoded)
            record = InstanceRecord.from_header(
                header, path, len(encoded), calling_ae=calling, peer_address=address, association_id=assoc_id
            )
            new = self.index.record_instance(record)
        except OSError as exc:
            log.error("instance_store_failed", error=str(exc))
            if self.metrics:
                self.metrics.instances_refused.labels(status=f"0x{STATUS_OUT_OF_RESOURCES:04X}").inc()
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # the index is down: the peer must retry
            log.error("instance_index_failed", error=repr(exc))
            if self.metrics:
                self.metrics.instances_refused.labels(status=f"0x{STATUS_OUT_OF_RESOURCES:04X}").inc()
            return STATUS_OUT_OF_RESOURCES

        if self.metrics:
            (self.metrics.instances_received if new else self.metrics.instances_duplicate).inc()
            self.metrics.store_seconds.observe(time.perf_counter() - started)
        log.debug("instance_stored", bytes=len(encoded), new=new)
        return STATUS_SUCCESS

    def _refuse(self, encoded: bytes, status: int, reason: str, peer: dict) -> int:
        details = {"dimse_status": f"0x{status:04X}", **peer}
        try:
            kept = self.spool.quarantine(encoded, reason, details)
        except OSError as exc:
            kept = None
            self.log.error("quarantine_failed", error=str(exc))
        self.log.warning("instance_refused", status=details["dimse_status"], reason=reason, quarantined=str(kept), **peer)
        if self.metrics:
            self.metrics.instances_refused.labels(status=details["dimse_status"]).inc()
        return status
