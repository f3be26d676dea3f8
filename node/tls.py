"""DICOM TLS (PS3.15 Annex B.9 and B.12, BCP 195): contexts and the listener.

- :func:`server_context` and :func:`client_context` build :class:`ssl.SSLContext`
  objects from ``[node.tls]`` and a destination's ``tls`` table: TLS 1.2 or
  later, certificates verified against the configured CA, hostname checked
  on the client side unless turned off.
- :class:`DicomServer` is pynetdicom's threaded association server with a
  configurable listen backlog and, for TLS, the handshake moved out of the
  accept loop. pynetdicom wraps each socket in ``get_request``, i.e. in the
  one thread that accepts connections, so a client that connects and says
  nothing holds every other handshake, and a failed handshake is dropped
  without a word. Here ``get_request`` only accepts; the handshake runs in
  the connection's own thread with a timeout, and each failure is logged
  (``tls_handshake_failed``, with the peer and the reason).
- :func:`peer_tls_info` tells an association's handlers whether the peer
  came over TLS and which client certificate it presented.
"""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog
from cryptography import x509
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

if TYPE_CHECKING:
    from node.config import DicomTls
    from node.destinations.dicom import DestinationTls


class TlsVersion(StrEnum):
    """Lowest TLS version accepted; PS3.15 Annex B.9 (BCP 195) allows 1.2 and 1.3."""

    TLS_1_2 = "1.2"
    TLS_1_3 = "1.3"


_VERSIONS: dict[str, ssl.TLSVersion] = {TlsVersion.TLS_1_2: ssl.TLSVersion.TLSv1_2, TlsVersion.TLS_1_3: ssl.TLSVersion.TLSv1_3}


def _password(section) -> str | None:
    return section.key_password.get_secret_value() if section.key_password is not None else None


def _load_chain(ctx: ssl.SSLContext, certificate: Path, key: Path, password: str | None) -> None:
    try:
        ctx.load_cert_chain(certificate, key, password)
    except (ssl.SSLError, OSError) as exc:
        # Wrong passphrase, a key that does not match the certificate, not PEM...
        raise ValueError(f"certificate, key: cannot load {certificate} with {key}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"ca: cannot load CA certificates from {ca}: {exc}") from None


def server_context(tls: DicomTls) -> ssl.SSLContext:
    """The SCP's context for ``[node.tls]``.

    Client certificates are required (``CERT_REQUIRED``) when
    ``require_client_certificate`` is true, verified if presented when it is
    false and a ``ca`` is given, and not asked for otherwise.

    Raises
    ------
    ValueError
        The certificate, key (or its passphrase) or CA file cannot be loaded;
        the message names the key.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[str(tls.minimum_version)]
    _load_chain(ctx, tls.certificate, tls.key, _password(tls))
    if tls.ca is not None:
        _load_ca(ctx, tls.ca)
    if tls.require_client_certificate:
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_OPTIONAL if tls.ca is not None else ssl.CERT_NONE
    return ctx


def client_context(tls: DestinationTls) -> ssl.SSLContext:
    """The SCU's context for a destination's ``tls`` table: the server's
    certificate is verified against ``ca`` (the system's CA store when
    absent), its name checked unless ``verify_hostname`` is false, and the
    client certificate presented when one is configured.

    Raises
    ------
    ValueError
        A file cannot be loaded; the message names the key.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[str(tls.minimum_version)]
    if tls.ca is not None:
        _load_ca(ctx, tls.ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = tls.verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.certificate is not None and tls.key is not None:
        _load_chain(ctx, tls.certificate, tls.key, _password(tls))
    return ctx


def tls_args(tls: DestinationTls | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for pynetdicom's ``AE.associate``: the context and the
    name the server's certificate must carry (``server_hostname``, or the
    destination's host)."""
    if tls is None:
        return None
    return client_context(tls), tls.server_hostname or host


def peer_tls_info(assoc: Any) -> tuple[bool, str | None]:
    """(whether the association runs over TLS, the client certificate's
    subject as an RFC 4514 string or None when none was presented)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return False, None
    der = sock.getpeercert(binary_form=True)
    if not der:
        return True, None
    return True, x509.load_der_x509_certificate(der).subject.rfc4514_string()


class DicomServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a listen backlog and, when
    ``tls_context`` is given, a TLS handshake per connection thread.

    Parameters
    ----------
    backlog:
        Connections the kernel queues before the accept loop takes them
        (``listen(2)``); socketserver's default is 5.
    tls_context:
        The server context, or None for plain DICOM.
    handshake_timeout:
        Seconds a client has to complete the TLS handshake.
    """

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list,
        ssl_context: ssl.SSLContext | None = None,
        *,
        evt_handlers: list | None = None,
        backlog: int = 64,
        tls_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        if ssl_context is not None:
            raise ValueError("ssl_context: pass tls_context, so the handshake runs in the connection's thread")
        self.request_queue_size = backlog  # read by server_activate() in __init__
        self.tls_context = tls_context
        self.handshake_timeout = handshake_timeout
        self.log = structlog.get_logger("node.tls")
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers=evt_handlers)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only; see :meth:`process_request_thread` for the handshake."""
        assert self.socket is not None
        return self.socket.accept()

    def process_request_thread(self, request, client_address) -> None:
        if self.tls_context is not None:
            request = self._handshake(request, client_address)
            if request is None:
                return
        super().process_request_thread(request, client_address)

    def _handshake(self, raw: socket.socket, client_address) -> ssl.SSLSocket | None:
        assert self.tls_context is not None  # process_request_thread calls this only with TLS
        peer = {"peer_address": client_address[0], "peer_port": client_address[1], "port": self.server_address[1]}
        raw.settimeout(self.handshake_timeout)
        sock: socket.socket = raw
        try:
            sock = self.tls_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            sock.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            reason = f"no handshake within {self.handshake_timeout} s" if isinstance(exc, TimeoutError) else str(exc)
            self.log.warning("tls_handshake_failed", reason=reason, **peer)
            sock.close()  # the SSLSocket owns the descriptor once wrapped
            return None
        sock.settimeout(None)  # as an accepted plain socket: pynetdicom selects, then reads
        cipher = sock.cipher()  # (name, protocol, bits); None only before the handshake
        self.log.debug("tls_established", version=sock.version(), cipher=cipher[0] if cipher else None, **peer)
        return sock


def start_server(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list,
    *,
    backlog: int,
    tls_context: ssl.SSLContext | None = None,
    handshake_timeout: float = 10.0,
) -> DicomServer:
    """Listen on ``address`` in a background thread, as pynetdicom's
    ``AE.start_server(block=False)`` does, with :class:`DicomServer`.
    Stop it with its ``shutdown()``.

    Raises
    ------
    OSError
        The address cannot be bound (in use, not local).
    """
    server = ae.make_server(  # pynetdicom types it as the base class; it is a server_class
        address,
        evt_handlers=evt_handlers,
        server_class=DicomServer,
        backlog=backlog,
        tls_context=tls_context,
        handshake_timeout=handshake_timeout,
    )
    name = f"AcceptorServer{'-TLS' if tls_context else ''}@{datetime.now():%Y%m%d%H%M%S}"
    threading.Thread(target=make_target(server.serve_forever), name=name, daemon=True).start()
    ae._servers.append(server)  # as start_server does: shutdown() removes it
    return cast(DicomServer, server)
