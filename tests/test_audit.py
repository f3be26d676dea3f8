"""The audit trail (node/index/audit.py, node/audit.py, ``ainode audit``).

A real Node with in-process pynetdicom peers (a modality, a Storage SCP for
the PACS, one that refuses us for good), a real UDP socket as the syslog
collector, and the append-only guarantee on SQLite and a real PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import Counter

import pydicom
import pytest
import sqlalchemy
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage
from structlog.testing import capture_logs
from typer.testing import CliRunner

from node.audit import SyslogForwarder, redacted
from node.cli import app
from node.config import ConfigError, load_config
from node.config.audit import AuditSection
from node.index import AuditEvent, Index
from node.service import Node
from tests.peers import free_port, node_sections, wait_for, write_node_toml
from tests.test_dispatch import StoreSCP
from tests.test_receive import body_of, send_raw

# RFC 5424 6: HEADER SP STRUCTURED-DATA SP MSG, MSG-UTF8 starting with the BOM.
RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 "
    rb"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    rb"(?P<host>[\x21-\x7e]{1,255}) (?P<app>[\x21-\x7e]{1,48}) (?P<procid>[\x21-\x7e]{1,128}) "
    rb"(?P<msgid>[\x21-\x7e]{1,32}) "
    rb'(?P<sd>-|(?:\[[^\s=\]"]{1,32}(?: [^\s=\]"]{1,32}="(?:[^"\\\]]|\\.)*")*\])+) '
    rb"\xef\xbb\xbf(?P<msg>.*)$",
    re.DOTALL,
)


class UdpCollector:
    """A syslog collector on a real UDP socket: every datagram it receives."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.datagrams.append(self.sock.recv(65535))
            except TimeoutError:
                continue

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def parse(message: bytes) -> dict:
    m = RFC5424.match(message)
    assert m, message[:200]
    return {**{k: v.decode() for k, v in m.groupdict().items() if k != "msg"}, "record": json.loads(m["msg"])}


@pytest.fixture
def peers():
    pacs = StoreSCP(free_port()).start()
    strict = StoreSCP(free_port(), aet="STRICT", require_called_aet=True).start()
    collector = UdpCollector()
    yield pacs, strict, collector
    pacs.stop()
    strict.stop()
    collector.stop()


def _send(port: int, contexts, datasets, called="AINODE"):
    ae = AE(ae_title="MODALITY")
    for ctx in contexts:
        ae.add_requested_context(ctx, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    return statuses


def test_node_audits_every_event(tmp_path, peers, rg1_uncr, monkeypatch):
    pacs, strict, collector = peers
    sections = node_sections(
        tmp_path,
        node={"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": free_port()},
        completion={"sweep_interval_seconds": 0.2, "series_idle_seconds": 30, "complete_on_release": True},
        # A broad rule: the CT reaches the pneumonia pipeline, which finds it not applicable.
        routes=[{"name": "broad", "pipeline": "pneumonia", "destinations": ["pacs", "strict"],
                 "match": {"Modality": ["CR", "CT"]}}],
        destinations={
            "pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            # Called "WRONG": A-ASSOCIATE-RJ rejected-permanent, a permanent failure.
            "strict": {"kind": "dicom", "ae_title": "WRONG", "host": "127.0.0.1", "port": strict.port},
        },
        retry={"initial_delay_seconds": 0.2, "max_delay_seconds": 1},
        api={"enabled": False},
        audit={"syslog": f"udp://127.0.0.1:{collector.port}", "hostname": "node-1.example"},
    )
    path = write_node_toml(tmp_path / "node.toml", sections)
    node = Node(load_config(path))
    node.start()
    try:
        port = node.config.node.port
        assert _send(port, [CTImageStorage], [], called="NOTUS") is None  # rejected
        cr, ct = pydicom.dcmread(rg1_uncr), pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        assert _send(port, [ComputedRadiographyImageStorage, CTImageStorage], [cr, ct]) == [0x0000, 0x0000]
        truncated = body_of(pydicom.dcmread(get_testdata_file("CT_small.dcm")))[:305]

        class Receiver:  # what send_raw needs of one
            address = ("127.0.0.1", port)

        status = send_raw(monkeypatch, Receiver, tmp_path, truncated, CTImageStorage, generate_uid(), ExplicitVRLittleEndian)
        assert status == 0xC210
        wait_for(lambda: {j.state for j in node.index.jobs()} == {"done", "not_applicable"}, 120, what="both jobs")
        wait_for(lambda: {d.state for d in node.index.deliveries()} == {"delivered", "failed"}
                 and len(node.index.deliveries()) == 4, 60, what="deliveries delivered and failed")
    finally:
        node.stop()

    index = Index(node.config.storage.index_url)
    rows = [r.as_dict() for r in index.audit_events(limit=1000)][::-1]
    index.close()
    by_event = Counter(r["event"] for r in rows)
    assert by_event == {
        "config_loaded": 1, "association_rejected": 1, "association_accepted": 2, "instance_stored": 2,
        "instance_quarantined": 1, "job_queued": 2, "job_started": 2, "job_finished": 2,
        "delivery_delivered": 2, "delivery_failed": 2,
    }, by_event
    first = rows[0]
    assert first["event"] == "config_loaded"
    assert first["details"]["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first["details"]["file"] == str(path.resolve()) and len(first["details"]["effective_sha256"]) == 64

    [rejected] = [r for r in rows if r["event"] == "association_rejected"]
    assert (rejected["actor"], rejected["client"]) == ("MODALITY", "127.0.0.1")
    assert "'NOTUS'" in rejected["details"]["reason"] and rejected["details"]["tls"] is False
    stored = {r["details"]["sop_instance_uid"]: r for r in rows if r["event"] == "instance_stored"}
    assert stored.keys() == {cr.SOPInstanceUID, ct.SOPInstanceUID}
    assert stored[cr.SOPInstanceUID]["study_uid"] == cr.StudyInstanceUID
    assert stored[cr.SOPInstanceUID]["actor"] == "MODALITY" and stored[cr.SOPInstanceUID]["details"]["source"] == "c-store"
    [quarantined] = [r for r in rows if r["event"] == "instance_quarantined"]
    assert quarantined["details"]["dimse_status"] == "0xC210" and "cannot be parsed" in quarantined["details"]["reason"]
    finished = {r["study_uid"]: r["details"]["state"] for r in rows if r["event"] == "job_finished"}
    assert finished == {cr.StudyInstanceUID: "done", ct.StudyInstanceUID: "not_applicable"}
    failed = [r for r in rows if r["event"] == "delivery_failed"]
    assert {r["details"]["destination"] for r in failed} == {"strict"} and all(r["details"]["error"] for r in failed)
    assert {r["study_uid"] for r in rows if r["event"].startswith("delivery_")} == {cr.StudyInstanceUID}

    # The same events, as RFC 5424 syslog over UDP.
    wait_for(lambda: len(collector.datagrams) == len(rows), 10, what="every event at the collector")
    messages = [parse(d) for d in collector.datagrams]
    assert [m["msgid"] for m in messages] == [r["event"] for r in rows]
    assert {m["host"] for m in messages} == {"node-1.example"} and {m["app"] for m in messages} == {"ainode"}
    assert [m["sd"] for m in messages] == [f'[meta sequenceId="{i}"]' for i in range(1, len(rows) + 1)]
    pri = {m["msgid"]: int(m["pri"]) for m in messages}
    assert pri["job_finished"] == 10 * 8 + 5 and pri["delivery_failed"] == 10 * 8 + 4
    assert [{k: v for k, v in r.items() if k != "id"} for r in rows] == [m["record"] for m in messages]

    # ainode audit --json --study
    out = CliRunner().invoke(app, ["audit", "--json", "--study", cr.StudyInstanceUID, "--config", str(path)])
    assert out.exit_code == 0, out.output
    printed = json.loads(out.stdout)
    assert printed == [r for r in rows if r["study_uid"] == cr.StudyInstanceUID]
    assert [r["event"] for r in printed][:1] == ["instance_stored"]
    assert Counter(r["event"] for r in printed)["delivery_delivered"] == 2
    text = CliRunner().invoke(app, ["audit", "--event", "association_rejected", "--config", str(path)])
    assert text.exit_code == 0 and "association_rejected" in text.stdout and "NOTUS" in text.stdout
    bad = CliRunner().invoke(app, ["audit", "--event", "nonsense", "--config", str(path)])
    assert bad.exit_code == 2 and "operator_action" in bad.output


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    url = request.getfixturevalue("postgres_url")
    from node.index import Base

    engine = sqlalchemy.create_engine(url)
    Base.metadata.drop_all(engine)  # each test starts empty
    engine.dispose()
    return url


def _refused(index: Index, sql: str) -> str:
    with pytest.raises(sqlalchemy.exc.DBAPIError) as err, index.engine.begin() as c:
        c.exec_driver_sql(sql)
    return str(err.value)


def test_audit_rows_cannot_be_updated_or_deleted(index_url):
    index = Index(index_url)
    try:
        index.audit(AuditEvent.OPERATOR_ACTION, actor="alice", client="10.0.0.9", details={"action": "cancel_job"})
        assert "audit_events is append-only" in _refused(index, "UPDATE audit_events SET actor = 'mallory'")
        assert "audit_events is append-only" in _refused(index, "DELETE FROM audit_events")
        if index.engine.dialect.name == "postgresql":
            assert "audit_events is append-only" in _refused(index, "TRUNCATE audit_events")
        [row] = index.audit_events()
        assert (row.actor, row.as_dict()["details"]) == ("alice", {"action": "cancel_job"})
        # A database made before the triggers gets them at start-up.
        with index.engine.begin() as c:
            names = ["audit_events_no_update", "audit_events_no_delete"] if c.dialect.name == "sqlite" else [
                "audit_events_no_change ON audit_events", "audit_events_no_truncate ON audit_events"]
            for name in names:
                c.exec_driver_sql(f"DROP TRIGGER {name}")
            c.exec_driver_sql("DELETE FROM audit_events")
        index.close()
        index = Index(index_url)
        index.audit(AuditEvent.CONFIG_LOADED)
        assert "audit_events is append-only" in _refused(index, "DELETE FROM audit_events")
        assert [r.event for r in index.audit_events()] == ["config_loaded"]
    finally:
        index.close()


def test_audit_log_line_and_queries(tmp_path):
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        with capture_logs() as logs:
            index.audit(AuditEvent.OPERATOR_ACTION, actor="ops-token", client="192.0.2.7", study_uid="1.2.3",
                        details={"action": "purge_study", "target": "1.2.3", "reason": "test data"})
        [line] = [e for e in logs if e["event"] == "audit"]
        assert line["audit_event"] == "operator_action" and line["actor"] == "ops-token"
        assert line["details"] == {"action": "purge_study", "target": "1.2.3", "reason": "test data"}
        index.audit(AuditEvent.CONFIG_LOADED)
        [first] = index.audit_events(event="operator_action")
        assert [r.id for r in index.audit_events(study_uid="1.2.3")] == [first.id]
        assert [r.event for r in index.audit_events(limit=1)] == ["config_loaded"]
        assert [r.event for r in index.audit_events(limit=1, offset=1)] == ["operator_action"]
        assert index.audit_events(since=first.at.replace(year=first.at.year + 1)) == []
        with pytest.raises(ValueError, match="not a valid AuditEvent"):
            index.audit_events(event="nonsense")
        with pytest.raises(ValueError, match="not a valid AuditEvent"):
            index.audit("nonsense")  # type: ignore[arg-type]
    finally:
        index.close()


def test_syslog_over_tcp_uses_octet_counting():
    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def accept():
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    forwarder = SyslogForwarder(AuditSection(syslog=f"tcp://127.0.0.1:{server.getsockname()[1]}"))
    records = [{"at": "2026-01-02T03:04:05.000006Z", "event": e, "actor": "Zoë", "client": None,
                "study_uid": None, "details": {"n": i}} for i, e in enumerate(["job_queued", "delivery_failed"])]
    for record in records:
        forwarder(record)
    forwarder.close()
    thread.join(5)
    server.close()
    frames, rest = [], bytes(received)
    while rest:  # RFC 6587 3.4.1: MSG-LEN SP SYSLOG-MSG
        length, _, rest = rest.partition(b" ")
        frames.append(rest[: int(length)])
        rest = rest[int(length):]
    assert [parse(f)["record"] for f in frames] == records
    assert [parse(f)["pri"] for f in frames] == ["85", "84"]


def test_audit_section_refuses_other_schemes_and_redacts_secrets(tmp_path):
    bad = write_node_toml(tmp_path / "bad.toml", {"audit": {"syslog": "http://collector:514"}})
    with pytest.raises(ConfigError, match="audit.syslog"):
        load_config(bad)
    assert AuditSection(syslog="tls://collector.example").syslog_target == ("tls", "collector.example", 6514)
    assert redacted({"url": "postgresql://ainode:s3cret@db/x", "password": "s3cret", "token_env": None}) == {
        "url": "postgresql://ainode:**********@db/x", "password": "**********", "token_env": None,
    }
