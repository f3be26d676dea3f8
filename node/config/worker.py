"""``[worker]``: how jobs run, in the node's own threads (``backend =
"embedded"``, the default) or on Celery workers on other machines
(``backend = "celery"``, ``[worker.celery]``); see docs/architecture.md,
"Scaling out"."""

from __future__ import annotations

import re
import ssl
from enum import StrEnum
from pathlib import Path

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator

from node.config.base import _Section
from node.secrets import secret_or_file


class WorkerBackend(StrEnum):
    """Who runs the jobs (``[worker] backend``)."""

    EMBEDDED = "embedded"  # threads in the node's process, on its index (SQLite or PostgreSQL)
    CELERY = "celery"  # ``ainode worker`` processes fed through a Celery broker; PostgreSQL index


class WorkerInput(StrEnum):
    """How a Celery worker reads a job's input series (``[worker] input``)."""

    SHARED_SPOOL = "shared_spool"  # the spool paths in the index, on NFS or a shared volume
    DICOMWEB = "dicomweb"  # WADO-RS from the node (PS3.18 10.4), transfer-syntax=*


class WorkerOutput(StrEnum):
    """How a Celery worker hands its results back (``[worker] output``)."""

    STOW = "stow"  # STOW-RS to the node's endpoint for that job (PS3.18 10.5)
    SHARED_OUTBOX = "shared_outbox"  # written into the shared outbox, recorded in the index


class Precision(StrEnum):
    """Floating-point precision of inference (``[worker] precision``):
    ``torch.autocast`` on CUDA; the CPU always runs fp32."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class DeviceClass(StrEnum):
    """The queue class a route's jobs go to (``[[routes]] worker``)."""

    CPU = "cpu"
    GPU = "gpu"


def queue_name(pipeline: str, device_class: DeviceClass | str) -> str:
    """The Celery queue of ``pipeline``'s jobs on ``device_class`` workers,
    e.g. ``"brain_tumour.gpu"``: one queue per pipeline and class."""
    return f"{pipeline}.{DeviceClass(device_class)}"


class BrokerTls(_Section):
    """``[worker.celery.tls]``: TLS to the broker (``rediss://`` or
    ``amqps://``); kombu's ``broker_use_ssl``."""

    ca_file: FilePath | None = Field(None, description="CA bundle the broker's certificate must chain to.")
    cert_file: FilePath | None = Field(None, description="Client certificate, when the broker asks for one.")
    key_file: FilePath | None = None
    verify: bool = Field(True, description="false accepts any certificate: for tests only.")

    def kombu_options(self, redis: bool) -> dict:
        """``broker_use_ssl`` for kombu: redis-py's ``ssl_*`` keys for Redis,
        :func:`ssl.wrap_socket`-style keys for AMQP."""
        reqs = ssl.CERT_REQUIRED if self.verify else ssl.CERT_NONE
        names = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs") if redis else (
            "ca_certs", "certfile", "keyfile", "cert_reqs")
        values = (self.ca_file, self.cert_file, self.key_file, reqs)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in zip(names, values, strict=True) if v is not None}


class CelerySection(_Section):
    """``[worker.celery]``: the broker and the task settings that matter for
    never losing a job (docs/architecture.md states why each is set)."""

    broker_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="redis://, rediss:// (TLS) or amqp:// / amqps:// (RabbitMQ); a secret: it may hold a password.",
    )
    broker_url_file: Path | None = None
    tls: BrokerTls | None = None
    visibility_timeout_seconds: float = Field(
        7200, gt=0, description="Redis re-delivers an unacknowledged message after this: longer than the slowest job.",
    )
    job_time_limit_seconds: float = Field(
        3600, gt=0, description="A job still running after this is failed and its worker process exits, to be restarted.",
    )
    max_retries: int = Field(3, ge=0, le=20, description="Retries of a task whose index or node call failed transiently.")
    retry_backoff_seconds: float = Field(2.0, gt=0, description="First retry delay; doubles each time, at most 60 s.")
    publish_timeout_seconds: float = Field(2.0, gt=0, description="How long the node waits for the broker per message.")

    _secrets = secret_or_file("broker_url")

    @field_validator("broker_url")
    @classmethod
    def _scheme(cls, v: SecretStr) -> SecretStr:
        if not re.match(r"^(redis|rediss|amqp|amqps|pyamqp)://", v.get_secret_value()):
            raise ValueError("expected redis://, rediss://, amqp:// or amqps://")
        return v

    @model_validator(mode="after")
    def _timeouts(self) -> CelerySection:
        if self.visibility_timeout_seconds <= self.job_time_limit_seconds:
            raise ValueError(
                "visibility_timeout_seconds must be longer than job_time_limit_seconds: else Redis re-delivers "
                "a job that is still running"
            )
        return self

    @property
    def is_redis(self) -> bool:
        return self.broker_url.get_secret_value().startswith("redis")


class WorkerSection(_Section):
    """``[worker]``: how jobs run."""

    backend: WorkerBackend = WorkerBackend.EMBEDDED
    concurrency: int = Field(1, ge=1, le=64, description="Embedded worker threads.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")
    precision: Precision = Precision.FP32
    max_job_attempts: int = Field(
        3, ge=1, description="A job whose worker died (or the node, while running it) this many times is failed."
    )
    torch_threads: int = Field(0, ge=0, description="0 leaves torch's default.")
    input: WorkerInput = WorkerInput.SHARED_SPOOL
    output: WorkerOutput = WorkerOutput.STOW
    node_url: str | None = Field(
        None, description="The node's HTTP API root, e.g. https://ainode:8080: WADO-RS input and STOW-RS output."
    )
    node_token: SecretStr | None = Field(None, description="Bearer token (scopes read and ingest) for node_url.")
    node_token_file: Path | None = None
    node_ca_file: FilePath | None = Field(None, description="CA bundle for an HTTPS node_url.")
    heartbeat_seconds: float = Field(5.0, gt=0, le=300, description="A Celery worker's heartbeat on its job row.")
    stale_after_seconds: float = Field(
        30.0, gt=0, description="A running job whose heartbeat is older than this is queued again by the node's sweep."
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="The worker's own /metrics; 0: a free port, announced.")
    metrics_bind: str = "127.0.0.1"
    celery: CelerySection = Field(default_factory=CelerySection)

    _secrets = secret_or_file("node_token")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    @field_validator("node_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/]+", v):
            raise ValueError("expected http://HOST:PORT or https://HOST:PORT")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _heartbeat(self) -> WorkerSection:
        if self.stale_after_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("stale_after_seconds must be at least twice heartbeat_seconds")
        return self
