"""Sizes of the reliability campaign, in one place.

The default run fits in about 3 minutes on 2 cores; ``AINODE_SOAK=1`` runs
the full campaign (at least 4,000 instances in 40 series, 20 SIGKILL/restart
cycles, 200 bad inputs). Each size can also be set on its own with the
environment variable of the same name (e.g. ``AINODE_LOAD_INSTANCES=1000``).
"""

from __future__ import annotations

import os

SOAK = os.environ.get("AINODE_SOAK", "") not in ("", "0")


def _size(name: str, default: int, soak: int) -> int:
    value = os.environ.get(f"AINODE_{name}")
    return int(value) if value else (soak if SOAK else default)


#: Load: instances and series (CT, MR and CR in turn), parallel senders.
LOAD_INSTANCES = _size("LOAD_INSTANCES", 600, 4000)
LOAD_SERIES = _size("LOAD_SERIES", 40, 40)
LOAD_SENDERS = 8  # half dcmtk storescu, half pynetdicom SCUs

#: Crashes: SIGKILL/restart cycles, and the traffic they interrupt.
KILL_CYCLES = _size("KILL_CYCLES", 6, 21)
CRASH_LOAD_SERIES = _size("CRASH_LOAD_SERIES", 18, 90)  # CT/MR series of CRASH_SERIES_SIZE
CRASH_SERIES_SIZE = 10
# One chest radiograph each, routed to pneumonia: one per job and dispatch cycle.
CRASH_CR_SERIES = _size("CRASH_CR_SERIES", 4, 14)

#: Hostile input: bad inputs generated across every category.
HOSTILE_INPUTS = _size("HOSTILE_INPUTS", 200, 240)
