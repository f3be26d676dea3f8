"""The index on both backends: SQLite (WAL) and a real PostgreSQL server.

The PostgreSQL server is started by the test from the Debian binaries
(``initdb``, ``pg_ctl``) on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pydicom
import pytest
import sqlalchemy

from node.index import Index, InstanceRecord, utcnow
from tests.peers import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _pg_tool(name: str) -> str | None:
    return shutil.which(name) or (str(PG_BIN / name) if (PG_BIN / name).exists() else None)


@pytest.fixture(scope="session")
def postgres_url():
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pytest.importorskip("psycopg", reason="psycopg is needed for the PostgreSQL index")
    root = Path(tempfile.mkdtemp(prefix="ainode-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "ainode", "--auth=trust"], check=True, capture_output=True)
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-o", f"-p {port} -k {root} -h 127.0.0.1", "-w", "start"],
        check=True,
        capture_output=True,
    )
    yield f"postgresql+psycopg://ainode@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request, tmp_path):
    if request.param == "sqlite":
        idx = Index(f"sqlite:///{tmp_path / 'index.db'}")
    else:
        url = request.getfixturevalue("postgres_url")
        engine = sqlalchemy.create_engine(url)
        from node.index import Base

        Base.metadata.drop_all(engine)  # each test starts empty
        engine.dispose()
        idx = Index(url)
    yield idx
    idx.close()


def _record(ds: pydicom.Dataset, path: Path, **kw) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, series_uid=ds.SeriesInstanceUID,
        study_uid=ds.StudyInstanceUID, transfer_syntax_uid="1.2.840.10008.1.2.1", path=path, size=1,
        modality=ds.Modality, **kw,
    )


def test_sqlite_runs_in_wal_mode(tmp_path):
    idx = Index(f"sqlite:///{tmp_path / 'i.db'}")
    with idx.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    idx.close()


def test_instances_series_jobs_and_deliveries(index, rg1_uncr, tmp_path):
    ds = pydicom.dcmread(rg1_uncr, stop_before_pixels=True)
    index.association_opened("a1", "MOD", "127.0.0.1", 5000)
    assert index.record_instance(_record(ds, tmp_path / "x.dcm", association_id="a1", calling_ae="MOD"))
    assert not index.record_instance(_record(ds, tmp_path / "x.dcm"))  # duplicate
    assert index.association_closed("a1", "released") == 1
    assert index.series_to_complete(utcnow(), 3600, on_release=True) == [ds.SeriesInstanceUID]
    assert index.series_to_complete(utcnow(), 3600, on_release=False) == []
    assert index.set_series_state(ds.SeriesInstanceUID, "complete", "released", expect="receiving")
    assert not index.set_series_state(ds.SeriesInstanceUID, "queued", expect="receiving")

    job_id = index.create_job(
        pipeline="pneumonia", route="cxr", level="series", study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID, destinations=["a", "b"],
    )
    job = index.claim_job()
    assert job.id == job_id and job.attempts == 1 and job.destinations == ("a", "b")
    assert index.series_info(ds.SeriesInstanceUID).state == "running"
    assert index.claim_job() is None
    result = pydicom.Dataset()
    result.SOPInstanceUID, result.StudyInstanceUID = "1.2.3.4", ds.StudyInstanceUID
    result.SeriesInstanceUID, result.SOPClassUID, result.Modality = "1.2.3", "1.2.840.10008.5.1.4.1.1.88.34", "SR"
    index.finish_job(job_id, [(result, tmp_path / "r.dcm", ["a", "b"])])
    assert index.job(job_id).state == "done"
    due = index.due_deliveries("a", utcnow())
    assert [d.sop_instance_uid for d in due] == ["1.2.3.4"]
    assert index.record_attempt(due[0].id, ok=False, status=None, error="down", seconds=0.1, next_attempt_at=utcnow()) == "pending"
    assert index.record_attempt(due[0].id, ok=True, status="0x0000", error=None, seconds=0.1, next_attempt_at=None) == "delivered"
    assert [a.ok for a in index.attempts(due[0].id)] == [False, True]
    counts = index.counts()
    assert counts["deliveries"] == {"delivered": 1, "pending": 1}
    assert counts["jobs"] == {"done": 1}
    assert index.series_info(ds.SeriesInstanceUID).state == "done"
