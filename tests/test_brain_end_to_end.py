"""The brain tumour pipeline end to end, with real peers only.

A real BraTS case (``../shared/data/brats/BraTS-GLI-00001-000``, which the
demonstration model never saw) is turned into a four-series DICOM MR study by
``ainode tools nifti-to-dicom``, as a user would. dcmtk's ``storescu`` sends
it to ``ainode serve``, one association per series, in shuffled order. The
node must wait for the whole study, run the pipeline once, and send a SEG and
a TID 1500 SR into a real Orthanc, where they are read back with highdicom:

- the SEG lies on the T1c series as Orthanc stores it (Study, Series and
  Frame of Reference UIDs, pixel spacing, orientation, one frame per slice
  and segment at the slice's own position);
- the SR's volumes are the SEG's voxel counts times the voxel volume.

A phantom study with FLAIR missing must fail after the force-complete
timeout, naming FLAIR, with nothing written to Orthanc.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from pipelines.brain_tumour.convert import SEQUENCE_PROTOCOLS
from tests.brain_phantom import make_phantom
from tests.conftest import shared_file
from tests.peers import SHARED_DATA, NodeProcess, storescu, wait_for
from tests.test_brain_write import seg_voxel_counts, volume_of
from tests.test_end_to_end import BRAIN_ROUTE, _record_latency, derived_in_orthanc, write_node_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BRATS_CASE = SHARED_DATA / "brats" / "BraTS-GLI-00001-000"
ROLES = ("T1", "T1c", "T2", "FLAIR")
TC, WT = "Tumour core (TC = NCR + ET)", "Whole tumour (WT = NCR + ED + ET)"


@pytest.fixture
def brain_node(tmp_path, orthanc):
    """Start ``ainode serve`` with the brain route (``start(**completion)``);
    stopped after the test whatever its outcome."""
    started: list[NodeProcess] = []

    def start(**completion) -> tuple[NodeProcess, dict]:
        config, ports = write_node_config(
            tmp_path, orthanc, "dicom", routes=BRAIN_ROUTE,
            completion={"series_idle_seconds": 10, "study_idle_seconds": 2, **completion},
        )
        node = NodeProcess(config, tmp_path)
        started.append(node)
        node.start(ports["api"], timeout=120)
        wait_for(lambda: any(e.get("event") == "pipeline_ready" for e in node.log_lines()), 120, what="pipeline warm-up")
        return node, ports

    yield start
    for node in started:
        node.stop()


def _send_shuffled(series: dict[str, list[Path]], port: int, seed: int) -> list[str]:
    """One storescu association per series, series in shuffled order and each
    series' files shuffled too; returns the order sent."""
    rng = random.Random(seed)
    order = list(series)
    rng.shuffle(order)
    for role in order:
        files = list(series[role])
        rng.shuffle(files)
        sent = storescu(files, port, "AINODE", calling_aet="MRSCANNER")
        assert sent.returncode == 0, sent.stderr
    return order


@pytest.fixture
def brats_dicom(tmp_path) -> dict:
    """The BraTS case as a DICOM study, written by the project's converter CLI."""
    shared_file(BRATS_CASE / "BraTS-GLI-00001-000-t1c.nii.gz")
    out = tmp_path / "study"
    done = subprocess.run(
        [sys.executable, "-m", "node", "tools", "nifti-to-dicom", str(BRATS_CASE), "--out", str(out),
         "--patient-name", "BraTS^GLI00001", "--patient-id", "BRATS-GLI-00001-000"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    series: dict[str, list[Path]] = {}
    for path in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series.setdefault(str(ds.SeriesDescription), []).append(path)
    assert len(series) == 4 and all(len(files) == 155 for files in series.values()), {k: len(v) for k, v in series.items()}
    return series


def test_brats_study_in_seg_and_sr_back(tmp_path, brats_dicom, orthanc, brain_node, dcmtk):
    node, ports = brain_node()
    order = _send_shuffled(brats_dicom, ports["node"], seed=6692)
    t_last = time.monotonic()
    first = pydicom.dcmread(next(iter(brats_dicom.values()))[0], stop_before_pixels=True)
    study_uid = first.StudyInstanceUID

    wait_for(lambda: "SR" in derived_in_orthanc(orthanc, study_uid), 400, 0.2, "SR in Orthanc")
    latency = time.monotonic() - t_last
    found = wait_for(lambda: (f := derived_in_orthanc(orthanc, study_uid)) and len(f) == 2 and f, 60, 0.2, "SEG in Orthanc")
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1, found

    seg = hd.seg.segread(BytesIO(orthanc.file(found["SEG"][0])))
    [referenced] = [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence]
    # The reference series (T1c) as the modality sent it.
    sent = {role: [pydicom.dcmread(p, stop_before_pixels=True) for p in files] for role, files in brats_dicom.items()}
    by_series = {datasets[0].SeriesInstanceUID: datasets for datasets in sent.values()}
    assert referenced in by_series, (list(by_series), referenced)
    reference = sorted(by_series[referenced], key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert reference[0].SeriesDescription == SEQUENCE_PROTOCOLS["T1c"].series_description  # the reference role

    # Geometry: the SEG is on the stored T1c series, frame by frame.
    assert seg.StudyInstanceUID == study_uid and seg.FrameOfReferenceUID == reference[0].FrameOfReferenceUID
    assert "NOT FOR DIAGNOSTIC USE" in seg.SeriesDescription.upper()
    assert (seg.Rows, seg.Columns) == (reference[0].Rows, reference[0].Columns)
    assert int(seg.NumberOfFrames) == len(reference) * 3  # omit_empty_frames=False
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in reference[0].PixelSpacing]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        float(v) for v in reference[0].ImageOrientationPatient
    ]
    positions = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in reference}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == positions[source]

    # Volumes: SR = SEG voxel counts x voxel volume.
    counts = seg_voxel_counts(seg, reference)
    voxel_ml = (
        float(reference[0].PixelSpacing[0]) * float(reference[0].PixelSpacing[1])
        * abs(float(reference[1].ImagePositionPatient[2]) - float(reference[0].ImagePositionPatient[2])) / 1000.0
    )
    sr = hd.sr.srread(BytesIO(orthanc.file(found["SR"][0])))
    assert sr.StudyInstanceUID == study_uid and "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription.upper()
    rois = sr.content.get_volumetric_roi_measurement_groups()
    assert len(rois) == 3
    for roi, number in zip(rois, (1, 2, 3), strict=True):
        assert roi.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert volume_of(roi).value == pytest.approx(counts[number] * voxel_ml, rel=1e-9)
    regions = {g.tracking_identifier: volume_of(g).value for g in sr.content.get_image_measurement_groups()}
    assert regions[TC] == pytest.approx((counts[1] + counts[3]) * voxel_ml, rel=1e-9)
    assert regions[WT] == pytest.approx(sum(counts.values()) * voxel_ml, rel=1e-9)
    evidence = {
        series.SeriesInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    assert set(by_series) <= evidence

    # One job, for the whole study, run once.
    with sqlite3.connect(f"file:{tmp_path / 'index.db'}?mode=ro", uri=True) as c:
        assert c.execute("SELECT level, state FROM jobs").fetchall() == [("study", "done")]
    timings = [e for e in node.log_lines() if e.get("event") == "job_done"][0]["timings"]
    result = [e for e in node.log_lines() if e.get("event") == "brain_tumour_result"][0]
    _record_latency("brats-gli-00001-brain-tumour-dicom", {
        "last_instance_to_sr_in_orthanc_s": round(latency, 3),
        "series_order_sent": order,
        "voxels": counts,
        "volumes_ml": result["volumes_ml"],
        "job_stages_s": timings,
    })
    print(f"\nbrain study: last instance -> SR in Orthanc {latency:.1f} s; volumes {result['volumes_ml']}; stages {timings}")


def test_study_missing_flair_fails_clearly_and_writes_nothing(tmp_path, orthanc, brain_node, dcmtk):
    phantom = make_phantom(out_dir=tmp_path / "phantom", missing="FLAIR")
    series = {role: list(paths) for role, paths in phantom.paths.items()}
    assert set(series) == {"T1", "T1c", "T2"}
    node, ports = brain_node(force_complete_seconds=8)
    _send_shuffled(series, ports["node"], seed=1)
    study_uid = pydicom.dcmread(series["T1"][0], stop_before_pixels=True).StudyInstanceUID
    db = tmp_path / "index.db"

    def jobs() -> list[tuple]:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("SELECT level, state, error, started_at FROM jobs").fetchall()

    [(level, state, error, started)] = wait_for(lambda: jobs(), 60, 0.2, "the study's job")
    assert (level, state, started) == ("study", "failed", None), (level, state, started)
    assert "missing FLAIR" in error, error
    failed = [e for e in node.log_lines() if "FLAIR" in str(e.get("reason", e.get("error", "")))]
    assert failed, "the failure is logged with its reason"
    time.sleep(3)
    assert derived_in_orthanc(orthanc, study_uid) == {}, "nothing is written to the PACS for a partial study"
