"""The node end to end, with real peers only.

A real Orthanc (Debian package, DICOMweb plugin) on free loopback ports,
``ainode serve`` as its own process, and dcmtk's ``storescu`` as the modality.
A real chest radiograph goes in; the SR and SEG must come back into the same
Orthanc study, over C-STORE and over STOW-RS. Then the node is killed with
SIGKILL mid-job, and Orthanc is stopped mid-dispatch: the result must still
arrive, exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests.peers import REPO, NodeProcess, free_port, node_sections, storescu, wait_for, write_node_toml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTIFACTS = REPO / "test-artifacts"


CXR_ROUTE = """
[[routes]]
name = "cxr-pneumonia"
pipeline = "pneumonia"
destinations = ["pacs"]
match = { Modality = ["CR", "DX"], BodyPartExamined = ["CHEST", ""] }
"""

BRAIN_ROUTE = """
[[routes]]
name = "brain-mri-tumour"
pipeline = "brain_tumour"
level = "study"
required_roles = ["T1", "T1c", "T2", "FLAIR"]
destinations = ["pacs"]
match = { Modality = ["MR"] }
"""


def write_node_config(
    workdir: Path, orthanc, kind: str, *, retry: dict | None = None, routes: str = CXR_ROUTE,
    completion: dict | None = None,
) -> tuple[Path, dict]:
    """A node configuration sending the results of ``routes`` (default: the
    pneumonia route) to ``orthanc``."""
    ports = {"node": free_port(), "api": free_port()}
    if kind == "dicom":
        dest = {"kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    else:
        dest = {"kind": "dicomweb", "url": orthanc.dicomweb_url}
    sections = node_sections(
        workdir,
        node={"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": ports["node"]},
        completion={"sweep_interval_seconds": 0.5, "series_idle_seconds": 5, "complete_on_release": True}
        | (completion or {}),
        destinations={"pacs": dest},
        retry=retry or {"max_attempts": 20, "initial_delay_seconds": 0.5, "multiplier": 1.5, "max_delay_seconds": 2},
        worker={"torch_threads": 2},
        api={"bind_address": "127.0.0.1", "port": ports["api"]},
    )
    return write_node_toml(workdir / "node.toml", sections, routes), ports


def derived_in_orthanc(orthanc, study_uid: str) -> dict[str, list[str]]:
    """Modality -> Orthanc instance ids of the study's SEG and SR instances."""
    out = {}
    for modality in ("SEG", "SR"):
        ids = [i for series in orthanc.series_instances(study_uid, Modality=modality) for i in series]
        if ids:
            out[modality] = ids
    return out


def check_results(orthanc, source: Path) -> dict:
    """Read the SR and SEG back from Orthanc and check them against each other
    and the source.

    The SEG is decoded with pydicom alone (highdicom 0.28's ``segread``
    cannot read Pixel Measures without Slice Thickness, and a radiograph has
    none): its one frame must lie on the source image, state the source's
    valid pixel spacing with the pixel grid's identity orientation (none if
    the source has no valid spacing), and have no Frame of Reference. The SR
    is read with highdicom: one TID 1410 group whose outline, drawn on the
    source's grid, covers the SEG's largest region (the whole image if the
    SEG is empty), with the probability, on the source image.
    """
    import numpy as np

    from tests.test_pneumonia_write import grid_geometry, iou, largest_region, outline_mask, segment_on_source

    src = pydicom.dcmread(source, stop_before_pixels=True)
    found = derived_in_orthanc(orthanc, src.StudyInstanceUID)
    assert len(found.get("SR", [])) == 1 and len(found.get("SEG", [])) == 1, found

    seg = pydicom.dcmread(BytesIO(orthanc.file(found["SEG"][0])))
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in seg.SeriesDescription.upper()
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    mask = segment_on_source(seg, src)
    assert "FrameOfReferenceUID" not in seg and "FrameOfReferenceUID" not in src
    spacings = [
        tuple(float(v) for v in src[keyword].value)
        for keyword in ("PixelSpacing", "ImagerPixelSpacing")
        if keyword in src and len(src[keyword].value) == 2 and all(float(v) > 0 for v in src[keyword].value)
    ]
    geometry = grid_geometry(seg)
    assert geometry.spacing == (spacings[0] if spacings else None), (geometry, spacings)
    assert geometry.orientation == ((1, 0, 0, 0, 1, 0) if spacings else None), geometry
    assert not (geometry.slice_thickness or geometry.plane_position or geometry.per_frame_geometry), geometry

    sr = hd.sr.srread(BytesIO(orthanc.file(found["SR"][0])))
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription.upper()
    assert not sr.content.get_image_measurement_groups(), "a group without coordinates: OHIF cannot open it"
    [roi] = sr.content.get_planar_roi_measurement_groups()  # TID 1410
    probability = [m for m in roi.get_measurements() if m.name.meaning == "Probability"]
    assert probability and 0.0 <= probability[0].value <= 1.0
    region = roi.roi
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    outline = region.value
    expected = largest_region(mask) if mask.any() else np.ones(mask.shape, bool)
    overlap = iou(outline_mask(outline, mask.shape), expected)
    assert overlap > 0.99, f"the SR outline covers the SEG region with IoU {overlap:.3f}"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {src.SOPInstanceUID}, evidence
    return {
        "probability": float(probability[0].value),
        "attention_pixels": int(mask.sum()),
        "outline_points": len(outline),
        "outline_iou_with_seg": round(overlap, 4),
        "seg": seg.SOPInstanceUID,
        "sr": sr.SOPInstanceUID,
    }


def _record_latency(name: str, figures: dict) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "latency.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = figures
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture
def node_for(tmp_path, orthanc):
    started: list[NodeProcess] = []

    def start(kind: str, **kw) -> tuple[NodeProcess, dict]:
        config, ports = write_node_config(tmp_path, orthanc, kind, **kw)
        node = NodeProcess(config, tmp_path).start(ports["api"])
        started.append(node)
        return node, ports

    yield start
    for node in started:
        node.stop()


@pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
@pytest.mark.parametrize("case", ["rg1_uncr", "rsna_cxr"])
def test_radiograph_in_sr_and_seg_back(request, case, kind, orthanc, node_for, dcmtk):
    source: Path = request.getfixturevalue(case)
    node, ports = node_for(kind)
    # Steady state: the model is loaded at start-up, before any study arrives.
    wait_for(lambda: any(e.get("event") == "pipeline_ready" for e in node.log_lines()), 60, what="pipeline warm-up")
    sent = storescu([source], ports["node"], "AINODE")
    assert sent.returncode == 0, sent.stderr
    t_received = time.monotonic()
    src = pydicom.dcmread(source, stop_before_pixels=True)
    wait_for(lambda: "SR" in derived_in_orthanc(orthanc, src.StudyInstanceUID), 120, 0.05, "SR in Orthanc")
    latency = time.monotonic() - t_received
    wait_for(lambda: len(derived_in_orthanc(orthanc, src.StudyInstanceUID)) == 2, 30, 0.05, "SEG in Orthanc")
    result = check_results(orthanc, source)
    timings = [e for e in node.log_lines() if e.get("event") == "job_done"][0]["timings"]
    _record_latency(f"{case}-{kind}", {"last_instance_to_sr_in_orthanc_s": round(latency, 3), "job_stages_s": timings, **result})
    print(f"\n{case} via {kind}: last instance -> SR in Orthanc {latency:.2f} s; stages {timings}")


def _job_states(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        return c.execute("SELECT state, attempts FROM jobs").fetchall()


def test_sigkill_mid_job_result_arrives_exactly_once(tmp_path, rg1_uncr, orthanc, node_for, dcmtk):
    node, ports = node_for("dicom")
    assert storescu([rg1_uncr], ports["node"], "AINODE").returncode == 0
    db = tmp_path / "index.db"
    wait_for(lambda: ("running", 1) in _job_states(db), 60, 0.01, "job running")
    node.kill()
    src = pydicom.dcmread(rg1_uncr, stop_before_pixels=True)
    assert derived_in_orthanc(orthanc, src.StudyInstanceUID) == {}, "killed before any result was sent"
    assert _job_states(db) == [("running", 1)]

    node2, _ = node_for("dicom")
    wait_for(lambda: len(derived_in_orthanc(orthanc, src.StudyInstanceUID)) == 2, 120, 0.1, "SR and SEG after restart")
    time.sleep(2)  # anything duplicated would show up by now
    found = derived_in_orthanc(orthanc, src.StudyInstanceUID)
    assert len(found["SR"]) == 1 and len(found["SEG"]) == 1
    assert _job_states(db) == [("done", 2)]
    recovered = [e for e in node2.log_lines() if e.get("event") == "recovered"]
    assert recovered and recovered[-1]["jobs_requeued"] == 1
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*), min(state), max(state) FROM deliveries").fetchone() == (2, "delivered", "delivered")
    check_results(orthanc, rg1_uncr)


def test_pacs_down_during_dispatch_result_delivered_when_back(tmp_path, rg1_uncr, orthanc, node_for, dcmtk):
    node, ports = node_for("dicom")
    orthanc.stop()
    assert storescu([rg1_uncr], ports["node"], "AINODE").returncode == 0
    db = tmp_path / "index.db"

    def failed_attempts() -> int:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("SELECT count(*) FROM delivery_attempts WHERE ok = 0").fetchone()[0]

    wait_for(lambda: failed_attempts() >= 4, 120, 0.2, "failed delivery attempts while Orthanc is down")
    with sqlite3.connect(db) as c:
        assert {r[0] for r in c.execute("SELECT state FROM deliveries")} == {"pending"}
    orthanc.start()
    src = pydicom.dcmread(rg1_uncr, stop_before_pixels=True)
    wait_for(lambda: len(derived_in_orthanc(orthanc, src.StudyInstanceUID)) == 2, 60, 0.2, "results after Orthanc returned")
    check_results(orthanc, rg1_uncr)
    with sqlite3.connect(db) as c:
        assert {r[0] for r in c.execute("SELECT state FROM deliveries")} == {"delivered"}
