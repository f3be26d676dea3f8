"""``ainode run``: a pipeline on files, offline, study-level roles assigned
as the node assigns them (:func:`node.route.assign_roles`)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config, _dicom_files, _logging
from node.config import NodeConfig


def _role_overrides(values: list[str], required: tuple[str, ...], pipeline: str) -> dict[str, str]:
    """``--role ROLE=SERIES_UID`` values -> {role: Series Instance UID}; the
    role's spelling is matched case-insensitively to ``required``.

    Raises
    ------
    typer.BadParameter
        Not ROLE=UID, a role ``pipeline`` does not read, a role given twice,
        or ``--role`` for a series-level pipeline.
    """
    if values and not required:
        raise typer.BadParameter(f"--role: {pipeline} is a series-level pipeline; it has no sequence roles")
    by_name = {r.upper(): r for r in required}
    overrides: dict[str, str] = {}
    for value in values:
        name, sep, uid = (part.strip() for part in value.partition("="))
        if not sep or not name or not uid:
            raise typer.BadParameter(f"--role: expected ROLE=SERIES_UID, got {value!r}")
        role = by_name.get(name.upper())
        if role is None:
            raise typer.BadParameter(f"--role {value}: unknown role {name!r}; {pipeline} reads {', '.join(required)}")
        if role in overrides:
            raise typer.BadParameter(f"--role: {role} given twice ({overrides[role]} and {uid})")
        overrides[role] = uid
    return overrides


def _study_route(cfg: NodeConfig, pipeline: str):
    """The first study-level route for ``pipeline``, or None."""
    return next((r for r in cfg.routes if r.pipeline == pipeline and r.level == "study"), None)


def _offline_studies(groups: dict, cfg: NodeConfig, pipeline: str, spec, role_values: list[str]):
    """The inputs of ``ainode run``: (label, Study) per series for a
    series-level pipeline; per study for a study-level one, its roles assigned
    by :func:`node.route.assign_roles` and each series' decision printed.
    ``spec`` is the pipeline's :class:`pipelines.spec.PipelineSpec`; its
    ``required_roles`` apply where no route for it gives them.
    Returns (inputs, 1 if a study lacks a role else 0).

    Raises
    ------
    typer.BadParameter
        A ``--role`` value is wrong or names a series not among the files.
    """
    from node.route import RoleDecision, SeriesCandidate, assign_roles, rule_matches
    from pipelines.base import Study

    rule = _study_route(cfg, pipeline) if spec.level == "study" else None
    required = tuple(rule.required_roles) if rule else spec.required_roles
    source = f"route {rule.name!r}" if rule else f"pipeline {pipeline}"
    overrides = _role_overrides(role_values, required, pipeline)
    if not required:
        return [(series_uid, Study(study_uid, {series_uid: datasets})) for (study_uid, series_uid), datasets in groups.items()], 0
    seen = [series_uid for _, series_uid in groups]
    for role, uid in overrides.items():
        if uid not in seen:
            raise typer.BadParameter(f"--role {role}={uid}: no such series among the files; series seen: {', '.join(seen)}")
    inputs, status = [], 0
    for study_uid in dict.fromkeys(study for study, _ in groups):
        series = {s: ds for (st, s), ds in groups.items() if st == study_uid}
        candidates, decisions = [], []
        for uid, datasets in series.items():
            # As in the node, only series the route matches are candidates; an override is taken as given.
            if rule and not rule_matches(rule, datasets[0]) and uid not in overrides.values():
                description = str(datasets[0].get("SeriesDescription", "") or "(absent)")
                decisions.append(RoleDecision(uid, description, None, None, f"does not match {source}"))
            else:
                candidates.append(SeriesCandidate(uid, datasets[0], len(datasets)))
        try:
            roles, assigned = assign_roles(candidates, required, cfg.sequences, {r: u for r, u in overrides.items() if u in series})
        except ValueError as exc:  # one series given for two roles
            raise typer.BadParameter(str(exc)) from None
        typer.echo(f"study {study_uid}: roles {', '.join(required)} ({source})")
        for d in decisions + assigned:
            typer.echo(f"  series {d.series_uid} {d.description!r}: {d.role or 'none'}: {d.reason}")
        missing = [r for r in required if r not in roles]
        if missing:
            fate = {
                d.series_uid: d.role or (f"unused, identified as {d.identified}" if d.identified else "no role")
                for d in decisions + assigned
            }
            listed = "; ".join(f"{d.series_uid} {d.description!r} ({fate[d.series_uid]})" for d in decisions + assigned)
            typer.echo(
                f"study {study_uid}: missing role {', '.join(missing)}: no series fills it "
                f"(name one with --role {missing[0]}=SERIES_UID); series seen: {listed}",
                err=True,
            )
            status = 1
            continue
        inputs.append((study_uid, Study(study_uid, {u: series[u] for u in dict.fromkeys(roles.values())}, roles)))
    return inputs, status


def run_offline(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name, e.g. pneumonia.")],
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders.")],
    out: Annotated[Path, typer.Option(help="Folder for the derived objects.")] = Path("out"),
    role: Annotated[
        list[str] | None,
        typer.Option("--role", help="ROLE=SERIES_UID: the series that fills ROLE, whatever [sequences] says (repeatable)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run a pipeline on files, offline, and write its outputs to a folder.

    A series-level pipeline runs once per series. A study-level pipeline runs
    once per study, its sequence roles assigned as the node assigns them
    (``[sequences]`` rules, the later acquisition among repeats; roles from
    the route for the pipeline, else the pipeline's own), each series'
    decision printed. Exit status 1 when a series' input is faulty or a study
    lacks a role; a series the pipeline does not read (a lateral view, say)
    is reported as not applicable, status 0."""
    import time

    import pydicom
    import structlog

    from node.run import PipelineCache, resolve_device
    from pipelines.base import PipelineContext, PipelineInputError, PipelineNotApplicable
    from pipelines.registry import registry

    cfg = _config(config)
    _logging(cfg, "WARNING")
    if pipeline not in registry():
        raise typer.BadParameter(registry().unknown(pipeline))
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for f in _dicom_files(paths):
        ds = pydicom.dcmread(f)
        groups[(ds.StudyInstanceUID, ds.SeriesInstanceUID)].append(ds)
    inputs, status = _offline_studies(groups, cfg, pipeline, registry().spec(pipeline), role or [])
    if not inputs:
        raise typer.Exit(status)
    runner = PipelineCache(cfg).get(pipeline)
    out.mkdir(parents=True, exist_ok=True)
    for label, study in inputs:
        ctx = PipelineContext(
            uid_prefix=cfg.node.uid_prefix,
            device=resolve_device(cfg.worker.device),
            precision=str(cfg.worker.precision),
            log=structlog.get_logger("ainode.run").bind(study_uid=study.study_instance_uid, input=label),
        )
        t = time.perf_counter()
        try:
            results = runner.run(study, ctx)
        except PipelineInputError as exc:
            typer.echo(f"{label}: {exc}", err=True)
            status = 1
            continue
        except PipelineNotApplicable as exc:  # valid input, not for this pipeline: not an error
            typer.echo(f"{label}: not applicable: {exc}", err=True)
            continue
        for derived in results:
            target = out / f"{derived.Modality}_{derived.SOPInstanceUID}.dcm"
            derived.save_as(target, enforce_file_format=True)
            typer.echo(f"{target} ({derived.get('SeriesDescription', '')})")
        stages = json.dumps({k: round(v, 3) for k, v in ctx.timings.items()})
        typer.echo(f"{label}: {len(results)} objects in {time.perf_counter() - t:.2f} s; stages {stages}")
    raise typer.Exit(status)
