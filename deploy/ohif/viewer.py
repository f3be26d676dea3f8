#!/usr/bin/env python3
"""Serve the OHIF viewer at ``/`` and proxy ``/dicom-web`` to Orthanc.

The prebuilt OHIF dist (npm ``@ohif/app``, fetched by ``make viewer-deps``)
uses absolute paths, so it must be served at ``/``. Orthanc's DICOMweb is
proxied on the same origin, so the browser needs no CORS and the viewer's
configuration (``app-config.js`` beside this file, served in place of the
dist's own) can say just ``/dicom-web``.

Standard library only::

    python3 deploy/ohif/viewer.py --orthanc http://127.0.0.1:8042 --port 3000

then open http://127.0.0.1:3000/. It binds to 127.0.0.1 by default: the
proxy gives whoever reaches it Orthanc's DICOMweb (read and STOW) with
Orthanc's own authentication, which the local Orthanc of ``make run`` has off.
"""

from __future__ import annotations

import argparse
import http.client
import mimetypes
import shutil
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
# The OHIF release, pinned in one place for the Makefile, this server and the tests.
OHIF_VERSION = (HERE / "ohif-version").read_text().strip()
# Where `make viewer-deps` unpacks the npm package's dist.
DEFAULT_DIST = HERE.parents[1] / ".cache" / "ohif" / OHIF_VERSION / "dist"
PROXY_PREFIX = "/dicom-web"
# Headers that describe one hop, not the message (RFC 9110 7.6.1).
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
}
CHUNK = 1 << 16

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


class ViewerHandler(BaseHTTPRequestHandler):
    """Static files from the dist (SPA fallback to index.html), DICOMweb to Orthanc."""

    protocol_version = "HTTP/1.1"  # keep-alive: OHIF makes hundreds of requests
    server: ViewerServer

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_POST(self) -> None:  # STOW-RS, when a user saves a SEG or SR from OHIF
        if self._is_proxied():
            self._proxy()
        else:
            self.send_error(405)

    def _is_proxied(self) -> bool:
        path = urlsplit(self.path).path
        return path == PROXY_PREFIX or path.startswith(PROXY_PREFIX + "/")

    def _route(self, head: bool) -> None:
        if self._is_proxied():
            self._proxy()
        else:
            self._static(head)

    # --- static files -------------------------------------------------------

    def _static(self, head: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/app-config.js":
            file = self.server.app_config
        else:
            file = (self.server.dist / path.lstrip("/")).resolve()
            if not file.is_relative_to(self.server.dist):
                self.send_error(404)
                return
            if not file.is_file():
                if Path(path).suffix:  # a missing asset is a 404, not the app
                    self.send_error(404)
                    return
                file = self.server.dist / "index.html"  # a viewer route, e.g. /viewer
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        size = file.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size))
        # The bundles have content hashes in their names; these do not.
        if file.name in ("index.html", "app-config.js"):
            self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if not head:
            with open(file, "rb") as f:
                shutil.copyfileobj(f, self.wfile, CHUNK)

    # --- DICOMweb proxy -----------------------------------------------------

    def _proxy(self) -> None:
        body = None
        if "Content-Length" in self.headers:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        elif self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        # Host is passed on unchanged: Orthanc builds the absolute BulkDataURIs
        # of its DICOMweb metadata from it, so they point back at this proxy.
        conn = self.server.upstream()
        try:
            conn.request(self.command, self.server.orthanc_path + self.path, body=body, headers=headers)
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            self.send_error(502, f"Orthanc unreachable: {exc}")
            return
        try:
            self.send_response(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            if length is None and self.command != "HEAD":
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command == "HEAD":
                return
            while chunk := resp.read(CHUNK):
                if length is None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    self.wfile.write(chunk)
            if length is None:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            conn.close()

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while size := int(self.rfile.readline().split(b";")[0], 16):
            out += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return bytes(out)

    def log_message(self, fmt: str, *args) -> None:
        if not self.server.quiet:
            super().log_message(fmt, *args)


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, dist: Path, orthanc: str, app_config: Path, quiet: bool = False):
        super().__init__(address, ViewerHandler)
        self.dist = dist.resolve()
        self.app_config = app_config.resolve()
        url = urlsplit(orthanc)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"--orthanc must be an http(s) URL, got {orthanc!r}")
        self.orthanc = url
        self.orthanc_path = url.path.rstrip("/")  # Orthanc behind a prefix, e.g. /pacs
        self.quiet = quiet

    def upstream(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.orthanc.scheme == "https" else http.client.HTTPConnection
        return cls(self.orthanc.hostname, self.orthanc.port, timeout=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dist", type=Path, default=DEFAULT_DIST, help="the OHIF dist folder (default: where make viewer-deps puts it)")
    p.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's URL; /dicom-web is proxied to it")
    p.add_argument("--app-config", type=Path, default=HERE / "app-config.js", help="served as /app-config.js")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--quiet", action="store_true", help="no access log")
    args = p.parse_args(argv)
    if not (args.dist / "index.html").is_file():
        p.error(f"{args.dist}/index.html not found: run `make viewer-deps` first")
    server = ViewerServer(
        (args.bind, args.port), dist=args.dist, orthanc=args.orthanc, app_config=args.app_config, quiet=args.quiet
    )
    print(f"OHIF viewer on http://{args.bind}:{server.server_address[1]}/ (DICOMweb: {args.orthanc}/dicom-web)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
