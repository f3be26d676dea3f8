"""Dispatch: per-destination outbox, retries with backoff, recorded outcomes.

Destinations here are real pynetdicom Storage SCPs in-process; the STOW-RS
and Orthanc cases are in tests/test_end_to_end.py.
"""

from __future__ import annotations

import threading
import time

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from node.config import RetryPolicy, load_config
from node.dispatch import Dispatcher
from node.index import Index
from node.spool import Spool
from tests.peers import free_port, wait_for


class StoreSCP:
    """A minimal Storage SCP that records what it receives."""

    def __init__(self, port: int, aet: str = "PACS"):
        self.port, self.aet = port, aet
        self.received: list[str] = []
        self._server = None
        self._lock = threading.Lock()

    def _store(self, event):
        with self._lock:
            self.received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    def start(self):
        ae = AE(ae_title=self.aet)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server = None


def _config(tmp_path, destinations: dict, retry: dict | None = None):
    return load_config(
        None,
        storage={
            "spool_dir": str(tmp_path / "spool"),
            "quarantine_dir": str(tmp_path / "q"),
            "outbox_dir": str(tmp_path / "outbox"),
            "index_url": f"sqlite:///{tmp_path / 'index.db'}",
        },
        destinations=destinations,
        retry=retry or {"max_attempts": 5, "initial_delay_seconds": 0.2, "multiplier": 2, "max_delay_seconds": 1, "jitter": 0},
    )


def _queue_result(cfg, index: Index, spool: Spool, source_path, destinations) -> str:
    ds = pydicom.dcmread(source_path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = spool.store_result(ds)
    job = index.create_job(
        pipeline="pneumonia", route="r", level="series", study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID, destinations=destinations,
    )
    assert index.claim_job().id == job
    index.finish_job(job, [(ds, path, destinations)])
    return ds.SOPInstanceUID


@pytest.fixture
def state(tmp_path):
    def make(destinations, retry=None):
        cfg = _config(tmp_path, destinations, retry)
        index = Index(cfg.storage.index_url)
        spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir)
        made.append(index)
        return cfg, index, spool

    made: list[Index] = []
    yield make
    for index in made:
        index.close()


def _dest(port, aet="PACS"):
    return {"kind": "dicom", "ae_title": aet, "host": "127.0.0.1", "port": port, "timeout_seconds": 5}


def test_backoff_is_exponential_and_bounded():
    p = RetryPolicy(initial_delay_seconds=2, multiplier=3, max_delay_seconds=30)
    assert [p.delay(n) for n in range(1, 6)] == [2, 6, 18, 30, 30]


def test_delivers_over_c_store(state, rg1_uncr):
    pacs = StoreSCP(free_port()).start()
    try:
        cfg, index, spool = state({"pacs": _dest(pacs.port)})
        uid = _queue_result(cfg, index, spool, rg1_uncr, ["pacs"])
        dispatcher = Dispatcher(cfg, index)
        dispatcher.start()
        try:
            wait_for(lambda: index.deliveries()[0].state == "delivered", 20, what="delivery")
        finally:
            dispatcher.stop()
        assert pacs.received == [uid]
        attempts = index.attempts(index.deliveries()[0].id)
        assert [(a.ok, a.status) for a in attempts] == [(True, "0x0000")]
    finally:
        pacs.stop()


def test_retries_until_destination_returns(state, rg1_uncr):
    port = free_port()
    cfg, index, spool = state({"pacs": _dest(port)})
    uid = _queue_result(cfg, index, spool, rg1_uncr, ["pacs"])
    dispatcher = Dispatcher(cfg, index)
    dispatcher.start()
    pacs = StoreSCP(port)
    try:
        wait_for(lambda: index.deliveries()[0].attempts >= 2, 20, what="two failed attempts")
        assert index.deliveries()[0].state == "pending"
        pacs.start()
        wait_for(lambda: index.deliveries()[0].state == "delivered", 20, what="delivery after recovery")
    finally:
        dispatcher.stop()
        pacs.stop()
    attempts = index.attempts(index.deliveries()[0].id)
    assert attempts[-1].ok and not any(a.ok for a in attempts[:-1])
    assert all("association" in a.error for a in attempts[:-1])
    # backoff: each wait at least the policy's delay (jitter 0)
    gaps = [(b.at - a.at).total_seconds() for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.2 - 0.05
    assert pacs.received == [uid]


def test_gives_up_after_max_attempts_with_reason(state, rg1_uncr):
    cfg, index, spool = state(
        {"pacs": _dest(free_port())},
        retry={"max_attempts": 3, "initial_delay_seconds": 0.1, "multiplier": 1, "max_delay_seconds": 1, "jitter": 0},
    )
    _queue_result(cfg, index, spool, rg1_uncr, ["pacs"])
    dispatcher = Dispatcher(cfg, index)
    dispatcher.start()
    try:
        wait_for(lambda: index.deliveries()[0].state == "failed", 20, what="delivery failed")
    finally:
        dispatcher.stop()
    d = index.deliveries()[0]
    assert d.attempts == 3 and "association" in d.last_error
    assert [t.to_state for t in index.transitions("delivery", d.id)] == ["failed"]


def test_down_destination_does_not_hold_back_another(state, rg1_uncr):
    up = StoreSCP(free_port()).start()
    try:
        # The down destination takes its full connect timeout on each try.
        cfg, index, spool = state({"down": _dest(free_port(), "DOWN"), "up": _dest(up.port)})
        uid = _queue_result(cfg, index, spool, rg1_uncr, ["down", "up"])
        dispatcher = Dispatcher(cfg, index)
        dispatcher.start()
        t0 = time.monotonic()
        try:
            wait_for(lambda: up.received, 20, what="delivery to the live destination")
        finally:
            dispatcher.stop()
        assert up.received == [uid]
        assert time.monotonic() - t0 < 10
        states = {d.destination: d.state for d in index.deliveries()}
        assert states["up"] == "delivered" and states["down"] == "pending"
    finally:
        up.stop()
