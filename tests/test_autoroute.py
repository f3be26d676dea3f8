"""Orthanc auto-routing to the node, with deploy/orthanc/ exactly as shipped.

Orthanc runs ``deploy/orthanc/orthanc.json`` itself (which loads
``autoroute.lua``); only environment variables differ from ``make run``:
free ports, a storage folder and a short StableAge. A real chest radiograph
is stored *into Orthanc*; the SR and SEG must appear in the same Orthanc study
with no other action, and the node's results must not be forwarded back.
A second test checks the routing rules themselves against dcmtk's storescp
as the receiving modality, which records everything Orthanc sends.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from tests.peers import DeployedOrthanc, NodeProcess, free_port, require_orthanc, wait_for
from tests.test_end_to_end import _record_latency, check_results, derived_in_orthanc, write_node_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STABLE_AGE = 1  # seconds; the shipped default is 5
CLOSE_DELAY = 1  # DicomAssociationCloseDelay, as shipped


def _utc(text: str) -> float:
    """A naive UTC timestamp from the node's index, as a Unix time."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def test_deployed_config_takes_ports_and_node_from_environment(tmp_path):
    """The ``${VAR:-default}`` substitution really is applied by Orthanc 1.10."""
    require_orthanc()
    pacs = DeployedOrthanc(tmp_path / "orthanc", node_port=34567, stable_age=STABLE_AGE).start()
    try:
        system = pacs.get("/system")
        assert (system["HttpPort"], system["DicomPort"], system["DicomAet"]) == (pacs.http_port, pacs.dicom_port, "ORTHANC")
        node = pacs.get("/modalities?expand")["AINODE"]
        assert (node["AET"], node["Host"], node["Port"]) == ("AINODE", "127.0.0.1", 34567)
        assert (tmp_path / "orthanc" / "db").is_dir(), "storage must follow ORTHANC_STORAGE_DIR"
        assert any("Lua toolbox installed" in line for line in pacs.log_path.read_text().splitlines())
    finally:
        pacs.stop()


@pytest.fixture
def autorouted(tmp_path):
    """Orthanc from deploy/orthanc/ auto-routing to a real node that sends its
    results back to that Orthanc over C-STORE."""
    require_orthanc()
    pacs = DeployedOrthanc(tmp_path / "orthanc", node_port=0, stable_age=STABLE_AGE)
    config, ports = write_node_config(tmp_path, pacs, "dicom")
    pacs.env["ORTHANC_NODE_PORT"] = str(ports["node"])
    pacs.start()
    node = NodeProcess(config, tmp_path).start(ports["api"])
    yield pacs, node, tmp_path / "index.db"
    node.stop()
    pacs.stop()


def test_radiograph_stored_into_orthanc_comes_back_with_sr_and_seg(autorouted, rg1_uncr):
    pacs, node, db = autorouted
    wait_for(lambda: any(e.get("event") == "pipeline_ready" for e in node.log_lines()), 60, what="pipeline warm-up")
    src = pydicom.dcmread(rg1_uncr, stop_before_pixels=True)

    assert pacs.store(rg1_uncr)["Status"] == "Success"
    t_stored = time.time()  # POST /instances answered: the image is in the PACS
    wait_for(lambda: "SR" in derived_in_orthanc(pacs, src.StudyInstanceUID), 120, 0.05, "SR in Orthanc")
    latency = time.time() - t_stored
    wait_for(lambda: len(derived_in_orthanc(pacs, src.StudyInstanceUID)) == 2, 30, 0.05, "SEG in Orthanc")
    result = check_results(pacs, rg1_uncr)

    # No loop: Orthanc sees our SEG and SR series turn stable and keeps them.
    wait_for(lambda: sum("is a derived object, not sent" in line for line in pacs.lua_lines()) == 2, 30, 0.2,
             "autoroute.lua deciding on the SEG and SR series")
    sent = [line for line in pacs.lua_lines() if "-> AINODE" in line]
    assert len(sent) == 1 and "(CR, body part \"CHEST\")" in sent[0], pacs.lua_lines()
    time.sleep(CLOSE_DELAY + 1)  # a forward queued by mistake would have arrived by now
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        associations = c.execute("SELECT calling_ae, instances, opened_at, closed_at, outcome FROM associations").fetchall()
        received = c.execute("SELECT sop_instance_uid FROM instances").fetchall()
    assert received == [(src.SOPInstanceUID,)], "the node received exactly the radiograph, none of its own results"
    [(calling, n, opened, closed, outcome)] = associations
    assert (calling, n, outcome) == ("ORTHANC", 1, "released")

    timings = [e for e in node.log_lines() if e.get("event") == "job_done"][0]["timings"]
    figures = {
        "store_into_orthanc_to_sr_in_orthanc_s": round(latency, 3),
        "stable_age_s": STABLE_AGE,
        "association_close_delay_s": CLOSE_DELAY,
        "orthanc_opened_association_after_s": round(_utc(opened) - t_stored, 3),
        "orthanc_released_association_after_s": round(_utc(closed) - t_stored, 3),
        "job_stages_s": timings,
        **result,
    }
    _record_latency("autoroute-rg1_uncr", figures)
    print(f"\nstored into Orthanc -> SR in Orthanc {latency:.2f} s: {figures}")
    # StableAge + Orthanc's ~1 s stability check + close delay + the job (~2 s
    # here): far more means a wait somewhere that should not be there.
    assert latency < STABLE_AGE + CLOSE_DELAY + 15, figures


# --- the routing rules, against dcmtk's storescp as the node --------------------------------


def _variant(source: str, study_uid: str | None = None, **attrs) -> bytes:
    """A pydicom test file as a new instance (new UIDs), with ``attrs`` set."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(source))
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "SOPClassUID" in attrs:
        ds.file_meta.MediaStorageSOPClassUID = attrs["SOPClassUID"]
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


class Storescp:
    """dcmtk's storescp as the receiving modality: every instance it is sent
    is kept under its own file name, duplicates included."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "received"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["storescp", "+uf", "-aet", "AINODE", "-od", str(self.dir), str(self.port)],
            stdout=open(workdir / "storescp.log", "ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )

    def received(self) -> list[str]:
        """SOP Instance UIDs received so far, one per C-STORE."""
        return sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in self.dir.iterdir())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_routing_rules_forward_only_what_the_node_can_use(tmp_path, dcmtk):
    require_orthanc()
    scp = Storescp(tmp_path)
    pacs = DeployedOrthanc(tmp_path / "orthanc", node_port=scp.port, stable_age=STABLE_AGE).start()
    try:
        def decided(n: int) -> list[str]:
            return wait_for(lambda: len(pacs.lua_lines()) >= n and pacs.lua_lines(), 30, 0.1, f"{n} routing decisions")

        def sop(blob: bytes) -> str:
            return pydicom.dcmread(BytesIO(blob), stop_before_pixels=True).SOPInstanceUID

        chest_cr = _variant("CT_small.dcm", Modality="CR", BodyPartExamined="CHEST")
        # RSNA style: Secondary Capture with Modality CR and no body part.
        rsna_sc = _variant("CT_small.dcm", Modality="CR", BodyPartExamined=None, SOPClassUID=SecondaryCaptureImageStorage)
        hand_cr = _variant("CT_small.dcm", Modality="CR", BodyPartExamined="HAND")
        ct = _variant("CT_small.dcm")
        mr_study = generate_uid()
        mr_a = _variant("MR_small.dcm", mr_study, SeriesDescription="T1 AX")
        for blob in (chest_cr, rsna_sc, hand_cr, ct, mr_a):
            assert pacs.store(blob)["Status"] == "Success"
        # 5 series decisions + 1 MR study decision
        decided(6)
        expected = sorted(map(sop, (chest_cr, rsna_sc, mr_a)))
        wait_for(lambda: scp.received() == expected, 30, 0.1, "chest CR, RSNA SC and MR forwarded")

        # One of our results in the MR study: it is not forwarded, and the
        # study, stable again, is not sent a second time.
        ours = _variant(
            "MR_small.dcm", mr_study, Manufacturer="dicom-ai-node",
            SeriesDescription="brain_tumour 1.0 NOT FOR DIAGNOSTIC USE",
        )
        assert pacs.store(ours)["Status"] == "Success"
        lines = decided(8)
        assert any("is a derived object, not sent" in line for line in lines[6:]), lines
        assert any("was sent already, not sent again" in line for line in lines[6:]), lines

        # A new MR series (the FLAIR came late): the study goes again, whole.
        mr_b = _variant("MR_small.dcm", mr_study, SeriesDescription="FLAIR AX")
        assert pacs.store(mr_b)["Status"] == "Success"
        lines = decided(10)
        expected = sorted([*expected, sop(mr_a), sop(mr_b)])
        wait_for(lambda: scp.received() == expected, 30, 0.1, "MR study forwarded again with the new series")
        time.sleep(CLOSE_DELAY + 1)  # nothing else may follow
        assert scp.received() == expected

        lines = pacs.lua_lines()
        assert sum("-> AINODE" in line for line in lines) == 4, lines  # 2 chest series, the MR study twice
        assert sum("is nothing for the node, not sent" in line for line in lines) == 2, lines  # hand CR, CT
    finally:
        pacs.stop()
        scp.stop()
