"""Shared fixtures. Real-data tests skip, naming ../shared/data, where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers import SHARED_DATA, Orthanc, have_dcmtk, have_orthanc

CXR_RSNA = SHARED_DATA / "cxr" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


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
