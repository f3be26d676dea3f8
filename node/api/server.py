"""uvicorn in the node's process: one thread, one socket we bind ourselves.

Binding the socket here (not in uvicorn) makes port 0 pick a free port that
:attr:`ApiServer.address` reports, and makes "address in use" an error of
the constructor rather than of a background thread.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import structlog
import uvicorn
from fastapi import FastAPI

from node.config import ApiSection

log = structlog.get_logger("node.api")


class ApiServer:
    """Serve ``app`` as ``api`` says: bind address, port, ``[api.tls]``.

    Parameters
    ----------
    app:
        From :func:`node.api.app.create_app`.
    api:
        The ``[api]`` section. With ``tls``, HTTPS (TLS 1.2 or later); with
        ``tls.ca``, clients must present a certificate signed by it.

    Raises
    ------
    OSError
        The address cannot be bound (in use, not local).
    ssl.SSLError
        The certificate, key or CA cannot be loaded.
    """

    def __init__(self, app: FastAPI, api: ApiSection, *, start_timeout: float = 10.0):
        self.app = app
        self.start_timeout = start_timeout
        family = socket.AF_INET6 if ":" in api.bind_address else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((api.bind_address, api.port))
            self.socket.listen(128)
            self._address = self.socket.getsockname()[:2]
            self.config = uvicorn.Config(app, **_uvicorn_options(api))
            self.config.load()  # builds the SSL context now, so a bad key fails here
        except BaseException:
            self.socket.close()
            raise
        if self.config.ssl is not None:
            self.config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self.scheme = "https" if api.tls else "http"
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound."""
        return self._address

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as exc:  # SystemExit too: uvicorn exits on a failed lifespan start-up
            self._error = exc

    def start(self) -> None:
        """Serve in a thread; return once uvicorn accepts connections.

        Raises
        ------
        RuntimeError
            uvicorn stopped or did not start within ``start_timeout`` s.
        """
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not start: {self._error!r}")
            time.sleep(0.01)
        log.info("api_listening", url=f"{self.scheme}://{self._address[0]}:{self._address[1]}",
                 client_certificates=self.config.ssl_ca_certs is not None)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in progress finish (at most
        ``timeout`` s), close the socket. Safe to call twice or unstarted."""
        if self._thread is not None:
            self.server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(2)
            self._thread = None
        self.socket.close()


def _uvicorn_options(api: ApiSection) -> dict:
    options: dict = {
        "log_config": None,  # the node's logging (node/log.py) stays as it is
        "access_log": False,  # one line a scrape would drown the JSON log
        "proxy_headers": False,  # the logged client address is the peer's, not a header's
        "server_header": False,
        "http": "h11",
        "ws": "none",
        "lifespan": "on",
        "timeout_graceful_shutdown": 5,
    }
    tls = api.tls
    if tls is not None:
        options |= {
            "ssl_certfile": str(tls.certificate),
            "ssl_keyfile": str(tls.key),
            "ssl_keyfile_password": tls.key_password.get_secret_value() if tls.key_password else None,
            "ssl_ca_certs": str(tls.ca) if tls.ca else None,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.ca else ssl.CERT_NONE,
        }
    return options
