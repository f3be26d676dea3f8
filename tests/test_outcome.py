"""node/outcome.py: which failures are retried (PS3.4 B.2.3, PS3.7 Annex C, PS3.8 9.3.4, RFC 9110).

The network cases (refused, timed out, rejected, STOW-RS statuses) run
against real peers in tests/test_dispatch.py; these are the tables.
"""

from __future__ import annotations

import pytest

from node.outcome import OutcomeClass, classify_association, classify_dimse, classify_http, dimse_status_text

S, T, P = OutcomeClass.SUCCESS, OutcomeClass.TRANSIENT, OutcomeClass.PERMANENT


@pytest.mark.parametrize(
    "code, expected",
    [
        (0x0000, S), (0xB000, S), (0xB006, S), (0xB007, S), (0x0107, S),  # success and warnings: stored
        (0xA700, T), (0xA7FF, T), (0x0110, T), (0x0213, T), (0x0210, T), (0xFE00, T), (0xFF00, T),
        (0xA900, P), (0xA9FF, P), (0xC000, P), (0xCFFF, P), (0x0122, P), (0x0117, P), (0x0124, P), (0x0211, P),
        (0xD123, T),  # unknown to pynetdicom: bounded retries
    ],
    ids=lambda v: f"0x{v:04X}" if isinstance(v, int) else str(v),
)
def test_dimse_status_classes(code, expected):
    assert classify_dimse(code) == expected


def test_dimse_status_text_names_the_meaning():
    assert dimse_status_text(0xA900) == "0xA900 (Failure: Data Set Does Not Match SOP Class)"
    assert dimse_status_text(0x0000) == "0x0000 (Success)"
    with pytest.raises(ValueError):
        classify_dimse(-1)


@pytest.mark.parametrize(
    "code, expected",
    [(200, S), (202, S), (400, P), (401, P), (403, P), (404, P), (409, P), (413, P), (415, P),
     (408, T), (425, T), (429, T), (500, T), (502, T), (503, T), (504, T), (501, P), (505, P), (302, P)],
)
def test_http_status_classes(code, expected):
    assert classify_http(code) == expected


def test_http_status_out_of_range_is_refused():
    with pytest.raises(ValueError, match="100-599"):
        classify_http(700)


@pytest.mark.parametrize(
    "result, source, expected",
    [(None, None, T), (2, 1, T), (2, 3, T), (1, 1, P), (1, 2, P), (1, 3, T)],
)
def test_association_rejection_classes(result, source, expected):
    assert classify_association(result, source) == expected
