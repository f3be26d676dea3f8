"""What a result SR says: its values for the API, and in a line for the dashboard.

The SR in the outbox is read with highdicom (``highdicom.sr.srread``) and
its TID 1500 measurement groups (PS3.16 TID 1410 planar, TID 1411
volumetric and TID 1501 image-level) give measurements and qualitative
evaluations; the finding is made from those alone, so what the dashboard
says is exactly what the SR sent to the PACS says:

- the pneumonia SR (pipelines/pneumonia/write.py): the Probability
  (DCM 122157) and the evaluation Pneumonia (SCT 233604007) Present/Absent;
- the brain tumour SR (pipelines/brain_tumour/write.py): the Volume
  (SCT 118565006) in ml of each group, named by the abbreviation in its
  Tracking Identifier (``Enhancing tumour (ET)`` -> ET), ET/TC/WT shown.

Readings are cached per SR SOP Instance UID (a UID names one content).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("node.findings")

PROBABILITY = ("DCM", "122157")
THRESHOLD = ("DCM", "122411")
VOLUME = ("SCT", "118565006")
#: Qualitative items of every group that are context, not a finding:
#: Finding category (SCT 276214006), Algorithm Family (DCM 111000) and
#: Geometric purpose of region (DCM 130400).
_CONTEXT = {("SCT", "276214006"), ("DCM", "111000"), ("DCM", "130400")}
_ABBREVIATION = re.compile(r"\(([A-Z]{2,4})\b")
#: Brain regions shown first, in this order.
BRATS_SHOWN = ("ET", "TC", "WT")


@dataclass(frozen=True)
class Measurement:
    group: str  # the group's Tracking Identifier
    name: str  # code meaning
    value: float
    unit: str  # UCUM code


@dataclass(frozen=True)
class Evaluation:
    group: str  # the group's Tracking Identifier
    name: str  # code meaning of the concept
    value: str  # code meaning of the coded value


@dataclass(frozen=True)
class Finding:
    """A result SR's finding. ``summary`` is one line; ``present`` is True or
    False where the SR states a Present/Absent evaluation, else None."""

    summary: str
    present: bool | None = None
    probability: float | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    measurements: tuple[Measurement, ...] = ()
    evaluations: tuple[Evaluation, ...] = ()


def _code(concept) -> tuple[str, str]:
    return str(concept.scheme_designator), str(concept.value)


def read_finding(path: str | Path) -> Finding:
    """The finding of the SR file at ``path``.

    Raises
    ------
    OSError
        The file cannot be read.
    ValueError
        The file is not an SR highdicom reads as TID 1500
        (``highdicom.sr.srread`` errors are passed on as ValueError).
    """
    import highdicom as hd

    try:
        sr = hd.sr.srread(path)
        content: Any = sr.content  # a MeasurementReport for a TID 1500 SR
        groups = [
            *content.get_planar_roi_measurement_groups(),
            *content.get_volumetric_roi_measurement_groups(),
            *content.get_image_measurement_groups(),
        ]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a TID 1500 SR highdicom reads: {exc}") from exc
    measurements: list[Measurement] = []
    present = probability = None
    volumes: dict[str, float] = {}
    evaluations: list[str] = []
    judged: list[Evaluation] = []
    for group in groups:
        label = str(group.tracking_identifier or "")
        for m in group.get_measurements():
            measurements.append(Measurement(label, m.name.meaning, float(m.value), str(m.unit.value)))
            if _code(m.name) == PROBABILITY:
                probability = float(m.value)
            elif _code(m.name) == VOLUME and (found := _ABBREVIATION.search(label)):
                volumes[found.group(1)] = float(m.value)
        for q in group.get_qualitative_evaluations():
            meaning = str(q.value.meaning)
            judged.append(Evaluation(label, str(q.name.meaning), meaning))  # all of them, for the API
            if _code(q.name) in _CONTEXT:
                continue
            evaluations.append(f"{q.name.meaning} {meaning.lower()}")
            if meaning.lower() in ("present", "absent"):
                present = meaning.lower() == "present"
    return Finding(
        _summary(evaluations, probability, volumes), present, probability, volumes, tuple(measurements), tuple(judged)
    )


def _summary(evaluations: list[str], probability: float | None, volumes: dict[str, float]) -> str:
    parts = list(evaluations)
    if probability is not None:
        parts.append(f"p = {probability:.2f}")
    shown = [k for k in BRATS_SHOWN if k in volumes] or list(volumes)
    parts += [f"{k} {volumes[k]:.2f} ml" for k in shown]
    return ", ".join(parts) or "no measurement"


class FindingCache:
    """Findings by SR SOP Instance UID, at most ``size`` kept (least recently
    used dropped). A file that cannot be read gives a Finding saying so, not
    an error: the dashboard shows it and the log has the reason."""

    def __init__(self, size: int = 512):
        self.size = size
        self._items: OrderedDict[str, Finding] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sop_instance_uid: str, path: str | Path) -> Finding:
        with self._lock:
            if sop_instance_uid in self._items:
                self._items.move_to_end(sop_instance_uid)
                return self._items[sop_instance_uid]
        try:
            finding = read_finding(path)
        except (OSError, ValueError) as exc:
            log.warning("finding_unreadable", sop_instance_uid=sop_instance_uid, path=str(path), error=str(exc))
            return Finding("SR unreadable (see the log)")
        with self._lock:
            self._items[sop_instance_uid] = finding
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return finding
