"""The whole node in-process, with the real pneumonia pipeline.

Peers are pynetdicom in-process (a modality and a Storage SCP standing for the
PACS); the real-Orthanc cases are in tests/test_end_to_end.py.
"""

from __future__ import annotations

import json
import urllib.request
from io import BytesIO

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from node.service import Node
from tests.peers import free_port, wait_for
from tests.test_dispatch import StoreSCP


@pytest.fixture
def running(node_config):
    pacs = StoreSCP(free_port()).start()
    cfg = node_config(
        node={"bind_address": "127.0.0.1", "port": free_port()},
        completion={"sweep_interval_seconds": 0.2, "series_idle_seconds": 30, "complete_on_release": True},
        routes=[
            {
                "name": "cxr",
                "pipeline": "pneumonia",
                "destinations": ["pacs"],
                "match": {"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST", ""]},
            }
        ],
        destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
        retry={"initial_delay_seconds": 0.2, "max_delay_seconds": 1},
        api={"bind_address": "127.0.0.1", "port": free_port()},
    )
    node = Node(cfg)
    yield node, pacs, cfg
    node.stop()
    pacs.stop()


def send(cfg, *datasets) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    return statuses


def get_json(cfg, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{cfg.api.port}{path}", timeout=5) as r:
        return r.status, r.read()


def test_failed_job_is_recorded_and_the_node_keeps_serving(running, rg1_uncr):
    node, pacs, cfg = running
    node.start()
    broken = pydicom.dcmread(rg1_uncr)
    # Empty Pixel Data: routed, then refused by the pipeline. (Without Pixel
    # Data at all, a CR is refused at ingest: 0xA900, see node/ingest.py.)
    broken.PixelData = b""
    broken.SeriesInstanceUID, broken.SOPInstanceUID = generate_uid(), generate_uid()
    assert send(cfg, broken) == [0x0000]
    wait_for(lambda: node.index.jobs() and node.index.jobs()[0].state == "failed", 60, what="failed job")
    job = node.index.jobs()[0]
    assert "no frontal single-frame CR/DX image" in job.error
    assert node.index.series_info(broken.SeriesInstanceUID).state == "failed"

    good = pydicom.dcmread(rg1_uncr)
    assert send(cfg, good) == [0x0000]
    wait_for(lambda: len(pacs.received) == 2, 60, what="SEG and SR at the PACS")
    done = [j for j in node.index.jobs() if j.series_uid == good.SeriesInstanceUID][0]
    assert done.state == "done" and set(json.loads(done.timings)) >= {"inference", "write", "total"}

    status, body = get_json(cfg, "/health")
    assert status == 200 and json.loads(body) == {"scp": True, "scheduler": True, "index": True}
    # The PACS has both objects a moment before the node records the outcome.
    report = wait_for(
        lambda: (r := json.loads(get_json(cfg, "/status")[1]))["counts"]["deliveries"] == {"delivered": 2} and r,
        30, what="deliveries recorded as delivered",
    )
    assert report["counts"]["jobs"] == {"done": 1, "failed": 1}
    metrics = get_json(cfg, "/metrics")[1].decode()
    assert 'ainode_jobs_total{pipeline="pneumonia",state="failed"} 1.0' in metrics
    assert "ainode_instances_received_total 2.0" in metrics


def test_start_up_indexes_spool_files_left_without_a_row(running, rg1_uncr):
    node, pacs, cfg = running
    ds = pydicom.dcmread(rg1_uncr)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    # As if the process died between the rename and the index commit.
    node.spool.store_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buf.getvalue())
    summary = node.recover()
    assert summary["reindexed"] == 1
    info = node.index.series_info(ds.SeriesInstanceUID)
    assert info.state == "receiving" and info.instance_count == 1
