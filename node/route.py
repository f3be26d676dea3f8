"""Route: match a complete series against the routing rules, queue jobs.

A rule (``[[routes]]``) matches when every attribute in its ``match`` table
matches the series' first instance (its header only: the pixel data is never
read here). A list accepts any of its values, case-insensitively, ``""``
standing for an absent or empty attribute; a string is a regular expression
searched case-insensitively. Matching on Modality and Body Part Examined, not
only on SOP Class, matters: RSNA-style chest radiographs arrive as Secondary
Capture with Modality CR.

Each matching rule becomes one queued job. A series no rule matches is kept as
``unmatched`` for ``unmatched_retention_hours``, then deleted.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from pydicom import Dataset

from node.config import MatchValue, NumericRange, Presence, RouteRule
from node.index import AssemblyState, Index, Series, SeriesState
from node.spool import read_header


def _text(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return [""]
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [str(value).strip()]
    return [str(v).strip() for v in value] or [""]


def attribute_matches(ds: Dataset, keyword: str, accepted: MatchValue) -> bool:
    """Whether ``ds.<keyword>`` satisfies ``accepted`` (see the module docstring).
    For multi-valued attributes, any value may match."""
    return values_match(_text(ds, keyword), accepted)


def values_match(values: Sequence[str], accepted: MatchValue) -> bool:
    """Whether the values of an attribute (as text, ``[""]`` when absent)
    satisfy ``accepted``; any value may match. :func:`attribute_matches`
    reads them from a dataset; :mod:`node.guard` also from derived values."""
    values = list(values) or [""]
    if isinstance(accepted, Presence):
        return any(values) == accepted.present
    if isinstance(accepted, NumericRange):
        numbers = []
        for v in values:
            try:
                numbers.append(float(v))
            except ValueError:
                continue
        return any(
            (accepted.min is None or x >= accepted.min) and (accepted.max is None or x <= accepted.max)
            for x in numbers
        )
    if isinstance(accepted, str):
        pattern = re.compile(accepted, re.IGNORECASE)
        return any(pattern.search(v) for v in values)
    wanted = {a.strip().upper() for a in accepted}
    return any(v.upper() in wanted for v in values)


def rule_matches(rule: RouteRule, ds: Dataset) -> bool:
    return all(attribute_matches(ds, kw, accepted) for kw, accepted in rule.match.items())


def _show(ds: Dataset, keyword: str) -> str:
    return "\\".join(_text(ds, keyword)) or "(absent)"


def classify_role(ds: Dataset, sequences: Mapping[str, Sequence[Mapping[str, MatchValue]]]) -> tuple[str | None, str]:
    """Which sequence role a series fills, and why.

    Roles are tried in the order of ``sequences``; within a role, the first
    rule whose every attribute matches decides. Returns (role, reason) or
    (None, reason) when no rule matched; the reason quotes the attributes.
    """
    for role, rules in sequences.items():
        for i, rule in enumerate(rules):
            if all(attribute_matches(ds, kw, accepted) for kw, accepted in rule.items()):
                shown = ", ".join(f"{kw}={_show(ds, kw)}" for kw in rule)
                return role, f"{role} rule {i + 1} matched: {shown}"
    keys = ("SeriesDescription", "ScanningSequence", "RepetitionTime", "EchoTime", "InversionTime", "ContrastBolusAgent")
    return None, "no sequence rule matched: " + ", ".join(f"{kw}={_show(ds, kw)}" for kw in keys)


def _acquired(series_header: Dataset) -> str:
    return f"{series_header.get('SeriesDate', '') or ''}{series_header.get('SeriesTime', '') or ''}"


@dataclass(frozen=True)
class SeriesCandidate:
    """A series offered for the sequence roles of a study-level pipeline.

    Attributes
    ----------
    series_uid:
        Series Instance UID (0020,000E).
    header:
        Its first instance, without pixel data.
    instance_count:
        How many instances it has.
    received_at:
        When its first instance arrived (UTC), the tie-break after Series
        Date/Time; ``None`` where unknown (files read offline).
    identified:
        ``(role, reason)`` as :func:`classify_role` decided when the series
        arrived (the node records it); ``None``: classify it here.
    """

    series_uid: str
    header: Dataset
    instance_count: int
    received_at: dt.datetime | None = None
    identified: tuple[str | None, str] | None = None


@dataclass(frozen=True)
class RoleDecision:
    """What became of one series: the role it was identified as, the role it
    fills (``None``: not used), and why, in the words the router logs."""

    series_uid: str
    description: str
    identified: str | None
    role: str | None
    reason: str


def pick_series(candidates: Sequence[SeriesCandidate]) -> tuple[SeriesCandidate, str]:
    """Choose one series among repeats that fill the same role: the later
    acquisition (Series Date/Time, else arrival), then the one with more
    instances, then the higher Series Number, then the UID. Returns it and why.

    Raises
    ------
    ValueError
        ``candidates`` is empty.
    """
    if not candidates:
        raise ValueError("pick_series: no candidate series")

    def key(c: SeriesCandidate):
        try:
            number = int(c.header.get("SeriesNumber") or 0)
        except (TypeError, ValueError):
            number = 0
        return (_acquired(c.header), c.received_at or dt.datetime.min, c.instance_count, number, c.series_uid)

    ranked = sorted(candidates, key=key, reverse=True)
    chosen = ranked[0]
    if len(ranked) == 1:
        return chosen, "only candidate"
    when = _acquired(chosen.header) or ("arrival order" if chosen.received_at else "no Series Date/Time")
    others = ", ".join(f"{c.series_uid} ({_show(c.header, 'SeriesDescription')}, {c.instance_count} instances)" for c in ranked[1:])
    return chosen, f"latest acquisition ({when}, {chosen.instance_count} instances) over {others}"


def assign_roles(
    candidates: Sequence[SeriesCandidate],
    required_roles: Sequence[str],
    sequences: Mapping[str, Sequence[Mapping[str, MatchValue]]],
    overrides: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], list[RoleDecision]]:
    """Assign the series of one study to the sequence roles of a study-level
    pipeline, as the node does (see "Study-level rules" in
    ``docs/architecture.md``): each series is identified by
    :func:`classify_role` (unless ``identified`` already says), repeats of a
    role are resolved by :func:`pick_series`.

    ``overrides`` maps a role to the Series Instance UID that fills it
    whatever the rules say; that series fills no other role.

    Returns
    -------
    ``(roles, decisions)``: role -> Series Instance UID for every required
    role some series fills (a missing role is absent), and one
    :class:`RoleDecision` per candidate, in the order given.

    Raises
    ------
    ValueError
        An override names a role not in ``required_roles``, a series not
        among ``candidates``, or one series for two roles.
    """
    overrides = dict(overrides or {})
    uids = [c.series_uid for c in candidates]
    for role, uid in overrides.items():
        if role not in required_roles:
            raise ValueError(f"role override {role}: not a required role; expected one of {list(required_roles)}")
        if uid not in uids:
            raise ValueError(f"role override {role}={uid}: no such series; the study has {', '.join(uids) or 'none'}")
    doubled = {uid for uid in overrides.values() if list(overrides.values()).count(uid) > 1}
    if doubled:
        raise ValueError(f"role overrides: series {', '.join(sorted(doubled))} given for more than one role")
    identified = {c.series_uid: c.identified or classify_role(c.header, sequences) for c in candidates}
    forced = {uid: role for role, uid in overrides.items()}
    roles = dict(overrides)
    why: dict[str, str] = {}
    for role in required_roles:
        if role in roles:
            continue
        matching = [c for c in candidates if c.series_uid not in forced and identified[c.series_uid][0] == role]
        if matching:
            chosen, why[role] = pick_series(matching)
            roles[role] = chosen.series_uid
    chosen_for = {uid: role for role, uid in roles.items()}
    decisions = []
    for c in candidates:
        found, reason = identified[c.series_uid]
        assigned = chosen_for.get(c.series_uid)
        if c.series_uid in forced:
            reason = f"{assigned} set by override (sequence rules: {reason})"
        elif assigned is not None:
            reason = f"{reason}; selected: {why[assigned]}"
        elif found in roles:
            reason = f"{reason}; not selected: {roles[found]} fills {found}"
        elif found is not None:
            reason = f"{reason}; {found} is not a required role"
        decisions.append(RoleDecision(c.series_uid, _show(c.header, "SeriesDescription"), found, assigned, reason))
    return {role: roles[role] for role in required_roles if role in roles}, decisions


#: Series states that never fill a role: gone, unrouted, roleless, or not yet routed.
_NOT_CANDIDATES = (SeriesState.PURGED, SeriesState.UNMATCHED, SeriesState.UNUSED, SeriesState.COMPLETE)


class Router:
    """Turns complete series into queued jobs, and complete studies into
    study-level jobs.

    Parameters
    ----------
    routes:
        The ``[[routes]]`` rules, in order.
    sequences:
        ``[sequences]``: role -> rules, for study-level rules.
    index:
        Where series are read and jobs written.
    on_queued:
        Called after jobs were queued, so the runner wakes at once.
    """

    def __init__(
        self,
        routes: Sequence[RouteRule],
        index: Index,
        on_queued: Callable[[], None] | None = None,
        sequences: Mapping[str, Sequence[Mapping[str, MatchValue]]] | None = None,
    ):
        self.routes = [r for r in routes if r.level == "series"]
        self.study_routes = {r.name: r for r in routes if r.level == "study"}
        self.sequences = sequences or {}
        self.index = index
        self.on_queued = on_queued
        self.log = structlog.get_logger("node.route")

    def route_series(self, series_uid: str) -> list[int]:
        """Queue a job per matching series rule and enrol the series in each
        matching study rule; returns the job ids queued now."""
        info = self.index.series_info(series_uid)
        paths = self.index.instance_paths(series_uid)
        if info is None or not paths:
            return []
        header = read_header(paths[0])
        log = self.log.bind(study_uid=info.study_uid, series_uid=series_uid)
        jobs = []
        for rule in self.routes:
            if rule_matches(rule, header):
                job_id = self.index.create_job(
                    pipeline=rule.pipeline,
                    route=rule.name,
                    level="series",
                    study_uid=info.study_uid,
                    series_uid=series_uid,
                    destinations=rule.destinations,
                )
                log.info("job_queued", job_id=job_id, route=rule.name, pipeline=rule.pipeline)
                jobs.append(job_id)
        enrolled = self._enrol(info, header, log)
        if jobs:
            if self.on_queued:
                self.on_queued()
        elif enrolled is not None:
            state = SeriesState.ASSIGNED if enrolled else SeriesState.UNUSED
            self.index.set_series_state(series_uid, state, "study-level rule", expect=SeriesState.COMPLETE)
        else:
            self.index.set_series_state(
                series_uid, SeriesState.UNMATCHED, "no routing rule matched", expect=SeriesState.COMPLETE
            )
            log.info(
                "series_unmatched",
                modality=_show(header, "Modality"),
                body_part=_show(header, "BodyPartExamined"),
                sop_class_uid=_show(header, "SOPClassUID"),
            )
        return jobs

    def _enrol(self, info: Series, header: Dataset, log) -> bool | None:
        """For study rules matching the series: record its sequence role and
        open the study's assembly. None: no study rule matched; False: matched
        but fills no role; True: fills a role."""
        matching = [r for r in self.study_routes.values() if rule_matches(r, header)]
        if not matching:
            return None
        role, reason = classify_role(header, self.sequences)
        self.index.set_series_role(info.series_uid, role, reason)
        log.info("sequence_identified", role=role, reason=reason, series_description=_show(header, "SeriesDescription"))
        for rule in matching:
            if self.index.open_assembly(info.study_uid, rule.name, f"series {info.series_uid} ({role or 'no role'})"):
                log.info("study_assembly_open", route=rule.name)
        return role is not None

    def candidates(self, study_uid: str, rule: RouteRule) -> tuple[dict[str, list[SeriesCandidate]], list[Series]]:
        """Complete series of the study per required role (as identified when
        each arrived), and the series of the study still receiving (which may
        fill a role yet)."""
        by_role: dict[str, list[SeriesCandidate]] = {role: [] for role in rule.required_roles}
        receiving = []
        for series in self.index.study_series(study_uid):
            if series.state == SeriesState.RECEIVING:
                receiving.append(series)
            elif series.role in by_role and series.state not in _NOT_CANDIDATES:
                paths = self.index.instance_paths(series.series_uid)
                if paths:
                    by_role[series.role].append(
                        SeriesCandidate(
                            series.series_uid, read_header(paths[0]), series.instance_count,
                            series.first_received_at, (series.role, series.role_reason or ""),
                        )
                    )
        return by_role, receiving

    def queue_study(self, study_uid: str, route: str) -> int:
        """Pick one series per role (:func:`assign_roles`) and queue the
        study-level job; a role no series fills any more (purged while the
        node was down) fails the study instead."""
        rule = self.study_routes[route]
        by_role, _ = self.candidates(study_uid, rule)
        log = self.log.bind(study_uid=study_uid, route=route)
        roles, decisions = assign_roles(
            [c for found in by_role.values() for c in found], rule.required_roles, self.sequences
        )
        missing = [role for role in rule.required_roles if role not in roles]
        if missing:
            return self.fail_study(study_uid, route, f"no complete series fills {', '.join(missing)}")
        for d in decisions:
            if d.role is not None:
                log.info("sequence_selected", role=d.role, series_uid=d.series_uid, reason=d.reason)
        job_id = self.index.create_job(
            pipeline=rule.pipeline,
            route=route,
            level="study",
            study_uid=study_uid,
            series_uid=None,
            destinations=rule.destinations,
            roles=roles,
        )
        log.info("job_queued", job_id=job_id, pipeline=rule.pipeline, roles=roles)
        if self.on_queued:
            self.on_queued()
        return job_id

    def fail_study(self, study_uid: str, route: str, reason: str) -> int:
        """Record the study's job as failed without running it: a study that
        never became complete must not be processed partially."""
        rule = self.study_routes[route]
        job_id = self.index.create_job(
            pipeline=rule.pipeline,
            route=route,
            level="study",
            study_uid=study_uid,
            series_uid=None,
            destinations=rule.destinations,
            failed_reason=reason,
        )
        self.index.set_assembly_state(study_uid, route, AssemblyState.FAILED, reason)
        self.log.warning("study_incomplete", study_uid=study_uid, route=route, job_id=job_id, reason=reason)
        return job_id
