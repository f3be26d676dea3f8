"""The scale-out deployment files (issue "Scale out", "Deployment"):

- deploy/compose/docker-compose.yml validated by Debian's ``docker-compose
  config -q`` (no daemon needed), with its secrets made by
  make-secrets.sh, and checked against its node.toml: each secret file the
  configuration names is mounted into the services that read it, and the
  workers' queues are the ones the routes need;
- deploy/compose/node.toml loaded by :func:`node.config.load_config`: celery
  mode on a PostgreSQL index, with the secrets read from their files;
- deploy/systemd units checked by ``systemd-analyze verify``.

Neither Docker nor systemd runs anything here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # PyYAML: `docker-compose config` prints YAML
from typer.testing import CliRunner

from node.cli import app
from node.cli.worker import worker_queues
from node.config import CelerySection, WorkerBackend, WorkerInput, WorkerOutput, load_config
from tests.peers import REPO

COMPOSE_DIR = REPO / "deploy" / "compose"
SYSTEMD_DIR = REPO / "deploy" / "systemd"
INSTALLED_AINODE = "/opt/dicom-ai-node/.venv/bin/ainode"

needs_compose = pytest.mark.skipif(
    not (shutil.which("docker-compose") and shutil.which("openssl")),
    reason="needs Debian's docker-compose and openssl (make setup installs docker-compose)",
)
needs_systemd = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")


def _secrets(tmp_path: Path) -> Path:
    folder = tmp_path / "secrets"
    subprocess.run([str(COMPOSE_DIR / "make-secrets.sh"), str(folder)], check=True, capture_output=True, timeout=60)
    return folder


def _compose(secrets: Path, *args: str, compose_file: Path = COMPOSE_DIR / "docker-compose.yml") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AINODE_", "COMPOSE_", "DOCKER_"))}
    env["AINODE_SECRETS"] = str(secrets)
    return subprocess.run(["docker-compose", "-f", str(compose_file), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def _compose_config(tmp_path: Path) -> dict:
    secrets = _secrets(tmp_path)
    quiet = _compose(secrets, "config", "-q")
    assert quiet.returncode == 0, quiet.stderr
    full = _compose(secrets, "config")
    assert full.returncode == 0, full.stderr
    return yaml.safe_load(full.stdout)


def _compose_node_config(tmp_path: Path, secrets: Path):
    """deploy/compose/node.toml with /run/secrets/ pointing at ``secrets``."""
    text = (COMPOSE_DIR / "node.toml").read_text().replace("/run/secrets/", f"{secrets}/")
    path = tmp_path / "node.toml"
    path.write_text(text)
    return load_config(path)


def _seconds(duration: str) -> float:
    """A compose duration such as ``31m`` or ``1m30s`` in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def _option_value(command: list[str], option: str) -> str:
    return command[command.index(option) + 1]


@needs_compose
def test_compose_file_is_valid_and_complete(tmp_path):
    config = _compose_config(tmp_path)
    services = config["services"]
    assert set(services) == {"node", "postgres", "redis", "worker-cpu", "worker-gpu"}
    for name, service in services.items():  # each has a health check that runs a command
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    assert services["node"]["healthcheck"]["test"][-1].count("/health")
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "redis-cli ping" in services["redis"]["healthcheck"]["test"][-1]
    for name in ("worker-cpu", "worker-gpu"):  # the worker's own /metrics, on its --metrics-port
        port = _option_value(services[name]["command"], "--metrics-port")
        assert f"127.0.0.1:{port}/metrics" in services[name]["healthcheck"]["test"][-1]
        assert services[name]["depends_on"]["node"]["condition"] == "service_healthy"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["worker-cpu"]
    # The spool/outbox volume is shared by the node and the shared_spool worker only.
    mounts = {name: {v.split(":")[0]: v.split(":")[1] for v in s.get("volumes", [])} for name, s in services.items()}
    assert mounts["node"]["ainode-data"] == mounts["worker-cpu"]["ainode-data"] == "/var/lib/ainode"
    assert "ainode-data" not in mounts["worker-gpu"]
    assert mounts["postgres"]["postgres-data"] == "/var/lib/postgresql/data"
    assert mounts["redis"]["redis-data"] == "/data"
    assert set(config["volumes"]) == {"ainode-data", "postgres-data", "redis-data"}
    for name in ("node", "worker-cpu", "worker-gpu"):
        assert mounts[name][str(COMPOSE_DIR / "node.toml")] == "/etc/ainode/node.toml"
    for secret in config["secrets"].values():  # make-secrets.sh made every file compose mounts
        assert Path(secret["file"]).read_text().strip(), secret


@needs_compose
def test_compose_secrets_match_the_configuration(tmp_path):
    """Every /run/secrets file node.toml names is mounted where it is read;
    the Redis ACL and the broker URL share one password; PostgreSQL reads
    the index's password."""
    config = _compose_config(tmp_path)
    services = config["services"]
    named = set(re.findall(r'"/run/secrets/([a-z_]+)"', (COMPOSE_DIR / "node.toml").read_text()))
    assert named == {"db_password", "api_token", "broker_url"}
    for name in ("node", "worker-cpu", "worker-gpu"):
        assert {s["source"] for s in services[name]["secrets"]} == named, name
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"
    assert [s["source"] for s in services["postgres"]["secrets"]] == ["db_password"]
    assert services["redis"]["command"][services["redis"]["command"].index("--aclfile") + 1] == "/run/secrets/redis_acl"
    files = {name: Path(s["file"]).read_text() for name, s in config["secrets"].items()}
    password = re.fullmatch(r"redis://ainode:([0-9a-f]{48})@redis:6379/0\n", files["broker_url"]).group(1)
    assert f"user ainode on >{password} " in files["redis_acl"]
    assert "user default on nopass -@all +ping\n" in files["redis_acl"]  # the health check's PING, nothing else


@needs_compose
def test_compose_config_refuses_a_broken_file(tmp_path):
    """The validation the tests above rely on does refuse a wrong file."""
    broken = tmp_path / "docker-compose.yml"
    text = (COMPOSE_DIR / "docker-compose.yml").read_text()
    broken.write_text(text.replace("stop_grace_period: 60s", "stop_grace_period: 60s\n    gpus_please: 1"))
    answer = _compose(_secrets(tmp_path), "config", "-q", compose_file=broken)
    assert answer.returncode != 0 and "gpus_please" in answer.stderr


@needs_compose
def test_compose_node_toml_loads_in_celery_mode(tmp_path):
    compose = _compose_config(tmp_path)
    secrets = tmp_path / "secrets"
    cfg = _compose_node_config(tmp_path, secrets)
    assert cfg.worker.backend == WorkerBackend.CELERY
    assert cfg.storage.index_url.startswith("postgresql+psycopg://ainode@postgres:5432/")
    password = (secrets / "db_password").read_text().strip()
    assert f"ainode:{password}@postgres" in cfg.storage.engine_url()
    assert cfg.worker.celery.broker_url.get_secret_value() == (secrets / "broker_url").read_text().strip()
    assert cfg.worker.node_token.get_secret_value() == (secrets / "api_token").read_text().strip()
    assert cfg.worker.input == WorkerInput.DICOMWEB and cfg.worker.output == WorkerOutput.STOW
    assert [t.scopes for t in cfg.api.tokens] == [["read", "ingest"]]
    assert cfg.worker.celery.visibility_timeout_seconds > cfg.worker.celery.job_time_limit_seconds
    # The workers' commands serve exactly the queues the routes need.
    services = compose["services"]
    served = set()
    for name in ("worker-cpu", "worker-gpu"):
        command = services[name]["command"]
        _, queues = worker_queues(cfg, [_option_value(command, "--queue")], _option_value(command, "--device"))
        served.update(queues)
        # Warm shutdown finishes the job: the grace period outlasts the longest one.
        assert _seconds(services[name]["stop_grace_period"]) > cfg.worker.celery.job_time_limit_seconds, name
    assert served == {"pneumonia.cpu", "brain_tumour.gpu"} == {f"{r.pipeline}.{r.worker}" for r in cfg.routes}
    assert _option_value(services["worker-cpu"]["command"], "--input") == "shared_spool"
    assert _option_value(services["worker-cpu"]["command"], "--output") == "shared_outbox"
    assert _option_value(services["worker-gpu"]["command"], "--device") == "cuda:0"


def test_worker_command_lines_use_existing_options():
    """The options the compose services and the systemd unit give
    ``ainode worker`` exist (typer would refuse an unknown one at start)."""
    help_text = CliRunner().invoke(app, ["worker", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    used = set(re.findall(r"(--[a-z][a-z-]+)", (SYSTEMD_DIR / "ainode-worker@.service").read_text().split("ExecStart=")[1]
                          .splitlines()[0]))
    compose = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    for name in ("worker-cpu", "worker-gpu"):
        used.update(a for a in compose["services"][name]["command"] if a.startswith("--"))
    assert used >= {"--config", "--queue", "--device", "--metrics-port"}
    missing = {option for option in used if option not in help_text}
    assert not missing, missing


def _verify(tmp_path: Path, *units: str, edit=None) -> subprocess.CompletedProcess:
    """``systemd-analyze verify`` on copies of deploy/systemd whose
    ExecStart binary is a fake executable (verify requires it to exist)."""
    folder = tmp_path / "units"
    shutil.copytree(SYSTEMD_DIR, folder)
    fake = tmp_path / "ainode"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    for unit in folder.rglob("*"):
        if unit.is_file():
            text = unit.read_text().replace(INSTALLED_AINODE, str(fake))
            unit.write_text(edit(unit.name, text) if edit else text)
    return subprocess.run(["systemd-analyze", "verify", *(str(folder / u) for u in units)], capture_output=True,
                          text=True, timeout=120, cwd=folder)


def _unit_findings(answer: subprocess.CompletedProcess) -> list[str]:
    """verify's complaints about our units (it exits 0 on an unknown key or
    a bad value, and only says so)."""
    return [line for line in (answer.stdout + answer.stderr).splitlines() if "ainode" in line]


@needs_systemd
def test_systemd_units_verify(tmp_path):
    answer = _verify(tmp_path, "ainode-worker@gpu0.service", "ainode.service")
    assert answer.returncode == 0 and not _unit_findings(answer), answer.stdout + answer.stderr


@needs_systemd
def test_systemd_verify_reports_a_bad_unit(tmp_path):
    """The check above would see a bad key in the worker unit and in the
    node's celery drop-in (verify reads drop-ins beside the unit)."""

    def spoil(name: str, text: str) -> str:
        if name == "ainode-worker@.service":
            return text.replace("KillMode=mixed", "KillMode=softly")
        if name == "celery.conf":
            return text + "\nStopAfterJobs=1\n"
        return text

    findings = _unit_findings(_verify(tmp_path, "ainode-worker@gpu0.service", "ainode.service", edit=spoil))
    assert any("kill mode" in f.lower() for f in findings), findings
    assert any("StopAfterJobs" in f for f in findings), findings


def test_worker_unit_settings():
    """The worker unit reads its instance's file, stops by SIGTERM with time
    for the longest default job, and restarts on failure."""
    unit = (SYSTEMD_DIR / "ainode-worker@.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert settings["EnvironmentFile"] == "/etc/ainode/worker-%i.env"
    assert settings["ExecStart"] == (f"{INSTALLED_AINODE} worker --config /etc/ainode/node.toml --queue ${{QUEUE}} "
                                     "--device ${DEVICE} --metrics-port ${METRICS_PORT}")
    assert settings["KillSignal"] == "SIGTERM" and settings["Restart"] == "on-failure"
    assert float(settings["TimeoutStopSec"]) > CelerySection().job_time_limit_seconds
    assert "PrivateDevices" not in settings  # it would hide /dev/nvidia*
    node_unit = (SYSTEMD_DIR / "ainode.service").read_text()
    assert f"ExecStart={INSTALLED_AINODE} serve --config /etc/ainode/node.toml" in node_unit
