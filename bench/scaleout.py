"""Scale-out benchmark: chest-pipeline throughput of the embedded worker and of
one and two Celery worker processes, and the queueing overhead per job.

Test load (docs/architecture.md, "Scaling out"): single-instance CR chest
studies (tests/reliability/support.py ``InstanceFactory``: RG1_UNCR, a real
CR chest PA, downscaled to 320 rows), all sent up front by dcmtk
``storescu`` on one association, so the queue is full. Each worker (and the
embedded one) runs with ``torch_threads = 1``; the node, a real PostgreSQL
(Debian's ``initdb``/``pg_ctl``), a real ``redis-server`` and the results
destination (dcmtk ``storescp``) share this machine's cores. Workers are
started and announced, and each has run one warm-up study (its first
inference), before the measured studies are sent; a fresh database per run.

- studies per minute: from the first C-STORE to the last job ``done``
  (``jobs.finished_at``);
- queueing overhead, idle queue: studies sent one at a time with the worker
  idle; ``jobs.enqueued_at`` (message published) to ``jobs.started_at``
  (claimed), and ``jobs.created_at`` (job queued in the index) to
  ``started_at``, which adds the node's publishing pass;
- under load: the gap between a worker's job ending and its next claim.

Prints one JSON object. Usage::

    .venv/bin/python bench/scaleout.py [--studies 36] [--idle 12] [--no-sqlite]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import _pg_tool  # noqa: E402
from tests.peers import free_port, storescu, wait_for, write_node_toml  # noqa: E402
from tests.reliability.support import CHEST_ROUTE, DcmtkStoreSCP, InstanceFactory  # noqa: E402
from tests.test_scaleout import RedisServer, WorkerProcess, _database  # noqa: E402

OVERHEAD_TARGET_MS = 50.0
SPEEDUP_TARGET = 1.3


class PostgreSQL:
    """Debian's PostgreSQL server on a free loopback port (as the tests'
    ``postgres_url`` fixture starts it)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ainode-bench-pg-"))  # its own: postgres must reach it
        self.port = free_port()
        self.as_user: list[str] = []
        self.pg_ctl = _pg_tool("pg_ctl")

    def start(self) -> str:
        initdb = _pg_tool("initdb")
        if not (initdb and self.pg_ctl):
            raise SystemExit("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.as_user, initdb, "-D", str(self.root / "data"), "-U", "ainode", "--auth=trust"],
                       check=True, capture_output=True)
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.root / "data"), "-l", str(self.root / "log"),
                        "-o", f"-p {self.port} -k {self.root} -h 127.0.0.1", "-w", "start"], check=True, capture_output=True)
        return f"postgresql+psycopg://ainode@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.pg_ctl), "-D", str(self.root / "data"), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _sections(work: Path, index_url: str, backend: str, broker: str | None) -> dict:
    worker: dict = {"backend": backend, "torch_threads": 1, "device": "cpu", "concurrency": 1}
    if backend == "celery":
        worker |= {"heartbeat_seconds": 1.0, "stale_after_seconds": 10.0, "input": "shared_spool",
                   "output": "shared_outbox",
                   "celery": {"broker_url": broker, "visibility_timeout_seconds": 600, "job_time_limit_seconds": 300}}
    return {
        "node": {"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": free_port()},
        "storage": {"spool_dir": str(work / "spool"), "quarantine_dir": str(work / "quarantine"),
                    "outbox_dir": str(work / "outbox"), "index_url": index_url, "fsync": False},
        "completion": {"sweep_interval_seconds": 0.2, "series_idle_seconds": 60},
        "api": {"bind_address": "127.0.0.1", "port": free_port()},
        "worker": worker,
    }


def _ms(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(values), "median_ms": round(statistics.median(values), 1), "p95_ms": round(p95, 1)}


def _delta_ms(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return None if a is None or b is None else 1000 * (b - a).total_seconds()


class Mode:
    """One configuration of the node (and its workers), started and measured."""

    def __init__(self, name: str, work: Path, index_url: str, backend: str, workers: int, broker: str | None,
                 results: DcmtkStoreSCP):
        from node.config import load_config
        from node.service import Node

        self.name, self.work, self.backend = name, work, backend
        sections = _sections(work, index_url, backend, broker)
        sections["destinations"] = {"arrivals": results.destination()}
        sections["routes"] = [CHEST_ROUTE | {"destinations": ["arrivals"]}]
        self.config_path = write_node_toml(work / "node.toml", sections)
        self.node = Node(load_config(self.config_path))
        self.workers: list[WorkerProcess] = []
        self.factory = InstanceFactory(seed=hash(name) % 1000)
        self.n_workers = workers

    def start(self) -> Mode:
        self.node.start()
        for i in range(self.n_workers if self.backend == "celery" else 0):
            self.workers.append(WorkerProcess(self.config_path, self.work, f"w{i}"))
        if self.workers:
            wait_for(lambda: not self.node.queue.unserved()
                     and len(self.node.index.live_workers(10.0)) == len(self.workers), 180, 0.5, "workers announced")
        return self

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.node.stop()

    def jobs(self) -> list:
        from sqlalchemy import select

        from node.index import Job

        with self.node.index._session() as s:
            return list(s.scalars(select(Job).order_by(Job.id)))

    def _wait_done(self, n: int, timeout: float) -> list:
        from node.index import JobState

        def finished():
            jobs = self.jobs()
            if any(j.state == JobState.FAILED for j in jobs):
                raise RuntimeError(f"{self.name}: a job failed: {[j.error for j in jobs if j.error]}")
            return jobs if sum(j.state == JobState.DONE for j in jobs) >= n else None

        return wait_for(finished, timeout, 0.1, f"{self.name}: {n} jobs done")

    def send(self, n: int) -> None:
        files = [self.factory.series(self.work / "in", "CR", 1)[0] for _ in range(n)]
        out = storescu(files, self.node.config.node.port, "AINODE")
        if out.returncode != 0:
            raise RuntimeError(f"storescu failed: {out.stderr[-2000:]}")

    def idle(self, n: int) -> dict:
        """``n`` studies one at a time, each after the previous job is done."""
        for i in range(n):
            self.send(1)
            self._wait_done(i + 1, 120)
            time.sleep(0.3)  # the worker back to waiting on the broker
        jobs = self.jobs()
        published = [d for j in jobs if (d := _delta_ms(j.enqueued_at, j.started_at)) is not None]
        created = [d for j in jobs if (d := _delta_ms(j.created_at, j.started_at)) is not None]
        return {"published_to_claim": _ms(published), "queued_to_claim": _ms(created),
                "jobs_without_enqueued_at": sum(j.enqueued_at is None for j in jobs)}

    def warm_up(self) -> None:
        """One study per worker first: each worker's first inference (torch's
        lazy initialisation) is start-up, not throughput."""
        before = len(self.jobs())
        n = max(1, len(self.workers))
        self.send(n)
        self._wait_done(before + n, 180)

    def load(self, n: int) -> dict:
        """``n`` studies at once; throughput and the gap between jobs."""
        self.warm_up()
        before = len(self.jobs())
        from node.index.schema import utcnow

        t0 = utcnow()
        self.send(n)
        sent_s = (utcnow() - t0).total_seconds()
        jobs = self._wait_done(before + n, 60 + 30 * n)[before:]
        load_1min = os.getloadavg()[0]  # other work on the machine shares its cores
        end = max(j.finished_at for j in jobs)
        seconds = (end - t0).total_seconds()
        gaps: list[float] = []
        for wid in {j.worker_id for j in jobs}:
            mine = sorted((j for j in jobs if j.worker_id == wid), key=lambda j: j.started_at)
            gaps += [g for a, b in zip(mine, mine[1:], strict=False) if (g := _delta_ms(a.finished_at, b.started_at)) is not None]
        job_s = [(j.finished_at - j.started_at).total_seconds() for j in jobs]
        return {
            "studies": n, "seconds": round(seconds, 2), "send_seconds": round(sent_s, 2),
            "studies_per_minute": round(60 * n / seconds, 1), "load_average_1min": round(load_1min, 2),
            "job_seconds_median": round(statistics.median(job_s), 3),
            "gap_between_jobs": _ms(gaps),
            "jobs_by_worker": sorted((sum(j.worker_id == w for j in jobs) for w in {j.worker_id for j in jobs}), reverse=True),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=36, help="studies per throughput run")
    ap.add_argument("--idle", type=int, default=12, help="studies sent one at a time for the idle overhead")
    ap.add_argument("--no-sqlite", action="store_true", help="skip embedded mode on SQLite")
    args = ap.parse_args()
    from node.log import configure_logging

    configure_logging("WARNING")
    root = Path(tempfile.mkdtemp(prefix="ainode-bench-scaleout-"))
    pg = PostgreSQL()
    redis = results = None
    out: dict = {"benchmark": "scaleout", "cpu_count": os.cpu_count(), "torch_threads": 1,
                 "destination": "dcmtk storescp", "worker_io": "shared_spool / shared_outbox"}
    try:
        pg_url = pg.start()
        redis = RedisServer(root).start()
        broker = f"redis://127.0.0.1:{redis.port}/0"
        results = DcmtkStoreSCP(root / "arrivals").start()
        plan = [("embedded_postgresql", "embedded", 0), ("celery_1_worker", "celery", 1), ("celery_2_workers", "celery", 2)]
        if not args.no_sqlite:
            plan.insert(1, ("embedded_sqlite", "embedded", 0))
        for name, backend, workers in plan:
            work = root / name
            work.mkdir()
            url = f"sqlite:///{work / 'index.db'}" if name.endswith("sqlite") else _database(pg_url)
            mode = Mode(name, work, url, backend, workers, broker, results).start()
            try:
                figures = {}
                if args.idle and name in ("embedded_postgresql", "celery_1_worker"):
                    figures["idle_overhead"] = mode.idle(args.idle)
                figures |= mode.load(args.studies)
                out[name] = figures
            finally:
                mode.stop()
            print(f"{name}: {json.dumps(out[name])}", file=sys.stderr)
        one, two = out["celery_1_worker"]["studies_per_minute"], out["celery_2_workers"]["studies_per_minute"]
        idle = out["celery_1_worker"].get("idle_overhead", {}).get("published_to_claim", {})
        out["speedup_2_vs_1_workers"] = round(two / one, 2)
        out["targets"] = {
            "overhead_ms_below": OVERHEAD_TARGET_MS, "overhead_median_ms": idle.get("median_ms"),
            "overhead_met": idle.get("median_ms") is not None and idle["median_ms"] < OVERHEAD_TARGET_MS,
            "speedup_at_least": SPEEDUP_TARGET, "speedup": out["speedup_2_vs_1_workers"],
            "speedup_met": two / one >= SPEEDUP_TARGET,
        }
        print(json.dumps(out, indent=2))
    finally:
        if results is not None:
            results.stop()
        if redis is not None:
            redis.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
