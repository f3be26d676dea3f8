"""``GET /metrics`` of a real node in-process: a pynetdicom modality sends
chest radiographs, the pneumonia demo model runs, results go to an
in-process Storage SCP; the exposition is checked with ``promtool`` and the
Grafana dashboard (deploy/grafana/ainode.json) against it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from node.metrics import Metrics
from node.service import Node
from tests.peers import free_port, wait_for
from tests.test_dispatch import StoreSCP
from tests.test_outcomes import rgb_cr, small_cr

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "ainode.json"
LATENCIES = ("complete", "job_start", "job_end", "delivered")
#: Four or more dot-separated numbers: a DICOM UID (PS3.5 9.1), never a metric value.
UID_LIKE = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def require_promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is required: apt-get install prometheus (Makefile APT_PACKAGES)")
    return path


@pytest.fixture
def running(node_config):
    pacs = StoreSCP(free_port()).start()
    down = free_port()  # nothing listens: its deliveries stay pending
    cfg = node_config(
        node={"bind_address": "127.0.0.1", "port": free_port()},
        completion={"sweep_interval_seconds": 0.2, "series_idle_seconds": 60, "complete_on_release": True},
        routes=[
            {
                "name": "cxr",
                "pipeline": "pneumonia",
                "destinations": ["pacs", "down"],
                "match": {"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST", ""]},
            }
        ],
        destinations={
            "pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            "down": {"kind": "dicom", "ae_title": "DOWN", "host": "127.0.0.1", "port": down},
        },
        retry={"max_attempts": 1000, "initial_delay_seconds": 0.5, "max_delay_seconds": 1, "jitter": 0},
        api={"bind_address": "127.0.0.1", "port": free_port()},
    )
    node = Node(cfg)
    node.start()
    yield node, pacs, cfg
    node.stop()
    pacs.stop()


def scrape(cfg) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{cfg.api.port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and want <= ls)


def test_metrics_of_a_running_node(running, tmp_path):
    node, pacs, cfg = running
    before = scrape(cfg)
    for state in ("done", "failed", "not_applicable"):  # declared at 0 before any job
        assert f'ainode_jobs_total{{pipeline="pneumonia",state="{state}"}} 0.0' in before
    assert 'ainode_outbox_pending{destination="pacs"} 0.0' in before
    assert 'ainode_outbox_pending{destination="down"} 0.0' in before
    free = total(before, "ainode_spool_free_bytes")
    assert abs(free - shutil.disk_usage(cfg.storage.spool_dir).free) < max(2**30, 0.1 * free)

    # Three frontal images in one series (done: a SEG and an SR each), one colour image (not_applicable).
    study = generate_uid()
    frontal_series = generate_uid()
    frontal = [small_cr(StudyInstanceUID=study, SeriesInstanceUID=frontal_series, InstanceNumber=i) for i in (1, 2, 3)]
    colour = rgb_cr()
    colour.StudyInstanceUID, colour.SeriesInstanceUID, colour.SeriesNumber = study, generate_uid(), 2
    sent = [*frontal, colour]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
    assert assoc.is_established
    try:
        assert [assoc.send_c_store(ds).Status for ds in sent] == [0x0000] * len(sent)
        during = scrape(cfg)
    finally:
        assoc.release()
    assert total(during, "ainode_associations_open") == 1
    assert total(during, "ainode_instances_received_total") == len(sent)

    results = 2 * len(frontal)
    wait_for(lambda: len(pacs.received) == results, 120, what="SEG and SR of each frontal image at the PACS")
    text = wait_for(
        lambda: (t := scrape(cfg))
        and total(t, "ainode_latency_to_delivered_seconds_count") == results
        and total(t, "ainode_outbox_pending", destination="down") == results
        and total(t, "ainode_associations_open") == 0
        and t,
        30, what="deliveries and outbox counted",
    )
    assert total(text, "ainode_instances_received_total") == len(sent)
    assert total(text, "ainode_jobs_total", pipeline="pneumonia", state="done") == 1
    assert total(text, "ainode_jobs_total", pipeline="pneumonia", state="not_applicable") == 1
    assert total(text, "ainode_jobs_total", pipeline="pneumonia", state="failed") == 0

    # Each delivered result once: one observation per result per destination, none for the dead one.
    delivered = node.index.deliveries(100, state="delivered")
    assert len(delivered) == results == len(pacs.received)
    assert {d.destination for d in delivered} == {"pacs"}
    assert total(text, "ainode_latency_to_delivered_seconds_count", pipeline="pneumonia", destination="pacs") == results
    assert total(text, "ainode_latency_to_delivered_seconds_count", destination="down") == 0
    assert total(text, "ainode_delivery_attempts_total", destination="pacs", outcome="delivered") == results
    assert total(text, "ainode_delivery_attempts_total", destination="down", outcome="pending") >= results
    assert total(text, "ainode_outbox_pending", destination="pacs") == 0
    assert node.index.pending_deliveries() == {"down": results}
    # Two jobs (done, not_applicable): each observed once at each step, as the job rows time them.
    seconds = {}
    for step in LATENCIES:
        if step != "delivered":
            assert total(text, f"ainode_latency_to_{step}_seconds_count", pipeline="pneumonia") == 2, step
        seconds[step] = total(text, f"ainode_latency_to_{step}_seconds_sum", pipeline="pneumonia")
    jobs = node.index.jobs(10)
    assert sorted(j.state for j in jobs) == ["done", "not_applicable"]

    def from_trigger(attribute: str) -> float:
        return sum((getattr(j, attribute) - j.trigger_received_at).total_seconds() for j in jobs)

    slack = 0.5  # seconds: the row's timestamp and the observation are a few statements apart
    assert abs(seconds["complete"] - from_trigger("created_at")) < 0.01  # both from the job row
    assert from_trigger("started_at") - 0.01 <= seconds["job_start"] <= from_trigger("started_at") + slack
    assert from_trigger("finished_at") - 0.01 <= seconds["job_end"] <= from_trigger("finished_at") + slack
    assert seconds["complete"] <= seconds["job_start"] <= seconds["job_end"]
    done = next(j for j in jobs if j.state == "done")
    done_end = (done.finished_at - done.trigger_received_at).total_seconds()
    last_delivery = max((d.delivered_at - done.trigger_received_at).total_seconds() for d in delivered)
    assert results * (done_end - 0.01) <= seconds["delivered"] <= results * (last_delivery + slack)

    # No UID nor patient data in any label or value.
    assert not UID_LIKE.findall(text), UID_LIKE.findall(text)[:5]
    for ds in sent:
        for value in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, str(ds.PatientName), ds.PatientID):
            assert value not in text

    scraped = tmp_path / "metrics.txt"
    scraped.write_text(text)
    check = subprocess.run(
        [require_promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def test_dashboard_queries_use_metrics_the_node_serves(running, tmp_path):
    node, pacs, cfg = running
    served = {s.name for family in text_string_to_metric_families(scrape(cfg)) for s in family.samples}
    dash = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dash["panels"]}
    assert {
        "Instances received", "Instances refused, by DIMSE status", "Jobs by outcome",
        "Latency to delivered, p50 / p95", "Outbox depth", "Associations open", "Free disk in the spool",
        "Delivery attempts by outcome",
    } <= titles
    used = {name for expr in dashboard_queries() for name in re.findall(r"\bainode_[a-z0-9_]+", expr)}
    assert len(used) >= 10, used
    # Sample names as served (counters end _total, histograms _bucket/_count/_sum): a fresh node
    # serves each at 0, so every one the dashboard queries must be among them.
    assert used - served == set(), f"the dashboard queries metrics the node does not serve: {used - served}"

    # Each query is valid PromQL: promtool parses it as a recording rule ($__rate_interval is Grafana's).
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"ainode:dashboard_query_{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")}
        for i, expr in enumerate(t["expr"] for p in dash["panels"] for t in p["targets"])
    ]}]}
    path = tmp_path / "dashboard-rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(rules))
    check = subprocess.run([require_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_step_without_metrics_gets_its_own_registry(node_config):
    """Steps built alone (metrics=None) count into a private registry: never the global one,
    and two of them never clash."""
    from node.dispatch import Dispatcher
    from node.index import Index

    cfg = node_config()
    index = Index(cfg.storage.index_url)
    try:
        a, b = Dispatcher(cfg, index), Dispatcher(cfg, index)
        assert isinstance(a.metrics, Metrics) and a.metrics.registry is not b.metrics.registry
        a.metrics.deliveries.labels(destination="x", outcome="delivered").inc()
        assert b.metrics.registry.get_sample_value(
            "ainode_delivery_attempts_total", {"destination": "x", "outcome": "delivered"}
        ) is None
        assert REGISTRY.get_sample_value("ainode_delivery_attempts_total", {"destination": "x", "outcome": "delivered"}) is None
    finally:
        index.close()
