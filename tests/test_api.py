"""The HTTP API against a real node: uvicorn on a real socket, real TLS
(certificates from tests/certs.py), tokens from the environment and from
files, and ``ainode serve`` as its own process for the refusal log."""

from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from fastapi import APIRouter
from typer.testing import CliRunner

from node.api import Scope, requires
from node.cli import app as cli_app
from node.config import ConfigError, load_config
from node.destinations.dicomweb import DicomWebDestination, StowSender
from node.service import Node
from tests.certs import make_pki, write_encrypted_key
from tests.peers import NodeProcess, free_port, node_config_for, node_sections, write_node_toml

SECRET_MASK = "**********"


@pytest.fixture
def start_node(tmp_path):
    """Start a real node (no routes) whose [api] is the keyword arguments."""
    nodes: list[Node] = []

    def start(**api) -> Node:
        cfg = node_config_for(
            tmp_path / f"node{len(nodes)}",
            node={"bind_address": "127.0.0.1", "port": free_port()},
            api={"bind_address": "127.0.0.1", "port": 0} | api,
        )
        node = Node(cfg)
        nodes.append(node)
        node.start()
        return node

    yield start
    for node in nodes:
        node.stop()


def url(node: Node, path: str) -> str:
    return f"{node.api.scheme}://127.0.0.1:{node.api.address[1]}{path}"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


def test_health_is_open_and_status_and_metrics_need_the_read_scope(start_node, tmp_path, monkeypatch):
    reader, ingester = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    monkeypatch.setenv("AINODE_TEST_TOKEN_READER", reader)
    token_file = tmp_path / "ingester.token"
    token_file.write_text(ingester + "\n")  # as `openssl rand` > file leaves it
    node = start_node(tokens=[
        {"name": "grafana", "scopes": ["read"], "env": "AINODE_TEST_TOKEN_READER"},
        {"name": "modality", "scopes": ["ingest"], "file": str(token_file)},
    ])
    assert node.api.address[1] != 0  # port 0 picked a free port, reported as bound

    health = requests.get(url(node, "/health"), timeout=5)
    assert health.status_code == 200 and health.json() == {"scp": True, "scheduler": True, "index": True}

    for path in ("/status", "/metrics"):
        missing = requests.get(url(node, path), timeout=5)
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
        unknown = requests.get(url(node, path), headers=bearer(secrets.token_urlsafe(32)), timeout=5)
        assert unknown.status_code == 401 and 'error="invalid_token"' in unknown.headers["WWW-Authenticate"]
        basic = requests.get(url(node, path), auth=("grafana", reader), timeout=5)
        assert basic.status_code == 401
        wrong_scope = requests.get(url(node, path), headers=bearer(ingester), timeout=5)
        assert wrong_scope.status_code == 403 and "insufficient_scope" in wrong_scope.headers["WWW-Authenticate"]
        assert requests.get(url(node, path), headers=bearer(reader), timeout=5).status_code == 200

    status = requests.get(url(node, "/status"), headers=bearer(reader), timeout=5).json()
    assert status["counts"]["jobs"] == {} and status["jobs"] == []
    metrics = requests.get(url(node, "/metrics"), headers=bearer(reader), timeout=5)
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert "ainode_instances_received_total 0.0" in metrics.text

    node.receiver.stop()  # the SCP no longer listens
    down = requests.get(url(node, "/health"), timeout=5)
    assert down.status_code == 503 and down.json()["scp"] is False


def test_a_router_declares_its_scope_in_one_line(start_node, monkeypatch):
    """Later routers (STOW-RS, actions) need ingest/operator: never open, even
    on loopback without tokens, where reads are."""
    open_node = start_node()
    act = APIRouter(dependencies=[requires(Scope.OPERATOR)])
    act.add_api_route("/actions/ping", lambda: {"pong": True}, methods=["POST"])
    open_node.api.app.include_router(act)

    assert requests.get(url(open_node, "/status"), timeout=5).status_code == 200  # read: open on loopback
    assert requests.get(url(open_node, "/metrics"), timeout=5).status_code == 200
    assert requests.post(url(open_node, "/actions/ping"), timeout=5).status_code == 401
    stranger = requests.get(url(open_node, "/status"), headers=bearer(secrets.token_urlsafe(32)), timeout=5)
    assert stranger.status_code == 401  # a token that is not configured is refused, not ignored

    operator, reader = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    monkeypatch.setenv("AINODE_TEST_OPERATOR", operator)
    monkeypatch.setenv("AINODE_TEST_READER", reader)
    closed = start_node(tokens=[
        {"name": "ops", "scopes": ["operator", "read"], "env": "AINODE_TEST_OPERATOR"},
        {"name": "grafana", "scopes": ["read"], "env": "AINODE_TEST_READER"},
    ])
    closed.api.app.include_router(act)
    assert requests.get(url(closed, "/status"), timeout=5).status_code == 401  # a token configured: reads close
    assert requests.post(url(closed, "/actions/ping"), headers=bearer(reader), timeout=5).status_code == 403
    done = requests.post(url(closed, "/actions/ping"), headers=bearer(operator), timeout=5)
    assert done.status_code == 200 and done.json() == {"pong": True}
    assert requests.get(url(closed, "/status"), headers=bearer(operator), timeout=5).status_code == 200


def test_https_with_an_encrypted_key(start_node, pki, tmp_path):
    password_file = tmp_path / "key-password"
    password_file.write_text("correct horse battery\n")
    key = write_encrypted_key(pki.server_key, tmp_path / "server-encrypted.key", "correct horse battery")
    node = start_node(tls={"certificate": str(pki.server_cert), "key": str(key), "key_password_file": str(password_file)})
    assert node.api.scheme == "https"
    answer = requests.get(url(node, "/health"), verify=str(pki.ca), timeout=5)
    assert answer.status_code == 200
    with pytest.raises(requests.exceptions.SSLError):  # a CA that did not sign the node's certificate
        requests.get(url(node, "/health"), verify=str(pki.other_ca), timeout=5)
    with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP to the TLS port
        requests.get(f"http://127.0.0.1:{node.api.address[1]}/health", timeout=5)


def test_client_certificate_is_required_when_ca_is_set(start_node, pki):
    node = start_node(tls={"certificate": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca)})
    ok = requests.get(url(node, "/health"), verify=str(pki.ca), cert=(str(pki.client_cert), str(pki.client_key)), timeout=5)
    assert ok.status_code == 200
    with pytest.raises(requests.exceptions.ConnectionError):  # SSLError is one
        requests.get(url(node, "/health"), verify=str(pki.ca), timeout=5)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(
            url(node, "/health"), verify=str(pki.ca),
            cert=(str(pki.other_client_cert), str(pki.other_client_key)), timeout=5,
        )


def test_wrong_api_configurations_are_refused(pki, tmp_path, monkeypatch):
    monkeypatch.setenv("AINODE_TEST_TOKEN", secrets.token_urlsafe(32))
    token = {"name": "grafana", "scopes": ["read"], "env": "AINODE_TEST_TOKEN"}
    tls = {"certificate": str(pki.server_cert), "key": str(pki.server_key)}

    def refused(api: dict) -> str:
        with pytest.raises(ConfigError) as exc:
            load_config(None, api=api)
        return str(exc.value)

    plain = refused({"bind_address": "0.0.0.0", "tokens": [token]})
    assert "api.bind_address" in plain and "[api.tls]" in plain
    open_ = refused({"bind_address": "::", "tls": tls})
    assert "api.bind_address" in open_ and "[[api.tokens]]" in open_
    assert "api.bind_address" in refused({"bind_address": "192.0.2.1", "allow_plain_http": True})
    assert load_config(None, api={"bind_address": "0.0.0.0", "tls": tls, "tokens": [token]}).api.tls is not None
    assert load_config(None, api={"bind_address": "0.0.0.0", "allow_plain_http": True, "tokens": [token]})
    assert load_config(None, api={"bind_address": "::1"}).api.loopback  # loopback: neither needed
    assert load_config(None, api={"bind_address": "127.0.0.2"}).api.loopback

    unset = refused({"tokens": [{"name": "grafana", "scopes": ["read"], "env": "AINODE_TEST_UNSET_TOKEN"}]})
    assert "api.tokens.0" in unset and "AINODE_TEST_UNSET_TOKEN" in unset
    assert "api.tokens.0" in refused({"tokens": [{"name": "g", "scopes": ["read"], "file": str(tmp_path / "none")}]})
    short = tmp_path / "short"
    short.write_text("abc")
    assert "at least 16" in refused({"tokens": [{"name": "g", "scopes": ["read"], "file": str(short)}]})
    in_toml = refused({"tokens": [{"name": "g", "scopes": ["read"], "value": "x" * 32}]})
    assert "api.tokens.0.value" in in_toml and "x" * 32 not in in_toml
    assert "scopes" in refused({"tokens": [{"name": "g", "scopes": ["write"], "env": "AINODE_TEST_TOKEN"}]})
    assert "used twice" in refused({"tokens": [token, token]})
    bad_key = refused({"tls": {"certificate": str(pki.server_cert), "key": str(pki.client_key)}})
    assert "api.tls" in bad_key and "cannot load" in bad_key


def test_refusals_are_logged_with_the_address_never_the_token(tmp_path):
    reader, ingester, stranger = (secrets.token_urlsafe(32) for _ in range(3))
    (tmp_path / "ingester.token").write_text(ingester)
    api_port = free_port()
    sections = node_sections(
        tmp_path, node={"bind_address": "127.0.0.1", "port": free_port()}, api={"bind_address": "127.0.0.1", "port": api_port}
    )
    config = write_node_toml(tmp_path / "node.toml", sections, f"""
[[api.tokens]]
name = "grafana"
scopes = ["read"]
env = "AINODE_TEST_TOKEN_GRAFANA"

[[api.tokens]]
name = "modality"
scopes = ["ingest"]
file = "{tmp_path}/ingester.token"
""")
    node = NodeProcess(config, tmp_path, env={"AINODE_TEST_TOKEN_GRAFANA": reader}).start(api_port)
    try:
        base = f"http://127.0.0.1:{api_port}"
        assert requests.get(f"{base}/status", timeout=5).status_code == 401
        assert requests.get(f"{base}/metrics", headers=bearer(stranger), timeout=5).status_code == 401
        assert requests.get(f"{base}/status", headers=bearer(ingester), timeout=5).status_code == 403
        assert requests.get(f"{base}/status", headers=bearer(reader), timeout=5).status_code == 200
    finally:
        node.stop()
    log_text = node.log_path.read_text()
    for token in (reader, ingester, stranger):
        assert token not in log_text
    refusals = [line for line in node.log_lines() if line.get("event") == "api_auth_refused"]
    assert [(r["path"], r["status"], r["client"]) for r in refusals] == [
        ("/status", 401, "127.0.0.1"), ("/metrics", 401, "127.0.0.1"), ("/status", 403, "127.0.0.1"),
    ]
    assert [r["reason"] for r in refusals] == [
        "no Authorization header", "unknown token", "token 'modality' lacks scope read",
    ]
    assert refusals[2]["token_name"] == "modality"
    assert not any(line.get("event") == "api_read_endpoints_open" for line in node.log_lines())


def test_config_check_never_prints_a_secret(tmp_path, pki):
    password, token, key_password = "pacs-password-" + secrets.token_hex(8), secrets.token_urlsafe(24), "key-" + secrets.token_hex(8)
    (tmp_path / "pacs2.password").write_text(password + "-2\n")
    key = write_encrypted_key(pki.server_key, tmp_path / "server-encrypted.key", key_password)
    config = write_node_toml(tmp_path / "node.toml", node_sections(tmp_path), f"""
[destinations.pacs]
kind = "dicomweb"
url = "https://pacs.example/dicom-web"
auth = {{ type = "basic", username = "ainode", password = "{password}" }}

[destinations.pacs2]
kind = "dicomweb"
url = "https://pacs2.example/dicom-web"
auth = {{ type = "basic", username = "ainode", password_file = "{tmp_path}/pacs2.password" }}

[destinations.cloud]
kind = "dicomweb"
url = "https://cloud.example/dicom-web"
auth = {{ type = "bearer", token = "{token}" }}

[api.tls]
certificate = "{pki.server_cert}"
key = "{key}"
key_password = "{key_password}"
""")
    result = CliRunner().invoke(cli_app, ["config", "check", str(config)])
    assert result.exit_code == 0, result.output
    for secret in (password, token, key_password):
        assert secret not in result.output
    effective = json.loads(result.stdout)
    assert effective["destinations"]["pacs"]["auth"]["password"] == SECRET_MASK
    assert effective["destinations"]["pacs2"]["auth"]["password"] == SECRET_MASK
    assert effective["destinations"]["cloud"]["auth"]["token"] == SECRET_MASK
    assert effective["api"]["tls"]["key_password"] == SECRET_MASK
    cfg = load_config(config)
    assert cfg.destinations["pacs2"].auth.password.get_secret_value() == password + "-2"
    assert password not in repr(cfg) and token not in str(cfg)


class _AuthPeer(BaseHTTPRequestHandler):
    """A STOW-RS origin behind authentication: 200 only with the expected
    Authorization header (the body is not read as DICOM)."""

    expected = ""

    def do_POST(self):  # noqa: N802 (http.server's name)
        if "chunked" in self.headers.get("Transfer-Encoding", ""):  # dicomweb-client streams the body
            while size := int(self.rfile.readline().split(b";")[0], 16):
                self.rfile.read(size + 2)
            self.rfile.readline()
        else:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append(self.headers.get("Authorization"))
        self.send_response(200 if self.headers.get("Authorization") == self.server.expected else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "auth, expected",
    [
        ({"type": "basic", "username": "ainode", "password": "s3cret pass"}, "Basic YWlub2RlOnMzY3JldCBwYXNz"),
        ({"type": "bearer", "token": "tok-123456"}, "Bearer tok-123456"),
    ],
)
def test_stow_sender_sends_the_secret_itself(auth, expected, rg1_uncr):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AuthPeer)
    server.expected, server.seen = expected, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = DicomWebDestination(kind="dicomweb", url=f"http://127.0.0.1:{server.server_address[1]}/dicom-web", auth=auth)
        outcomes = StowSender(dest).send([Path(rg1_uncr)])
    finally:
        server.shutdown()
        server.server_close()
    assert server.seen == [expected]
    assert outcomes[0].ok, outcomes
