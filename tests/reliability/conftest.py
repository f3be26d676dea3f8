"""Fixtures of the reliability campaign (sizes: tests/reliability/sizes.py)."""

from __future__ import annotations

import pytest

from tests.peers import have_dcmtk
from tests.reliability.support import InstanceFactory, streaming


@pytest.fixture(autouse=True)
def stream_files(monkeypatch):
    """pynetdicom sends file paths byte for byte instead of re-encoding them."""
    monkeypatch.setattr(*streaming(), True)


@pytest.fixture
def factory() -> InstanceFactory:
    return InstanceFactory()


@pytest.fixture
def peers():
    """Register what a test starts (``peers(obj)`` returns ``obj``); each is
    stopped at teardown, in reverse order, whether the test passed or not."""
    started: list = []

    def register(obj):
        started.append(obj)
        return obj

    yield register
    for obj in reversed(started):
        try:
            (getattr(obj, "stop", None) or obj.close)()
        except Exception as exc:  # one failing stop must not leave the rest running
            print(f"teardown: stopping {obj!r} failed: {exc!r}")


@pytest.fixture(scope="session", autouse=True)
def dcmtk_tools():
    if not have_dcmtk():
        pytest.fail("dcmtk is required (storescu, storescp): apt-get install dcmtk")
