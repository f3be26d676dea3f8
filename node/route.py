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
from collections.abc import Callable, Sequence

import structlog
from pydicom import Dataset

from node.config import MatchValue, RouteRule
from node.index import Index
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
    values = _text(ds, keyword)
    if isinstance(accepted, str):
        pattern = re.compile(accepted, re.IGNORECASE)
        return any(pattern.search(v) for v in values)
    wanted = {a.strip().upper() for a in accepted}
    return any(v.upper() in wanted for v in values)


def rule_matches(rule: RouteRule, ds: Dataset) -> bool:
    return all(attribute_matches(ds, kw, accepted) for kw, accepted in rule.match.items())


class Router:
    """Turns complete series into queued jobs.

    Parameters
    ----------
    routes:
        The ``[[routes]]`` rules, in order.
    index:
        Where series are read and jobs written.
    on_queued:
        Called after jobs were queued, so the runner wakes at once.
    """

    def __init__(self, routes: Sequence[RouteRule], index: Index, on_queued: Callable[[], None] | None = None):
        self.routes = [r for r in routes if r.level == "series"]
        self.index = index
        self.on_queued = on_queued
        self.log = structlog.get_logger("node.route")

    def route_series(self, series_uid: str) -> list[int]:
        """Queue a job per matching rule; returns the job ids."""
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
        if jobs:
            self.index.set_series_state(series_uid, "queued", f"{len(jobs)} job(s)", expect="complete")
            if self.on_queued:
                self.on_queued()
        else:
            self.index.set_series_state(series_uid, "unmatched", "no routing rule matched", expect="complete")
            log.info(
                "series_unmatched",
                modality=str(header.get("Modality", "")),
                body_part=str(header.get("BodyPartExamined", "")),
                sop_class_uid=str(header.get("SOPClassUID", "")),
            )
        return jobs
