"""Dispatch: per-destination outbox, retries with backoff, recorded outcomes.

Destinations here are real pynetdicom Storage SCPs in-process; the STOW-RS
and Orthanc cases are in tests/test_end_to_end.py.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from node.config import RetryPolicy
from node.dispatch import Dispatcher
from node.index import Index
from node.spool import Spool
from tests.peers import free_port, node_config_for, wait_for


class StoreSCP:
    """A minimal Storage SCP that records what it receives.

    It answers each C-STORE with ``status`` (settable while it runs); with
    ``require_called_aet`` it rejects associations not called ``aet``
    (A-ASSOCIATE-RJ rejected-permanent, Called AE title not recognised).
    """

    def __init__(self, port: int, aet: str = "PACS", *, status: int = 0x0000, require_called_aet: bool = False):
        self.port, self.aet = port, aet
        self.status = status
        self.require_called_aet = require_called_aet
        self.received: list[str] = []
        self._server = None
        self._lock = threading.Lock()

    def _store(self, event):
        with self._lock:
            self.received.append(event.dataset.SOPInstanceUID)
        return self.status

    def start(self):
        ae = AE(ae_title=self.aet)
        ae.require_called_aet = self.require_called_aet
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server = None


def _config(tmp_path, destinations: dict, retry: dict | None = None):
    return node_config_for(
        tmp_path,
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
    gaps = [(b.at - a.at).total_seconds() for a, b in zip(attempts, attempts[1:], strict=False)]
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


# -- outcomes: what failed, and whether to try again (node/outcome.py) ---------------------


def _one_delivery(index: Index):
    (d,) = index.deliveries()
    return d


def _run_until(cfg, index, predicate, timeout: float, what: str):
    dispatcher = Dispatcher(cfg, index)
    dispatcher.start()
    try:
        wait_for(predicate, timeout, what=what)
    finally:
        dispatcher.stop()


@pytest.mark.parametrize(
    "status, meaning",
    [(0xA900, "Data Set Does Not Match SOP Class"), (0x0122, "SOP Class Not Supported")],
    ids=["0xA900", "0x0122"],
)
def test_permanent_c_store_status_fails_at_once(state, rg1_uncr, status, meaning):
    pacs = StoreSCP(free_port(), status=status).start()
    try:
        cfg, index, spool = state({"pacs": _dest(pacs.port)})
        uid = _queue_result(cfg, index, spool, rg1_uncr, ["pacs"])
        _run_until(cfg, index, lambda: _one_delivery(index).state == "failed", 20, "permanent failure")
        time.sleep(0.5)  # longer than the first retry delay (0.2 s): no retry may follow
    finally:
        pacs.stop()
    d = _one_delivery(index)
    assert d.state == "failed" and d.attempts == 1
    assert f"0x{status:04X}" in d.last_error and meaning in d.last_error and "permanent" in d.last_error
    (attempt,) = index.attempts(d.id)
    assert (attempt.ok, attempt.status, attempt.error) == (False, f"0x{status:04X}", d.last_error)
    assert [t.to_state for t in index.transitions("delivery", d.id)] == ["failed"]
    assert pacs.received == [uid]


def test_out_of_resources_is_retried(state, rg1_uncr):
    pacs = StoreSCP(free_port(), status=0xA700).start()
    try:
        cfg, index, spool = state({"pacs": _dest(pacs.port)})
        _queue_result(cfg, index, spool, rg1_uncr, ["pacs"])
        _run_until(cfg, index, lambda: _one_delivery(index).attempts >= 2, 20, "two attempts")
    finally:
        pacs.stop()
    d = _one_delivery(index)
    assert d.state == "pending"
    assert "0xA700" in d.last_error and "Out of Resources" in d.last_error and "permanent" not in d.last_error


def test_refused_connection_is_named(state, rg1_uncr):
    port = free_port()
    cfg, index, spool = state({"pacs": _dest(port)})
    _queue_result(cfg, index, spool, rg1_uncr, ["pacs"])
    _run_until(cfg, index, lambda: _one_delivery(index).attempts >= 1, 20, "an attempt")
    d = _one_delivery(index)
    assert d.state == "pending"  # transient: the PACS may come back
    assert d.last_error == f"association to PACS@127.0.0.1:{port} failed: connection refused"


def test_silent_peer_is_timed_out(state, rg1_uncr):
    # A listening socket nobody accepts from: TCP connects (the kernel's backlog),
    # the A-ASSOCIATE-RQ is never answered.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        cfg, index, spool = state({"pacs": {**_dest(port), "timeout_seconds": 1}})
        _queue_result(cfg, index, spool, rg1_uncr, ["pacs"])
        _run_until(cfg, index, lambda: _one_delivery(index).attempts >= 1, 20, "an attempt")
    d = _one_delivery(index)
    assert d.state == "pending"
    assert "timed out: no A-ASSOCIATE response after" in d.last_error, d.last_error


def test_rejected_association_fails_at_once_with_its_reason(state, rg1_uncr):
    pacs = StoreSCP(free_port(), aet="PACS", require_called_aet=True).start()
    try:
        cfg, index, spool = state({"pacs": _dest(pacs.port, aet="OTHER")})
        _queue_result(cfg, index, spool, rg1_uncr, ["pacs"])
        _run_until(cfg, index, lambda: _one_delivery(index).state == "failed", 20, "permanent failure")
    finally:
        pacs.stop()
    d = _one_delivery(index)
    assert d.attempts == 1 and pacs.received == []
    assert "rejected (rejected permanent; source: Service User; reason: Called AE title not recognised)" in d.last_error
    assert "permanent: not retried" in d.last_error


class StowServer:
    """A tiny HTTP server in a thread answering every STOW-RS POST with ``code``
    (and ``body``, DICOM JSON, if given); counts the requests it gets."""

    def __init__(self, code: int, body: dict | None = None):
        self.code, self.body, self.posts = code, body, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self._read_body()
                outer.posts += 1
                payload = json.dumps(outer.body).encode() if outer.body is not None else b""
                self.send_response(outer.code)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _read_body(self):
                if "Content-Length" in self.headers:
                    self.rfile.read(int(self.headers["Content-Length"]))
                    return
                while size := int(self.rfile.readline().split(b";")[0], 16):  # chunked
                    self.rfile.read(size + 2)
                self.rfile.readline()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ct_small():
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")


@pytest.mark.parametrize("code, permanent", [(400, True), (408, False), (429, False), (503, False)])
def test_stow_rs_http_status_is_classified(state, ct_small, code, permanent):
    server = StowServer(code)
    try:
        cfg, index, spool = state({"web": {"kind": "dicomweb", "url": server.url, "timeout_seconds": 5}})
        _queue_result(cfg, index, spool, ct_small, ["web"])
        done = (lambda: _one_delivery(index).state == "failed") if permanent else (lambda: _one_delivery(index).attempts >= 2)
        _run_until(cfg, index, done, 20, f"HTTP {code} handled")
        if permanent:
            time.sleep(0.5)
    finally:
        server.stop()
    d = _one_delivery(index)
    assert f"STOW-RS HTTP {code}" in d.last_error
    # One request per attempt: dicomweb-client's own retries are off.
    assert server.posts == d.attempts
    if permanent:
        assert d.state == "failed" and d.attempts == 1 and "permanent" in d.last_error
    else:
        assert d.state == "pending" and "permanent" not in d.last_error


@pytest.mark.parametrize("reason, permanent", [(0xA700, False), (0xA900, True)], ids=["0xA700", "0xA900"])
def test_stow_rs_conflict_is_classified_by_failure_reason(state, ct_small, reason, permanent):
    server = StowServer(409)
    try:
        cfg, index, spool = state({"web": {"kind": "dicomweb", "url": server.url, "timeout_seconds": 5}})
        uid = _queue_result(cfg, index, spool, ct_small, ["web"])
        item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}, "00081155": {"vr": "UI", "Value": [uid]},
                "00081197": {"vr": "US", "Value": [reason]}}
        server.body = {"00081198": {"vr": "SQ", "Value": [item]}}  # Failed SOP Sequence (PS3.18 10.5.3)
        done = (lambda: _one_delivery(index).state == "failed") if permanent else (lambda: _one_delivery(index).attempts >= 2)
        _run_until(cfg, index, done, 20, "409 handled")
    finally:
        server.stop()
    d = _one_delivery(index)
    assert f"STOW-RS failure reason 0x{reason:04X}" in d.last_error
    assert (d.state == "failed") == permanent and ("permanent" in d.last_error) == permanent

