"""``ainode replay`` against a real Orthanc as the archive: over DICOMweb
(QIDO-RS, WADO-RS), over C-FIND with C-GET, and with C-MOVE to the replay's
own storage SCP. The archive holds two chest CR studies (pydicom-data's
RG1_UNCR with new UIDs) and one CT study, which the pneumonia pipeline
finds not applicable. A second Orthanc is the node's clinical destination
(a route sends there): it must receive nothing from a replay. An interrupted
replay (``--limit 1``) resumes without running a finished study again.
"""

from __future__ import annotations

import copy
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from node.cli import app
from node.index import Index
from node.index.replay import ReplayStudyState
from node.replay import ReplayFilters
from tests.peers import Orthanc, free_port, node_sections, require_orthanc, write_node_toml

pytestmark = [pytest.mark.integration]

runner = CliRunner()
REPLAY_AE = "AINODE_REPLAY"
ROUTE = """
[[routes]]
name = "cxr-pneumonia"
pipeline = "pneumonia"
destinations = ["pacs"]
match = { Modality = ["CR", "DX"], BodyPartExamined = ["CHEST", ""] }
"""


def _cr(source: Path, study_date: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDate = study_date
    return ds


def _ct(study_date: str, slices: int = 2) -> list[pydicom.Dataset]:
    """A small CT series (16 x 16 pixels), its own study."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(slices):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.StudyDate, ds.Modality = "REPLAYCT", "Replay^CT", study_date, "CT"
        ds.SeriesNumber, ds.InstanceNumber, ds.ImageType = 1, i + 1, ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, float(i)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.FrameOfReferenceUID = [1, 1], 1, frame_of_reference
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.full((16, 16), 1000 + i, dtype=np.uint16).tobytes()
        out.append(ds)
    return out


def _upload(pacs: Orthanc, ds: pydicom.Dataset) -> None:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    requests.post(f"{pacs.url}/instances", data=buffer.getvalue(), timeout=60).raise_for_status()


@pytest.fixture(scope="module")
def world(tmp_path_factory, rg1_uncr):
    """The archive (filled), the clinical PACS, and the node's configuration."""
    require_orthanc()
    root = tmp_path_factory.mktemp("replay")
    move_port = free_port()
    archive = Orthanc(root / "archive", aet="ARCHIVE",
                      modalities={"replay": [REPLAY_AE, "127.0.0.1", move_port]}).start()
    clinical = Orthanc(root / "clinical", aet="CLINICAL").start()
    cr = [_cr(rg1_uncr, "20240110"), _cr(rg1_uncr, "20240220")]
    ct = _ct("20240115")
    for ds in [*cr, *ct]:
        _upload(archive, ds)
    research = root / "research"
    research.mkdir()
    sections = node_sections(
        root / "node",
        node={"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": free_port()},
        destinations={
            "pacs": {"kind": "dicom", "ae_title": "CLINICAL", "host": "127.0.0.1", "port": clinical.dicom_port},
            "research": {"kind": "folder", "path": str(research)},
        },
        worker={"torch_threads": 2, "device": "cpu"},
    )
    config = write_node_toml(root / "node.toml", sections, ROUTE)
    yield {
        "archive": archive, "clinical": clinical, "config": config, "root": root, "research": research,
        "cr": [ds.StudyInstanceUID for ds in cr], "ct": ct[0].StudyInstanceUID, "move_port": move_port,
        "index_url": sections["storage"]["index_url"], "spool": Path(sections["storage"]["spool_dir"]),
    }
    with ThreadPoolExecutor(2) as pool:  # each Orthanc takes seconds to shut down: both at once
        list(pool.map(Orthanc.stop, (archive, clinical)))


def _replay(world, *args: str):
    result = runner.invoke(app, ["replay", *args, "--pipeline", "pneumonia", "--config", str(world["config"])])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _studies(world, run_id: int) -> dict:
    index = Index(world["index_url"])
    try:
        return {s.study_uid: s for s in index.replay_studies(run_id)}
    finally:
        index.close()


def _run_id(output: str) -> int:
    return int(output.split("replay run ", 1)[1].split(":", 1)[0])


def _derived(folder: Path, study_uid: str) -> dict[str, int]:
    """Modality -> number of derived files of the study under ``folder``."""
    out: dict[str, int] = {}
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.StudyInstanceUID == study_uid:
            out[ds.Modality] = out.get(ds.Modality, 0) + 1
    return out


def _assert_clinical_untouched(world) -> None:
    assert world["clinical"].get("/instances") == []
    assert not any(world["spool"].rglob("*.dcm")) if world["spool"].exists() else True


def test_dicomweb_to_a_replay_destination_and_again_without_rerun(world):
    result = _replay(world, world["archive"].dicomweb_url, "--to", "research")
    assert result.exit_code == 0, result.output
    assert "studies seen 3, processed 2, not applicable 1, out of scope 0, failed 0, pending 0" in result.output
    run_id = _run_id(result.output)
    studies = _studies(world, run_id)
    assert {u: s.state for u, s in studies.items()} == {
        world["cr"][0]: ReplayStudyState.DONE, world["cr"][1]: ReplayStudyState.DONE,
        world["ct"]: ReplayStudyState.NOT_APPLICABLE,
    }
    assert "Modality CT is not CR or DX" in studies[world["ct"]].reason
    assert f"not_applicable {world['ct']}: " in result.output
    for uid in world["cr"]:
        assert _derived(world["research"], uid) == {"SEG": 1, "SR": 1}
        assert studies[uid].results == 2 and studies[uid].instances == 1
    _assert_clinical_untouched(world)

    again = _replay(world, world["archive"].dicomweb_url, "--to", "research")
    assert again.exit_code == 0, again.output
    assert _run_id(again.output) == run_id and "0 new studies listed, 0 to do" in again.output
    assert {u: (s.finished_at, s.attempts) for u, s in _studies(world, run_id).items()} == {
        u: (s.finished_at, s.attempts) for u, s in studies.items()
    }


def test_cget_interrupted_then_resumed(world, tmp_path):
    uids = tmp_path / "studies.txt"
    uids.write_text(f"# the two chest studies\n{world['cr'][0]}\n\n{world['cr'][1]}\n")
    out = tmp_path / "out"
    source = f"ARCHIVE@127.0.0.1:{world['archive'].dicom_port}"
    common = [source, "--fetch", "get", "--studies", str(uids), "--since", "2024-01-01", "--until", "2024-12-31",
              "--out", str(out)]
    first = _replay(world, *common, "--limit", "1")
    assert first.exit_code == 0, first.output
    assert "studies seen 2, processed 1, not applicable 0, out of scope 0, failed 0, pending 1" in first.output
    run_id = _run_id(first.output)
    done = {u: s for u, s in _studies(world, run_id).items() if s.state is ReplayStudyState.DONE}
    assert len(done) == 1
    (done_uid, done_row), = done.items()

    resumed = _replay(world, *common, "--resume", str(run_id))
    assert resumed.exit_code == 0, resumed.output
    assert "studies seen 2, processed 2" in resumed.output and "1 to do" in resumed.output
    assert f"{done_uid}: done" not in resumed.output  # the finished study did not run again
    after = _studies(world, run_id)
    assert (after[done_uid].finished_at, after[done_uid].attempts) == (done_row.finished_at, 1)
    for uid in world["cr"]:
        assert after[uid].state is ReplayStudyState.DONE
        assert _derived(out, uid) == {"SEG": 1, "SR": 1}
    _assert_clinical_untouched(world)


def test_cmove_to_the_replays_own_scp(world, tmp_path):
    out = tmp_path / "out"
    source = f"ARCHIVE@127.0.0.1:{world['archive'].dicom_port}"
    result = _replay(world, source, "--fetch", "move", "--move-port", str(world["move_port"]), "--move-bind", "127.0.0.1",
                     "--modality", "CR", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "studies seen 2, processed 2, not applicable 0" in result.output  # the CT study is filtered out
    for uid in world["cr"]:
        assert _derived(out, uid) == {"SEG": 1, "SR": 1}
    _assert_clinical_untouched(world)
    work = world["root"] / "node" / "replay"
    assert not any(work.rglob("*.dcm")), "the work folder is emptied study by study"


def test_refusals(world, tmp_path):
    """A route's (clinical) destination, the node's own AE title for C-MOVE,
    neither or both targets, and bad filters are refused before anything runs."""
    source = f"ARCHIVE@127.0.0.1:{world['archive'].dicom_port}"
    cases = [
        ([world["archive"].dicomweb_url, "--to", "pacs"], "routes cxr-pneumonia send clinical results there"),
        ([source, "--fetch", "move", "--move-ae", "AINODE", "--move-port", "1", "--out", str(tmp_path)],
         "that is the node's clinical SCP"),
        ([world["archive"].dicomweb_url], "give one of --to DESTINATION or --out DIR"),
        ([world["archive"].dicomweb_url, "--out", str(tmp_path), "--since", "2024-02-01", "--until", "2024-01-01"],
         "is after until"),
        (["nowhere", "--out", str(tmp_path)], "is neither a folder"),
    ]
    for args, message in cases:
        result = _replay(world, *args)
        assert result.exit_code == 2, (args, result.output)
        text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # the error box's borders wrap lines
        assert message in text, (args, result.output)
    _assert_clinical_untouched(world)


def test_filters_validate_and_match():
    with pytest.raises(ValueError, match="studies: 'x1' is not a Study Instance UID"):
        ReplayFilters(studies=("x1",))
    with pytest.raises(ValueError, match="modality"):
        ReplayFilters(modalities=("cr",))
    import datetime as dt

    from node.replay import ListedStudy

    f = ReplayFilters(since=dt.date(2024, 1, 1), until=dt.date(2024, 1, 31), modalities=("CR",))
    assert f.date_range() == "20240101-20240131"
    assert f.matches(ListedStudy("1.2.3", "20240115", ("CR", "DX")))
    assert not f.matches(ListedStudy("1.2.3", "20240201", ("CR",)))
    assert not f.matches(ListedStudy("1.2.3", "20240115", ("CT",)))
    assert f.matches(ListedStudy("1.2.3"))  # a source that says nothing of date or modalities


def test_folder_source(world, tmp_path, rg1_uncr):
    """A folder as the source: its one CT study is not applicable, a non-DICOM file is skipped."""
    folder = tmp_path / "archive"
    folder.mkdir()
    for i, ds in enumerate(_ct("20230101")):
        ds.save_as(folder / f"ct{i}.dcm", enforce_file_format=True)
    (folder / "README.txt").write_text("not DICOM")
    result = _replay(world, str(folder), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "studies seen 1, processed 0, not applicable 1" in result.output
    assert copy.copy(sorted(p.name for p in folder.iterdir())) == ["README.txt", "ct0.dcm", "ct1.dcm"]  # read in place
