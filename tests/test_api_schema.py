"""Every operation of the HTTP API against its own OpenAPI document, with
schemathesis: a throwaway node of its own (actions purge and pause), served
by uvicorn on a real socket, fuzzed with an operator token. No answer may be
a 5xx, and each must match the status codes, media types and schema the
document declares. Bounded: 20 examples per operation.

STOW-RS (``/dicom-web``) is left out: its bodies are multipart DICOM, not
JSON, and tests/test_stow.py covers it.
"""

from __future__ import annotations

import os
import secrets

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from node.service import Node
from tests.peers import free_port, node_config_for, wait_for

TOKEN_ENV = "AINODE_TEST_SCHEMA_OPS"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_node(tmp_path_factory, rg1_uncr):
    """A node with one study (no rule matches it: no pipeline runs) and a folder destination."""
    import pydicom

    token = secrets.token_urlsafe(32)
    os.environ[TOKEN_ENV] = token
    folder = tmp_path_factory.mktemp("schema")
    (folder / "archive").mkdir()
    cfg = node_config_for(
        folder,
        node={"bind_address": "127.0.0.1", "port": free_port()},
        completion={"sweep_interval_seconds": 0.2, "complete_on_release": True},
        destinations={"archive": {"kind": "folder", "path": str(folder / "archive")}},
        api={"bind_address": "127.0.0.1", "port": 0, "destination_check_seconds": 1,
             "tokens": [{"name": "fuzz", "scopes": ["read", "operator"], "env": TOKEN_ENV}]},
    )
    node = Node(cfg)
    node.start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
    assert assoc.is_established and assoc.send_c_store(pydicom.dcmread(rg1_uncr)).Status == 0x0000
    assoc.release()
    wait_for(lambda: node.index.counts()["series"] == {"unmatched": 1}, 30, what="series routed")
    yield node, token
    node.stop()
    os.environ.pop(TOKEN_ENV, None)


def test_every_answer_matches_the_openapi_document(api_node):
    """Each operation in turn (schemathesis's pytest plugin does not run on
    this pytest: its own loop over the operations, one hypothesis run each)."""
    node, token = api_node
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{node.api.address[1]}/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    failures, tried = {}, []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/dicom-web"):
            continue

        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        @given(case=operation.as_strategy())
        def run(case):
            case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

        tried.append(operation.label)
        try:
            run()
        except Exception as exc:
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert len(tried) >= 15, tried
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
