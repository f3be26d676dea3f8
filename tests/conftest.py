"""Shared fixtures. Real-data tests skip, naming ../shared/data, where it is absent."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.peers import SHARED_DATA, Orthanc, free_port, have_dcmtk, have_orthanc, node_config_for

if TYPE_CHECKING:
    from node.config import NodeConfig

CXR_RSNA = SHARED_DATA / "cxr" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.fixture(autouse=True)
def _structlog_per_test(monkeypatch):
    """Commands run in-process (CliRunner) configure logging for the whole
    process: keep loggers uncached there, so ``structlog.testing.capture_logs``
    sees every logger in later tests, and restore the defaults after."""
    import structlog

    configure = structlog.configure
    monkeypatch.setattr(structlog, "configure", lambda *a, **kw: configure(*a, **{**kw, "cache_logger_on_first_use": False}))
    yield
    structlog.reset_defaults()


def shared_file(path: Path) -> Path:
    """``path`` under ../shared/data, or skip the test naming that folder."""
    if not path.exists():
        pytest.skip(f"real data not available: {path} (../shared/data is absent)")
    return path


@pytest.fixture(scope="session")
def rg1_uncr() -> Path:
    """RG1_UNCR.dcm from pydicom-data: a real CR chest PA, 1955x1841, 15-bit, MONOCHROME1."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None, "pydicom-data is a test dependency and holds RG1_UNCR.dcm"
    return Path(path)


@pytest.fixture
def rsna_cxr() -> Path:
    return shared_file(CXR_RSNA)


@pytest.fixture
def node_config(tmp_path) -> Callable[..., NodeConfig]:
    """``node_config(**sections)``: a :class:`NodeConfig` whose spool, quarantine,
    outbox and SQLite index lie under ``tmp_path``; ``storage`` keys given are
    laid over those, other sections taken as given (:func:`tests.peers.node_config_for`)."""
    return functools.partial(node_config_for, tmp_path)


@pytest.fixture
def orthanc(tmp_path):
    if not have_orthanc():
        pytest.fail("Orthanc with the DICOMweb plugin is required: apt-get install orthanc orthanc-dicomweb")
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


@pytest.fixture(scope="session")
def dcmtk():
    if not have_dcmtk():
        pytest.fail("dcmtk is required: apt-get install dcmtk")


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _pg_tool(name: str) -> str | None:
    return shutil.which(name) or (str(PG_BIN / name) if (PG_BIN / name).exists() else None)


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for the session (Debian's initdb, pg_ctl on a
    free loopback port); its URL."""
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pytest.importorskip("psycopg", reason="psycopg is needed for the PostgreSQL index")
    root = Path(tempfile.mkdtemp(prefix="ainode-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "ainode", "--auth=trust"], check=True, capture_output=True)
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-o", f"-p {port} -k {root} -h 127.0.0.1", "-w", "start"],
        check=True,
        capture_output=True,
    )
    yield f"postgresql+psycopg://ainode@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
