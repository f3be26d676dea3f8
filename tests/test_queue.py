"""The job queue's guarantees on a real PostgreSQL (node.index.queue,
node.queue): targeted claims, a lost claim, the stale sweep, re-publishing
only after the visibility timeout, releases, unserved queues in /ready, the
job-results endpoint, and the configuration errors of celery mode."""

from __future__ import annotations

import datetime as dt
import secrets
import uuid

import pydicom
import pytest
import requests
from pydantic import SecretStr
from pydicom.data import get_testdata_file
from sqlalchemy import select, update

from node.config import ConfigError, load_config
from node.index import ClaimLost, Index, Job, JobState, Transition, WorkerInfo, utcnow
from node.queue import CeleryQueue
from node.service import Node
from tests.peers import free_port, node_sections

TOKEN = secrets.token_urlsafe(32)


@pytest.fixture
def pg_index(postgres_url):
    import psycopg

    name = f"queue_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    index = Index(url)
    yield index
    index.close()


def _job(index: Index, pipeline: str = "pneumonia") -> int:
    return index.create_job(pipeline=pipeline, route="chest", level="series", study_uid="1.2.3", series_uid="1.2.3.4",
                            destinations=["pacs"])


def _age(index: Index, job_id: int, **seconds_ago: float) -> None:
    """Move a job's heartbeat_at / enqueued_at that many seconds into the past."""
    values = {k: utcnow() - dt.timedelta(seconds=v) for k, v in seconds_ago.items()}
    with index._session.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def test_a_message_claims_its_own_job_once(pg_index):
    first, second = _job(pg_index), _job(pg_index)
    claimed = pg_index.claim_job("w1", second)
    assert claimed is not None and claimed.id == second and claimed.worker_id == "w1"
    assert pg_index.claim_job("w2", second) is None  # held: the message is dropped
    pg_index.finish_job(second, [], worker_id="w1")
    assert pg_index.claim_job("w2", second) is None  # done: dropped
    assert pg_index.job(first).state == JobState.QUEUED


def test_a_worker_that_lost_its_claim_changes_nothing(pg_index):
    job_id = _job(pg_index)
    pg_index.claim_job("w1", job_id)
    _age(pg_index, job_id, heartbeat_at=60)
    requeued, failed = pg_index.requeue_stale_jobs(stale_after=30, max_attempts=3)
    assert (requeued, failed) == ([job_id], [])
    assert not pg_index.heartbeat_job(job_id, "w1")
    pg_index.claim_job("w2", job_id)
    with pytest.raises(ClaimLost):
        pg_index.finish_job(job_id, [], worker_id="w1")
    with pytest.raises(ClaimLost):
        pg_index.fail_job(job_id, "late", worker_id="w1")
    row = pg_index.job(job_id)
    assert row.state == JobState.RUNNING and row.worker_id == "w2" and row.attempts == 2


def test_stale_sweep_spares_live_workers_and_gives_up_after_max_attempts(pg_index):
    live, dying = _job(pg_index), _job(pg_index)
    pg_index.claim_job("alive", live)
    assert pg_index.heartbeat_job(live, "alive")
    for attempt in range(3):
        pg_index.claim_job(f"w{attempt}", dying)
        _age(pg_index, dying, heartbeat_at=60)
        requeued, failed = pg_index.requeue_stale_jobs(stale_after=30, max_attempts=3)
    assert (requeued, failed) == ([], [dying])
    assert pg_index.job(dying).state == JobState.FAILED and "giving up" in pg_index.job(dying).error
    assert pg_index.job(live).state == JobState.RUNNING


def test_a_published_job_is_published_again_only_after_the_visibility_timeout(pg_index):
    job_id = _job(pg_index)
    assert [j.id for j in pg_index.jobs_to_publish(visibility_timeout=60)] == [job_id]
    pg_index.mark_published(job_id, "pneumonia.cpu")
    assert pg_index.jobs_to_publish(visibility_timeout=60) == []  # backed up, not lost: no copy
    _age(pg_index, job_id, enqueued_at=61)
    assert [j.id for j in pg_index.jobs_to_publish(visibility_timeout=60)] == [job_id]


def test_release_republishes_now_or_after_the_hold(pg_index):
    job_id = _job(pg_index)
    pg_index.claim_job("w1", job_id)
    assert pg_index.release_job(job_id, "w1", "SIGTERM")
    row = pg_index.job(job_id)
    assert row.state == JobState.QUEUED and row.attempts == 0 and row.enqueued_at is None
    assert [j.id for j in pg_index.jobs_to_publish(visibility_timeout=60)] == [job_id]  # at once
    pg_index.claim_job("w1", job_id)
    assert pg_index.release_job(job_id, "w1", "node unreachable", hold_seconds=10, visibility_timeout=60)
    row = pg_index.job(job_id)
    assert row.attempts == 0 and row.enqueued_at is not None  # outages do not count as attempts
    assert pg_index.jobs_to_publish(visibility_timeout=60) == []  # the task's own retry comes first
    _age(pg_index, job_id, enqueued_at=61)  # ... and if its message is lost, the node publishes it again
    assert [j.id for j in pg_index.jobs_to_publish(visibility_timeout=60)] == [job_id]
    assert not pg_index.release_job(job_id, "w9", "not mine")


def test_an_unserved_backlog_blocks_no_other_queue(pg_index):
    brain = [pg_index.create_job(pipeline="brain_tumour", route="brain", level="series", study_uid="1.2",
                                 series_uid=f"1.2.{i}", destinations=["pacs"]) for i in range(3)]
    chest = _job(pg_index)
    assert [j.id for j in pg_index.jobs_to_publish(60, routes=["chest"], limit=2)] == [chest]
    assert [j.id for j in pg_index.jobs_to_publish(60, limit=2)] == brain[:2]
    orphan = pg_index.create_job(pipeline="pneumonia", route="renamed-since", level="series", study_uid="1.3",
                                 series_uid="1.3.1", destinations=["pacs"])
    published = pg_index.jobs_to_publish(60, routes=["chest"], known_routes=["chest", "brain"])
    assert [j.id for j in published] == [chest, orphan]  # a removed route's job is not stranded


def _celery_sections(tmp_path, index_url: str, **worker) -> dict:
    return node_sections(
        tmp_path,
        storage={"index_url": index_url, "fsync": False},
        node={"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": free_port()},
        api={"bind_address": "127.0.0.1", "port": 0,
             "tokens": [{"name": "workers", "scopes": ["read", "ingest"], "env": "AINODE_TEST_QUEUE_TOKEN"}]},
        worker={"backend": "celery", "node_url": "http://127.0.0.1:1", "heartbeat_seconds": 0.5,
                "stale_after_seconds": 2, "celery": {"broker_url": f"redis://127.0.0.1:{free_port()}/0"}} | worker,
        destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
        routes=[{"name": "chest", "pipeline": "pneumonia", "match": {"Modality": ["CR", "DX"]}, "destinations": ["pacs"]},
                {"name": "brain", "pipeline": "brain_tumour", "level": "study", "worker": "gpu",
                 "required_roles": ["T1", "T1c", "T2", "FLAIR"], "match": {"Modality": ["MR"]}, "destinations": ["pacs"]}],
    )


def test_celery_mode_configuration_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("AINODE_TEST_QUEUE_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match="SQLite is one machine's file"):
        load_config(None, **_celery_sections(tmp_path, f"sqlite:///{tmp_path}/i.db"))
    pg = "postgresql+psycopg://ainode@127.0.0.1:1/x"
    with pytest.raises(ConfigError, match="worker.node_url"):
        load_config(None, **_celery_sections(tmp_path, pg, node_url=None))
    sections = _celery_sections(tmp_path, pg)
    sections["worker"]["celery"] |= {"visibility_timeout_seconds": 600, "job_time_limit_seconds": 900}
    with pytest.raises(ConfigError, match="visibility_timeout_seconds must be longer"):
        load_config(None, **sections)
    sections["worker"]["celery"] = {"broker_url": "http://broker"}
    with pytest.raises(ConfigError, match="redis://") as refused:
        load_config(None, **sections)
    assert "http://broker" not in str(refused.value)  # a broker URL is a secret: never echoed
    assert load_config(None, **_celery_sections(tmp_path, pg)).worker.backend == "celery"


def test_ready_names_unserved_queues_and_nothing_is_published_to_them(tmp_path, monkeypatch, pg_index):
    monkeypatch.setenv("AINODE_TEST_QUEUE_TOKEN", TOKEN)
    node = Node(load_config(None, **_celery_sections(tmp_path, pg_index.url)))
    node.start()
    try:
        assert isinstance(node.queue, CeleryQueue)
        url = f"http://127.0.0.1:{node.api.address[1]}/ready"
        answer = requests.get(url, timeout=10)
        assert answer.status_code == 503
        detail = answer.json()["checks"]["workers"]["detail"]
        assert "brain_tumour.gpu" in detail and "pneumonia.cpu" in detail
        _job(node.index)
        assert node.queue.publish() == 0  # no worker serves pneumonia.cpu: no message (and no broker needed)
        for queue in ("pneumonia.cpu", "brain_tumour.gpu"):
            node.index.announce_worker(WorkerInfo(
                worker_id=f"test:{queue}", hostname="test", queues=(queue,), pipelines={queue.split(".")[0]: "1"},
                device="cpu", precision="fp32", input="shared_spool"))
        assert node.queue.unserved() == []
        assert requests.get(url, timeout=10).json()["checks"]["workers"]["ok"]
    finally:
        node.stop()


def test_stow_results_endpoint_records_a_workers_results_once(tmp_path, node_config, monkeypatch):
    """A worker's STOW-RS of its results (node.worker.io.StowSink) against a
    real node: refused while the claim is another's, recorded once when it
    is the worker's, with one delivery per result and destination."""
    from node.worker.io import StowSink

    monkeypatch.setenv("AINODE_TEST_QUEUE_TOKEN", TOKEN)
    api = {"bind_address": "127.0.0.1", "port": 0,
           "tokens": [{"name": "workers", "scopes": ["read", "ingest"], "env": "AINODE_TEST_QUEUE_TOKEN"}]}
    cfg = node_config(api=api, node={"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": free_port()},
                      destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}})
    node = Node(cfg)
    node.start()
    try:
        worker_cfg = cfg.model_copy(update={"worker": cfg.worker.model_copy(update={
            "node_url": f"http://127.0.0.1:{node.api.address[1]}", "node_token": SecretStr(TOKEN)})})
        job_id = node.index.create_job(pipeline="pneumonia", route="chest", level="series", study_uid="1.2.3",
                                       series_uid="1.2.3.4", destinations=["pacs"])
        job = node.index.claim_job("w1", job_id)
        result = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        sink = StowSink(worker_cfg)
        with pytest.raises(ClaimLost):
            sink.deliver(job, [result], {"inference": 0.1}, None, "w2")
        assert node.index.job(job_id).state == JobState.RUNNING
        assert sink.deliver(job, [result], {"inference": 0.1}, "outside intended use: view", "w1") == 1
        row = node.index.job(job_id)
        with node.index._session() as s:
            done = s.scalar(select(Transition).where(Transition.entity == "job", Transition.entity_id == str(job_id),
                                                     Transition.to_state == JobState.DONE))
        assert row.state == JobState.DONE and "outside intended use" in done.reason
        assert node.index.pending_deliveries()["pacs"] == 1
        with pytest.raises(ClaimLost):  # a second hand-over of the same job changes nothing
            sink.deliver(job, [result], {}, None, "w1")
    finally:
        node.stop()
