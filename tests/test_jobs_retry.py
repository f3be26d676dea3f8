"""``ainode jobs retry``: failed jobs queued again, recorded, idempotent, and
taken by a running node without a restart; ``ainode run``'s outcomes."""

from __future__ import annotations

import datetime as dt
from io import BytesIO

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from node.cli import app
from node.index import Delivery, Index, InstanceRecord, JobState, Result, utcnow
from node.run import Runner
from node.service import Node
from node.spool import Spool, read_header
from tests.peers import free_port, node_config_for, node_sections, wait_for, write_node_toml
from tests.test_dispatch import StoreSCP
from tests.test_outcomes import BROAD_RULE, small_cr

cli = CliRunner()


def make_config(tmp_path, pacs_port: int = 104, **sections):
    return node_config_for(
        tmp_path,
        node={"bind_address": "127.0.0.1", "port": free_port()},
        storage={"fsync": False},
        completion={"sweep_interval_seconds": 0.2, "series_idle_seconds": 300},
        routes=[BROAD_RULE],
        destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        retry={"initial_delay_seconds": 0.2, "max_delay_seconds": 1},
        api={"enabled": False},
        **sections,
    )


def cli_config(tmp_path) -> str:
    """The same node as a TOML file for the CLI."""
    return str(write_node_toml(tmp_path / "cli.toml", node_sections(tmp_path)))


def spooled_job(index: Index, spool: Spool, ds=None) -> int:
    """A chest CR in the spool and the index, its series routed to a queued job."""
    ds = ds or small_cr()
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path = spool.store_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buf.getvalue())
    index.record_instance(InstanceRecord.from_header(read_header(path), path, path.stat().st_size))
    index.set_series_state(ds.SeriesInstanceUID, "queued", "routed by the test")
    return index.create_job(
        pipeline="pneumonia", route="chest", level="series", study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID, destinations=["pacs"],
    )


def killed_three_times(index: Index, job_id: int) -> None:
    """What the kill campaign left: the node died during the job 3 times."""
    for _ in range(3):
        assert index.claim_job().id == job_id
        index.recover_jobs(max_attempts=3)
    job = index.job(job_id)
    assert job.state == JobState.FAILED and "stopped during this job 3 times" in job.error


def test_retry_failed_brings_back_jobs_the_kill_campaign_gave_up_on(tmp_path):
    pacs = StoreSCP(free_port()).start()
    node = Node(make_config(tmp_path, pacs.port))
    try:
        job_id = spooled_job(node.index, node.spool)
        killed_three_times(node.index, job_id)
        node.start()
        assert node.index.job(job_id).state == JobState.FAILED  # start-up recovery leaves it alone

        result = cli.invoke(
            app, ["jobs", "retry", "--failed", "--by", "tester", "--reason", "kill campaign over", "--config", cli_config(tmp_path)]
        )
        assert result.exit_code == 0, result.output
        assert f"queued again: #{job_id}" in result.stdout
        # The running node takes it at its next poll (<= 1 s), no restart.
        job = wait_for(lambda: (j := node.index.job(job_id)).state == JobState.DONE and j, 60, what="retried job done")
        assert job.attempts == 1 and job.error is None
        wait_for(lambda: len(pacs.received) == 2, 30, what="SEG and SR at the PACS")
        retry = [t for t in node.index.transitions("job", job_id) if t.from_state == "failed" and t.to_state == "queued"]
        assert [t.reason for t in retry] == ["retry requested by tester: kill campaign over"]
    finally:
        node.stop()
        pacs.stop()


@pytest.fixture
def index(tmp_path):
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    yield index
    index.close()


def new_job(index: Index, pipeline: str = "pneumonia") -> int:
    return index.create_job(
        pipeline=pipeline, route="r", level="series", study_uid="1.2.3", series_uid=None, destinations=["pacs"]
    )


def test_retry_selects_failed_jobs_and_only_named_not_applicable_ones(tmp_path, index):
    pipelines = ("pneumonia", "brain_tumour", "pneumonia", "pneumonia", "pneumonia")
    failed_chest, failed_brain, not_applicable, done, queued = (new_job(index, p) for p in pipelines)
    for job_id in (failed_chest, failed_brain, not_applicable, done):
        assert index.claim_job().id == job_id
    index.fail_job(failed_chest, "bad input")
    index.fail_job(failed_brain, "bad input")
    index.fail_job(not_applicable, "lateral view", state=JobState.NOT_APPLICABLE)
    index.finish_job(done, [])
    config = cli_config(tmp_path)

    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    none = cli.invoke(app, ["jobs", "retry", "--failed", "--since", later, "--config", config])
    assert none.exit_code == 0 and "no job queued again" in none.stdout

    chest = cli.invoke(app, ["jobs", "retry", "--failed", "--pipeline", "pneumonia", "--config", config])
    assert chest.exit_code == 0, chest.output
    assert index.job(failed_chest).state == JobState.QUEUED and index.job(failed_chest).attempts == 0
    assert index.job(failed_brain).state == JobState.FAILED
    assert index.job(not_applicable).state == JobState.NOT_APPLICABLE  # --failed never takes these
    who = index.transitions("job", failed_chest)[-1].reason
    assert who.startswith("retry requested by ") and who != "retry requested by "

    named = cli.invoke(app, ["jobs", "retry", str(not_applicable), str(done), str(queued), "999", "--config", config])
    assert named.exit_code == 1
    assert index.job(not_applicable).state == JobState.QUEUED
    assert index.job(done).state == JobState.DONE and index.job(queued).attempts == 0
    assert f"#{done}: not queued: state is done" in named.output
    assert "#999: not queued: no such job" in named.output

    assert cli.invoke(app, ["jobs", "retry", "--config", config]).exit_code == 2
    assert cli.invoke(app, ["jobs", "retry", "--failed", "--since", "yesterday", "--config", config]).exit_code == 2
    assert cli.invoke(app, ["jobs", "retry", "1", "--pipeline", "pneumonia", "--config", config]).exit_code == 2


def test_since_takes_an_offset_and_defaults_to_utc(index, tmp_path):
    job_id = new_job(index)
    index.claim_job()
    index.fail_job(job_id, "bad input")
    finished = index.job(job_id).finished_at  # naive UTC
    before = (finished - dt.timedelta(minutes=1)).replace(tzinfo=dt.UTC).astimezone(dt.timezone(dt.timedelta(hours=5)))
    queued, refused = index.retry_jobs(failed=True, since=finished + dt.timedelta(minutes=1), by="t")
    assert (queued, refused) == ([], {})
    result = cli.invoke(app, ["jobs", "retry", "--failed", "--since", before.isoformat(), "--config", cli_config(tmp_path)])
    assert result.exit_code == 0 and f"#{job_id}" in result.stdout


def test_a_rerun_makes_the_same_results_and_queues_fresh_deliveries(tmp_path):
    cfg = make_config(tmp_path)
    index = Index(cfg.storage.index_url)
    spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir, fsync=False)
    runner = Runner(cfg, index, spool)
    try:
        job_id = spooled_job(index, spool)
        assert runner.run_job(index.claim_job()) == JobState.DONE
        first = sorted((d.sop_instance_uid, d.destination) for d in index.deliveries())
        assert len(first) == 2
        for d in index.deliveries():
            index.record_attempt(d.id, ok=True, status="0x0000", error=None, seconds=0.1, next_attempt_at=None)
        # An operator asks for the job again (here: a done job marked failed by hand).
        index.fail_job(job_id, "operator: run it again")
        assert index.retry_jobs([job_id], by="tester") == ([job_id], {})
        assert runner.run_job(index.claim_job()) == JobState.DONE  # no IntegrityError on the existing rows
        again = index.deliveries()
        assert sorted((d.sop_instance_uid, d.destination) for d in again) == first  # same deterministic UIDs
        assert {(d.state, d.attempts) for d in again} == {("pending", 0)}
        with index._session() as s:
            assert len(s.scalars(select(Result)).all()) == 2
            assert len(s.scalars(select(Delivery)).all()) == 2
        assert utcnow() >= max(d.next_attempt_at for d in again)
    finally:
        index.close()


def test_offline_run_reports_not_applicable_apart_from_faults(tmp_path):
    lateral, empty = tmp_path / "lateral.dcm", tmp_path / "empty.dcm"
    small_cr(ViewPosition="LL").save_as(lateral, enforce_file_format=True)
    small_cr(PixelData=b"").save_as(empty, enforce_file_format=True)
    out = tmp_path / "out"
    config = cli_config(tmp_path)
    skipped = cli.invoke(app, ["run", "pneumonia", str(lateral), "--out", str(out), "--config", config])
    assert skipped.exit_code == 0 and "not applicable: no frontal" in skipped.output and "lateral view" in skipped.output
    faulty = cli.invoke(app, ["run", "pneumonia", str(empty), "--out", str(out), "--config", config])
    assert faulty.exit_code == 1 and "Pixel Data (7FE0,0010) is empty" in faulty.output
    assert list(out.glob("*.dcm")) == []
