"""STOW-RS into the node (PS3.18 10.5): a real node on a real socket, real
clients (dicomweb-client, requests with a chunked body) and a real Orthanc
sending over DICOMweb; the same checks, quarantine, spool, index and
completion as C-STORE."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
import uuid
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from node.index import Index, InstanceRecord, utcnow
from node.service import Node
from tests.peers import NodeProcess, Orthanc, free_port, node_config_for, require_orthanc, wait_for

INGEST_TOKEN = secrets.token_urlsafe(32)
READ_TOKEN = secrets.token_urlsafe(32)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A real node (no routes) with an ingest and a read token."""
    started: list[Node] = []

    def start(**api) -> Node:
        monkeypatch.setenv("AINODE_TEST_STOW_INGEST", INGEST_TOKEN)
        monkeypatch.setenv("AINODE_TEST_STOW_READ", READ_TOKEN)
        cfg = node_config_for(
            tmp_path / f"node{len(started)}",
            node={"bind_address": "127.0.0.1", "port": free_port()},
            completion={"sweep_interval_seconds": 0.2, "stow_idle_seconds": 1.0, "series_idle_seconds": 60},
            api={
                "bind_address": "127.0.0.1",
                "port": 0,
                "tokens": [
                    {"name": "orthanc", "scopes": ["ingest"], "env": "AINODE_TEST_STOW_INGEST"},
                    {"name": "grafana", "scopes": ["read"], "env": "AINODE_TEST_STOW_READ"},
                ],
            }
            | api,
        )
        n = Node(cfg)
        started.append(n)
        n.start()
        return n

    yield start
    for n in started:
        n.stop()


def stow_url(n: Node, study_uid: str | None = None) -> str:
    base = f"http://127.0.0.1:{n.api.address[1]}/dicom-web/studies"
    return f"{base}/{study_uid}" if study_uid else base


def ct_instances(count: int, study_uid: str | None = None) -> list[pydicom.Dataset]:
    """``count`` CT images (pydicom's CT_small) of one new series and study."""
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    out = []
    for i in range(count):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def encoded(ds: pydicom.Dataset) -> bytes:
    fp = BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


def multipart(parts: list[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/related body of application/dicom parts (RFC 2387), as a
    STOW-RS client writes it; returns (body, Content-Type)."""
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in parts
    ) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def post(n: Node, parts: list[bytes], study_uid: str | None = None, token: str = INGEST_TOKEN) -> requests.Response:
    body, content_type = multipart(parts)
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json", **bearer(token)}
    return requests.post(stow_url(n, study_uid), data=body, headers=headers, timeout=30)


def sop_items(response: requests.Response, tag: str) -> list[dict]:
    """(0008,1199) Referenced or (0008,1198) Failed SOP Sequence items, as
    {keyword: value} (None where empty)."""
    ds = pydicom.Dataset.from_json(response.json())
    seq = ds.get(tag)
    out = []
    for item in seq or []:
        out.append({kw: item.get(kw) or None for kw in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID", "FailureReason")})
    return out


def quarantined(n: Node) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(n.spool.quarantine_dir.glob("*.json"))]


# -- one path with C-STORE ----------------------------------------------------------------


def test_dicomweb_client_stores_a_radiograph_which_completes_by_the_stow_idle_time(node, rg1_uncr):
    n = node()
    client = DICOMwebClient(f"http://127.0.0.1:{n.api.address[1]}/dicom-web", headers=bearer(INGEST_TOKEN))
    src = pydicom.dcmread(rg1_uncr)
    answer = client.store_instances([src])
    [ref] = answer.ReferencedSOPSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
    assert "FailedSOPSequence" not in answer

    path = n.spool.instance_path(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
    assert pydicom.dcmread(path).PixelData == src.PixelData
    assert n.index.instance_paths(src.SeriesInstanceUID) == [path]
    assert not list(n.spool.spool_dir.glob(".*.tmp")), "temporary part files are removed"
    info = n.index.series_info(src.SeriesInstanceUID)
    assert info.state == "receiving" and info.last_source == "stow-rs" and not info.released
    # The request's end is no release: the series waits stow_idle_seconds (1 s), not series_idle_seconds (60 s).
    wait_for(lambda: n.index.series_info(src.SeriesInstanceUID).state != "receiving", 10, what="series completion")
    reasons = [t.reason for t in n.index.transitions("series", src.SeriesInstanceUID)]
    assert any(r and "STOW-RS" in r for r in reasons), reasons

    again = client.store_instances([src])  # a duplicate: stored once, answered as stored
    assert len(again.ReferencedSOPSequence) == 1
    assert n.index.counts()["instances"]["total"] == 1


def test_bad_parts_refused_and_quarantined_while_good_ones_are_stored(node):
    n = node()
    good = ct_instances(2)
    study = good[0].StudyInstanceUID
    other_study = ct_instances(1)[0]
    truncated = encoded(ct_instances(1, study)[0])[:-100]
    garbage = b"this is not a DICOM file" * 20
    response = post(n, [encoded(good[0]), truncated, encoded(other_study), garbage, encoded(good[1])], study)

    assert response.status_code == 202, response.text  # PS3.18 Table 10.5.3-1: some stored, some failed
    assert response.headers["Content-Type"].startswith("application/dicom+json")
    stored = sop_items(response, "ReferencedSOPSequence")
    assert [s["ReferencedSOPInstanceUID"] for s in stored] == [good[0].SOPInstanceUID, good[1].SOPInstanceUID]
    failed = sop_items(response, "FailedSOPSequence")
    assert [f["FailureReason"] for f in failed] == [0xC210, 0xA900, 0xC210]
    assert failed[1]["ReferencedSOPInstanceUID"] == other_study.SOPInstanceUID  # what is known is named
    assert failed[2]["ReferencedSOPInstanceUID"] is None and failed[2]["ReferencedSOPClassUID"] is None

    q = quarantined(n)
    assert sorted(e["dimse_status"] for e in q) == ["0xA900", "0xC210", "0xC210"]
    assert {e["source"] for e in q} == {"stow-rs"} and {e["token_name"] for e in q} == {"orthanc"}
    mismatch = next(e for e in q if e["dimse_status"] == "0xA900")
    assert study in mismatch["reason"] and other_study.StudyInstanceUID in mismatch["reason"]
    assert n.index.counts()["instances"]["total"] == 2
    assert len(list(n.spool.iter_instances())) == 2

    none_stored = post(n, [garbage, truncated])
    assert none_stored.status_code == 409, none_stored.text  # none stored
    assert [f["FailureReason"] for f in sop_items(none_stored, "FailedSOPSequence")] == [0xC210, 0xC210]
    assert "00081199" not in none_stored.json()

    # A body that ends inside its last part: the parts before it are stored.
    kept, cut = ct_instances(2)
    body, content_type = multipart([encoded(kept), encoded(cut)])
    headers = {"Content-Type": content_type, **bearer(INGEST_TOKEN)}
    cut_short = requests.post(stow_url(n), data=body[: -len(encoded(cut)) // 2], headers=headers, timeout=30)
    assert cut_short.status_code == 202, cut_short.text
    assert [s["ReferencedSOPInstanceUID"] for s in sop_items(cut_short, "ReferencedSOPSequence")] == [kept.SOPInstanceUID]
    [unfinished] = sop_items(cut_short, "FailedSOPSequence")
    assert unfinished["FailureReason"] == 0xC210
    assert sum("ended inside this part" in e["reason"] for e in quarantined(n)) == 1
    not_multipart = requests.post(stow_url(n), data=garbage, headers=headers, timeout=30)
    assert not_multipart.status_code == 400 and "cannot be parsed" in not_multipart.json()["detail"]
    assert n.index.counts()["instances"]["total"] == 3


def test_chunked_request_body_is_streamed_to_disk(node):
    n = node()
    instances = ct_instances(3)
    body, content_type = multipart([encoded(ds) for ds in instances])

    def chunks():  # requests sends a generator with Transfer-Encoding: chunked, as Orthanc does
        for i in range(0, len(body), 7_000):
            yield body[i : i + 7_000]

    r = requests.post(stow_url(n), data=chunks(), headers={"Content-Type": content_type, **bearer(INGEST_TOKEN)}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert len(sop_items(r, "ReferencedSOPSequence")) == 3
    assert n.index.counts()["instances"]["total"] == 3


# -- refusals of the request ----------------------------------------------------------------


def test_token_scope_media_type_and_size_limit(node):
    n = node(stow_max_request_mb=0.5)
    part = encoded(ct_instances(1)[0])
    body, content_type = multipart([part])
    url = stow_url(n)

    assert requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=10).status_code == 401
    assert requests.post(url, data=body, headers={"Content-Type": content_type, **bearer("x" * 32)}, timeout=10).status_code == 401
    wrong_scope = requests.post(url, data=body, headers={"Content-Type": content_type, **bearer(READ_TOKEN)}, timeout=10)
    assert wrong_scope.status_code == 403 and "insufficient_scope" in wrong_scope.headers["WWW-Authenticate"]

    for media in ("application/dicom", 'multipart/related; type="application/dicom+xml"; boundary=x', "multipart/form-data; boundary=x"):
        r = requests.post(url, data=body, headers={"Content-Type": media, **bearer(INGEST_TOKEN)}, timeout=10)
        assert r.status_code == 415, (media, r.status_code)
    no_boundary = requests.post(url, data=body, headers={"Content-Type": "multipart/related", **bearer(INGEST_TOKEN)}, timeout=10)
    assert no_boundary.status_code == 400
    bad_uid = requests.post(stow_url(n, "1.2.x"), data=body, headers={"Content-Type": content_type, **bearer(INGEST_TOKEN)}, timeout=10)
    assert bad_uid.status_code == 400

    big, big_type = multipart([part] * 60)  # ~2.4 MB > 0.5 MiB
    headers = {"Content-Type": big_type, **bearer(INGEST_TOKEN)}
    assert requests.post(url, data=big, headers=headers, timeout=30).status_code == 413
    chunked = requests.post(url, data=(big[i : i + 65536] for i in range(0, len(big), 65536)), headers=headers, timeout=30)
    assert chunked.status_code == 413
    assert n.index.counts()["instances"]["total"] == 0 and not quarantined(n)
    assert not list(n.spool.spool_dir.glob(".*.tmp"))

    # Our disk short of space (the guard C-STORE answers 0xA700 with): 503, the client retries.
    guard = n.ingest.free_space
    guard.min_free_bytes, guard.max_age_seconds = 2**60, 0
    full = requests.post(url, data=body, headers={"Content-Type": content_type, **bearer(INGEST_TOKEN)}, timeout=10)
    assert full.status_code == 503 and full.headers["Retry-After"] and "free disk" in full.json()["detail"]
    guard.min_free_bytes = 0
    assert requests.post(url, data=body, headers={"Content-Type": content_type, **bearer(INGEST_TOKEN)}, timeout=10).status_code == 200
    assert n.index.counts()["instances"]["total"] == 1 and not quarantined(n)


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request, tmp_path):
    """An empty index on SQLite, then on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    import sqlalchemy

    from node.index import Base

    url = request.getfixturevalue("postgres_url")
    engine = sqlalchemy.create_engine(url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    return url


def test_stow_series_complete_by_their_own_idle_time(tmp_path, index_url):
    """The index keeps each series' latest source; C-STORE series keep
    series_idle_seconds and release, STOW-RS ones wait stow_idle_seconds
    (SQLite and PostgreSQL)."""
    index = Index(index_url)
    try:
        study = generate_uid()
        for series, source in (("1.2.3.1", "c-store"), ("1.2.3.2", "stow-rs"), ("1.2.3.3", None)):
            index.record_instance(InstanceRecord(
                sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=series,
                study_uid=study, transfer_syntax_uid="1.2.840.10008.1.2.1", path=tmp_path / f"{series}.dcm", size=1,
                source=source,
            ))
        soon = utcnow() + dt.timedelta(seconds=3)
        assert index.series_to_complete(soon, 10, True, stow_idle_seconds=2) == ["1.2.3.2"]
        assert sorted(index.series_to_complete(soon, 2, True, stow_idle_seconds=5)) == ["1.2.3.1", "1.2.3.3"]
        assert sorted(index.series_to_complete(soon, 2, True)) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    finally:
        index.close()


# -- real peers --------------------------------------------------------------------------------


@pytest.mark.integration
def test_orthanc_sends_a_study_over_dicomweb_one_instance_a_request_then_all_at_once(node, tmp_path):
    require_orthanc()
    n = node()
    url = f"http://127.0.0.1:{n.api.address[1]}/dicom-web/"
    auth = {"Authorization": f"Bearer {INGEST_TOKEN}"}
    servers = {
        "ainode": {"Url": url, "HttpHeaders": auth},  # chunked transfers: Orthanc's default
        "ainode-plain": {"Url": url, "HttpHeaders": auth, "ChunkedTransfers": False},
    }
    pacs = Orthanc(tmp_path / "orthanc", extra={"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers}}).start()
    try:
        first, second = ct_instances(3), ct_instances(4)
        ids = {}
        for ds in first + second:
            r = requests.post(f"{pacs.url}/instances", data=encoded(ds), timeout=30)
            r.raise_for_status()
            ids[ds.SOPInstanceUID] = r.json()["ID"]

        def stow(server: str, resources: list[str]) -> None:
            r = requests.post(
                f"{pacs.url}/dicom-web/servers/{server}/stow", json={"Resources": resources, "Synchronous": True}, timeout=60
            )
            assert r.ok, r.text
            job = r.json().get("ID")
            if job:  # an asynchronous job after all: wait for it
                state = wait_for(lambda: requests.get(f"{pacs.url}/jobs/{job}", timeout=5).json()["State"] in ("Success", "Failure")
                                 and requests.get(f"{pacs.url}/jobs/{job}", timeout=5).json()["State"], 60, what="stow job")
                assert state == "Success", requests.get(f"{pacs.url}/jobs/{job}", timeout=5).json()

        with capture_logs() as logs:
            for ds in first:  # one instance per request
                stow("ainode-plain", [ids[ds.SOPInstanceUID]])
            study_id = requests.get(f"{pacs.url}/instances/{ids[second[0].SOPInstanceUID]}/study", timeout=10).json()["ID"]
            stow("ainode", [study_id])  # the whole study in one chunked request
        answered = [(e["status"], e["stored"], e["chunked"]) for e in logs if e["event"] == "stow_request"]
        assert answered == [(200, 1, False)] * 3 + [(200, 4, True)], answered

        for batch in (first, second):
            series = batch[0].SeriesInstanceUID
            info = n.index.series_info(series)
            assert info is not None and info.instance_count == len(batch) and info.last_source == "stow-rs"
            assert [p.name for p in n.index.instance_paths(series)] == [f"{ds.SOPInstanceUID}.dcm" for ds in batch]
        for ds in first + second:  # exactly the bytes Orthanc holds
            path = n.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            assert path.read_bytes() == pacs.file(ids[ds.SOPInstanceUID])
        wait_for(lambda: n.index.series_info(second[0].SeriesInstanceUID).state != "receiving", 10, what="completion")
    finally:
        pacs.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_dicomweb_client_to_ainode_serve_results_arrive_in_orthanc(tmp_path, orthanc, rg1_uncr):
    """dicomweb-client stores a chest radiograph into `ainode serve`; its
    SEG and SR arrive in a real Orthanc, as after C-STORE."""
    from tests.test_end_to_end import check_results, derived_in_orthanc, write_node_config

    config, ports = write_node_config(tmp_path, orthanc, "dicom", completion={"stow_idle_seconds": 0.5})
    config.write_text(
        config.read_text() + '\n[[api.tokens]]\nname = "sender"\nscopes = ["ingest"]\nenv = "AINODE_TEST_STOW_TOKEN"\n'
    )
    proc = NodeProcess(config, tmp_path, env={"AINODE_TEST_STOW_TOKEN": INGEST_TOKEN}).start(ports["api"])
    try:
        client = DICOMwebClient(f"http://127.0.0.1:{ports['api']}/dicom-web", headers=bearer(INGEST_TOKEN))
        src = pydicom.dcmread(rg1_uncr)
        answer = client.store_instances([src])
        assert answer.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        started = time.monotonic()
        wait_for(lambda: len(derived_in_orthanc(orthanc, src.StudyInstanceUID)) == 2, 120, 0.1, "SR and SEG in Orthanc")
        check_results(orthanc, Path(rg1_uncr))
        completions = [e for e in proc.log_lines() if e.get("event") == "series_complete"]
        assert completions and "STOW-RS" in completions[0]["reason"], completions
        print(f"\nSTOW-RS in -> SR and SEG in Orthanc {time.monotonic() - started:.2f} s")
    finally:
        proc.stop()
