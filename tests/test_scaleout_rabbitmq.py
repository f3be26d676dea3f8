"""RabbitMQ instead of Redis (issue "Scale out"): the same node and worker,
with only ``[worker.celery] broker_url`` changed to ``amqp://``.

A real Debian ``rabbitmq-server`` is started here as its own Erlang node
(``test-<hex>@localhost``) on free loopback ports, with its database, logs,
configuration and Erlang cookie under ``tmp_path``; Erlang's port mapper
(epmd, port 4369) is shared with any other node on the machine. Two chest
studies go node -> RabbitMQ -> ``ainode worker`` -> dcmtk ``storescp``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from node.config import load_config
from node.index import JobState
from node.service import Node
from tests.peers import free_port, have_dcmtk, wait_for, write_node_toml
from tests.reliability.support import CHEST_ROUTE, DcmtkStoreSCP, InstanceFactory, duplicates
from tests.test_scaleout import WorkerProcess, _database, _jobs, _send

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's real scripts; /usr/sbin's wrappers su to the rabbitmq user

pytestmark = pytest.mark.skipif(
    not ((RABBIT_BIN / "rabbitmq-server").exists() and shutil.which("erl") and have_dcmtk()),
    reason="needs Debian's rabbitmq-server and dcmtk (make setup installs them)",
)

STUDIES = 2
JOB_TIME_LIMIT = 15.0


class RabbitMQServer:
    """``rabbitmq-server`` as an unprivileged, throw-away node.

    ``consumer_timeout`` is set above the job time limit: Celery acknowledges
    a message only when its job ended (``task_acks_late``), and RabbitMQ
    closes the channel of a consumer that holds an unacknowledged delivery
    longer than ``consumer_timeout`` (30 min by default), re-delivering the
    message while the job still runs.
    """

    def __init__(self, workdir: Path, consumer_timeout_seconds: float):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.dist_port = free_port(), free_port()
        self.node = f"test-{uuid.uuid4().hex[:8]}@localhost"
        self.consumer_timeout_ms = int(consumer_timeout_seconds * 1000)
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        w = self.workdir
        return {
            **os.environ, "HOME": str(w),  # the Erlang cookie, shared by the server and rabbitmqctl
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"), "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"), "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
        }

    def start(self) -> RabbitMQServer:
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {self.consumer_timeout_ms}\n"
            "loopback_users = none\n"  # guest over loopback only: listeners bind 127.0.0.1
        )
        (self.workdir / "enabled_plugins").write_text("[].\n")
        log = open(self.workdir / "rabbitmq.out", "ab")
        self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        wait_for(self._accepting, 60, 0.25, f"rabbitmq-server on port {self.port}")
        return self

    def _accepting(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            out = (self.workdir / "rabbitmq.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode}:\n{out}")
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.5).close()
            return True
        except OSError:
            return False

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env(),
                              capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.ctl("shutdown")
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)


def test_one_worker_over_rabbitmq(tmp_path, postgres_url):
    started = time.monotonic()
    rabbit = RabbitMQServer(tmp_path / "rabbitmq", consumer_timeout_seconds=2 * JOB_TIME_LIMIT).start()
    results = DcmtkStoreSCP(tmp_path / "arrivals").start()
    node = worker = None
    try:
        timeout = rabbit.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
        assert timeout.stdout.strip() == f"{{ok,{rabbit.consumer_timeout_ms}}}", timeout
        sections = {
            "node": {"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": free_port()},
            "storage": {"spool_dir": str(tmp_path / "spool"), "quarantine_dir": str(tmp_path / "quarantine"),
                        "outbox_dir": str(tmp_path / "outbox"), "index_url": _database(postgres_url), "fsync": False},
            "completion": {"sweep_interval_seconds": 0.2, "series_idle_seconds": 60},
            "worker": {"backend": "celery", "heartbeat_seconds": 0.5, "stale_after_seconds": 3.0, "torch_threads": 1,
                       "device": "cpu", "input": "shared_spool", "output": "shared_outbox",
                       "celery": {"broker_url": f"amqp://guest:guest@127.0.0.1:{rabbit.port}//",
                                  "visibility_timeout_seconds": 20, "job_time_limit_seconds": JOB_TIME_LIMIT}},
            "destinations": {"arrivals": results.destination()},
            "routes": [CHEST_ROUTE | {"destinations": ["arrivals"]}],
        }
        config = write_node_toml(tmp_path / "node.toml", sections)
        node = Node(load_config(config))
        node.start()
        worker = WorkerProcess(config, tmp_path, "amqp", "--input", "shared_spool", "--output", "shared_outbox")
        wait_for(lambda: not node.queue.unserved(), 90, 0.5, "the worker announced")
        factory = InstanceFactory(seed=12)
        studies = [_send(factory, tmp_path / "in", node.config.node.port) for _ in range(STUDIES)]
        wait_for(lambda: sum(j.state == JobState.DONE for j in _jobs(node)) == STUDIES, 60, 0.2, "both jobs done")
        wait_for(lambda: not any(node.index.pending_deliveries().values()), 30, 0.2, "results delivered")

        jobs = _jobs(node)
        assert {j.study_uid for j in jobs} == set(studies)
        assert all(j.worker_id == worker.worker_id() for j in jobs), jobs
        # The messages went through RabbitMQ: its queue exists and is drained (acknowledged).
        listed = rabbit.ctl("list_queues", "name", "messages", "messages_unacknowledged")
        assert "pneumonia.cpu\t0\t0" in listed.stdout, listed.stdout
        groups, _ = duplicates(results.arrivals())
        assert len(groups) == 2 * STUDIES and all(len(v) == 1 for v in groups.values()), groups
        assert {a.modality for a in results.arrivals()} == {"SR", "SEG"}
    finally:
        if worker is not None:
            worker.stop()
        if node is not None:
            node.stop()
        results.stop()
        rabbit.stop()
    assert time.monotonic() - started < 90
