"""The index on both backends: SQLite (WAL) and a real PostgreSQL server.

The PostgreSQL server is started by the ``postgres_url`` fixture
(tests/conftest.py) from the Debian binaries on a free loopback port.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
import sqlalchemy

from node.index import Index, InstanceRecord, utcnow


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


def test_resend_deliveries_selects_and_records(index, rg1_uncr, tmp_path):
    import datetime as dt

    ds = pydicom.dcmread(rg1_uncr, stop_before_pixels=True)
    job_id = index.create_job(
        pipeline="pneumonia", route="cxr", level="series", study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID, destinations=["a", "b"],
    )
    assert index.claim_job().id == job_id
    result = pydicom.Dataset()
    result.SOPInstanceUID, result.StudyInstanceUID = "1.2.3.4", ds.StudyInstanceUID
    result.SeriesInstanceUID, result.SOPClassUID, result.Modality = "1.2.3", "1.2.840.10008.5.1.4.1.1.88.34", "SR"
    index.finish_job(job_id, [(result, tmp_path / "r.dcm", ["a", "b"])])
    ids = {d.destination: d.id for d in index.deliveries()}
    for i in ids.values():
        index.record_attempt(i, ok=False, status="0x0122", error="refused", seconds=0.1, next_attempt_at=None)
    with pytest.raises(ValueError):
        index.resend_deliveries(by="me")  # neither ids nor failed=True
    with pytest.raises(ValueError):
        index.resend_deliveries([ids["a"]], destination="a", by="me")
    with pytest.raises(ValueError):
        index.resend_deliveries(failed=True, by=" ")
    assert index.resend_deliveries(failed=True, since=utcnow() + dt.timedelta(hours=1), by="me") == ([], [])
    assert index.resend_deliveries(failed=True, destination="b", by="me", reason="PACS fixed") == ([ids["b"]], [])
    assert index.resend_deliveries([ids["a"], 999], by="me") == ([ids["a"]], [999])
    for d in index.deliveries():
        assert (d.state, d.attempts, d.last_error) == ("pending", 0, "refused")
        assert len(index.attempts(d.id)) == 1  # the earlier attempt is kept
        assert index.delivery(d.id).destination == d.destination
    assert [d.id for d in index.due_deliveries("b", utcnow())] == [ids["b"]]
    (t,) = [t for t in index.transitions("delivery", ids["b"]) if t.to_state == "pending"]
    assert (t.from_state, t.reason) == ("failed", "resend by me: PACS fixed")
    assert index.delivery(12345) is None


def test_states_are_enums_and_every_change_has_its_row(index, rg1_uncr, tmp_path):
    from node.index import DeliveryState, JobState, SeriesState

    ds = pydicom.dcmread(rg1_uncr, stop_before_pixels=True)
    uid = ds.SeriesInstanceUID
    assert index.record_instance(_record(ds, tmp_path / "x.dcm"))
    assert index.series_info(uid).state is SeriesState.RECEIVING
    with pytest.raises(ValueError, match="not a valid SeriesState"):
        index.set_series_state(uid, "finished")
    with pytest.raises(ValueError, match="not a valid JobState"):
        index.jobs(state="delivered")
    assert index.set_series_state(uid, SeriesState.COMPLETE, "idle", expect=SeriesState.RECEIVING)
    assert index.set_series_state(uid, SeriesState.COMPLETE, "again")  # no change, no row
    job_id = index.create_job(
        pipeline="p", route="r", level="series", study_uid=ds.StudyInstanceUID, series_uid=uid, destinations=["a"],
    )
    index.claim_job()
    index.fail_job(job_id, "bad input")
    assert index.job(job_id).state is JobState.FAILED
    assert [(t.from_state, t.to_state) for t in index.transitions("job", job_id)] == [
        (None, "queued"), ("queued", "running"), ("running", "failed"),
    ]
    assert [(t.from_state, t.to_state) for t in index.transitions("series", uid)] == [
        (None, "receiving"), ("receiving", "complete"), ("complete", "queued"), ("queued", "running"), ("running", "failed"),
    ]
    # A new instance reopens the series, from the state it was in.
    assert index.record_instance(replace(_record(ds, tmp_path / "y.dcm"), sop_instance_uid=ds.SOPInstanceUID + ".1"))
    info = index.series_info(uid)
    assert (info.state, info.instance_count) == (SeriesState.RECEIVING, 2)
    last = index.transitions("series", uid)[-1]
    assert (last.from_state, last.to_state, last.reason) == ("failed", "receiving", "new instance")
    assert index.counts()["series"] == {"receiving": 1}
    assert DeliveryState("pending") is DeliveryState.PENDING


def test_concurrent_claims_take_each_job_once(index, rg1_uncr):
    """Workers claiming at once (PostgreSQL runs them concurrently: FOR UPDATE SKIP LOCKED)."""
    from concurrent.futures import ThreadPoolExecutor

    ds = pydicom.dcmread(rg1_uncr, stop_before_pixels=True)
    ids = {
        index.create_job(
            pipeline="p", route="r", level="series", study_uid=ds.StudyInstanceUID, series_uid=None, destinations=[],
        )
        for _ in range(40)
    }

    def drain() -> list[int]:
        got = []
        while (job := index.claim_job()) is not None:
            got.append(job.id)
        return got

    with ThreadPoolExecutor(8) as pool:
        claimed = [i for got in pool.map(lambda _: drain(), range(8)) for i in got]
    assert sorted(claimed) == sorted(ids)  # each exactly once
    assert {index.job(i).attempts for i in ids} == {1}
    assert all(len(index.transitions("job", i)) == 2 for i in ids)
