"""The ``AinodeRouting`` section Orthanc's ``deploy/orthanc/autoroute.lua`` reads.

The Lua script holds no rule of its own: it reads this section of the
Orthanc configuration (``GetOrthancConfiguration()``) and forwards a stable
series that a series rule matches, and the series of a stable study that a
study rule matches. ``ainode orthanc-routing`` writes the section from the
node's ``[[routes]]``, so adding a pipeline and its route never needs a Lua
edit.

Orthanc sees only its main DICOM tags of a series (PS3.3 attributes Orthanc
indexes, e.g. Modality, Body Part Examined, Series Description), and Lua
has no Python regular expressions. So a rule keeps a route's list-valued
criteria on those tags; every other criterion (regular expression, range,
presence, another attribute) is left to the node, which matches again
exactly, and is listed under ``"Unchecked"`` for the reader. Orthanc thus
forwards a superset of what the routes take, never less.
"""

from __future__ import annotations

from typing import Any

from node.config import NodeConfig

#: The Orthanc configuration key the Lua script reads.
SECTION = "AinodeRouting"

#: Series-level main DICOM tags of Orthanc 1.10 (``DicomMap``) holding text a list can match.
ORTHANC_SERIES_TAGS = frozenset({
    "Modality",
    "Manufacturer",
    "StationName",
    "SeriesDescription",
    "BodyPartExamined",
    "SequenceName",
    "ProtocolName",
    "OperatorsName",
    "PerformedProcedureStepDescription",
    "AcquisitionDeviceProcessingDescription",
    "ContrastBolusAgent",
})


def _rule(route) -> dict[str, Any]:
    match: dict[str, list[str]] = {}
    unchecked: list[str] = []
    for keyword, accepted in route.match.items():
        if isinstance(accepted, list) and keyword in ORTHANC_SERIES_TAGS:
            match[keyword] = [a.strip().upper() for a in accepted]
        else:
            why = "not an Orthanc series tag" if keyword not in ORTHANC_SERIES_TAGS else "not a list of values"
            unchecked.append(f"{keyword} ({why})")
    rule: dict[str, Any] = {"Route": route.name, "Pipeline": route.pipeline, "Match": match}
    if unchecked:
        rule["Unchecked"] = unchecked
    return rule


def routing_section(config: NodeConfig, modality: str = "AINODE") -> dict[str, Any]:
    """``{"AinodeRouting": {...}}`` for ``config``'s routes.

    ``modality`` is the node's name under Orthanc's ``DicomModalities``.
    ``"Series"`` holds the series-level routes, ``"Study"`` the study-level
    ones; each rule's ``"Match"`` maps a tag to accepted values (upper case;
    ``""`` accepts an absent or empty tag), all of which must match.
    """
    series = [_rule(r) for r in config.routes if r.level == "series"]
    study = [_rule(r) for r in config.routes if r.level == "study"]
    return {SECTION: {"Modality": modality, "Series": series, "Study": study}}
