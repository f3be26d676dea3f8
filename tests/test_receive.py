"""Receive, spool, index: the SCP with real pynetdicom peers in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, SecondaryCaptureImageStorage, Verification

from node.config import load_config
from node.index import Index
from node.receive import Receiver
from node.spool import Spool
from tests.peers import free_port


def make_receiver(tmp_path: Path, **node) -> tuple[Receiver, Index, Spool]:
    cfg = load_config(
        None,
        node={"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": free_port(), **node},
        storage={
            "spool_dir": str(tmp_path / "spool"),
            "quarantine_dir": str(tmp_path / "quarantine"),
            "outbox_dir": str(tmp_path / "outbox"),
            "index_url": f"sqlite:///{tmp_path / 'index.db'}",
        },
    )
    spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir)
    index = Index(cfg.storage.index_url)
    receiver = Receiver(cfg, spool, index)
    receiver.start()
    return receiver, index, spool


@pytest.fixture
def scp(tmp_path):
    receiver, index, spool = make_receiver(tmp_path)
    yield receiver, index, spool
    receiver.stop()
    index.close()


def associate(receiver: Receiver, contexts, calling_ae="MODALITY"):
    ae = AE(ae_title=calling_ae)
    for ctx in contexts:
        ae.add_requested_context(*ctx) if isinstance(ctx, tuple) else ae.add_requested_context(ctx)
    host, port = receiver.address
    return ae.associate(host, port, ae_title="AINODE")


def test_echo(scp):
    receiver, *_ = scp
    assoc = associate(receiver, [Verification])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_store_writes_durably_and_indexes(scp, rg1_uncr):
    receiver, index, spool = scp
    src = pydicom.dcmread(rg1_uncr)
    assoc = associate(receiver, [(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)])
    assert assoc.send_c_store(src).Status == 0x0000
    assoc.release()

    path = spool.instance_path(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
    stored = pydicom.dcmread(path)
    assert stored.PixelData == src.PixelData
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not list(path.parent.glob(".*.tmp"))  # no temp file left behind
    info = index.series_info(src.SeriesInstanceUID)
    assert info.instance_count == 1 and info.state == "receiving" and info.modality == "CR"
    inst = index.instance_paths(src.SeriesInstanceUID)
    assert inst == [path]


def test_duplicate_is_stored_once(scp, rg1_uncr):
    receiver, index, spool = scp
    src = pydicom.dcmread(rg1_uncr)
    assoc = associate(receiver, [(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)])
    assert assoc.send_c_store(src).Status == 0x0000
    assert assoc.send_c_store(src).Status == 0x0000
    assoc.release()
    assert index.series_info(src.SeriesInstanceUID).instance_count == 1
    assert len(list(spool.iter_instances())) == 1
    assert index.counts()["instances"]["total"] == 1


def test_jpeg_baseline_kept_as_received(scp, rsna_cxr):
    receiver, index, spool = scp
    src = pydicom.dcmread(rsna_cxr)
    assoc = associate(receiver, [(SecondaryCaptureImageStorage, JPEGBaseline8Bit)])
    assert assoc.is_established
    assert assoc.accepted_contexts[0].transfer_syntax[0] == JPEGBaseline8Bit
    assert assoc.send_c_store(src).Status == 0x0000
    assoc.release()
    stored = pydicom.dcmread(spool.instance_path(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert stored.PixelData == src.PixelData  # not decoded and re-encoded


def _quarantined(spool: Spool) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(spool.quarantine_dir.glob("*.json"))]


def test_unparseable_dataset_refused_and_quarantined(scp, tmp_path, rg1_uncr, monkeypatch):
    from pynetdicom import _config

    # Send the file's bytes as they are, without pynetdicom decoding them first.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    receiver, index, spool = scp
    src = pydicom.dcmread(rg1_uncr, stop_before_pixels=True)
    # Valid file meta, then a dataset element with a VR that does not exist.
    bad = tmp_path / "bad.dcm"
    meta = pydicom.Dataset()
    meta.file_meta = src.file_meta
    meta.preamble = b"\0" * 128
    meta.save_as(bad, enforce_file_format=True)
    with open(bad, "ab") as fh:
        fh.write(b"\x08\x00\x16\x00XX\x05\x00abcde")
    assoc = associate(receiver, [(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)])
    status = assoc.send_c_store(bad)
    assoc.release()
    assert status.Status == 0xC210
    q = _quarantined(spool)
    assert len(q) == 1 and q[0]["dimse_status"] == "0xC210" and "cannot be parsed" in q[0]["reason"]
    assert q[0]["calling_ae"] == "MODALITY"
    assert index.counts()["instances"]["total"] == 0


def test_missing_series_uid_refused_with_a900(scp, rg1_uncr):
    receiver, index, spool = scp
    src = pydicom.dcmread(rg1_uncr)
    del src.SeriesInstanceUID
    assoc = associate(receiver, [(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)])
    status = assoc.send_c_store(src)
    assoc.release()
    assert status.Status == 0xA900
    q = _quarantined(spool)
    assert len(q) == 1 and "SeriesInstanceUID" in q[0]["reason"]
    assert (spool.quarantine_dir / (Path(sorted(spool.quarantine_dir.glob("*.json"))[0]).stem + ".dcm")).stat().st_size > 1_000_000
    assert index.counts()["instances"]["total"] == 0


def test_path_escaping_uid_refused(scp, rg1_uncr):
    receiver, index, spool = scp
    src = pydicom.dcmread(rg1_uncr)
    src.StudyInstanceUID = "1.2/../../etc"
    assoc = associate(receiver, [(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)])
    status = assoc.send_c_store(src)
    assoc.release()
    assert status.Status == 0xA900
    assert not list(spool.iter_instances())


def test_allow_list_rejects_unknown_callers(tmp_path, rg1_uncr):
    receiver, index, _ = make_receiver(
        tmp_path, allowed_callers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}, {"host": "10.0.0.0/8"}]
    )
    try:
        refused = associate(receiver, [Verification], calling_ae="INTRUDER")
        assert refused.is_rejected
        allowed = associate(receiver, [Verification], calling_ae="ORTHANC")
        assert allowed.is_established
        allowed.release()
    finally:
        receiver.stop()
        index.close()


def test_release_marks_series_released(scp, rg1_uncr):
    receiver, index, _ = scp
    src = pydicom.dcmread(rg1_uncr)
    assoc = associate(receiver, [(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)])
    assoc.send_c_store(src)
    assert index.series_info(src.SeriesInstanceUID).released is False
    assoc.release()
    from tests.peers import wait_for

    wait_for(lambda: index.series_info(src.SeriesInstanceUID).released, 5, what="release recorded")


def test_abort_does_not_release(scp, rg1_uncr):
    receiver, index, _ = scp
    src = pydicom.dcmread(rg1_uncr)
    src.SOPInstanceUID = generate_uid()
    assoc = associate(receiver, [(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)])
    assoc.send_c_store(src)
    assoc.abort()
    import time

    time.sleep(0.5)
    assert index.series_info(src.SeriesInstanceUID).released is False
