"""A DICOM peer as a replay source (pynetdicom): C-FIND to list (Study Root
Query/Retrieve, PS3.4 C.4.1), C-GET (PS3.4 C.4.3) or C-MOVE (PS3.4 C.4.2)
to fetch. See :mod:`node.replay.sources`.

With C-GET the instances come back on the replay's own association: each
Storage SOP Class is proposed with the SCP role (SCP/SCU Role Selection,
PS3.7 D.3.3.4) and an ``EVT_C_STORE`` handler writes them. With C-MOVE the
peer opens an association to ``move_ae``, a storage SCP that this replay
starts for itself (:class:`MoveReceiver`): the peer must know that AE title
(its host and port) and it is never the node's clinical SCP.
"""

from __future__ import annotations

import threading
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    StoragePresentationContexts,
    build_role,
    evt,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.replay.sources import (
    FetchError,
    ListedStudy,
    ReplayFilters,
    Source,
    _dedupe,
    _Fetched,
    _queries,
    _store_into,
    _text,
    _values,
)

#: At most 128 presentation contexts an association (PS3.8 9.3.2.2): the Get
#: model and the first 127 storage classes pynetdicom lists (the common ones).
_GET_STORAGE = [str(cx.abstract_syntax) for cx in StoragePresentationContexts[:127]]


class MoveReceiver:
    """The storage SCP a C-MOVE replay listens on (``--move-ae``, ``--move-port``).

    It accepts only associations called ``ae_title`` from ``peer_ae`` (the
    archive), and stores only instances of the study being fetched
    (:func:`node.replay.sources._store_into` gives the statuses).
    """

    def __init__(self, ae_title: str, bind_address: str, port: int, peer_ae: str):
        self.ae = AE(ae_title)
        self.ae.require_called_aet = True
        self.ae.require_calling_aet = [peer_ae]
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self._fetched: _Fetched | None = None
        self._lock = threading.Lock()
        server = self.ae.start_server((bind_address, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None  # block=False returns the server
        self.server = server

    def _on_store(self, event) -> int:
        with self._lock:
            fetched = self._fetched
        return _store_into(fetched, event)

    def expect(self, fetched: _Fetched | None) -> None:
        """Store the coming instances into ``fetched`` (None: refuse them)."""
        with self._lock:
            self._fetched = fetched

    def close(self) -> None:
        self.server.shutdown()


class DicomPeerSource(Source):
    """A DICOM peer ``peer_ae@host:port``; we call it as ``calling_ae``.

    ``fetch_mode`` ``get`` or ``move``; ``move`` needs ``receiver``.

    Raises
    ------
    ValueError
        ``fetch_mode`` is neither, or ``move`` without a receiver.
    """

    def __init__(self, peer_ae: str, host: str, port: int, *, calling_ae: str, fetch_mode: str = "get",
                 receiver: MoveReceiver | None = None, timeout: float = 60.0):
        if fetch_mode not in ("get", "move"):
            raise ValueError(f"fetch_mode: expected get or move, got {fetch_mode!r}")
        if fetch_mode == "move" and receiver is None:
            raise ValueError("fetch_mode: move needs a MoveReceiver (--move-ae, --move-port)")
        self.peer_ae, self.host, self.port = peer_ae, host, port
        self.calling_ae, self.fetch_mode, self.receiver, self.timeout = calling_ae, fetch_mode, receiver, timeout
        self.label = f"dicom {peer_ae}@{host}:{port}"

    def _ae(self) -> AE:
        ae = AE(self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        return ae

    def _associate(self, ae: AE, what: str, **kwargs):
        assoc = ae.associate(self.host, self.port, ae_title=self.peer_ae, **kwargs)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise FetchError(f"{what}: association with {self.peer_ae}@{self.host}:{self.port} {why}")
        return assoc

    def list_studies(self, filters: ReplayFilters) -> list[ListedStudy]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae, "C-FIND")
        found = []
        try:
            for uid, modality in _queries(filters):
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = uid or ""
                query.StudyDate = filters.date_range()
                query.ModalitiesInStudy = modality or ""
                for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                    code = getattr(status, "Status", None)
                    if code is None:
                        raise FetchError("C-FIND: no response (timed out or aborted)")
                    if code in (0xFF00, 0xFF01) and identifier is not None and "StudyInstanceUID" in identifier:
                        found.append(ListedStudy(str(identifier.StudyInstanceUID), _text(identifier, "StudyDate"),
                                                 _values(identifier, "ModalitiesInStudy")))
                    elif code not in (0x0000, 0xFF00, 0xFF01):
                        raise FetchError(f"C-FIND: status 0x{code:04X}")
        finally:
            assoc.release()
        return _dedupe(found, filters)

    def fetch(self, study_uid: str, folder: Path) -> list[Path]:
        fetched = _Fetched(study_uid, Path(folder))
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        if self.fetch_mode == "get":
            final = self._get(query, fetched)
        else:
            final = self._move(query, fetched)
        failed = int(getattr(final, "NumberOfFailedSuboperations", 0) or 0)
        code = int(final.Status)
        if code not in (0x0000, 0xB000) or failed or fetched.refused:
            details = "; ".join(fetched.refused[:3])
            raise FetchError(
                f"C-{self.fetch_mode.upper()} study {study_uid}: status 0x{code:04X}, {failed} sub-operations failed, "
                f"{len(fetched.paths)} instances stored" + (f"; {details}" if details else "")
            )
        if not fetched.paths:
            raise FetchError(f"C-{self.fetch_mode.upper()} study {study_uid}: no instances (status 0x{code:04X})")
        return list(fetched.paths)

    def _final(self, responses, what: str) -> Dataset:
        final = None
        for status, _identifier in responses:
            if getattr(status, "Status", None) is None:
                raise FetchError(f"{what}: no response (timed out or aborted)")
            if status.Status not in (0xFF00,):  # pending responses report progress only
                final = status
        if final is None:
            raise FetchError(f"{what}: no final response")
        return final

    def _get(self, query: Dataset, fetched: _Fetched) -> Dataset:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for uid in _GET_STORAGE:
            ae.add_requested_context(uid)
        roles = [build_role(uid, scp_role=True) for uid in _GET_STORAGE]
        handlers = [(evt.EVT_C_STORE, lambda event: _store_into(fetched, event))]
        assoc = self._associate(ae, "C-GET", ext_neg=roles, evt_handlers=handlers)
        try:
            return self._final(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet), "C-GET")
        finally:
            assoc.release()

    def _move(self, query: Dataset, fetched: _Fetched) -> Dataset:
        assert self.receiver is not None  # checked in __init__
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = self._associate(ae, "C-MOVE")
        self.receiver.expect(fetched)
        try:
            responses = assoc.send_c_move(query, self.receiver.ae.ae_title, StudyRootQueryRetrieveInformationModelMove)
            return self._final(responses, "C-MOVE")
        finally:
            self.receiver.expect(None)
            assoc.release()

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
