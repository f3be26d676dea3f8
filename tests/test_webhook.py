"""``kind = "webhook"`` notifications (node/notify.py, node/destinations/webhook.py).

The receivers are real HTTP servers (``http.server``, in a thread) that check
each request's HMAC-SHA256 signature with the shared secret as a receiver
would (the README's recipe); the PACS is an in-process pynetdicom Storage
SCP; jobs run the real pneumonia pipeline on a small synthetic chest CR.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import socket
import threading
import time

import pytest
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from node.config import ConfigError
from node.destinations.registry import registry
from node.dispatch import Dispatcher
from node.index import Index, JobState
from node.notify import Notifier
from node.run import Runner
from node.spool import FreeSpace, Spool
from tests.peers import free_port, node_config_for, wait_for
from tests.test_dispatch import StoreSCP, _queue_result
from tests.test_jobs_retry import spooled_job
from tests.test_outcomes import BROAD_RULE, rgb_cr, small_cr

SECRET = "s3cret-for-the-test-receiver"


def verify(secret: str, headers, body: bytes, tolerance: float = 300) -> bool:
    """The receiver's check, as the README gives it."""
    ts = headers["X-Ainode-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers["X-Ainode-Signature"]) and abs(time.time() - int(ts)) <= tolerance


class Receiver:
    """An HTTP server recording each POST; answers ``statuses`` in turn, then 200."""

    def __init__(self, statuses: list[int] | None = None):
        self.statuses = list(statuses or [])
        self.requests: list[tuple[dict, bytes, float]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body, time.monotonic()))
                code = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def events(self) -> list[dict]:
        return [json.loads(body) for _, body, _ in self.requests]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(statuses=None) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def hook(url: str, events=None, **settings) -> dict:
    table = {"kind": "webhook", "url": url, "secret": SECRET, "timeout_seconds": 3, **settings}
    if events is not None:
        table["events"] = events
    return table


def fast_retry(attempts: int = 3) -> dict:
    return {"max_attempts": attempts, "initial_delay_seconds": 0.1, "multiplier": 2, "max_delay_seconds": 0.5, "jitter": 0}


def config(tmp_path, hooks: dict, pacs_port: int = 104, **destinations):
    return node_config_for(
        tmp_path,
        storage={"fsync": False},
        routes=[BROAD_RULE],
        destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port,
                               "timeout_seconds": 5}, **destinations, **hooks},
        retry={"max_attempts": 3, "initial_delay_seconds": 0.2, "max_delay_seconds": 1, "jitter": 0},
        api={"enabled": False},
    )


@pytest.fixture
def state(tmp_path):
    made: list[tuple[Index, Notifier]] = []

    def make(cfg):
        index = Index(cfg.storage.index_url)
        spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir, fsync=False)
        notifier = Notifier(cfg)
        notifier.start()
        made.append((index, notifier))
        return index, spool, notifier

    yield make
    for index, notifier in made:
        notifier.stop(1.0)
        index.close()


def job_without_input(index: Index) -> int:
    """A queued job whose series has no instance in the spool: it fails with a reason naming the series' UID."""
    job = index.create_job(pipeline="pneumonia", route="chest", level="series", study_uid=generate_uid(),
                           series_uid=generate_uid(), destinations=["pacs"])
    return job


def test_job_events_are_signed_filtered_per_url_and_carry_no_patient_data(tmp_path, state, receivers):
    ops, audit = receivers(), receivers()
    cfg = config(tmp_path, {
        "ops": hook(ops.url, ["job.failed", "job.not_applicable"]),
        "audit": hook(audit.url, ["job.done"], include_uids=True),
    })
    index, spool, notifier = state(cfg)
    runner = Runner(cfg, index, spool, notifier=notifier)
    done_ds, lateral_ds = small_cr(), rgb_cr()  # a colour image: not_applicable
    spooled_job(index, spool, done_ds)
    assert runner.run_job(index.claim_job()) == JobState.DONE
    spooled_job(index, spool, lateral_ds)
    assert runner.run_job(index.claim_job()) == JobState.NOT_APPLICABLE
    failed_id = job_without_input(index)
    failed_job = index.claim_job()
    assert runner.run_job(failed_job) == JobState.FAILED

    wait_for(lambda: len(ops.requests) == 2 and len(audit.requests) == 1, 15, what="the events")
    time.sleep(0.3)  # nothing more arrives: each URL gets only its events
    assert [e["type"] for e in ops.events] == ["job.not_applicable", "job.failed"]
    assert [e["type"] for e in audit.events] == ["job.done"]

    for r in (ops, audit):
        for headers, body, _ in r.requests:
            assert headers["Content-Type"] == "application/json"
            assert verify(SECRET, headers, body)
            assert not verify("another secret", headers, body)
            assert not verify(SECRET, headers, body + b" ")  # the signature covers the raw body
            event = json.loads(body)
            assert headers["X-Ainode-Event"] == event["type"] and headers["X-Ainode-Delivery"] == event["id"]
            assert event["node"] == {"ae_title": cfg.node.ae_title}
            # No patient data, whatever the subscription: never a name, an ID, a date of birth, an accession number.
            for ds in (done_ds, lateral_ds):
                for value in (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber):
                    assert value.encode() not in body

    (done,) = audit.events
    assert done["data"]["state"] == "done" and done["data"]["pipeline"] == "pneumonia"
    assert done["data"]["results"] == 2 and done["data"]["destinations"] == ["pacs"]
    assert (done["data"]["study_uid"], done["data"]["series_uid"]) == (done_ds.StudyInstanceUID, done_ds.SeriesInstanceUID)

    not_applicable, failed = ops.events
    assert not_applicable["data"]["state"] == "not_applicable" and "colour" in not_applicable["data"]["reason"]
    assert failed["data"]["job_id"] == failed_id and failed["data"]["state"] == "failed"
    # Without include_uids no UID is sent, not even inside the reason text.
    assert failed["data"]["reason"] == "series <UID> has no instances in the spool"
    for _, body, _ in ops.requests:
        for uid in (lateral_ds.StudyInstanceUID, lateral_ds.SeriesInstanceUID, failed_job.study_uid, failed_job.series_uid):
            assert uid.encode() not in body
    assert "study_uid" not in failed["data"] and "series_uid" not in failed["data"]


def test_down_receivers_hold_back_neither_jobs_nor_deliveries_nor_other_receivers(tmp_path, state, receivers, rg1_uncr):
    up = receivers()
    hung = socket.socket()  # accepts connections (the kernel's backlog) but never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    pacs, refusing = StoreSCP(free_port()).start(), StoreSCP(free_port(), status=0xA900).start()
    try:
        events = ["job.failed", "delivery.failed"]
        cfg = config(
            tmp_path,
            {
                "closed": hook(f"http://127.0.0.1:{free_port()}/hook", events, retry=fast_retry(50)),
                "hung": hook(f"http://127.0.0.1:{hung.getsockname()[1]}/hook", events, timeout_seconds=20),
                "up": hook(up.url, events),
            },
            pacs_port=pacs.port,
            refusing={"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": refusing.port},
        )
        index, spool, notifier = state(cfg)
        uid = _queue_result(cfg, index, spool, rg1_uncr, ["pacs", "refusing"])

        t0 = time.monotonic()
        for _ in range(200):  # never waits for a receiver
            notifier.emit("job.failed", {"job_id": 0, "state": "failed", "reason": "burst"})
        assert time.monotonic() - t0 < 0.5

        dispatcher = Dispatcher(cfg, index, notifier=notifier)
        assert sorted(t for t in dispatcher._wake) == ["pacs", "refusing"]  # no delivery thread for a webhook
        t0 = time.monotonic()
        dispatcher.start()
        try:
            wait_for(lambda: {d.destination: d.state for d in index.deliveries()} == {"pacs": "delivered",
                                                                                      "refusing": "failed"},
                     10, what="the deliveries")
            delivered_in = time.monotonic() - t0
            runner = Runner(cfg, index, spool, notifier=notifier)
            runner.warm_up(["pneumonia"])  # the model's load is not what is timed
            job_id = job_without_input(index)
            t1 = time.monotonic()
            assert runner.run_job(index.claim_job()) == JobState.FAILED
            job_in = time.monotonic() - t1
        finally:
            dispatcher.stop()
        assert pacs.received == [uid]
        assert delivered_in < 3 and job_in < 1

        def types(r):
            return [e["type"] for e in r.events if e["data"].get("reason") != "burst"]

        wait_for(lambda: types(up) == ["delivery.failed", "job.failed"], 10, what="the live receiver's events")
        failed = next(e for e in up.events if e["type"] == "delivery.failed")["data"]
        assert failed["destination"] == "refusing" and failed["state"] == "failed" and failed["attempts"] == 1
        assert "0xA900" in failed["reason"] and "sop_instance_uid" not in failed and uid not in json.dumps(failed)
        assert [e["data"]["job_id"] for e in up.events if e["type"] == "job.failed"] == [0] * 200 + [job_id]
        closed = next(ch for ch in notifier.channels if ch.name == "closed")
        assert closed.sent == 0 and closed.failed == 0  # still retrying its first event
    finally:
        pacs.stop()
        refusing.stop()
        hung.close()


def test_retries_are_bounded_with_backoff_then_logged(tmp_path, receivers):
    flaky, broken, refusing = receivers([503, 503]), receivers([503] * 10), receivers([400])
    cfg = config(tmp_path, {
        "flaky": hook(flaky.url, ["disk.low", "disk.recovered"], retry=fast_retry(5)),
        "broken": hook(broken.url, ["disk.low"], retry=fast_retry(3)),
        "refusing": hook(refusing.url, ["disk.low"], retry=fast_retry(5)),
    })
    with capture_logs() as logs:
        notifier = Notifier(cfg)
        notifier.start()
        try:
            guard = FreeSpace(tmp_path, min_free_mb=2**40, min_free_percent=0, max_age_seconds=0, on_change=notifier.disk)
            assert not guard.ok() and not guard.ok()  # tripped once: one event
            guard.min_free_bytes = 0
            assert guard.ok()  # recovered
            wait_for(lambda: sum(ch.sent + ch.failed for ch in notifier.channels) == 4, 15, what="the notifications")
        finally:
            notifier.stop(1.0)

    assert [e["type"] for e in flaky.events] == ["disk.low"] * 3 + ["disk.recovered"]
    low = flaky.events[0]["data"]
    assert low["path"] == str(tmp_path) and low["free_bytes"] > 0 and "MiB" in low["reason"]
    assert len({e["id"] for e in flaky.events[:3]}) == 1  # a retry is the same event
    gaps = [b[2] - a[2] for a, b in zip(flaky.requests[:2], flaky.requests[1:3], strict=True)]
    assert gaps[0] >= 0.1 - 0.02 and gaps[1] >= 0.2 - 0.02  # exponential backoff
    assert all(verify(SECRET, h, b) for h, b, _ in flaky.requests)

    assert len(broken.requests) == 3  # bounded: max_attempts, then given up
    assert len(refusing.requests) == 1  # a 4xx is permanent: not retried
    failures = {e["destination"]: e for e in logs if e["event"] == "notification_failed"}
    assert set(failures) == {"broken", "refusing"}
    assert failures["broken"]["attempt"] == 3 and "503" in failures["broken"]["error"]
    assert failures["refusing"]["permanent"] is True and "400" in failures["refusing"]["error"]
    assert sum(e["event"] == "notification_retry" for e in logs) == 2 + 2  # flaky twice, broken twice


def test_a_full_queue_drops_the_oldest_event(tmp_path):
    port = free_port()
    cfg = config(tmp_path, {"hook": hook(f"http://127.0.0.1:{port}/", ["disk.low"], queue_size=2)})
    with capture_logs() as logs:
        notifier = Notifier(cfg)  # not started: the events stay queued
        for n in range(4):
            notifier.disk("/spool", f"short {n}", n)
    (ch,) = notifier.channels
    assert [e["data"]["free_bytes"] for e in ch.queue] == [2, 3] and ch.dropped == 2
    assert sum(e["event"] == "notification_dropped" for e in logs) == 2


def test_echo_posts_a_signed_ping(tmp_path, receivers):
    r = receivers()
    cfg = config(tmp_path, {"hook": hook(r.url)})
    from node.dispatch import sender_for

    outcome = sender_for(cfg, "hook").echo()
    assert outcome.ok and outcome.status == "200"
    ((headers, body, _),) = r.requests
    assert verify(SECRET, headers, body) and json.loads(body)["type"] == "ping"
    assert not sender_for(cfg, "hook").send([tmp_path / "x.dcm"])[0].ok  # takes no results


def test_configuration(tmp_path):
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET + "\n")
    table = {"kind": "webhook", "url": "https://alerts.example.org/ainode", "secret_file": str(secret_file)}
    cfg = node_config_for(tmp_path, destinations={"ops-hook": table})
    d = cfg.destinations["ops-hook"]
    assert d.secret.get_secret_value() == SECRET and SECRET not in repr(d)
    assert [str(e) for e in d.events] == ["job.done", "job.failed", "delivery.failed", "disk.low", "disk.recovered"]
    assert d.include_uids is False and not registry().kind("webhook").carries_results

    with pytest.raises(ConfigError, match=r"routes\[0\] \(chest\)\.destinations: 'ops-hook' is a webhook destination"):
        node_config_for(tmp_path, routes=[{**BROAD_RULE, "destinations": ["ops-hook"]}], destinations={"ops-hook": table})
    for bad, message in [
        ({"events": ["job.exploded"]}, "job.not_applicable"),
        ({"events": ["ping"]}, "ping"),
        ({"url": "ftp://host/"}, "http:// or https://"),
        ({"secret_file": None, "secret": "short"}, "at least 16"),
        ({"secret": SECRET}, "not both"),
    ]:
        with pytest.raises(ConfigError, match=message):
            node_config_for(tmp_path, destinations={"ops-hook": {**table, **bad}})


def test_the_node_notifies_its_disk_guard(tmp_path, receivers):
    """The whole node: a C-STORE refused 0xA700 for want of disk space sends ``disk.low``."""
    from pynetdicom import AE

    from node.service import Node

    r = receivers()
    cfg = node_config_for(
        tmp_path,
        node={"bind_address": "127.0.0.1", "port": free_port()},
        storage={"fsync": False, "min_free_mb": 2**40},
        destinations={"ops-hook": hook(r.url, ["disk.low"])},
        api={"enabled": False},
    )
    node = Node(cfg)
    node.start()
    try:
        ds = small_cr()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
        assert assoc.is_established
        try:
            assert assoc.send_c_store(ds).Status == 0xA700
        finally:
            assoc.release()
        wait_for(lambda: "disk.low" in [e["type"] for e in r.events], 10, what="disk.low")
    finally:
        node.stop()
    # (The node's periodic destination check may also have sent a ``ping``.)
    ((headers, body, _),) = [(h, b, t) for h, b, t in r.requests if h["X-Ainode-Event"] != "ping"]
    event = json.loads(body)
    assert verify(SECRET, headers, body) and event["type"] == "disk.low"
    assert event["data"]["path"] == str(cfg.storage.spool_dir) and "MiB" in event["data"]["reason"]
