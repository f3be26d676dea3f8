"""The audit trail outside the index: the configuration loaded, and syslog.

:func:`audit_config_loaded` writes the ``config_loaded`` event when the node
starts: the SHA-256 of the TOML file's bytes (what ``sha256sum`` prints),
and the SHA-256 of the effective configuration (file, defaults and
``AINODE_*`` environment together) as canonical JSON with secrets
redacted, so a change made only in the environment shows too.

:class:`SyslogForwarder` sends each audit event as one RFC 5424 message to
``[audit] syslog``: over UDP (RFC 5426, one datagram a message), TCP or TLS
(RFC 6587 / RFC 5425 octet counting: ``LEN SP MESSAGE``). ``PRI`` is
facility 10 (security/authorization, as IHE ATNA ITI-20 asks) with severity
5 (notice), 4 (warning) for refusals and failures. ``[meta sequenceId]``
(RFC 5424 7.3.1) numbers the messages, so a collector sees what was lost.
Sending is best effort, in its own thread: the index holds every event.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import queue
import re
import socket
import ssl
import threading
from itertools import count
from typing import Any

import structlog

from node.config import NodeConfig
from node.config.audit import AuditSection
from node.index import AuditEvent, Index

_SECRET_KEY = re.compile(r"password|passphrase|token|secret|credential|authorization", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?<=://)([^/:@\s]*):[^/@\s]*@")
REDACTED = "**********"


def redacted(value: Any) -> Any:
    """``value`` (JSON-ready) with the text values of secret-named keys
    replaced by ``**********`` (as pydantic's SecretStr dumps) and passwords in URLs
    (``scheme://user:password@host``) removed."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(k) and isinstance(v, str) else redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", value)
    return value


def config_digests(config: NodeConfig) -> dict[str, Any]:
    """``file`` and ``file_sha256`` (None without a file), ``effective_sha256``
    (SHA-256 of the redacted effective configuration as JSON with sorted
    keys and no spaces) and ``environment`` (the names, never the values, of
    the ``AINODE_*`` variables set)."""
    path, file_sha256 = config.source_file or (None, None)
    effective = json.dumps(redacted(config.model_dump(mode="json")), sort_keys=True, separators=(",", ":"))
    return {
        "file": path,
        "file_sha256": file_sha256,
        "effective_sha256": hashlib.sha256(effective.encode()).hexdigest(),
        "environment": sorted(k for k in os.environ if k.upper().startswith("AINODE_")),
    }


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (containers)
        return f"uid {os.getuid()}"


def audit_config_loaded(index: Index, config: NodeConfig) -> None:
    """Attach the syslog forwarder of ``[audit]`` to ``index`` (when set),
    then write ``config_loaded`` (actor: the OS user running the node).
    Raises ValueError for a TLS setting that cannot be loaded."""
    if config.audit.syslog_target is not None:
        index.add_audit_sink(SyslogForwarder(config.audit))
    index.audit(AuditEvent.CONFIG_LOADED, actor=_os_user(), client=socket.gethostname(), details=config_digests(config))


# -- syslog ------------------------------------------------------------------------------

_WARNING_EVENTS = {
    AuditEvent.ASSOCIATION_REJECTED, AuditEvent.INSTANCE_QUARANTINED, AuditEvent.DELIVERY_FAILED,
}
FACILITY = 10  # security/authorization messages (RFC 5424 6.2.1)


def rfc5424(record: dict[str, Any], *, hostname: str, app_name: str, procid: int, sequence: int) -> bytes:
    """One RFC 5424 message (section 6) of an audit ``record`` (as
    :meth:`node.index.Index.audit` hands it to sinks): ``<PRI>1 TIMESTAMP
    HOSTNAME APP-NAME PROCID MSGID [meta sequenceId="N"] BOM+JSON``, MSGID
    the event name, the JSON the record with sorted keys."""
    severity = 4 if record["event"] in _WARNING_EVENTS else 5
    msg = json.dumps(record, default=str, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    head = f'<{FACILITY * 8 + severity}>1 {record["at"]} {hostname} {app_name} {procid} {record["event"]}'
    return f'{head} [meta sequenceId="{sequence}"] '.encode("ascii") + b"\xef\xbb\xbf" + msg.encode("utf-8")


class SyslogForwarder:
    """An audit sink (:meth:`node.index.Index.add_audit_sink`) sending
    RFC 5424 messages to ``[audit] syslog`` from its own thread.

    A message waits in a queue of ``queue_size``; when the queue is full it
    is dropped (logged, ``audit_syslog_dropped``). A failed send is logged
    (``audit_syslog_failed``) and retried, after 1 s doubling to 60 s, on a
    new connection. Raises ValueError for TLS files that cannot be loaded.
    """

    def __init__(self, section: AuditSection, *, queue_size: int = 10000):
        target = section.syslog_target
        if target is None:
            raise ValueError("[audit] syslog is not set")
        self.transport, self.host, self.port = target
        self.hostname = section.hostname or socket.getfqdn() or "-"
        self.app_name = section.app_name
        self.log = structlog.get_logger("node.audit")
        self._tls = self._tls_context(section) if self.transport == "tls" else None
        self._queue: queue.Queue[bytes | None] = queue.Queue(queue_size)
        self._sequence = count(1)  # next() is atomic: __call__ runs in many threads
        self._dropped = 0
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    @staticmethod
    def _tls_context(section: AuditSection) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=section.syslog_ca)
            if section.syslog_certificate is not None:
                ctx.load_cert_chain(section.syslog_certificate, section.syslog_key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"[audit] syslog TLS files cannot be loaded: {exc}") from None
        return ctx

    def __call__(self, record: dict[str, Any]) -> None:
        sequence = (next(self._sequence) - 1) % 2147483647 + 1  # RFC 5424 7.3.1: 1 to 2147483647, then 1
        message = rfc5424(record, hostname=self.hostname, app_name=self.app_name, procid=os.getpid(), sequence=sequence)
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                self.log.warning("audit_syslog_dropped", dropped=self._dropped, reason="queue full")

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout`` seconds), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(1)
        self._disconnect()

    def _run(self) -> None:
        backoff = 1.0
        while (message := self._queue.get()) is not None:
            while not self._stop.is_set():
                try:
                    self._send(message)
                    backoff = 1.0
                    break
                except OSError as exc:
                    self.log.warning("audit_syslog_failed", target=f"{self.transport}://{self.host}:{self.port}",
                                     error=repr(exc), retry_seconds=backoff)
                    self._disconnect()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 60.0)

    def _send(self, message: bytes) -> None:
        if self.transport == "udp":
            if self._sock is None:
                self._sock = socket.socket(socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0][0],
                                           socket.SOCK_DGRAM)
            self._sock.sendto(message, (self.host, self.port))
            return
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=10)
            self._sock = self._tls.wrap_socket(sock, server_hostname=self.host) if self._tls else sock
        self._sock.sendall(b"%d " % len(message) + message)  # RFC 6587 3.4.1 octet counting

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def __repr__(self) -> str:
        return f"SyslogForwarder({self.transport}://{self.host}:{self.port})"


__all__ = ["SyslogForwarder", "audit_config_loaded", "config_digests", "redacted", "rfc5424"]
