"""Receive, spool, index: the SCP with real pynetdicom peers in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from node.index import Index
from node.receive import Receiver
from node.spool import Spool
from tests.peers import free_port, node_config_for


def make_receiver(tmp_path: Path, storage: dict | None = None, **node) -> tuple[Receiver, Index, Spool]:
    cfg = node_config_for(
        tmp_path,
        node={"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": free_port(), **node},
        storage=storage or {},
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


def associate(receiver: Receiver, contexts, calling_ae="MODALITY", called_ae="AINODE"):
    ae = AE(ae_title=calling_ae)
    for ctx in contexts:
        ae.add_requested_context(*ctx) if isinstance(ctx, tuple) else ae.add_requested_context(ctx)
    host, port = receiver.address
    return ae.associate(host, port, ae_title=called_ae)


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


# -- the C-STORE checks (node/ingest.py) --------------------------------------------


def body_of(ds: pydicom.Dataset, *, implicit: bool = False) -> bytes:
    """A dataset encoded without file meta, little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def send_raw(monkeypatch, receiver, tmp_path, body: bytes, sop_class, sop_instance, syntax, **kw):
    """Send ``body`` as it is (pynetdicom does not decode it) under ``syntax``."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = sop_class, sop_instance, syntax
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta)
    path = tmp_path / f"raw-{generate_uid()}.dcm"
    path.write_bytes(fp.getvalue() + body)
    assoc = associate(receiver, [(sop_class, syntax)], **kw)
    assert assoc.is_established
    try:
        return assoc.send_c_store(path).Status
    finally:
        assoc.release()


@pytest.fixture
def ct():
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _assert_refused(status, spool, index, code, words):
    assert status == code
    q = _quarantined(spool)
    assert len(q) == 1 and q[0]["dimse_status"] == f"0x{code:04X}", q
    assert all(w in q[0]["reason"] for w in words), q[0]["reason"]
    assert index.counts()["instances"]["total"] == 0
    assert not list(spool.iter_instances())


@pytest.mark.parametrize(
    "damage",
    ["cut at byte 305", "last 1 byte removed", "last 2 bytes removed", "last 7 bytes removed",
     "last 100 bytes removed", "element after Pixel Data declares 5000 bytes"],
)
def test_truncated_or_overrunning_dataset_refused(scp, tmp_path, monkeypatch, ct, damage):
    receiver, index, spool = scp
    body = body_of(ct)
    if damage.startswith("cut"):
        body = body[:305]  # inside an element (byte 300 ends one)
    elif damage.startswith("last"):
        body = body[: -int(damage.split()[1])]
    else:  # Data Set Trailing Padding (FFFC,FFFC) OB, 5000 bytes declared, none there
        body += b"\xfc\xff\xfc\xffOB\0\0" + (5000).to_bytes(4, "little")
    status = send_raw(monkeypatch, receiver, tmp_path, body, CTImageStorage, ct.SOPInstanceUID, ExplicitVRLittleEndian)
    _assert_refused(status, spool, index, 0xC210, ["cannot be parsed"])


def test_image_cut_before_its_pixel_data_refused_a900(scp, tmp_path, monkeypatch, ct):
    """Cut at an element boundary, the structure is sound; a CT image
    without Pixel Data (Type 1, PS3.3 C.7.6.3) does not match its class."""
    receiver, index, spool = scp
    body = body_of(ct)
    body = body[: body.index(b"\xe0\x7f\x10\x00OW")]  # everything before (7FE0,0010)
    status = send_raw(monkeypatch, receiver, tmp_path, body, CTImageStorage, ct.SOPInstanceUID, ExplicitVRLittleEndian)
    _assert_refused(status, spool, index, 0xA900, ["no Pixel Data"])


def test_uid_with_another_vr_refused_a900(scp, ct):
    receiver, index, spool = scp
    del ct.SeriesInstanceUID
    ct[0x0020000E] = DataElement(0x0020000E, "US", 7)
    assoc = associate(receiver, [(CTImageStorage, ExplicitVRLittleEndian)])
    status = assoc.send_c_store(ct).Status
    assoc.release()
    _assert_refused(status, spool, index, 0xA900, ["SeriesInstanceUID", "US"])


def test_implicit_body_in_explicit_context_refused(scp, tmp_path, monkeypatch, ct):
    receiver, index, spool = scp
    body = body_of(ct, implicit=True)
    status = send_raw(monkeypatch, receiver, tmp_path, body, CTImageStorage, ct.SOPInstanceUID, ExplicitVRLittleEndian)
    _assert_refused(status, spool, index, 0xC210, ["not a DICOM VR"])


def test_native_pixel_data_in_jpeg_context_refused(scp, tmp_path, monkeypatch, ct):
    receiver, index, spool = scp
    status = send_raw(monkeypatch, receiver, tmp_path, body_of(ct), CTImageStorage, ct.SOPInstanceUID, JPEGBaseline8Bit)
    _assert_refused(status, spool, index, 0xC210, ["Pixel Data", "encapsulated", "PS3.5 A.4"])


def test_valid_implicit_and_encapsulated_bodies_accepted(scp, tmp_path, monkeypatch, ct):
    """The checks refuse lies, not the syntaxes themselves."""
    receiver, index, spool = scp
    body = body_of(ct, implicit=True)
    assert send_raw(monkeypatch, receiver, tmp_path, body, CTImageStorage, ct.SOPInstanceUID, ImplicitVRLittleEndian) == 0
    jpeg = pydicom.dcmread(get_testdata_file("SC_rgb_dcmtk_+eb+cr.dcm"))
    status = send_raw(
        monkeypatch, receiver, tmp_path, body_of(jpeg), jpeg.SOPClassUID, jpeg.SOPInstanceUID, JPEGBaseline8Bit
    )
    assert status == 0x0000
    assert index.counts()["instances"]["total"] == 2 and not _quarantined(spool)


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    url = request.getfixturevalue("postgres_url")
    import sqlalchemy

    from node.index import Base

    engine = sqlalchemy.create_engine(url)
    Base.metadata.drop_all(engine)  # each test starts empty
    engine.dispose()
    return url


def test_overlong_values_indexed_clipped_and_flagged(tmp_path, ct, index_url):
    """PS3.5 6.2 maxima: CS 16, LO 64, SH 16. PostgreSQL enforces the column
    widths SQLite ignores; the file keeps the values whole."""
    receiver, index, spool = make_receiver(tmp_path, storage={"index_url": index_url})
    try:
        from structlog.testing import capture_logs

        ct.Modality, ct.PatientID, ct.AccessionNumber = "M" * 10_000, "P" * 60_000, "A" * 3_000
        with capture_logs() as logs:
            assoc = associate(receiver, [(CTImageStorage, ExplicitVRLittleEndian)])
            assert assoc.send_c_store(ct).Status == 0x0000
            assoc.release()
        [clipped] = [e for e in logs if e["event"] == "instance_values_clipped"]
        assert clipped["lengths"] == {"Modality": 10_000, "PatientID": 60_000, "AccessionNumber": 3_000}
        from node.index import Instance, Study

        with index._session() as s:
            inst = s.get(Instance, ct.SOPInstanceUID)
            study = s.get(Study, ct.StudyInstanceUID)
        assert inst.clipped is True
        assert (study.patient_id, study.accession_number) == ("P" * 64, "A" * 16)
        assert index.series_info(ct.SeriesInstanceUID).modality == "M" * 16
        stored = pydicom.dcmread(Path(inst.path))
        assert (stored.Modality, stored.PatientID) == ("M" * 10_000, "P" * 60_000)
    finally:
        receiver.stop()
        index.close()


def test_retired_storage_sop_class_accepted(scp):
    """Ultrasound Image Storage (Retired), 1.2.840.10008.5.1.4.1.1.6 (PS3.6)."""
    receiver, index, spool = scp
    src = pydicom.dcmread(get_testdata_file("color-pl.dcm"))
    assert src.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6"
    assoc = associate(receiver, [(src.SOPClassUID, src.file_meta.TransferSyntaxUID)])
    assert assoc.accepted_contexts, "the retired storage SOP class was refused at negotiation"
    assert assoc.send_c_store(src).Status == 0x0000
    assoc.release()
    assert index.counts()["instances"]["total"] == 1


def test_extra_private_sop_class_accepted(tmp_path, ct):
    private = "1.2.246.352.70.1.70"
    receiver, index, spool = make_receiver(tmp_path, extra_sop_classes=[private])
    try:
        ct.SOPClassUID = private
        assoc = associate(receiver, [(private, ExplicitVRLittleEndian), (CTImageStorage, ExplicitVRLittleEndian)])
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [private, CTImageStorage]
        assert assoc.send_c_store(ct).Status == 0x0000
        assoc.release()
        assert index.counts()["instances"]["total"] == 1
    finally:
        receiver.stop()
        index.close()


# -- who may call ---------------------------------------------------------------------


def _rejection(assoc) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


def test_called_ae_title_must_be_ours_or_an_alias(tmp_path):
    receiver, index, _ = make_receiver(tmp_path, aliases=["AINODE_B"])
    try:
        wrong = associate(receiver, [Verification], called_ae="SOMEONE")
        assert wrong.is_rejected
        # rejected-permanent, DICOM UL service-user, called-AE-title-not-recognized (PS3.8 9.3.4)
        assert _rejection(wrong) == (1, 1, 7)
        for called in ("AINODE", "AINODE_B"):
            ok = associate(receiver, [Verification], called_ae=called)
            assert ok.is_established, called
            ok.release()
    finally:
        receiver.stop()
        index.close()


def test_called_ae_title_check_can_be_turned_off(tmp_path):
    receiver, index, _ = make_receiver(tmp_path, require_called_ae_title=False)
    try:
        assoc = associate(receiver, [Verification], called_ae="ANYTHING")
        assert assoc.is_established
        assoc.release()
    finally:
        receiver.stop()
        index.close()


def test_associations_audited_accepted_and_rejected(tmp_path):
    from structlog.testing import capture_logs

    from tests.peers import wait_for

    receiver, index, _ = make_receiver(tmp_path, allowed_callers=[{"ae_title": "MODALITY"}])
    try:
        with capture_logs() as logs:
            ok = associate(receiver, [Verification])
            assert ok.is_established
            ok.release()
            assert associate(receiver, [Verification], calling_ae="INTRUDER").is_rejected
            assert associate(receiver, [Verification], called_ae="ELSEWHERE").is_rejected
            rows = wait_for(lambda: (r := index.associations()) and len(r) == 3 and r, 5, what="3 audit rows")
        by = {(r.calling_ae, r.called_ae): r for r in rows}
        released = by["MODALITY", "AINODE"]
        assert (released.outcome, released.tls, released.reason, released.peer_address) == ("released", False, None, "127.0.0.1")
        intruder = by["INTRUDER", "AINODE"]
        assert intruder.outcome == "rejected" and "allowed_callers" in intruder.reason and intruder.closed_at
        elsewhere = by["MODALITY", "ELSEWHERE"]
        assert elsewhere.outcome == "rejected" and "Called AE Title" in elsewhere.reason
        events = [e for e in logs if e["event"] in ("association_accepted", "association_rejected")]
        assert sorted(e["event"] for e in events) == ["association_accepted", "association_rejected", "association_rejected"]
        for e in events:
            assert {"calling_ae", "called_ae", "peer_address", "tls", "client_cert_subject", "outcome"} <= set(e), e
    finally:
        receiver.stop()
        index.close()


def test_pynetdicom_rejections_audited_too(tmp_path):
    from tests.peers import wait_for

    receiver, index, _ = make_receiver(tmp_path, maximum_associations=1)
    try:
        first = associate(receiver, [Verification])
        assert first.is_established
        second = associate(receiver, [Verification])
        assert second.is_rejected
        first.release()
        rejected = wait_for(lambda: [r for r in index.associations() if r.outcome == "rejected"], 5, what="audit row")
        assert "maximum_associations" in rejected[0].reason
    finally:
        receiver.stop()
        index.close()


def test_tls_association_audited_with_client_certificate(tmp_path):
    from tests.certs import make_pki
    from tests.peers import wait_for
    from tests.test_tls import client_tls, node_tls, tls_associate

    pki = make_pki(tmp_path / "pki")
    receiver, index, _ = make_receiver(tmp_path, tls=node_tls(pki))
    try:
        assoc = tls_associate(receiver.tls_address, client_tls(pki))
        assert assoc.is_established
        assoc.release()
        [row] = wait_for(lambda: [r for r in index.associations() if r.outcome == "released"], 5, what="audit row")
        assert row.tls is True and "CN=" in row.client_cert_subject, row.client_cert_subject
    finally:
        receiver.stop()
        index.close()


# -- limits ----------------------------------------------------------------------------


def test_maximum_pdu_size_is_finite_by_default(scp):
    receiver, *_ = scp
    assoc = associate(receiver, [Verification])
    assert assoc.acceptor.maximum_length == 262144  # A-ASSOCIATE-AC, PS3.8 D.1
    assoc.release()


def test_low_disk_space_answers_a700_before_writing_and_recovers(tmp_path, ct):
    from structlog.testing import capture_logs

    receiver, index, spool = make_receiver(tmp_path, storage={"min_free_mb": 2**40})  # more than any disk
    try:
        with capture_logs() as logs:
            assoc = associate(receiver, [(CTImageStorage, ExplicitVRLittleEndian)])
            assert assoc.send_c_store(ct).Status == 0xA700
            ct.SOPInstanceUID = generate_uid()
            assert assoc.send_c_store(ct).Status == 0xA700
            assert not any(spool.quarantine_dir.iterdir()) and not list(spool.iter_instances())
            receiver.free_space.min_free_bytes = 0  # space returns
            receiver.free_space.max_age_seconds = 0
            assert assoc.send_c_store(ct).Status == 0x0000
            assoc.release()
        assert [e["event"] for e in logs if e["event"].startswith("disk_space")] == ["disk_space_low", "disk_space_recovered"]
        assert index.counts()["instances"]["total"] == 1
    finally:
        receiver.stop()
        index.close()
