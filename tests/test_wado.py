"""WADO-RS out of the node (PS3.18 10.4): instances stored through the
node's real SCP (pynetdicom SCU), fetched by real clients (dicomweb-client,
requests, a real Orthanc retrieving over DICOMweb) and compared byte for
byte with the spool files; no transcoding (406), tokens, 404."""

from __future__ import annotations

import secrets
from io import BytesIO

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage
from structlog.testing import capture_logs

from node.service import Node
from tests.peers import Orthanc, free_port, node_config_for, require_orthanc, wait_for

READ_TOKEN = secrets.token_urlsafe(32)
INGEST_TOKEN = secrets.token_urlsafe(32)
ANY = (("application/dicom", "*"),)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A real node (no routes) with a read token and an ingest-only token."""
    monkeypatch.setenv("AINODE_TEST_WADO_READ", READ_TOKEN)
    monkeypatch.setenv("AINODE_TEST_WADO_INGEST", INGEST_TOKEN)
    cfg = node_config_for(
        tmp_path / "node",
        node={"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": free_port()},
        completion={"sweep_interval_seconds": 0.2, "series_idle_seconds": 60},
        api={
            "bind_address": "127.0.0.1",
            "port": 0,
            "tokens": [
                {"name": "worker", "scopes": ["read"], "env": "AINODE_TEST_WADO_READ"},
                {"name": "orthanc", "scopes": ["ingest"], "env": "AINODE_TEST_WADO_INGEST"},
            ],
        },
    )
    n = Node(cfg)
    n.start()
    yield n
    n.stop()


@pytest.fixture
def study(node):
    """One study sent by C-STORE to the node's SCP: a CT series of three
    instances in Explicit VR Little Endian and a JPEG Baseline secondary
    capture series of one. Returns (study UID, CT datasets, JPEG datasets)."""
    study_uid, ct_series, sc_series = generate_uid(), generate_uid(), generate_uid()
    cts = []
    for i in range(3):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, ct_series, generate_uid()
        ds.InstanceNumber = i + 1
        cts.append(ds)
    sc = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.SOPInstanceUID = study_uid, sc_series, generate_uid()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(SecondaryCaptureImageStorage, JPEGBaseline8Bit)
    assoc = ae.associate("127.0.0.1", node.config.node.port, ae_title="AINODE")
    assert assoc.is_established
    try:
        for ds in [*cts, sc]:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    return study_uid, cts, [sc]


def base_url(n: Node) -> str:
    return f"http://127.0.0.1:{n.api.address[1]}/dicom-web"


def spool_bytes(n: Node, ds: pydicom.Dataset) -> bytes:
    return n.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).read_bytes()


def file_bytes(ds: pydicom.Dataset) -> bytes:
    fp = BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


def test_dicomweb_client_retrieves_the_stored_bytes_in_their_transfer_syntax(node, study):
    study_uid, cts, scs = study
    client = DICOMwebClient(base_url(node), headers=bearer(READ_TOKEN))
    for batch, syntax in ((cts, ExplicitVRLittleEndian), (scs, JPEGBaseline8Bit)):
        got = client.retrieve_series(study_uid, batch[0].SeriesInstanceUID, media_types=ANY)
        assert [ds.SOPInstanceUID for ds in got] == [ds.SOPInstanceUID for ds in batch]  # by Instance Number
        for sent, ds in zip(batch, got, strict=True):
            assert file_bytes(ds) == spool_bytes(node, sent)  # the part is the stored file, byte for byte
            assert ds.file_meta.TransferSyntaxUID == syntax
            assert ds.PixelData == sent.PixelData  # as sent: not decoded, not re-encoded

    # Each part's Content-Type names the stored transfer syntax; the body is the files themselves.
    r = requests.get(f"{base_url(node)}/studies/{study_uid}", timeout=30,
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*', **bearer(READ_TOKEN)})
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
    boundary = r.headers["content-type"].split("boundary=")[1].encode()
    parts = r.content.split(b"--" + boundary)
    assert parts[0] == b"" and parts[-1] == b"--\r\n" and len(parts) == 6
    expected = sorted([(ds, ExplicitVRLittleEndian) for ds in cts] + [(scs[0], JPEGBaseline8Bit)],
                      key=lambda e: e[0].SeriesInstanceUID)  # by series UID, then Instance Number
    for (sent, ts), part in zip(expected, parts[1:-1], strict=True):
        head, _, body = part.partition(b"\r\n\r\n")
        assert head == f"\r\nContent-Type: application/dicom; transfer-syntax={ts}".encode()
        assert body == spool_bytes(node, sent) + b"\r\n"

    # Instance level, JPEG named explicitly.
    sc = scs[0]
    [one] = client.retrieve_series(study_uid, sc.SeriesInstanceUID, media_types=(("application/dicom", JPEGBaseline8Bit),))
    assert file_bytes(one) == spool_bytes(node, sc)
    r = requests.get(f"{base_url(node)}/studies/{study_uid}/series/{sc.SeriesInstanceUID}/instances/{sc.SOPInstanceUID}",
                     headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JPEGBaseline8Bit}',
                              **bearer(READ_TOKEN)}, timeout=30)
    assert r.status_code == 200 and spool_bytes(node, sc) in r.content


def test_no_transcoding_default_accept_is_explicit_vr_little_endian(node, study):
    study_uid, cts, scs = study
    client = DICOMwebClient(base_url(node), headers=bearer(READ_TOKEN))
    # dicomweb-client's default Accept names no transfer syntax: Explicit VR LE (PS3.18 8.7.3.5.2).
    got = client.retrieve_series(study_uid, cts[0].SeriesInstanceUID)
    assert [file_bytes(ds) for ds in got] == [spool_bytes(node, ds) for ds in cts]
    with pytest.raises(requests.HTTPError) as err:
        client.retrieve_series(study_uid, scs[0].SeriesInstanceUID)
    assert err.value.response.status_code == 406
    assert "1.2.840.10008.1.2.4.50" in err.value.response.json()["detail"]

    def status(path: str, accept: str | None) -> int:
        headers = bearer(READ_TOKEN) | ({"Accept": accept} if accept is not None else {})
        return requests.get(f"{base_url(node)}/studies/{study_uid}{path}", headers=headers, timeout=30).status_code

    ct_path, sc_path = f"/series/{cts[0].SeriesInstanceUID}", f"/series/{scs[0].SeriesInstanceUID}"
    jpeg = f'multipart/related; type="application/dicom"; transfer-syntax={JPEGBaseline8Bit}'
    assert status(ct_path, jpeg) == 406  # stored Explicit VR LE, asked JPEG
    assert status(sc_path, jpeg) == 200
    assert status("", jpeg) == 406  # the study holds both: some instance is not in JPEG
    assert status("", f'{jpeg}, multipart/related; type="application/dicom"') == 200  # either syntax, each as stored
    assert status("", 'multipart/related; type="application/dicom"; transfer-syntax=*') == 200
    assert status(ct_path, None) == 200 and status(sc_path, None) == 406
    assert status(ct_path, "application/json") == 406
    assert status(ct_path, 'multipart/related; type="image/jpeg"') == 406


def test_metadata_gives_the_attributes_without_bulk_data(node, study):
    study_uid, cts, scs = study
    client = DICOMwebClient(base_url(node), headers=bearer(READ_TOKEN))
    meta = client.retrieve_series_metadata(study_uid, cts[0].SeriesInstanceUID)
    assert len(meta) == 3
    for sent, item in zip(cts, meta, strict=True):
        ds = pydicom.Dataset.from_json(item)
        assert ds.SOPInstanceUID == sent.SOPInstanceUID and ds.InstanceNumber == sent.InstanceNumber
        assert (ds.PatientName, ds.Modality, ds.Rows, ds.Columns) == (sent.PatientName, "CT", sent.Rows, sent.Columns)
        assert "7FE00010" not in item and "00020010" not in item  # no Pixel Data, no file meta
    r = requests.get(f"{base_url(node)}/studies/{study_uid}/metadata", headers=bearer(READ_TOKEN), timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    assert sorted(i["00080018"]["Value"][0] for i in r.json()) == sorted(ds.SOPInstanceUID for ds in [*cts, *scs])
    sc = scs[0]
    item = client.retrieve_instance_metadata(  # dicomweb-client unwraps the one-item array
        study_uid, sc.SeriesInstanceUID, sc.SOPInstanceUID)
    assert item["00080016"]["Value"] == [SecondaryCaptureImageStorage] and "7FE00010" not in item


def test_tokens_unknown_resources_and_bad_uids(node, study):
    study_uid, cts, scs = study
    series = f"{base_url(node)}/studies/{study_uid}/series/{cts[0].SeriesInstanceUID}"
    for path in (series, f"{series}/metadata"):
        assert requests.get(path, timeout=10).status_code == 401
        assert requests.get(path, headers=bearer("not-a-token"), timeout=10).status_code == 401
        r = requests.get(path, headers=bearer(INGEST_TOKEN), timeout=10)  # a token without `read`
        assert r.status_code == 403 and "insufficient_scope" in r.headers["www-authenticate"]
    other = generate_uid()
    for path in (
        f"/studies/{other}",
        f"/studies/{other}/series/{cts[0].SeriesInstanceUID}",  # a real series under another study
        f"/studies/{study_uid}/series/{other}",
        f"/studies/{study_uid}/series/{other}/metadata",
        f"/studies/{study_uid}/series/{cts[0].SeriesInstanceUID}/instances/{other}",
    ):
        r = requests.get(base_url(node) + path, headers=bearer(READ_TOKEN), timeout=10)
        assert r.status_code == 404, path
    r = requests.get(f"{base_url(node)}/studies/1.2.x", headers=bearer(READ_TOKEN), timeout=10)
    assert r.status_code == 400
    # A file gone from the spool (retention) is not served.
    node.spool.remove_series(study_uid, scs[0].SeriesInstanceUID)
    r = requests.get(f"{base_url(node)}/studies/{study_uid}/series/{scs[0].SeriesInstanceUID}",
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*', **bearer(READ_TOKEN)},
                     timeout=10)
    assert r.status_code == 404


@pytest.mark.integration
def test_orthanc_retrieves_a_study_from_the_node_over_wado_rs(node, study, tmp_path):
    require_orthanc()
    study_uid, cts, scs = study
    servers = {"ainode": {"Url": base_url(node) + "/", "HttpHeaders": bearer(READ_TOKEN)}}
    pacs = Orthanc(tmp_path / "orthanc", extra={"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers}}).start()
    try:
        resources = [{"Study": study_uid, "Series": ds.SeriesInstanceUID} for ds in (cts[0], scs[0])]
        with capture_logs() as logs:
            r = requests.post(f"{pacs.url}/dicom-web/servers/ainode/retrieve", json={"Resources": resources}, timeout=60)
        assert r.ok, r.text
        retrieved = [e for e in logs if e["event"] == "wado_retrieve"]
        assert [e["token_name"] for e in retrieved] == ["worker", "worker"]
        assert all("transfer-syntax=*" in (e["accept"] or "") for e in retrieved), retrieved
        held = wait_for(lambda: len(pacs.study_instances(study_uid)) == 4 and pacs.study_instances(study_uid), 30,
                        what="instances in Orthanc")
        by_sop = {inst["MainDicomTags"]["SOPInstanceUID"]: inst["ID"] for inst in held}
        for ds in [*cts, *scs]:
            assert pacs.file(by_sop[ds.SOPInstanceUID]) == spool_bytes(node, ds)
    finally:
        pacs.stop()
