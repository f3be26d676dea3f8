"""Operating the node over HTTP, against a real node in-process: a real chest
radiograph sent with a pynetdicom SCU, the real pneumonia pipeline (demo
model), a pynetdicom Storage SCP (with Verification, for the destination
check) standing for the PACS, and uvicorn on a real socket.

One node for the module (the pipeline runs once); the tests run in file
order, the actions last (they stop the job workers).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import requests
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from node.api import ApiServer, create_app
from node.index.audit import AuditEvent
from node.service import Node
from tests.peers import free_port, node_config_for, wait_for

pytestmark = pytest.mark.slow

PATIENT_NAME = "Doe^Jane"


class PacsSCP:
    """A Storage SCP that keeps each dataset it receives and answers C-ECHO."""

    def __init__(self, port: int):
        self.port = port
        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts + VerificationPresentationContexts
        handlers = [(evt.EVT_C_STORE, self._store)]
        self._server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    def stop(self):
        self._server.shutdown()


@pytest.fixture(scope="module")
def ops(tmp_path_factory, rg1_uncr):
    """(node, pacs, tokens, source dataset) once the radiograph's SEG and SR are delivered."""
    tokens = {"ops": secrets.token_urlsafe(32), "reader": secrets.token_urlsafe(32)}
    os.environ["AINODE_TEST_OPS"], os.environ["AINODE_TEST_READER"] = tokens["ops"], tokens["reader"]
    pacs = PacsSCP(free_port())
    cfg = node_config_for(
        tmp_path_factory.mktemp("ops"),
        node={"bind_address": "127.0.0.1", "port": free_port()},
        completion={"sweep_interval_seconds": 0.2, "series_idle_seconds": 30, "complete_on_release": True},
        routes=[{
            "name": "cxr", "pipeline": "pneumonia", "destinations": ["pacs"],
            "match": {"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST", ""]},
        }],
        destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
        retry={"initial_delay_seconds": 0.2, "max_delay_seconds": 1},
        worker={"torch_threads": 2},
        api={"bind_address": "127.0.0.1", "port": 0, "tokens": [
            {"name": "ops", "scopes": ["read", "operator"], "env": "AINODE_TEST_OPS"},
            {"name": "grafana", "scopes": ["read"], "env": "AINODE_TEST_READER"},
        ]},
    )
    node = Node(cfg)
    node.start()
    source = pydicom.dcmread(rg1_uncr)
    source.PatientName, source.PatientID, source.StudyDate = PATIENT_NAME, "PID-OPS-1", "20240131"
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
    assert assoc.is_established and assoc.send_c_store(source).Status == 0x0000
    assoc.release()
    wait_for(lambda: node.index.counts()["deliveries"] == {"delivered": 2}, 120, what="SEG and SR delivered")
    yield node, pacs, tokens, source
    node.stop()
    pacs.stop()
    for var in ("AINODE_TEST_OPS", "AINODE_TEST_READER"):
        os.environ.pop(var, None)


def api(node: Node, method: str, path: str, token: str | None, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"http://127.0.0.1:{node.api.address[1]}{path}", headers=headers, timeout=30, **kw)


def test_lists_filter_and_page(ops):
    node, _, tokens, source = ops
    read = tokens["reader"]
    studies = api(node, "GET", "/api/studies", read).json()
    assert studies["total"] == 1 and studies["limit"] == 50 and studies["offset"] == 0
    [study] = studies["items"]
    assert study["study_uid"] == source.StudyInstanceUID and study["patient_id"] == "PID-OPS-1"
    assert study["study_date"] == "20240131" and study["modalities"] == ["CR"]
    assert study["series_states"] == {"done": 1} and study["job_states"] == {"done": 1}
    for query, total in [
        ({"patient_id": "PID-OPS-1"}, 1), ({"patient_id": "someone-else"}, 0), ({"modality": "CR"}, 1),
        ({"modality": "MR"}, 0), ({"state": "done"}, 1), ({"state": "failed"}, 0),
        ({"since": "2000-01-01T00:00:00Z"}, 1), ({"until": "2000-01-01T00:00:00"}, 0),
    ]:
        assert api(node, "GET", "/api/studies", read, params=query).json()["total"] == total, query
    assert api(node, "GET", "/api/studies", read, params={"state": "nonsense"}).status_code == 422

    jobs = api(node, "GET", "/api/jobs", read, params={"state": "done", "pipeline": "pneumonia"}).json()
    assert jobs["total"] == 1 and jobs["items"][0]["series_uid"] == source.SeriesInstanceUID
    assert api(node, "GET", "/api/jobs", read, params={"state": "not_applicable"}).json()["total"] == 0
    assert api(node, "GET", "/api/jobs", read, params={"since": "2999-01-01T00:00:00"}).json()["total"] == 0

    deliveries = api(node, "GET", "/api/deliveries", read, params={"destination": "pacs", "state": "delivered"}).json()
    assert deliveries["total"] == 2 and len(deliveries["items"]) == 2
    page = api(node, "GET", "/api/deliveries", read, params={"limit": 1, "offset": 1}).json()
    assert page["total"] == 2 and [d["id"] for d in page["items"]] == [min(d["id"] for d in deliveries["items"])]
    assert api(node, "GET", "/api/deliveries", read, params={"limit": 1, "offset": 2}).json()["items"] == []
    assert api(node, "GET", "/api/deliveries", read, params={"destination": "elsewhere"}).json()["total"] == 0
    series = api(node, "GET", "/api/series", read, params={"study_uid": source.StudyInstanceUID}).json()
    assert series["total"] == 1 and series["items"][0]["instance_count"] == 1
    assert api(node, "GET", "/api/studies", None).status_code == 401


def test_patient_names_are_hidden_by_default(ops):
    node, _, tokens, _ = ops
    assert node.index.study_list()[1][0].study.patient_name == PATIENT_NAME  # indexed at ingest
    body = api(node, "GET", "/api/studies", tokens["reader"])
    assert body.json()["items"][0]["patient_name"] is None
    assert "Doe" not in body.text and "Jane" not in body.text
    for path in ("/status", "/api/jobs", "/api/series", "/api/deliveries"):
        assert "Doe" not in api(node, "GET", path, tokens["reader"]).text, path

    # The same node's index through an app whose configuration shows names.
    api_section = node.config.api.model_copy(update={"show_patient_names": True, "port": 0})
    shown = node.config.model_copy(update={"api": api_section})
    node.config, kept = shown, node.config
    server = ApiServer(create_app(node), api_section)
    try:
        server.start()
        items = requests.get(
            f"http://127.0.0.1:{server.address[1]}/api/studies", headers={"Authorization": f"Bearer {tokens['reader']}"},
            timeout=10,
        ).json()["items"]
    finally:
        server.stop()
        node.config = kept
    assert items[0]["patient_name"] == PATIENT_NAME


def test_timeline_of_a_processed_chest_radiograph(ops):
    node, _, tokens, source = ops
    body = api(node, "GET", f"/api/studies/{source.StudyInstanceUID}/timeline", tokens["reader"]).json()
    events = body["events"]
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    [batch] = [e for e in events if e["event"] == "instances_received"]
    assert batch["data"]["count"] == 1 and batch["data"]["calling_ae"] == "MODALITY"
    assert batch["data"]["series_uid"] == source.SeriesInstanceUID and batch["data"]["association_id"]
    assert batch["data"]["first_at"] <= batch["data"]["last_at"]

    def changes(kind):
        return [(e["data"]["from_state"], e["data"]["to_state"]) for e in events if e["event"] == kind]

    series = changes("series_state")
    assert series[:3] == [(None, "receiving"), ("receiving", "complete"), ("complete", "queued")], series
    [routed] = [e for e in events if e["event"] == "series_state" and e["data"]["to_state"] == "queued"]
    assert "job" in routed["data"]["reason"]
    assert changes("job_state") == [(None, "queued"), ("queued", "running"), ("running", "done")]
    [stages] = [e for e in events if e["event"] == "job_stages"]
    assert {"read_input", "inference", "write_outbox", "total"} <= set(stages["data"]["stages"])
    assert all(isinstance(v, float) and v >= 0 for v in stages["data"]["stages"].values())
    attempts = [e["data"] for e in events if e["event"] == "delivery_attempt"]
    assert len(attempts) == 2 and all(a["ok"] and a["status"] == "0x0000" and a["destination"] == "pacs" for a in attempts)
    kinds = [e["event"] for e in events]
    assert kinds.index("instances_received") < kinds.index("job_stages") < kinds.index("delivery_attempt")
    assert api(node, "GET", "/api/studies/1.2.3.4/timeline", tokens["reader"]).status_code == 404


def test_job_results_are_the_values_of_its_sr(ops):
    node, pacs, tokens, _ = ops
    job = node.index.job_list(state="done")[1][0]
    body = api(node, "GET", f"/api/jobs/{job.id}/results", tokens["reader"]).json()
    assert body["state"] == "done" and body["pipeline"] == "pneumonia"
    assert sorted(o["modality"] for o in body["objects"]) == ["SEG", "SR"]
    # The SR the PACS received, read independently of the node's outbox.
    [sr] = [ds for ds in pacs.received if ds.Modality == "SR"]
    buf = BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    report = hd.sr.srread(BytesIO(buf.getvalue()))
    [group] = report.content.get_planar_roi_measurement_groups()
    expected = {m.name.meaning: float(m.value) for m in group.get_measurements()}
    got = {m["name"]: m["value"] for m in body["measurements"]}
    assert set(got) == {"Probability", "Threshold Value"} and got == expected
    assert all(m["unit"] == "{probability}" for m in body["measurements"])
    judged = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
    assert {e["name"]: e["value"] for e in body["evaluations"]} == judged
    [finding] = [e["value"] for e in body["evaluations"] if e["name"] == "Pneumonia"]
    assert (finding == "Present") == (got["Probability"] >= got["Threshold Value"]), body["evaluations"]

    for obj in body["objects"]:
        file = api(node, "GET", obj["file"], tokens["reader"])
        assert file.status_code == 200 and file.headers["content-type"] == "application/dicom"
        ds = pydicom.dcmread(BytesIO(file.content))
        assert ds.SOPInstanceUID == obj["sop_instance_uid"] and ds.Modality == obj["modality"]
    assert api(node, "GET", body["objects"][0]["file"], None).status_code == 401
    assert api(node, "GET", "/api/results/1.2.3/file", tokens["reader"]).status_code == 404
    assert api(node, "GET", "/api/jobs/999999/results", tokens["reader"]).status_code == 404


def test_status_reports_each_destination_and_ready_names_its_checks(ops):
    node, _, tokens, _ = ops
    node.monitor.check_all()
    [pacs] = api(node, "GET", "/status", tokens["reader"]).json()["destinations"]
    assert pacs["name"] == "pacs" and pacs["state"] == "ok" and pacs["kind"] == "dicom", pacs
    assert pacs["last_check"]["ok"] and pacs["last_check"]["status"] == "0x0000"
    assert pacs["last_attempt"]["ok"] and pacs["pending"] == 0
    ready = api(node, "GET", "/ready", None)
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"index", "spool", "disk", "workers", "dispatchers", "scheduler", "scp"}
    schema = api(node, "GET", "/openapi.json", None)
    assert schema.status_code == 200 and "/api/jobs/{job_id}/cancel" in schema.json()["paths"]
    assert api(node, "GET", "/docs", None).status_code == 404


def _audit_rows(node: Node) -> list:
    return node.index.audit_events(event=AuditEvent.OPERATOR_ACTION, limit=1000)


def test_actions_need_the_operator_scope_and_each_writes_one_audit_row(ops):
    node, pacs, tokens, source = ops
    op, read = tokens["ops"], tokens["reader"]
    study = source.StudyInstanceUID
    delivery = node.index.delivery_list()[1][0].id
    job = node.index.job_list()[1][0].id
    posts = [
        f"/api/studies/{study}/rerun", f"/api/studies/{study}/purge", f"/api/jobs/{job}/cancel",
        f"/api/deliveries/{delivery}/resend", "/api/destinations/pacs/pause", "/api/destinations/pacs/resume",
    ]
    for path in posts:
        assert api(node, "POST", path, None, json={"reason": "test"}).status_code == 401, path
        refused = api(node, "POST", path, read, json={"reason": "test"})
        assert refused.status_code == 403 and "insufficient_scope" in refused.headers["WWW-Authenticate"], path
        assert api(node, "POST", path, op, json={}).status_code == 422, path  # no reason
    assert _audit_rows(node) == []

    def act(path: str, status: int = 200, **body) -> dict:
        before = len(_audit_rows(node))
        r = api(node, "POST", path, op, json={"reason": f"because {path}", **body})
        assert r.status_code == status, (path, r.text)
        rows = _audit_rows(node)
        assert len(rows) == before + 1, path
        assert rows[0].actor == "ops" and rows[0].client == "127.0.0.1" and rows[0].at is not None
        details = json.loads(rows[0].details)
        assert details["reason"] == f"because {path}" and details["outcome"] == ("done" if status == 200 else "refused")
        return r.json()

    # Pause: dispatch holds the re-sent delivery, and purge is refused while it is pending.
    assert act("/api/destinations/pacs/pause")["details"]["changed"] is True
    assert node.index.destination_paused("pacs")
    node.monitor.check_all()
    assert api(node, "GET", "/status", read).json()["destinations"][0]["state"] == "paused"
    received = len(pacs.received)
    assert act(f"/api/deliveries/{delivery}/resend")["details"]["state"] == "pending"
    act(f"/api/studies/{study}/purge", 409)
    assert node.index.delivery(delivery).state == "pending" and len(pacs.received) == received
    act("/api/destinations/pacs/resume")
    wait_for(lambda: node.index.delivery(delivery).state == "delivered", 30, what="re-sent delivery delivered")
    assert len(pacs.received) == received + 1
    act("/api/destinations/nowhere/pause", 404)

    # Rerun with the workers stopped: the new job stays queued, a second rerun is refused, cancel ends it.
    node.runner.stop()
    not_ready = api(node, "GET", "/ready", None)
    assert not_ready.status_code == 503 and not_ready.json()["checks"]["workers"]["ok"] is False
    assert all(c["ok"] for name, c in not_ready.json()["checks"].items() if name != "workers")
    [new_job] = act(f"/api/studies/{study}/rerun", route="cxr")["details"]["jobs"]
    assert node.index.job(new_job).state == "queued"
    act(f"/api/studies/{study}/rerun", 409)
    act(f"/api/studies/{study}/rerun", 404, route="no-such-route")
    act(f"/api/studies/{study}/purge", 409)  # queued job
    assert act(f"/api/jobs/{new_job}/cancel")["details"]["state"] == "cancelled"
    assert node.index.job(new_job).state == "cancelled"
    assert node.index.series_info(source.SeriesInstanceUID).state == "cancelled"
    act(f"/api/jobs/{new_job}/cancel", 409)
    act(f"/api/jobs/{job}/cancel", 409)  # done
    act("/api/jobs/987654/cancel", 404)
    assert api(node, "GET", "/api/jobs", read, params={"state": "cancelled"}).json()["total"] == 1

    # Purge: the spool files go, the series is purged, the outbox keeps the results.
    [path] = node.index.instance_paths(source.SeriesInstanceUID)
    purged = act(f"/api/studies/{study}/purge")["details"]
    assert purged["files"] == 1 and purged["bytes"] > 0 and not path.exists()
    assert node.index.series_info(source.SeriesInstanceUID).state == "purged"
    assert all(r.path and Path(r.path).is_file() for r in node.index.job_results(job))
    act(f"/api/studies/{study}/rerun", 409)  # nothing left to run on
    act("/api/studies/1.2.3.4/purge", 404)
