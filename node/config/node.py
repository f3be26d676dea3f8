"""``[node]``: the DICOM SCP, its allowed callers and ``[node.tls]``."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator

from node.config.base import Port, _check_ae_title, _Section
from node.secrets import secret_or_file
from node.tls import TlsVersion


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
