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
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydicom.datadict import tag_for_keyword

from pipelines.brain_tumour.settings import BrainTumourSettings
from pipelines.pneumonia.settings import PneumoniaSettings

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


class NodeSection(_Section):
    """``[node]``: the DICOM SCP."""

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

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

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
    study_idle_seconds: float = Field(
        5.0, ge=0, description="Study-level rules wait this long after the study's last instance."
    )
    force_complete_seconds: float = Field(
        900.0, gt=0, description="A study still incomplete this long after its last instance fails clearly."
    )
    unmatched_retention_hours: float = Field(
        24.0, ge=0, description="Series no rule matched are deleted from spool and index after this."
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


class RetryPolicy(_Section):
    """``[retry]``: delivery retries, exponential backoff with bounded attempts."""

    max_attempts: int = Field(10, ge=1)
    initial_delay_seconds: float = Field(2.0, gt=0)
    multiplier: float = Field(2.0, ge=1)
    max_delay_seconds: float = Field(300.0, gt=0)
    jitter: float = Field(0.1, ge=0, le=1, description="Fraction of random spread on each delay.")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``, ``attempt`` >= 1, without jitter."""
        return min(self.max_delay_seconds, self.initial_delay_seconds * self.multiplier ** (attempt - 1))


class BasicAuth(_Section):
    type: Literal["basic"]
    username: str
    password: str


class BearerAuth(_Section):
    type: Literal["bearer"]
    token: str


class _DestinationBase(_Section):
    omit_empty_frames: bool = Field(
        False,
        description="Send SEGs without empty frames (needed by Weasis for >400 frames); "
        "default keeps one frame per source slice and segment.",
    )
    retry: RetryPolicy | None = Field(None, description="Overrides [retry] for this destination.")
    timeout_seconds: float = Field(30.0, gt=0)


class DicomDestination(_DestinationBase):
    """A C-STORE SCP."""

    kind: Literal["dicom"]
    ae_title: str
    host: str
    port: Port

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


class DicomWebDestination(_DestinationBase):
    """A STOW-RS service (PS3.18 10.5)."""

    kind: Literal["dicomweb"]
    url: str = Field(description="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    auth: Annotated[BasicAuth | BearerAuth, Field(discriminator="type")] | None = None
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/")


Destination = Annotated[DicomDestination | DicomWebDestination, Field(discriminator="kind")]


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


class PipelinesSection(_Section):
    pneumonia: PneumoniaSettings = Field(default_factory=PneumoniaSettings)
    brain_tumour: BrainTumourSettings = Field(default_factory=BrainTumourSettings)


class ApiSection(_Section):
    """``[api]``: HTTP health, status and Prometheus metrics."""

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: Port = 8780


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

    @model_validator(mode="after")
    def _cross_checks(self) -> NodeConfig:
        from pipelines import PIPELINES  # registry names only; imports no model code

        names = set()
        for i, route in enumerate(self.routes):
            if route.name in names:
                raise ValueError(f"routes[{i}].name: {route.name!r} is used twice")
            names.add(route.name)
            if route.pipeline not in PIPELINES:
                raise ValueError(
                    f"routes[{i}].pipeline: unknown pipeline {route.pipeline!r}; expected one of {sorted(PIPELINES)}"
                )
            for role in route.required_roles:
                if role not in self.sequences:
                    raise ValueError(
                        f"routes[{i}].required_roles: {role!r} has no rules under [sequences]; defined: {list(self.sequences)}"
                    )
            for dest in route.destinations:
                if dest not in self.destinations:
                    raise ValueError(
                        f"routes[{i}].destinations: {dest!r} is not defined under [destinations]; "
                        f"defined: {sorted(self.destinations)}"
                    )
        return self

    def retry_for(self, destination: str) -> RetryPolicy:
        return self.destinations[destination].retry or self.retry


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        # Drop pydantic's discriminator-tag segments ("dicom", "dicomweb") only when they repeat the kind.
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
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
