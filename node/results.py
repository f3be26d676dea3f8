"""The values of a result SR (TID 1500 Measurement Report, PS3.16 A.35.1),
read back with highdicom for the operator's views: each numeric
measurement (TID 300: e.g. the pneumonia probability and its threshold, a
volume in ml) and each qualitative evaluation, per measurement group (TID
1410 planar ROI, TID 1411 volumetric ROI, TID 1501 image measurements)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd


def _group_name(group) -> str | None:
    name = group.tracking_identifier
    return None if name is None else str(name)


def sr_values(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(measurements, evaluations) of the SR at ``path``: each measurement
    ``{group, name, value, unit}`` (value a float in its UCUM ``unit``),
    each evaluation ``{group, name, value}`` (the coded value's meaning).

    Raises
    ------
    OSError, pydicom.errors.InvalidDicomError
        The file cannot be read or is not DICOM.
    ValueError
        It is not a Structured Report with a TID 1500 Measurement Report.
    """
    sr = hd.sr.srread(path)
    content = sr.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError(f"{path} holds no TID 1500 Measurement Report")
    groups = [
        *content.get_planar_roi_measurement_groups(),
        *content.get_volumetric_roi_measurement_groups(),
        *content.get_image_measurement_groups(),
    ]
    measurements, evaluations = [], []
    for group in groups:
        name = _group_name(group)
        for m in group.get_measurements():
            unit = m.unit.value if m.unit is not None else None
            measurements.append({"group": name, "name": m.name.meaning, "value": float(m.value), "unit": unit})
        for e in group.get_qualitative_evaluations():
            evaluations.append({"group": name, "name": e.name.meaning, "value": getattr(e.value, "meaning", str(e.value))})
    return measurements, evaluations
