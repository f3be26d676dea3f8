"""One replay run: list the source's studies into ``replay_studies``, then
for each study not finished yet fetch it into the work folder, run the
pipeline in-process as ``ainode run`` does (series-level: once per series;
study-level: once per study, roles by :func:`node.route.assign_roles`), and
send its results to the replay's own target. Nothing goes through the
node's spool, jobs, outbox or dispatch.

A study's outcome (:class:`node.index.replay.ReplayStudyState`): ``failed``
if fetching, any input's pipeline run, or a delivery failed; else ``done``
if some input gave results; else ``not_applicable``.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import structlog

from node.config import NodeConfig
from node.destinations.base import DestinationContext, DestinationKind
from node.destinations.folder import FolderDestination, FolderSender, path_component
from node.destinations.registry import registry as destination_registry
from node.index import Index
from node.index.replay import FINISHED, ReplayRunView, ReplayStudyState, ReplayStudyView
from node.replay.sources import FetchError, ReplayFilters, Source

log = structlog.get_logger("node.replay")


@dataclass(frozen=True)
class Target:
    """Where a replay's results go: ``label`` is recorded with the run."""

    label: str
    sender: DestinationKind


def make_target(config: NodeConfig, to: str | None, out: Path | None) -> Target:
    """The replay's target: configured destination ``to``, or folder ``out``
    (created; the ``folder`` kind's layout and atomic writes).

    Raises
    ------
    ValueError
        Neither or both given; ``to`` is not configured, takes no results
        (a webhook), or is named by a ``[[routes]]`` rule: a clinical
        destination, which replay never sends to.
    """
    if (to is None) == (out is None):
        raise ValueError("give one of --to DESTINATION or --out DIR")
    if out is not None:
        out = Path(out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        return Target(f"folder {out}", FolderSender(FolderDestination(kind="folder", path=out)))
    assert to is not None
    if to not in config.destinations:
        raise ValueError(f"--to {to}: no such destination; configured: {', '.join(config.destinations) or 'none'}")
    clinical = [r.name for r in config.routes if to in r.destinations]
    if clinical:
        raise ValueError(f"--to {to}: routes {', '.join(clinical)} send clinical results there; replay needs a destination of its own")
    sender = destination_registry().sender(config.destinations[to], DestinationContext(name=to, calling_ae=config.node.ae_title))
    if not sender.carries_results:
        raise ValueError(f"--to {to}: a {config.destinations[to].kind} destination takes notifications, not results")
    return Target(f"destination {to}", sender)


def run_key(source: Source, filters: ReplayFilters, pipeline: str, target: Target) -> str:
    """The digest by which the same replay finds its run again."""
    text = "\n".join((source.label, filters.to_json(), pipeline, target.label))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class StudyOutcome:
    state: ReplayStudyState
    reason: str | None = None
    instances: int = 0
    results: int = 0
    reasons: list[str] = field(default_factory=list)


class Replay:
    """Replays one run's pending (and failed) studies.

    ``say`` prints a line for the user (role decisions, results); ``limit``
    stops after that many studies (the others stay pending).
    """

    def __init__(self, config: NodeConfig, index: Index, source: Source, run: ReplayRunView, target: Target,
                 work_dir: Path, *, say: Callable[[str], None] = print):
        from node.run import PipelineCache
        from pipelines.registry import registry

        self.config, self.index, self.source, self.run, self.target = config, index, source, run, target
        self.work_dir = Path(work_dir) / f"run-{run.id}"
        self.say = say
        self.spec = registry().spec(run.pipeline)
        self.pipelines = PipelineCache(config)
        self.log = log.bind(replay_run=run.id, pipeline=run.pipeline)

    def todo(self) -> list[ReplayStudyView]:
        """The studies still to do: pending and failed (a failure may have been transient)."""
        return [s for s in self.index.replay_studies(self.run.id) if s.state not in FINISHED]

    def process(self, study_uid: str) -> StudyOutcome:
        """Fetch, run and deliver one study; record and return its outcome.
        An interrupt (KeyboardInterrupt) leaves it pending."""
        self.index.replay_study_started(self.run.id, study_uid)
        started = time.perf_counter()
        folder = self.work_dir / path_component(study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            outcome = self._process(study_uid, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        seconds = time.perf_counter() - started
        self.index.replay_study_finished(self.run.id, study_uid, outcome.state, outcome.reason,
                                         instances=outcome.instances, results=outcome.results, seconds=seconds)
        self.log.info("replay_study_finished", study_uid=study_uid, state=outcome.state, reason=outcome.reason,
                      results=outcome.results, seconds=round(seconds, 3))
        return outcome

    def _process(self, study_uid: str, folder: Path) -> StudyOutcome:
        try:
            paths = self.source.fetch(study_uid, folder)
        except FetchError as exc:
            return StudyOutcome(ReplayStudyState.FAILED, str(exc))
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for path in paths:
            try:
                ds = pydicom.dcmread(path)
                groups[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))].append(ds)
            except Exception as exc:  # a damaged instance: the study fails with the reason
                return StudyOutcome(ReplayStudyState.FAILED, f"cannot read {path.name}: {type(exc).__name__}: {exc}",
                                    len(paths))
        outcome = self._run_pipeline(groups, folder / "results")
        outcome.instances = len(paths)
        return outcome

    def _run_pipeline(self, groups: dict, results_dir: Path) -> StudyOutcome:
        from node.cli.run import _offline_studies
        from node.run import resolve_device
        from pipelines.base import PipelineContext, PipelineInputError, PipelineNotApplicable

        inputs, missing = _offline_studies(groups, self.config, self.run.pipeline, self.spec, [])
        outcome = StudyOutcome(ReplayStudyState.NOT_APPLICABLE)
        if missing:
            outcome.reasons.append(f"a sequence role of {self.run.pipeline} has no series (see the role decisions)")
        failed, written = [], []
        for label, study in inputs:
            ctx = PipelineContext(uid_prefix=self.config.node.uid_prefix, device=resolve_device(self.config.worker.device),
                                  precision=str(self.config.worker.precision),
                                  log=self.log.bind(study_uid=study.study_instance_uid, input=label))
            try:
                results = self.pipelines.get(self.run.pipeline).run(study, ctx)
            except PipelineNotApplicable as exc:
                outcome.reasons.append(f"{label}: {exc}")
                continue
            except PipelineInputError as exc:
                failed.append(f"{label}: {exc}")
                continue
            except Exception as exc:  # the pipeline's own fault: the replay goes on with the next study
                self.log.exception("replay_pipeline_failed", input=label)
                failed.append(f"{label}: {type(exc).__name__}: {exc}")
                continue
            results_dir.mkdir(parents=True, exist_ok=True)
            for derived in results:
                target = results_dir / f"{derived.Modality}_{path_component(derived.SOPInstanceUID)}.dcm"
                derived.save_as(target, enforce_file_format=True)
                written.append(target)
                self.say(f"  {label}: {derived.Modality} {derived.SOPInstanceUID} ({derived.get('SeriesDescription', '')})")
        if written:
            bad = [o for o in self.target.sender.send(written) if not o.ok]
            if bad:
                failed.append(f"delivery to {self.target.label}: {bad[0].error} ({len(bad)} of {len(written)} failed)")
        if failed:
            return StudyOutcome(ReplayStudyState.FAILED, "; ".join(failed), results=len(written))
        if written:
            return StudyOutcome(ReplayStudyState.DONE, None, results=len(written))
        outcome.reason = "; ".join(outcome.reasons) or "no input for the pipeline"
        return outcome
