"""``[api]``: the HTTP API, its bearer tokens (``[[api.tokens]]``) and
``[api.tls]``."""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from enum import StrEnum
from pathlib import Path

from pydantic import Field, FilePath, PrivateAttr, SecretStr, ValidationInfo, field_validator, model_validator

from node.config.base import _Section
from node.secrets import read_secret_file, secret_or_file, token_digest


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
        if self.file is not None:
            value = read_secret_file(self.file, "file")
        else:
            value = os.environ.get(self.env or "", "").strip()
            if not value:
                raise ValueError(f"env: environment variable {self.env} is not set or empty")
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
    ohif_url: str | None = Field(
        None, pattern=r"^https?://[^\s?#]+$",
        description="An OHIF viewer on the PACS the results go to (e.g. http://pacs:3000): the dashboard links "
        "each study to {ohif_url}/viewer?StudyInstanceUIDs=...",
    )
    dashboard_session_hours: float = Field(
        8, gt=0, le=24 * 7, description="How long a dashboard login (session cookie) lasts, hours."
    )
    destination_check_seconds: float = Field(
        60, gt=0, description="Seconds between C-ECHO (or the kind's own check) of each destination, for /status."
    )
    show_patient_names: bool = Field(
        False, description="Show Patient's Name in the API's lists; off: Patient ID and study date only."
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
