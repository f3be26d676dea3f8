"""Retention of the spool, quarantine and outbox; start-up removal of the
temporary files a killed write leaves."""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import update
from structlog.testing import capture_logs

from node.config import load_config
from node.index import Index, InstanceRecord, JobState, Study, utcnow
from node.retention import Retention
from node.service import Node
from node.spool import Spool, read_header
from tests.peers import free_port, node_config_for, wait_for
from tests.test_outcomes import small_cr

DAY = dt.timedelta(days=1)


@pytest.fixture
def state(tmp_path):
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine", tmp_path / "outbox", fsync=False)
    yield index, spool
    index.close()


def retention(index, spool, **days) -> Retention:
    settings = load_config(None, retention={"spool_days": 7, "quarantine_days": 30, "outbox_days": 30, **days}).retention
    return Retention(settings, index, spool)


def received(index: Index, spool: Spool, days_ago: float, series_state: str = "done") -> Dataset:
    """A study of one instance, last received ``days_ago`` days ago."""
    ds = small_cr()
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path = spool.store_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buf.getvalue())
    index.record_instance(InstanceRecord.from_header(read_header(path), path, path.stat().st_size))
    index.set_series_state(ds.SeriesInstanceUID, series_state, "test")
    with index.engine.begin() as c:  # age the study as if its last instance came then
        c.execute(update(Study).where(Study.study_uid == ds.StudyInstanceUID).values(last_received_at=utcnow() - days_ago * DAY))
    return ds


def job_for(index: Index, ds: Dataset, state: JobState, outbox_path: Path | None = None) -> int:
    job_id = index.create_job(
        pipeline="pneumonia", route="cxr", level="series", study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID, destinations=["pacs"],
    )
    if state == JobState.QUEUED:
        return job_id
    assert index.claim_job().id == job_id
    if state == JobState.DONE:
        result = Dataset()
        result.SOPInstanceUID, result.SOPClassUID, result.Modality = generate_uid(), "1.2.840.10008.5.1.4.1.1.66.4", "SEG"
        result.StudyInstanceUID, result.SeriesInstanceUID = ds.StudyInstanceUID, generate_uid()
        index.finish_job(job_id, [(result, outbox_path or Path("/nonexistent"), ["pacs"])])
    return job_id


def deliver_all(index: Index) -> None:
    for d in index.deliveries(1000, state="pending"):
        index.record_attempt(d.id, ok=True, status="0x0000", error=None, seconds=0.1, next_attempt_at=None)


def spool_files(spool: Spool, ds: Dataset) -> list[Path]:
    return list((spool.spool_dir / ds.StudyInstanceUID).rglob("*.dcm")) if (spool.spool_dir / ds.StudyInstanceUID).exists() else []


def test_spool_retention_purges_idle_studies_and_never_busy_ones(state):
    index, spool = state
    old_done = received(index, spool, 8)
    job_for(index, old_done, JobState.DONE)
    old_pending = received(index, spool, 8)
    job_for(index, old_pending, JobState.DONE)
    deliver_all(index)  # old_done's delivery is delivered ...
    old_pending_job = job_for(index, old_pending, JobState.DONE)  # ... old_pending's second job's is pending
    old_queued = received(index, spool, 8, series_state="queued")
    job_for(index, old_queued, JobState.QUEUED)
    recent = received(index, spool, 1)
    old_receiving = received(index, spool, 8, series_state="receiving")
    size = spool_files(spool, old_done)[0].stat().st_size

    with capture_logs() as logs:
        report = retention(index, spool).run()
    assert report["spool"] == {"files": 1, "bytes": size, "studies": 1, "kept_busy": 3}
    assert spool_files(spool, old_done) == [] and not (spool.spool_dir / old_done.StudyInstanceUID).exists()
    assert index.series_info(old_done.SeriesInstanceUID).state == "purged"
    assert index.instance_paths(old_done.SeriesInstanceUID) == []
    assert "retention: no instance for 7 days" in index.transitions("series", old_done.SeriesInstanceUID)[-1].reason
    for kept in (old_queued, old_pending, recent, old_receiving):
        assert len(spool_files(spool, kept)) == 1
        assert index.instance_paths(kept.SeriesInstanceUID)
    [cleaned] = [e for e in logs if e["event"] == "retention_cleaned" and e["folder"] == "spool"]
    assert (cleaned["files"], cleaned["bytes"]) == (1, size)

    deliver_all(index)  # the pending delivery went out: nothing holds that study any more
    assert index.job(old_pending_job).state == JobState.DONE
    assert retention(index, spool).run()["spool"]["studies"] == 1
    assert spool_files(spool, old_pending) == []


def aged(path: Path, days: float) -> Path:
    t = time.time() - days * 86400
    os.utime(path, (t, t))
    return path


def test_quarantine_and_outbox_retention_by_age(state):
    index, spool = state
    old_dcm = aged(spool.quarantine(b"old bytes", "refused", {"status": "0xA900"}), 31)
    aged(old_dcm.with_suffix(".json"), 31)
    new_dcm = spool.quarantine(b"new bytes", "refused", {"status": "0xA900"})

    idle, busy = received(index, spool, 40), received(index, spool, 40, series_state="queued")
    job_for(index, busy, JobState.QUEUED)
    outputs = {}
    for ds in (idle, busy):
        result = Dataset()
        result.StudyInstanceUID, result.SOPInstanceUID = ds.StudyInstanceUID, generate_uid()
        path = spool.outbox_path(ds.StudyInstanceUID, result.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
        outputs[ds.StudyInstanceUID] = aged(path, 31)

    report = retention(index, spool, spool_days=0).run()
    assert "spool" not in report  # 0 keeps forever
    assert report["quarantine"]["files"] == 2 and report["quarantine"]["bytes"] > len(b"old bytes")
    assert not old_dcm.exists() and not old_dcm.with_suffix(".json").exists()
    assert new_dcm.exists() and new_dcm.with_suffix(".json").exists()
    assert report["outbox"] == {"files": 1, "bytes": 100, "studies": 1, "kept_busy": 1}
    assert not outputs[idle.StudyInstanceUID].parent.exists()
    assert outputs[busy.StudyInstanceUID].exists()
    assert len(spool_files(spool, idle)) == 1  # the spool is kept forever here

    forever = retention(index, spool, spool_days=0, quarantine_days=0, outbox_days=0).run()
    assert forever == {} and new_dcm.exists() and outputs[busy.StudyInstanceUID].exists()


def test_retention_settings_are_validated():
    from node.config import ConfigError

    with pytest.raises(ConfigError, match="retention.spool_days"):
        load_config(None, retention={"spool_days": -1})
    with pytest.raises(ConfigError, match="retention.interval_minutes"):
        load_config(None, retention={"interval_minutes": 0})


def quiet_node_config(tmp_path, **sections):
    """No API, no fsync: the node for the recovery and retention cases."""
    return node_config_for(
        tmp_path,
        node={"bind_address": "127.0.0.1", "port": free_port()},
        storage={"fsync": False},
        api={"enabled": False},
        **sections,
    )


def temporary(folder: Path, name: str, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.{uuid.uuid4().hex}.tmp"  # as node.spool.write_durable names them
    path.write_bytes(b"\0" * size)
    return path


def test_recovery_removes_temporary_files_a_kill_left(tmp_path):
    node = Node(quiet_node_config(tmp_path))
    try:
        st = node.config.storage
        left = [
            temporary(Path(st.spool_dir) / "1.2.3" / "1.2.3.4", "1.2.3.4.5.dcm", 1000),
            temporary(Path(st.quarantine_dir), "20250101T000000-abcdef012345.dcm", 200),
            temporary(Path(st.outbox_dir) / "1.2.3", "1.2.3.9.dcm", 30),
        ]
        keep = Path(st.spool_dir) / "1.2.3" / "1.2.3.4" / ".not-ours.tmp"
        keep.write_bytes(b"x")
        with capture_logs() as logs:
            summary = node.recover()
        assert (summary["temporary_files"], summary["temporary_bytes"]) == (3, 1230)
        assert not any(p.exists() for p in left) and keep.exists()
        [event] = [e for e in logs if e["event"] == "recovered"]
        assert (event["temporary_files"], event["temporary_bytes"]) == (3, 1230)
    finally:
        node.index.close()


def test_the_node_runs_retention_at_start_up(tmp_path):
    node = Node(quiet_node_config(tmp_path, retention={"quarantine_days": 1, "interval_minutes": 60}))
    old = aged(node.spool.quarantine(b"refused long ago", "refused", {}), 2)
    try:
        node.start()
        wait_for(lambda: not old.exists(), 20, what="start-up retention run")
        assert node.scheduler.get_job("retention") is not None
    finally:
        node.stop()
