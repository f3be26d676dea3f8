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

import re
from collections.abc import Callable, Mapping, Sequence

import structlog
from pydicom import Dataset

from node.config import MatchValue, NumericRange, Presence, RouteRule
from node.index import Index, Series
from node.spool import read_header


def _text(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return [""]
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [str(value).strip()]
    return [str(v).strip() for v in value] or [""]


def _numbers(ds: Dataset, keyword: str) -> list[float]:
    out = []
    for v in _text(ds, keyword):
        try:
            out.append(float(v))
        except ValueError:
            continue
    return out


def attribute_matches(ds: Dataset, keyword: str, accepted: MatchValue) -> bool:
    """Whether ``ds.<keyword>`` satisfies ``accepted`` (see the module docstring).
    For multi-valued attributes, any value may match."""
    if isinstance(accepted, Presence):
        return any(_text(ds, keyword)) == accepted.present
    if isinstance(accepted, NumericRange):
        return any(
            (accepted.min is None or x >= accepted.min) and (accepted.max is None or x <= accepted.max)
            for x in _numbers(ds, keyword)
        )
    values = _text(ds, keyword)
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


def pick_series(candidates: Sequence[tuple[Series, Dataset]]) -> tuple[Series, str]:
    """Choose one series among repeats that fill the same role: the later
    acquisition (Series Date/Time, else arrival), then the one with more
    instances, then the higher Series Number, then the UID. Returns it and why."""

    def key(c: tuple[Series, Dataset]):
        series, header = c
        try:
            number = int(header.get("SeriesNumber") or 0)
        except (TypeError, ValueError):
            number = 0
        return (_acquired(header), series.first_received_at, series.instance_count, number, series.series_uid)

    ranked = sorted(candidates, key=key, reverse=True)
    chosen = ranked[0][0]
    if len(ranked) == 1:
        return chosen, "only candidate"
    others = ", ".join(f"{s.series_uid} ({_show(h, 'SeriesDescription')}, {s.instance_count} instances)" for s, h in ranked[1:])
    return chosen, f"latest acquisition ({_acquired(ranked[0][1]) or 'arrival order'}, {chosen.instance_count} instances) over {others}"


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
            state = "assigned" if enrolled else "unused"
            self.index.set_series_state(series_uid, state, "study-level rule", expect="complete")
        else:
            self.index.set_series_state(series_uid, "unmatched", "no routing rule matched", expect="complete")
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

    def candidates(self, study_uid: str, rule: RouteRule) -> tuple[dict[str, list[tuple[Series, Dataset]]], list[Series]]:
        """Complete series of the study per required role, and the series of
        the study still receiving (which may fill a role yet)."""
        by_role: dict[str, list[tuple[Series, Dataset]]] = {role: [] for role in rule.required_roles}
        receiving = []
        for series in self.index.study_series(study_uid):
            if series.state == "receiving":
                receiving.append(series)
            elif series.role in by_role and series.state not in ("purged", "unmatched", "unused", "complete"):
                paths = self.index.instance_paths(series.series_uid)
                if paths:
                    by_role[series.role].append((series, read_header(paths[0])))
        return by_role, receiving

    def queue_study(self, study_uid: str, route: str) -> int:
        """Pick one series per role and queue the study-level job."""
        rule = self.study_routes[route]
        by_role, _ = self.candidates(study_uid, rule)
        log = self.log.bind(study_uid=study_uid, route=route)
        roles = {}
        for role, found in by_role.items():
            chosen, why = pick_series(found)
            roles[role] = chosen.series_uid
            log.info("sequence_selected", role=role, series_uid=chosen.series_uid, reason=why)
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
        self.index.set_assembly_state(study_uid, route, "failed", reason)
        self.log.warning("study_incomplete", study_uid=study_uid, route=route, job_id=job_id, reason=reason)
        return job_id
