"""The whole configuration (:class:`NodeConfig`), its cross-section checks
and :func:`load_config`."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from node.config.api import ApiSection
from node.config.audit import AuditSection
from node.config.base import ConfigError, _Section
from node.config.drift import DriftSection
from node.config.node import NodeSection
from node.config.pipelines import ModelsSection, PipelinesSection
from node.config.routing import Match, RouteRule, _check_route_spec, _default_sequences
from node.config.storage import CompletionSection, RetentionSection, StorageSection
from node.config.worker import WorkerBackend, WorkerInput, WorkerOutput, WorkerSection
from node.destinations.base import DestinationConfig, RetryPolicy
from node.destinations.registry import registry as destination_registry
from pipelines.registry import registry as pipeline_registry

#: One ``[destinations.<name>]`` table: the registered kinds' models
#: (node.destinations), discriminated on ``kind``, built when this module is imported.
if TYPE_CHECKING:
    Destination = DestinationConfig
else:
    Destination = destination_registry().config_union()


class LogSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = "json"


class NodeConfig(BaseSettings):
    """The whole configuration. Every section has working defaults."""

    model_config = SettingsConfigDict(
        env_prefix="AINODE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    node: NodeSection = Field(default_factory=NodeSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    completion: CompletionSection = Field(default_factory=CompletionSection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    routes: list[RouteRule] = Field(default_factory=list)
    sequences: dict[str, list[Match]] = Field(
        default_factory=_default_sequences,
        description="Sequence role -> alternative rules recognising it; roles are tried in order.",
    )
    destinations: dict[str, Destination] = Field(default_factory=dict)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    pipelines: PipelinesSection = Field(default_factory=PipelinesSection)
    api: ApiSection = Field(default_factory=ApiSection)
    log: LogSection = Field(default_factory=LogSection)
    audit: AuditSection = Field(default_factory=AuditSection)
    drift: DriftSection = Field(default_factory=DriftSection)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Environment overrides the file, whose values arrive as init kwargs.
        return (env_settings, init_settings)

    _warnings: list[str] = PrivateAttr(default_factory=list)
    _source_file: tuple[str, str] | None = PrivateAttr(None)  # set by load_config

    @model_validator(mode="after")
    def _cross_checks(self) -> NodeConfig:
        registry = pipeline_registry()  # specs only; imports no model code
        names = set()
        for i, route in enumerate(self.routes):
            if route.name in names:
                raise ValueError(f"routes[{i}].name: {route.name!r} is used twice")
            names.add(route.name)
            if route.pipeline not in registry:
                raise ValueError(f"routes[{i}] ({route.name}).pipeline: {registry.unknown(route.pipeline)}")
            for role in route.required_roles:
                if role not in self.sequences:
                    raise ValueError(
                        f"routes[{i}].required_roles: {role!r} has no rules under [sequences]; defined: {list(self.sequences)}"
                    )
            self._warnings.extend(_check_route_spec(i, route, registry.spec(route.pipeline)))
            for dest in route.destinations:
                if dest not in self.destinations:
                    raise ValueError(
                        f"routes[{i}].destinations: {dest!r} is not defined under [destinations]; "
                        f"defined: {sorted(self.destinations)}"
                    )
                if not destination_registry().kind(self.destinations[dest].kind).carries_results:
                    raise ValueError(
                        f"routes[{i}] ({route.name}).destinations: {dest!r} is a {self.destinations[dest].kind} "
                        "destination: it takes notifications, not results"
                    )
        self._check_worker()
        return self

    def _check_worker(self) -> None:
        """Celery mode needs what every machine can reach: a PostgreSQL
        index, and the node's API for DICOMweb input or STOW-RS output."""
        w = self.worker
        if w.backend != WorkerBackend.CELERY:
            return
        if self.storage.index_url.startswith("sqlite"):
            raise ValueError(
                "worker.backend: celery needs a PostgreSQL index shared by the node and its workers "
                "(storage.index_url = postgresql+psycopg://...); SQLite is one machine's file"
            )
        over_http = [f"{k} = {v!s}" for k, v in (("input", w.input), ("output", w.output))
                     if v in (WorkerInput.DICOMWEB, WorkerOutput.STOW)]
        if over_http and not w.node_url:
            raise ValueError(f"worker.node_url: workers with {' and '.join(over_http)} reach the node's API; give its URL")
        if (w.input == WorkerInput.DICOMWEB or w.output == WorkerOutput.STOW) and not self.api.enabled:
            raise ValueError("api.enabled: workers with DICOMweb input or STOW-RS output need the node's HTTP API")

    def retry_for(self, destination: str) -> RetryPolicy:
        return self.destinations[destination].retry or self.retry

    @property
    def warnings(self) -> list[str]:
        """Doubtful but valid settings found at load (e.g. a route matching
        a Modality its pipeline does not accept); ``ainode config check``
        prints them and ``ainode serve`` logs them."""
        return list(self._warnings)

    @property
    def source_file(self) -> tuple[str, str] | None:
        """(path, SHA-256 hex of its bytes) of the TOML file :func:`load_config` read, or None."""
        return self._source_file


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        # Drop pydantic's discriminator-tag segments ("dicom", "dicomweb") only when they repeat the kind.
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        secret = re.search(r"password|token|secret|auth|tls|broker", loc)  # never echo a secret (or a misspelt one)
        shown = "" if secret or isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"  {loc or '<root>'}: {msg}{shown}")
    return "\n".join(lines)


def load_config(path: Path | str | None = None, **overrides: Any) -> NodeConfig:
    """Read the configuration from ``path`` (TOML) and the environment.

    ``path=None`` uses the defaults alone. ``overrides`` are top-level
    sections that replace the file's (used by tests).

    Raises
    ------
    ConfigError
        The file is missing or not TOML, or a value is wrong; the message names
        each offending key and what was expected.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            raw = path.read_bytes()
            data = tomllib.loads(raw.decode("utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    data.update(overrides)
    try:
        config = NodeConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source + " (and AINODE_* environment)")) from None
    if path is not None:  # the audit trail's config_loaded names it (node.audit)
        config._source_file = (str(path.resolve()), hashlib.sha256(raw).hexdigest())
    return config
