"""Receive: the Storage and Verification SCP (pynetdicom).

Each handler does one thing and returns a status, as pynetdicom's examples do.
The C-STORE handler takes the fast path (docs/architecture.md, "State, and why
nothing is lost"): it writes the dataset exactly as the peer encoded it, parses
only the header up to the pixel data, and answers 0x0000 only after the file is
durable and indexed.

Refusals (PS3.4 Annex B.2.3 and PS3.7 C.4.2.1.4 for the status codes):

- a Called AE Title that is not ours (``ae_title`` or ``aliases``):
  A-ASSOCIATE-RJ, rejected-permanent, service-user, "called AE title not
  recognised" (PS3.8 9.3.4);
- a caller not on the allow-list: A-ASSOCIATE-RJ, "calling AE title not
  recognised";
- faults in the data (:mod:`node.ingest` decides, for C-STORE and STOW-RS
  alike): 0xC210 "Cannot understand" or 0xA900 "Data Set does not match
  SOP Class", quarantined;
- too little free disk, or the disk or index failing: 0xA700 "Out of
  resources", so the peer retries.

Refused datasets are kept in ``quarantine/`` with the reason. Every
association request, accepted or rejected, is one log line and one row of
``associations`` (calling and called AE, peer, TLS, client certificate).

Storage SOP Classes: every one of PS3.6, retired ones included (an old
ultrasound still sends Ultrasound Image Storage (Retired)), plus
``[node] extra_sop_classes`` (private ones), as Orthanc's
``UnknownSopClassAccepted`` and dcmtk's ``storescp --promiscuous`` allow.
"""

from __future__ import annotations

import socket
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import structlog
from pydicom import uid
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt, register_uid
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, uid_to_service_class  # type: ignore[attr-defined]

from node import tls
from node.config import NodeConfig
from node.index import AssociationOutcome, Index
from node.ingest import Ingest, Source, Status
from node.metrics import Metrics
from node.spool import FreeSpace, Spool

_LOSSLESS = {
    uid.RLELossless,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
}


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
    native: list[str] = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian]
    out.sort(key=lambda ts: (not UID(ts).is_compressed, ts not in _LOSSLESS, native.index(ts) if ts in native else 9))
    return out


def storage_sop_classes(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The SOP Classes the SCP accepts for C-STORE: pynetdicom's storage
    contexts, the retired Storage SOP Classes of PS3.6 (pydicom's UID
    dictionary; not Storage Commitment, which is no C-STORE) and ``extra``.

    Classes pynetdicom does not know are registered with its Storage
    Service Class (``pynetdicom.register_uid``), or its C-STORE would be
    refused as not implemented. pynetdicom limits *requested* contexts to
    128, not supported ones.
    """
    from pydicom._uid_dict import UID_dictionary

    out = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    retired = [
        u
        for u, (name, kind, _, status, _) in UID_dictionary.items()
        if kind == "SOP Class" and status == "Retired" and "Storage" in name and "Storage Commitment" not in name
    ]
    for u in [*retired, *extra]:
        if u in out:
            continue
        if uid_to_service_class(u) is not StorageServiceClass:
            register_uid(u, "AINodeStorage_" + u.replace(".", "_"), StorageServiceClass)
        out.append(u)
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
        The node's :class:`node.metrics.Metrics`; None: a private one.
    on_release:
        Called, with no argument, after an association is released, so the
        completion sweep can run at once instead of waiting for its interval.
    ingest:
        The ingest step shared with STOW-RS (:class:`node.ingest.Ingest`);
        by default one of its own on ``spool`` and ``index``.
    """

    def __init__(
        self,
        config: NodeConfig,
        spool: Spool,
        index: Index,
        *,
        metrics: Metrics | None = None,
        on_release: Callable[[], None] | None = None,
        ingest: Ingest | None = None,
    ):
        self.config = config
        self.spool = spool
        self.index = index
        self.metrics = metrics if metrics is not None else Metrics()
        self.on_release = on_release
        self.log = structlog.get_logger("node.receive")
        self._assoc_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._server: tls.DicomServer | None = None  # plain DICOM
        self._tls_server: tls.DicomServer | None = None  # DICOM TLS ([node.tls])
        storage = config.storage
        if ingest is None:
            free_space = FreeSpace(spool.spool_dir, storage.min_free_mb, storage.min_free_percent)
            ingest = Ingest(spool, index, free_space, metrics=self.metrics)
        self.ingest = ingest
        self.free_space = ingest.free_space
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        cfg = self.config.node
        ae = AE(ae_title=cfg.ae_title)
        syntaxes = accepted_transfer_syntaxes()
        ae.add_supported_context(Verification)
        for sop_class in storage_sop_classes(cfg.extra_sop_classes):
            ae.add_supported_context(sop_class, syntaxes)
        ae.maximum_associations = cfg.maximum_associations
        ae.network_timeout = cfg.network_timeout_seconds
        ae.dimse_timeout = cfg.dimse_timeout_seconds
        ae.acse_timeout = 30
        # Finite: with 0 (no limit) a peer may send a 4 GiB PDU, held in memory
        # whole. 256 KiB keeps the per-PDU overhead negligible for images.
        ae.maximum_pdu_size = cfg.maximum_pdu_size
        # Called AE Title: handle_requested checks it against ae_title and the
        # aliases; pynetdicom's require_called_aet compares with ae_title only.
        ae.require_called_aet = False
        return ae

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the plain DICOM listener.

        Raises
        ------
        RuntimeError
            Not started, or ``[node] plain = false``.
        """
        if self._server is None:
            raise RuntimeError("Receiver is not started" if self._tls_server is None else "plain DICOM is off ([node] plain = false)")
        return self._server.server_address[:2]

    @property
    def tls_address(self) -> tuple[str, int]:
        """(host, port) of the DICOM TLS listener.

        Raises
        ------
        RuntimeError
            Not started, or no ``[node.tls]``.
        """
        if self._tls_server is None:
            raise RuntimeError("Receiver is not started" if self._server is None else "DICOM TLS is off (no [node.tls])")
        return self._tls_server.server_address[:2]

    def start(self) -> None:
        cfg = self.config.node
        handlers = [
            (evt.EVT_CONN_OPEN, self.handle_conn_open),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
        ]
        if cfg.plain:
            self._server = tls.start_server(
                self.ae, (cfg.bind_address, cfg.port), handlers, backlog=cfg.listen_backlog
            )
            self.log.info("scp_listening", ae_title=cfg.ae_title, address=cfg.bind_address, port=self.address[1])
        if cfg.tls is not None:
            try:
                self._tls_server = tls.start_server(
                    self.ae,
                    (cfg.bind_address, cfg.tls.port),
                    handlers,
                    backlog=cfg.listen_backlog,
                    tls_context=tls.server_context(cfg.tls),
                    handshake_timeout=cfg.tls.handshake_timeout_seconds,
                )
            except BaseException:
                self.stop()
                raise
            self.log.info(
                "scp_listening", ae_title=cfg.ae_title, address=cfg.bind_address, port=self.tls_address[1], tls=True
            )

    def stop(self) -> None:
        """Stop listening; waits for running associations (and TLS
        handshakes, at most ``handshake_timeout_seconds``) to end."""
        for name in ("_server", "_tls_server"):
            server = getattr(self, name)
            if server is not None:
                server.shutdown()
                setattr(self, name, None)

    # -- association handlers -----------------------------------------------------

    def handle_conn_open(self, event) -> None:
        """Disable Nagle's algorithm: pynetdicom writes a C-STORE response in
        pieces, and Nagle plus the peer's delayed ACK would hold each one
        ~40 ms, capping ingest at ~25 instances a second."""
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _peer(self, event) -> dict[str, Any]:
        """Who is calling, for the audit: AE titles, address, TLS."""
        requestor = event.assoc.requestor
        primitive = requestor.primitive
        is_tls, subject = tls.peer_tls_info(event.assoc)
        return {
            "calling_ae": str(primitive.calling_ae_title).strip(),
            "called_ae": str(primitive.called_ae_title).strip(),
            "peer_address": requestor.address,
            "peer_port": requestor.port,
            "tls": is_tls,
            "client_cert_subject": subject,
        }

    def _audit(self, peer: dict[str, Any], outcome: AssociationOutcome, reason: str | None = None) -> str:
        """One log line and one ``associations`` row per association request."""
        assoc_id = str(uuid.uuid4())
        event = "association_rejected" if outcome == AssociationOutcome.REJECTED else "association_accepted"
        (self.log.warning if reason else self.log.info)(
            event, association_id=assoc_id, outcome=str(outcome), reason=reason, **peer
        )
        try:
            self.index.association_opened(
                assoc_id, peer["calling_ae"], peer["peer_address"], peer["peer_port"],
                called_ae=peer["called_ae"], tls=peer["tls"], client_cert_subject=peer["client_cert_subject"],
                outcome=outcome, reason=reason,
            )
        except Exception as exc:  # the audit row must not stop DICOM; the log line stands
            self.log.error("association_audit_failed", association_id=assoc_id, error=repr(exc))
        return assoc_id

    def handle_requested(self, event) -> None:
        """Refuse with A-ASSOCIATE-RJ, rejected-permanent, DICOM UL
        service-user (PS3.8 9.3.4), an association whose Called AE Title
        is not ours nor an alias (reason 7, called-AE-title-not-recognized;
        pynetdicom's ``AE.require_called_aet`` knows only one title, hence
        here), or whose caller is not on the allow-list (reason 3,
        calling-AE-title-not-recognized)."""
        cfg = self.config.node
        peer = self._peer(event)  # only the A-ASSOCIATE-RQ is known yet
        if cfg.require_called_ae_title and peer["called_ae"] not in (cfg.ae_title, *cfg.aliases):
            reason, diagnostic = f"Called AE Title {peer['called_ae']!r} is not {cfg.ae_title!r} nor an alias", 0x07
        elif cfg.allowed_callers and not any(r.allows(peer["calling_ae"], peer["peer_address"]) for r in cfg.allowed_callers):
            reason, diagnostic = "caller not on allowed_callers", 0x03
        else:
            return
        self._audit(peer, AssociationOutcome.REJECTED, reason)
        self.metrics.associations_rejected.inc()
        event.assoc.acse.send_reject(0x01, 0x01, diagnostic)
        # As pynetdicom does for its own rejections: let the DUL send the
        # A-ASSOCIATE-RJ before the socket closes, or the peer sees an abort.
        event.assoc.kill()

    def handle_rejected(self, event) -> None:
        """pynetdicom's own rejections (too many associations, user identity)."""
        self._audit(self._peer(event), AssociationOutcome.REJECTED, "rejected by pynetdicom (e.g. maximum_associations)")
        self.metrics.associations_rejected.inc()

    def handle_accepted(self, event) -> None:
        """Audit the association; ``ainode_associations_open`` + 1 until
        it is released or aborted (:meth:`_close`)."""
        assoc_id = self._audit(self._peer(event), AssociationOutcome.ACCEPTED)
        with self._lock:
            self._assoc_ids[event.assoc] = assoc_id
        self.metrics.associations_open.inc()

    def _close(self, event, outcome: AssociationOutcome) -> None:
        with self._lock:
            assoc_id = self._assoc_ids.pop(event.assoc, None)
        if assoc_id is None:
            return
        self.metrics.associations_open.dec()
        released = self.index.association_closed(assoc_id, outcome)
        self.log.info("association_closed", association_id=assoc_id, outcome=str(outcome), series_released=released)
        if released and self.on_release is not None:
            self.on_release()

    def handle_released(self, event) -> None:
        self._close(event, AssociationOutcome.RELEASED)

    def handle_aborted(self, event) -> None:
        self._close(event, AssociationOutcome.ABORTED)

    # -- DIMSE handlers ---------------------------------------------------------

    def handle_echo(self, event) -> int:
        """C-ECHO: always 0x0000 Success (PS3.7 9.3.5)."""
        return Status.SUCCESS

    def handle_store(self, event) -> int:
        """C-STORE: the shared ingest step (:meth:`node.ingest.Ingest.store`)
        on the dataset exactly as the peer encoded it, then answer.

        Returns 0x0000 once the file is durable and indexed (or was already:
        a duplicate); 0xA900 or 0xC210 for a fault in the data, which is
        quarantined; 0xA700 only when our disk is short of space
        (``[storage] min_free_mb``, ``min_free_percent``; nothing written)
        or the disk or index fails, so the peer retries.
        """
        requestor, request = event.assoc.requestor, event.request
        with self._lock:
            assoc_id = self._assoc_ids.get(event.assoc)
        peer = {
            "calling_ae": requestor.ae_title.strip(),
            "peer_address": requestor.address,
            "association_id": assoc_id,
            "affected_sop_instance_uid": str(request.AffectedSOPInstanceUID or ""),
            "affected_sop_class_uid": str(request.AffectedSOPClassUID or ""),
        }
        return self.ingest.store(
            event.encoded_dataset(include_meta=True),
            event.context.transfer_syntax,
            source=Source.C_STORE,
            peer=peer,
            expected_sop_class=peer["affected_sop_class_uid"],
            expected_sop_instance=peer["affected_sop_instance_uid"],
        ).status
