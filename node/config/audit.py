"""``[audit]``: forwarding the audit trail (:mod:`node.index.audit`) as syslog."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import Field, FilePath, field_validator

from node.config.base import _Section

#: Default ports: syslog over UDP (RFC 5426), TCP (RFC 6587, as rsyslog and
#: syslog-ng listen), TLS (RFC 5425).
SYSLOG_PORTS = {"udp": 514, "tcp": 601, "tls": 6514}
_PRINTUSASCII = re.compile(r"^[\x21-\x7e]+$")


class AuditSection(_Section):
    """``[audit]``: every audit event is also sent, as one RFC 5424 syslog
    message, to ``syslog`` (the transports IHE ATNA audit repositories
    accept; the message body is the event as JSON, not a DICOM PS3.15 A.5
    audit message). Sending is best effort: the index keeps every event."""

    syslog: str | None = Field(
        None,
        description="udp://HOST[:514], tcp://HOST[:601] (RFC 6587 octet counting) or tls://HOST[:6514] (RFC 5425).",
    )
    syslog_ca: FilePath | None = Field(None, description="tls: PEM CA certificate(s) of the collector; default the system's.")
    syslog_certificate: FilePath | None = Field(None, description="tls: PEM client certificate, for mutual TLS.")
    syslog_key: FilePath | None = Field(None, description="tls: PEM private key of syslog_certificate.")
    app_name: str = Field("ainode", max_length=48, description="APP-NAME of the messages (RFC 5424 6.2.5).")
    hostname: str | None = Field(
        None, max_length=255, description="HOSTNAME of the messages (RFC 5424 6.2.4); default this machine's FQDN."
    )

    @field_validator("syslog")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in SYSLOG_PORTS or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"expected udp://HOST[:PORT], tcp://HOST[:PORT] or tls://HOST[:PORT], got {v!r}")
        try:
            _ = parts.port  # urlsplit checks the port only when asked
        except ValueError:
            raise ValueError(f"the port of {v!r} is not a number from 0 to 65535") from None
        return v

    @field_validator("app_name", "hostname")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and not _PRINTUSASCII.match(v):
            raise ValueError("expected printable US-ASCII without spaces (RFC 5424 6.2: PRINTUSASCII)")
        return v

    @property
    def syslog_target(self) -> tuple[str, str, int] | None:
        """(transport, host, port) of ``syslog``, or None when it is not set."""
        if self.syslog is None:
            return None
        parts = urlsplit(self.syslog)
        assert parts.hostname is not None  # checked by the validator
        return parts.scheme, parts.hostname, parts.port or SYSLOG_PORTS[parts.scheme]
