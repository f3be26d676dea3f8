"""The node's one configuration object.

It is read from a TOML file (``config/node.toml`` by default) and then from
environment variables, which win: ``AINODE_<SECTION>__<KEY>``, e.g.
``AINODE_NODE__PORT=11113`` or ``AINODE_STORAGE__INDEX_URL=postgresql+psycopg://...``.
Values that are lists or tables take JSON in the environment.

A wrong value is refused by :func:`load_config` with a :class:`ConfigError`
naming the key and what was expected.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydicom.datadict import tag_for_keyword

from node.destinations.base import DestinationConfig, RetryPolicy
from node.destinations.registry import registry as destination_registry
from node.secrets import read_secret_file, secret_or_file, token_digest
from node.tls import TlsVersion
from pipelines.registry import Registry
from pipelines.registry import registry as pipeline_registry

DEFAULT_CONFIG_PATH = Path("config/node.toml")

# PS3.5 6.2: AE is at most 16 characters, no backslash or control characters,
# and not only spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class ConfigError(ValueError):
    """A configuration file or environment variable holds a wrong value."""


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            "expected an AE title: 1 to 16 printable ASCII characters, no backslash, not only spaces"
        )
    return value.strip()


AETitle = Annotated[str, Field(description="DICOM AE title (PS3.5 6.2)")]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CallerRule(_Section):
    """One allowed caller; an omitted field matches anything."""

    ae_title: str | None = None
    host: str | None = Field(None, description="IP address or CIDR network of the caller")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae_title(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError as exc:
            raise ValueError(f"expected an IP address or CIDR network, got {v!r}") from exc
        return v

    def allows(self, ae_title: str, address: str) -> bool:
        if self.ae_title is not None and self.ae_title != ae_title.strip():
            return False
        if self.host is not None:
            try:
                return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)
            except ValueError:
                return False
        return True


class DicomTls(_Section):
    """``[node.tls]``: DICOM TLS (PS3.15 Annex B.9, B.12) on its own port.

    The section's presence turns TLS on. Files are PEM; ``key`` may be
    encrypted, with ``key_password`` or ``key_password_file``.
    """

    port: Port = Field(2762, description="The DICOM TLS port (2762, as IANA's dicom-tls and dcm4chee).")
    certificate: FilePath = Field(description="PEM certificate (chain) of the node.")
    key: FilePath = Field(description="PEM private key of the certificate.")
    key_password: SecretStr | None = Field(None, description="Passphrase of an encrypted key.")
    key_password_file: Path | None = None
    ca: FilePath | None = Field(None, description="PEM CA certificate(s) client certificates must chain to.")
    require_client_certificate: bool = Field(True, description="Refuse clients without a certificate signed by ca.")
    minimum_version: TlsVersion = TlsVersion.TLS_1_2
    handshake_timeout_seconds: float = Field(10.0, gt=0, le=300)

    _secrets = secret_or_file("key_password")

    @model_validator(mode="after")
    def _loads(self) -> DicomTls:
        if self.require_client_certificate and self.ca is None:
            raise ValueError("ca: needed to verify client certificates (or set require_client_certificate = false)")
        from node.tls import server_context

        server_context(self)  # a wrong passphrase or mismatched key fails here, not at the first association
        return self


class NodeSection(_Section):
    """``[node]``: the DICOM SCP.

    The node listens for plain DICOM on ``port`` (unless ``plain = false``)
    and, with ``[node.tls]``, for DICOM TLS on ``tls.port``: either or both.
    """

    ae_title: str = "AINODE"
    bind_address: str = "0.0.0.0"
    port: Port = 11112
    allowed_callers: list[CallerRule] = Field(
        default_factory=list, description="Empty allows any caller."
    )
    uid_prefix: str | None = Field(
        None,
        description="Organisation UID root for derived objects, ending in '.'; empty uses pydicom's.",
    )
    maximum_associations: int = Field(16, ge=1, le=256)
    network_timeout_seconds: float = Field(60.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    aliases: list[str] = Field(
        default_factory=list, description="Other AE titles the node answers to as Called AE Title."
    )
    require_called_ae_title: bool = Field(
        True,
        description="Refuse associations whose Called AE Title is neither ae_title nor an alias "
        "(A-ASSOCIATE-RJ, called-AE-title-not-recognized, PS3.8 9.3.4).",
    )
    extra_sop_classes: list[str] = Field(
        default_factory=list,
        description="Private SOP Class UIDs accepted for C-STORE besides every Storage SOP Class of PS3.6.",
    )
    maximum_pdu_size: int = Field(
        262144,
        ge=0,
        le=0xFFFFFFFF,
        description="Largest PDU the node receives, in bytes (PS3.8 D.1); 0 means no limit, letting "
        "a peer send PDUs of up to 4 GiB that are held in memory whole.",
    )
    plain: bool = Field(True, description="Listen for DICOM without TLS on port; false needs [node.tls].")
    listen_backlog: int = Field(64, ge=1, le=65535, description="Connections queued before accept (listen(2)).")
    tls: DicomTls | None = Field(None, description="DICOM TLS on its own port; absent: no TLS.")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        return [_check_ae_title(a) for a in v]

    @field_validator("extra_sop_classes")
    @classmethod
    def _sop_classes(cls, v: list[str]) -> list[str]:
        for u in v:
            if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", u) or len(u) > 64:
                raise ValueError(f"expected SOP Class UIDs (PS3.5 9.1), got {u!r}")
        return v

    @model_validator(mode="after")
    def _listeners(self) -> NodeSection:
        if not self.plain and self.tls is None:
            raise ValueError("plain: false needs [node.tls], or the node listens on no port")
        if self.plain and self.tls is not None and self.tls.port == self.port:
            raise ValueError(f"tls.port: {self.tls.port} is also the plain DICOM port; give each its own")
        return self

    @field_validator("uid_prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.", v) or len(v) > 54:
            raise ValueError("expected a UID root of digits and dots ending in '.', at most 54 characters")
        return v

    @field_validator("bind_address")
    @classmethod
    def _bind(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError(f"expected an IP address to listen on, got {v!r}") from exc
        return v


class StorageSection(_Section):
    """``[storage]``: where instances, refused instances, results and the index live."""

    spool_dir: Path = Path("var/spool")
    quarantine_dir: Path = Path("var/quarantine")
    outbox_dir: Path = Path("var/outbox")
    index_url: str = Field(
        "sqlite:///var/index.db",
        description="SQLAlchemy URL: sqlite:///PATH (WAL mode) or postgresql+psycopg://...",
    )
    fsync: bool = Field(True, description="fsync each instance and its directory before answering C-STORE.")
    min_free_mb: float = Field(
        1024, ge=0, description="Below this free space (MiB) on the spool's file system, C-STORE is answered 0xA700."
    )
    min_free_percent: float = Field(
        5.0, ge=0, lt=100, description="Below this free fraction (%) of the spool's file system, C-STORE is answered 0xA700."
    )

    @field_validator("index_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", v):
            raise ValueError("expected an SQLAlchemy URL starting sqlite:/// or postgresql+psycopg://")
        return v


class CompletionSection(_Section):
    """``[completion]``: when a series or study counts as complete."""

    sweep_interval_seconds: float = Field(1.0, gt=0, le=60)
    series_idle_seconds: float = Field(10.0, ge=0)
    complete_on_release: bool = Field(
        True, description="A series is complete as soon as the association that delivered it is released."
    )
    stow_idle_seconds: float = Field(
        2.0, ge=0, description="A series whose latest instance came by STOW-RS is complete after this much silence "
        "(the end of a STOW-RS request is no end of a series; complete_on_release is for C-STORE)."
    )
    study_idle_seconds: float = Field(
        5.0, ge=0, description="Study-level rules wait this long after the study's last instance."
    )
    force_complete_seconds: float = Field(
        900.0, gt=0, description="A study still incomplete this long after its last instance fails clearly."
    )
    unmatched_retention_hours: float = Field(
        24.0, ge=0, description="Series no rule matched are deleted from spool and index after this."
    )


class RetentionSection(_Section):
    """``[retention]``: how long files are kept (:mod:`node.retention`); 0
    keeps them forever. A study with queued or running jobs, pending
    deliveries or series still arriving is never purged. Series no rule
    matched go sooner, by ``[completion] unmatched_retention_hours``."""

    spool_days: float = Field(
        7.0, ge=0, description="Received instances are deleted this many days after their study's last instance."
    )
    quarantine_days: float = Field(30.0, ge=0, description="Refused instances and their reasons are deleted after this.")
    outbox_days: float = Field(30.0, ge=0, description="Written results (SEG, SR) are deleted after this.")
    interval_minutes: float = Field(
        60.0, gt=0, le=1440, description="How often the clean-up runs (also once at start-up)."
    )


class NumericRange(_Section):
    """A numeric attribute within [min, max] (either bound optional), e.g.
    ``InversionTime = { min = 1500 }`` (ms)."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> NumericRange:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class Presence(_Section):
    """``{ present = true }``: the attribute has a non-empty value; ``false``: it has none."""

    present: bool


MatchValue = list[str] | str | NumericRange | Presence


def _check_match(v: dict[str, MatchValue]) -> dict[str, MatchValue]:
    for keyword, accepted in v.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword (PS3.6)")
        if isinstance(accepted, str):
            try:
                re.compile(accepted)
            except re.error as exc:
                raise ValueError(f"{keyword}: invalid regular expression {accepted!r}: {exc}") from exc
    return v


Match = Annotated[dict[str, MatchValue], AfterValidator(_check_match)]


class RouteRule(_Section):
    """``[[routes]]``: series or studies matching ``match`` go to ``pipeline``.

    ``match`` maps DICOM keywords to a list of accepted values
    (case-insensitive; ``""`` accepts an absent or empty attribute), a
    regular expression searched case-insensitively, a numeric range
    ``{ min = ..., max = ... }`` or ``{ present = true | false }``.

    ``level = "study"`` rules collect the study's matching series into the
    sequence roles of ``required_roles`` (recognised by ``[sequences]``) and
    run once per study when every role is filled by a complete series.
    """

    name: str
    pipeline: str
    level: Literal["series", "study"] = "series"
    match: Match = Field(default_factory=dict)
    required_roles: list[str] = Field(default_factory=list)
    destinations: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _roles(self) -> RouteRule:
        if self.level == "study" and not self.required_roles:
            raise ValueError("required_roles: a study-level rule needs the sequence roles it waits for")
        if self.level == "series" and self.required_roles:
            raise ValueError("required_roles: only study-level rules have roles")
        return self


def _default_sequences() -> dict[str, list[dict[str, MatchValue]]]:
    """Sequence recognition for brain MR (role -> alternative rules; a rule
    matches when all its attributes do). Roles are tried in this order, so a
    post-contrast FLAIR is FLAIR and a post-contrast T1 is T1c, never T1.
    Times are in ms (PS3.3 C.8.3.1: Repetition, Echo, Inversion Time)."""
    not_other = r"^(?!.*(dwi|diff|adc|trace|swi|perf|local|scout|survey|mip|\bmpr\b))"
    return {
        "FLAIR": [
            {"SeriesDescription": not_other + r".*(flair|dark.?fluid|\bt2.?f\b|\bfla\b)"},
            {"InversionTime": NumericRange(min=1500), "EchoTime": NumericRange(min=60)},
        ],
        "T1c": [
            {"SeriesDescription": not_other + r".*(t1.*(post|\+\s*c\b|\bc\+|gd|gad|contrast|\bce\b)|\bt1c\b|\bt1ce\b)"},
            {
                "ContrastBolusAgent": Presence(present=True),
                "ScanningSequence": ["SE", "IR"],
                "EchoTime": NumericRange(max=30),
            },
        ],
        "T2": [
            {"SeriesDescription": not_other + r".*(\bt2\b|t2w|\bt2.?(tse|fse|se)\b)(?!.*(\*|star|flair))"},
            {
                "EchoTime": NumericRange(min=60),
                "RepetitionTime": NumericRange(min=2000),
                "InversionTime": Presence(present=False),
            },
        ],
        "T1": [
            {"SeriesDescription": not_other + r".*(\bt1\b|t1w|mprage|spgr|\bt1n\b|\bt1.?(se|tse|fse)\b)"},
            {  # spin-echo T1
                "ScanningSequence": ["SE"],
                "RepetitionTime": NumericRange(max=1000),
                "EchoTime": NumericRange(max=30),
                "ContrastBolusAgent": Presence(present=False),
            },
            {  # MPRAGE-like: inversion-prepared gradient echo
                "ScanningSequence": ["IR"],
                "InversionTime": NumericRange(min=600, max=1300),
                "EchoTime": NumericRange(max=10),
                "ContrastBolusAgent": Presence(present=False),
            },
        ],
    }


#: One ``[destinations.<name>]`` table: the registered kinds' models
#: (node.destinations), discriminated on ``kind``, built when this module is imported.
if TYPE_CHECKING:
    Destination = DestinationConfig
else:
    Destination = destination_registry().config_union()


class WorkerSection(_Section):
    """``[worker]``: how jobs run."""

    concurrency: int = Field(1, ge=1, le=64)
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")
    max_job_attempts: int = Field(
        3, ge=1, description="A job that was running when the node died this many times is failed."
    )
    torch_threads: int = Field(0, ge=0, description="0 leaves torch's default.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v


class ModelsSection(_Section):
    """``[models]``: where model cards are found, besides the ones shipped in ``models/cards``."""

    card_dirs: list[Path] = Field(default_factory=list)


def pipelines_section(registry: Registry) -> type[_Section]:
    """The ``[pipelines]`` model: one ``[pipelines.<name>]`` table per
    registered pipeline, of its spec's settings model (all defaults when
    absent). A table for an unregistered name is refused, naming the
    registered ones."""

    class _Pipelines(_Section):
        @model_validator(mode="before")
        @classmethod
        def _registered(cls, data: Any) -> Any:
            for name in data if isinstance(data, dict) else ():
                if name not in cls.model_fields:
                    raise ValueError(f"[pipelines.{name}]: {registry.unknown(name)}")
            return data

    fields: dict[str, Any] = {
        name: (r.spec.settings, Field(default_factory=r.spec.settings, description=r.spec.description or None))
        for name, r in registry.pipelines.items()
    }
    return create_model("PipelinesSection", __base__=_Pipelines, __doc__="``[pipelines]``: settings per pipeline.", **fields)


#: Built from the pipelines registered when this module is imported (pipelines.registry).
PipelinesSection = pipelines_section(pipeline_registry())


class Scope(StrEnum):
    """What an API token may do (``[[api.tokens]] scopes``)."""

    READ = "read"  # GET /status, /metrics and the other read-only endpoints
    INGEST = "ingest"  # STOW-RS into the node
    OPERATOR = "operator"  # actions that change the node's state


# RFC 6750 2.1 b64token: what can follow "Authorization: Bearer ".
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MIN_TOKEN_LENGTH = 16


class ApiToken(_Section):
    """``[[api.tokens]]``: a named bearer token with its scopes.

    The value is read once, at load, from the environment variable ``env`` or
    the file ``file`` (never from the TOML) and kept only as its SHA-256
    digest.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Shown in logs, never the token.")
    scopes: list[Scope] = Field(min_length=1)
    env: str | None = Field(None, description="Environment variable holding the token.")
    file: Path | None = Field(None, description="File holding the token (e.g. /etc/ainode/tokens/NAME).")
    _digest: bytes = PrivateAttr(b"")

    @model_validator(mode="after")
    def _read(self) -> ApiToken:
        if (self.env is None) == (self.file is None):
            raise ValueError("give env or file (where the token is read from), exactly one")
        if self.env is not None:
            value = os.environ.get(self.env, "").strip()
            if not value:
                raise ValueError(f"env: environment variable {self.env} is not set or empty")
        else:
            value = read_secret_file(self.file, "file")
        if len(value) < MIN_TOKEN_LENGTH or not _B64TOKEN.match(value):
            raise ValueError(
                f"the token of {self.name!r} must be at least {MIN_TOKEN_LENGTH} characters of "
                "A-Z a-z 0-9 - . _ ~ + / (RFC 6750 b64token), e.g. from `openssl rand -hex 32`"
            )
        self._digest = token_digest(value)
        return self

    @property
    def digest(self) -> bytes:
        """SHA-256 of the token (:func:`node.secrets.token_digest`)."""
        return self._digest


class ApiTls(_Section):
    """``[api.tls]``: HTTPS for the API; with ``ca``, clients must present a
    certificate signed by it (mutual TLS)."""

    certificate: FilePath = Field(description="PEM certificate (chain) of the node.")
    key: FilePath = Field(description="PEM private key of the certificate.")
    ca: FilePath | None = Field(None, description="PEM CA certificate(s) client certificates must chain to.")
    key_password: SecretStr | None = Field(None, description="Passphrase of an encrypted key.")
    key_password_file: Path | None = None

    _secrets = secret_or_file("key_password")

    @model_validator(mode="after")
    def _loads(self) -> ApiTls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        password = self.key_password.get_secret_value() if self.key_password else None
        try:
            ctx.load_cert_chain(self.certificate, self.key, password)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"certificate, key: cannot load {self.certificate} with {self.key}: {exc}") from None
        if self.ca is not None:
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"ca: cannot load {self.ca}: {exc}") from None
        return self


class ApiSection(_Section):
    """``[api]``: the HTTP API (health, status, Prometheus metrics, ...).

    Beyond loopback, the API needs ``[api.tls]`` (or ``allow_plain_http``)
    and at least one token. On loopback with no token configured, the
    ``read`` endpoints are open; once a token is configured, every endpoint
    but ``GET /health`` needs one.
    """

    enabled: bool = True
    allow_plain_http: bool = Field(False, description="Allow HTTP without TLS beyond loopback.")
    tls: ApiTls | None = None
    tokens: list[ApiToken] = Field(default_factory=list)
    # After the fields above: its validator reads them (info.data).
    bind_address: str = "127.0.0.1"
    port: int = Field(8780, ge=0, le=65535, description="0 picks a free port.")
    stow_max_request_mb: float = Field(
        2048, gt=0, description="STOW-RS (POST /dicom-web/studies): a request body beyond this (MiB) is answered 413, "
        "and nothing of it is stored."
    )

    @field_validator("tokens")
    @classmethod
    def _unique(cls, v: list[ApiToken]) -> list[ApiToken]:
        names, digests = set(), set()
        for i, token in enumerate(v):
            if token.name in names:
                raise ValueError(f"[{i}].name: {token.name!r} is used twice")
            if token.digest in digests:
                raise ValueError(f"[{i}]: {token.name!r} has the same token as another entry")
            names.add(token.name)
            digests.add(token.digest)
        return v

    @field_validator("bind_address")
    @classmethod
    def _bind(cls, v: str, info: ValidationInfo) -> str:
        try:
            address = ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError(f"expected an IP address to listen on, got {v!r}") from exc
        if address.is_loopback or not info.data.get("enabled", True) or not {"tls", "tokens"} <= info.data.keys():
            return v  # loopback, disabled, or tls/tokens already refused on their own
        if info.data["tls"] is None and not info.data.get("allow_plain_http"):
            raise ValueError(
                f"{v} is beyond loopback: configure [api.tls] (certificate, key) or set [api] allow_plain_http = true"
            )
        if not info.data["tokens"]:
            raise ValueError(f"{v} is beyond loopback: configure at least one [[api.tokens]]")
        return v

    @property
    def loopback(self) -> bool:
        """Whether the API listens on loopback only (127.0.0.0/8 or ::1)."""
        return ipaddress.ip_address(self.bind_address).is_loopback


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

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Environment overrides the file, whose values arrive as init kwargs.
        return (env_settings, init_settings)

    _warnings: list[str] = PrivateAttr(default_factory=list)

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
        return self

    def retry_for(self, destination: str) -> RetryPolicy:
        return self.destinations[destination].retry or self.retry

    @property
    def warnings(self) -> list[str]:
        """Doubtful but valid settings found at load (e.g. a route matching
        a Modality its pipeline does not accept); ``ainode config check``
        prints them and ``ainode serve`` logs them."""
        return list(self._warnings)


def _check_route_spec(i: int, route: RouteRule, spec) -> list[str]:
    """Check a route's level and roles against its pipeline's
    :class:`~pipelines.spec.PipelineSpec`; return warnings about its
    ``match`` on Modality (0008,0060).

    Raises
    ------
    ValueError
        The level differs from the pipeline's, or the roles are not the ones
        it reads; the message names the route.
    """
    where = f"routes[{i}] ({route.name})"
    if route.level != spec.level:
        raise ValueError(f'{where}: pipeline {spec.name} is {spec.level}-level; level "{route.level}" given')
    missing = [r for r in spec.required_roles if r not in route.required_roles]
    extra = [r for r in route.required_roles if r not in spec.required_roles]
    if missing or extra:
        raise ValueError(
            f"{where}.required_roles: pipeline {spec.name} reads {', '.join(spec.required_roles)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; it does not read {', '.join(extra)}" if extra else "")
        )
    accepted = route.match.get("Modality")
    if not spec.modalities or not isinstance(accepted, list):
        return []  # a regular expression or range is not second-guessed
    foreign = [m for m in accepted if str(m).strip().upper() not in spec.modalities]
    if not foreign:
        return []
    return [
        f"{where}.match.Modality: pipeline {spec.name} accepts {', '.join(spec.modalities)}; "
        f"{', '.join(repr(m) for m in foreign)} will reach it and be refused or fail"
    ]


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        # Drop pydantic's discriminator-tag segments ("dicom", "dicomweb") only when they repeat the kind.
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        secret = re.search(r"password|token|secret|auth|tls", loc)  # never echo a secret (or a misspelt one)
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
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    data.update(overrides)
    try:
        return NodeConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source + " (and AINODE_* environment)")) from None
