"""Scale-out on Celery (issue "Scale out"): a real ``redis-server`` and a real
PostgreSQL started here on loopback ports, the node in celery mode, and two
``ainode worker`` processes, one reading its input over WADO-RS from the node
and answering by STOW-RS, one on the shared spool and outbox.

Twenty chest-radiograph studies go in by dcmtk ``storescu``; the results go
to a real Orthanc and, to count every arrival, to dcmtk ``storescp +uf``
(Orthanc keeps one copy per SOP Instance UID and would hide a duplicate).
On the way one worker is SIGKILLed in the middle of a job, and Redis is
stopped for 10 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from node.config import load_config
from node.index import Job, JobState
from node.service import Node
from tests.peers import REPO, Orthanc, free_port, have_dcmtk, have_orthanc, storescu, wait_for, write_node_toml
from tests.reliability.support import CHEST_ROUTE, DcmtkStoreSCP, InstanceFactory, duplicates, report

pytestmark = pytest.mark.skipif(
    not (shutil.which("redis-server") and have_dcmtk() and have_orthanc()),
    reason="needs redis-server, dcmtk and Orthanc (make setup installs them)",
)

STUDIES = 20
HEARTBEAT, STALE_AFTER, VISIBILITY = 0.5, 4.0, 12.0


class RedisServer:
    """Debian's ``redis-server`` on a loopback port, without persistence: a
    restart loses what the broker held, the worst case for the node."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=log, stderr=log,
        )
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                                        text=True).stdout.strip() == "PONG", 20, what="redis")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _database(postgres_url: str) -> str:
    """A fresh database on the session's PostgreSQL, for this test alone."""
    import psycopg

    name = f"scaleout_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


class WorkerProcess:
    """``ainode worker`` as its own process."""

    def __init__(self, config: Path, workdir: Path, name: str, *args: str):
        self.name = name
        self.log_path = workdir / f"worker-{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "worker", "--config", str(config), "--queue", "pneumonia", *args],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )

    def worker_id(self) -> str:
        return f"{os.uname().nodename}:{self.proc.pid}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def cluster(tmp_path, postgres_url):
    redis = RedisServer(tmp_path).start()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    results = DcmtkStoreSCP(tmp_path / "arrivals").start()
    token = tmp_path / "worker.token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    api_port = free_port()
    sections = {
        "node": {"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": free_port()},
        "storage": {"spool_dir": str(tmp_path / "spool"), "quarantine_dir": str(tmp_path / "quarantine"),
                    "outbox_dir": str(tmp_path / "outbox"), "index_url": _database(postgres_url), "fsync": False},
        "completion": {"sweep_interval_seconds": 0.2, "series_idle_seconds": 60},
        "api": {"bind_address": "127.0.0.1", "port": api_port,
                "tokens": [{"name": "workers", "scopes": ["read", "ingest"], "file": str(token)}]},
        "worker": {"backend": "celery", "heartbeat_seconds": HEARTBEAT, "stale_after_seconds": STALE_AFTER,
                   "torch_threads": 1, "device": "cpu", "node_url": f"http://127.0.0.1:{api_port}",
                   "node_token_file": str(token),
                   "celery": {"broker_url": f"redis://127.0.0.1:{redis.port}/0",
                              "visibility_timeout_seconds": VISIBILITY, "job_time_limit_seconds": 10,
                              "retry_backoff_seconds": 0.5}},
        "destinations": {"pacs": {"kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
                         "arrivals": results.destination()},
        "routes": [CHEST_ROUTE | {"destinations": ["pacs", "arrivals"]}],
    }
    config = write_node_toml(tmp_path / "node.toml", sections)
    node = Node(load_config(config))
    node.start()
    workers = {
        "web": WorkerProcess(config, tmp_path, "web", "--input", "dicomweb", "--output", "stow"),
        "shared": WorkerProcess(config, tmp_path, "shared", "--input", "shared_spool", "--output", "shared_outbox"),
    }
    try:
        wait_for(lambda: not node.queue.unserved() and len(node.index.live_workers(STALE_AFTER)) == 2, 120,
                 0.5, "both workers announced")
        yield node, workers, redis, orthanc, results, tmp_path
    finally:
        for w in workers.values():
            w.stop()
        node.stop()
        results.stop()
        orthanc.stop()
        redis.stop()


def _send(factory: InstanceFactory, outdir: Path, port: int) -> str:
    """One new chest study (one CR instance) by storescu; its Study Instance UID."""
    path = factory.series(outdir, "CR", 1)[0]
    assert storescu([path], port, "AINODE").returncode == 0
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def config_path(node: Node) -> Path:
    assert node.config.source_file is not None
    return Path(node.config.source_file[0])


def _job_running_on(node: Node, worker_id: str, send, studies: list[str], burst: int = 1, tries: int = 6) -> Job:
    """Send ``burst`` studies at a time (``send()``) until a job is seen
    running on ``worker_id``: another worker may take them, or a job end unseen."""
    for _ in range(tries):
        studies.extend(send() for _ in range(burst))
        try:
            return wait_for(lambda: next((j for j in _jobs(node) if j.state == JobState.RUNNING and j.worker_id == worker_id),
                                         None), 10, 0.01, f"a job running on {worker_id}")
        except TimeoutError:
            continue
    raise AssertionError(f"no job seen running on {worker_id} in {tries} studies")


def _jobs(node: Node) -> list[Job]:
    with node.index._session() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def test_two_workers_survive_a_sigkill_and_a_broker_outage(cluster):
    node, workers, redis, orthanc, results, tmp = cluster
    factory = InstanceFactory(seed=11)
    port = node.config.node.port
    ids = {name: w.worker_id() for name, w in workers.items()}
    started = time.monotonic()
    studies = [_send(factory, tmp / "in", port) for _ in range(8)]

    def send() -> str:
        return _send(factory, tmp / "in", port)

    def done() -> list[Job]:
        return [j for j in _jobs(node) if j.state == JobState.DONE]

    wait_for(lambda: len(done()) == 8, 90, 0.2, "the first 8 jobs")
    by_worker = {name: sum(j.worker_id == wid for j in done()) for name, wid in ids.items()}
    assert all(by_worker.values()), f"both workers should have processed some: {by_worker}"

    # SIGKILL the WADO-RS worker in the middle of a job; the other finishes it.
    # A kill that lands after the worker handed its results over (the STOW-RS
    # request already at the node) ends that job normally: then a new worker
    # takes the victim's place and the kill is tried again.
    for _attempt in range(3):
        victim = workers["web"]
        job = _job_running_on(node, ids["web"], send, studies, burst=3)  # a backlog: both workers busy
        victim.kill()
        killed_at = time.monotonic()
        wait_for(lambda job_id=job.id: node.index.job(job_id).state == JobState.DONE, 60, 0.1, "the killed worker's job done")
        recovery = time.monotonic() - killed_at
        if node.index.job(job.id).worker_id == ids["shared"]:
            break
        workers["web"] = WorkerProcess(config_path(node), tmp, "web2", "--input", "dicomweb", "--output", "stow")
        ids["web"] = workers["web"].worker_id()
        wait_for(lambda: len(node.index.live_workers(STALE_AFTER)) == 2, 120, 0.5, "the replacement worker")
    assert node.index.job(job.id).worker_id == ids["shared"], "no kill landed in the middle of a job in 3 tries"
    assert recovery < STALE_AFTER + 10, recovery

    # Redis down for 10 s, holding messages nobody had taken (the one live
    # worker paused a moment so the queue backs up), while more studies arrive.
    wait_for(lambda: len(done()) == len(studies), 60, 0.2, "the jobs before the outage")
    survivor = workers["shared"].proc
    survivor.send_signal(signal.SIGSTOP)
    try:
        backlog = [_send(factory, tmp / "in", port) for _ in range(3)]
        def backlog_published() -> bool:
            jobs = _jobs(node)[len(studies):]
            return len(jobs) == len(backlog) and all(j.enqueued_at for j in jobs)

        wait_for(backlog_published, 10, 0.05, "the backlog published")
        published_before = node.metrics.jobs_published.labels(queue="pneumonia.cpu")._value.get()
        redis.stop()  # no persistence: the three messages are gone with it
    finally:
        survivor.send_signal(signal.SIGCONT)
    outage_at = time.monotonic()
    studies += backlog
    studies += [_send(factory, tmp / "in", port) for _ in range(max(2, STUDIES - len(studies)))]
    time.sleep(max(0.0, 10 - (time.monotonic() - outage_at)))
    redis.start()
    wait_for(lambda: len(done()) == len(studies), 120, 0.5, "every job done")
    wait_for(lambda: not any(node.index.pending_deliveries().values()), 60, 0.5, "every result delivered")
    total = time.monotonic() - started

    for uid in studies:  # one SR and one SEG per study in the PACS
        found = orthanc.instances_by_modality(uid)
        assert len(found.get("SR", [])) == 1 and len(found.get("SEG", [])) == 1, (uid, found)
    arrivals = results.arrivals()
    groups, resent = duplicates(arrivals)
    duplicated = {k: v for k, v in groups.items() if len(v) > 1}
    assert not duplicated, duplicated
    assert len(groups) == 2 * len(studies)
    jobs = _jobs(node)
    assert len(jobs) == len(studies) and all(j.state == JobState.DONE for j in jobs)
    log = (tmp / "worker-shared.log").read_text(errors="replace")
    requeued = [j.id for j in jobs if j.attempts > 1]
    assert job.id in requeued
    with node.index._session() as s:
        from node.index import Transition

        republished = s.scalars(select(Transition).where(Transition.entity == "job", Transition.reason.like("%silent%")))
        stale_requeues = len(list(republished))
    assert stale_requeues >= 1
    published = node.metrics.jobs_published.labels(queue="pneumonia.cpu")._value.get()
    republished = node.metrics.jobs_republished._value.get()
    assert republished >= 1  # what Redis lost went out again after the visibility timeout
    assert published == len(studies) + stale_requeues + republished
    # Operators see the workers (/status) and scrape each one's own /metrics.
    headers = {"Authorization": f"Bearer {(tmp / 'worker.token').read_text()}"}
    status = requests.get(f"{node.config.worker.node_url}/status", headers=headers, timeout=10).json()
    live = {w["worker_id"]: w for w in status["workers"]}
    assert ids["shared"] in live and status["unserved_queues"] == []
    assert live[ids["shared"]]["pipelines"].keys() == {"pneumonia"} and live[ids["shared"]]["input"] == "shared_spool"
    scraped = requests.get(live[ids["shared"]]["metrics_url"], timeout=10).text
    assert 'ainode_jobs_total{pipeline="pneumonia",state="done"}' in scraped

    # SIGTERM in the middle of a job: the worker finishes it, then exits.
    checked = len(studies)
    stopping = workers["shared"]
    held = _job_running_on(node, ids["shared"], send, studies)
    stopping.proc.send_signal(signal.SIGTERM)
    assert stopping.proc.wait(60) == 0
    assert node.index.job(held.id).state == JobState.DONE and node.index.job(held.id).worker_id == ids["shared"]
    assert ids["shared"] not in {w.worker_id for w in node.index.live_workers(STALE_AFTER)}

    # SIGQUIT (Celery's cold shutdown) interrupts the job: it is given back, not failed.
    cold = WorkerProcess(config_path(node), tmp, "cold", "--input", "shared_spool", "--output", "shared_outbox")
    wait_for(lambda: cold.worker_id() in {w.worker_id for w in node.index.live_workers(STALE_AFTER)}, 120, 0.5,
             "the third worker")
    interrupted = _job_running_on(node, cold.worker_id(), send, studies)
    cold.proc.send_signal(signal.SIGQUIT)
    cold.proc.wait(60)
    row = node.index.job(interrupted.id)
    assert row.state in (JobState.QUEUED, JobState.DONE), (row.state, row.error)  # DONE: the signal came after it
    cold_outcome = str(row.state)

    report("scaleout", {
        "studies": checked, "sr_seg_pairs_in_orthanc": checked, "arrivals_at_storescp": len(arrivals),
        "same_uid_resends": resent, "duplicates": len(duplicated),
        "jobs_by_worker": {n: sum(j.worker_id == w for j in jobs) for n, w in ids.items()},
        "first_8_by_worker": by_worker, "sigkill_recovery_seconds": round(recovery, 2),
        "stale_requeues": stale_requeues, "jobs_run_twice": requeued,
        "messages_published": published, "published_before_outage": published_before,
        "backlog_in_redis_when_stopped": len(backlog), "republished_after_visibility_timeout": republished,
        "visibility_timeout_seconds": VISIBILITY,
        "dropped_messages_logged": log.count("message_dropped"), "wall_seconds": round(total, 1),
        "sigterm_job_finished_by_stopping_worker": True, "sigquit_job_left": cold_outcome,
    })
    print(json.dumps({"sigkill_recovery_seconds": round(recovery, 2), "resent": resent}))
