"""The ``ainode`` command line (typer).

Every command takes ``--config`` (default ``config/node.toml``); environment
variables ``AINODE_<SECTION>__<KEY>`` override the file.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer

from node.config import DEFAULT_CONFIG_PATH, ConfigError, NodeConfig, load_config
from node.pipelines_cli import orthanc_routing, pipelines_app

app = typer.Typer(help="dicom-ai-node: a DICOM AI node.", no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Validate and show the configuration.", no_args_is_help=True)
models_app = typer.Typer(help="Model cards and weights.", no_args_is_help=True)
train_app = typer.Typer(help="Train demonstration weights on local data.", no_args_is_help=True)
tools_app = typer.Typer(help="Tools for building test studies.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(tools_app, name="tools")
app.add_typer(models_app, name="models")
app.add_typer(train_app, name="train")
app.add_typer(pipelines_app, name="pipelines")
app.command("orthanc-routing")(orthanc_routing)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML configuration file.")]

_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


def _config(path: Path | None) -> NodeConfig:
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _logging(config: NodeConfig, level: str | None = None) -> None:
    from node.log import configure_logging

    configure_logging(level or config.log.level, config.log.format)


def parse_peer(value: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` -> (ae_title, host, port).

    Raises
    ------
    typer.BadParameter
        The value is not of that form.
    """
    m = _PEER.match(value)
    if not m or not 0 < int(m["port"]) < 65536:
        raise typer.BadParameter(f"expected AE@HOST:PORT, got {value!r}")
    return m["ae"], m["host"], int(m["port"])


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the whole node in one process until SIGINT or SIGTERM."""
    from node.service import Node

    cfg = _config(config)
    _logging(cfg)
    import structlog

    for warning in cfg.warnings:
        structlog.get_logger("node.config").warning("config_warning", warning=warning)
    Node(cfg).serve_forever()


@app.command()
def echo(
    to: Annotated[str | None, typer.Option(help="AE@HOST:PORT; default: this node as configured.")] = None,
    destinations: Annotated[
        bool, typer.Option("--destinations", help="Check every destination instead, as its kind does (C-ECHO, QIDO-RS, a test write).")
    ] = False,
    calling_ae: Annotated[
        str | None, typer.Option(help="Our AE title; default AINODE_SCU, or [node] ae_title (as deliveries) with --destinations.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """C-ECHO a peer (Verification, PS3.4 Annex A), or check each destination.

    Exit status 1 if any check failed, else 0.
    """
    from node.destinations import DestinationContext
    from node.destinations import registry as destination_registry
    from node.destinations.dicom import c_echo

    cfg = _config(config)
    checks = []  # (label, target, check returning a node.outcome.Outcome)
    if destinations:
        for name, d in cfg.destinations.items():
            # Each kind checks itself: DICOM TLS destinations are echoed over TLS, with their own tls table.
            sender = destination_registry().sender(d, DestinationContext(name, calling_ae or cfg.node.ae_title))
            checks.append((f"{name} ({d.kind})", sender.target, sender.echo))
        if not checks:
            typer.echo("no destinations configured", err=True)
    else:
        if to:
            label, (ae_title, host, port) = to, parse_peer(to)
        elif not cfg.node.plain:
            typer.echo("the node listens for DICOM TLS only ([node] plain = false); echo it with --to from a TLS client", err=True)
            raise typer.Exit(2)
        else:
            host = "127.0.0.1" if cfg.node.bind_address in ("0.0.0.0", "::") else cfg.node.bind_address
            label, ae_title, port = "node", cfg.node.ae_title, cfg.node.port
        scu = calling_ae or "AINODE_SCU"
        checks.append((label, f"{ae_title}@{host}:{port}", lambda: c_echo(ae_title, host, port, calling_ae=scu, timeout=10)))
    failed = 0
    for label, target, check in checks:
        outcome = check()
        typer.echo(f"{label}: {target} {outcome.text}", err=not outcome.ok)
        failed += not outcome.ok
    raise typer.Exit(1 if failed else 0)


def _dicom_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise typer.BadParameter(f"{p} does not exist")
    return files


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (searched recursively).")],
    to: Annotated[str, typer.Option(help="AE@HOST:PORT of the Storage SCP.")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "AINODE_SCU",
) -> None:
    """C-STORE files to a peer on one association, like dcmtk's storescu.

    A file that cannot be read or encoded is reported as failed, with the
    reason, and the rest are sent. Exit status 1 if any file was not stored
    (Success or Warning, PS3.4 B.2.3) or the association failed, else 0.
    """
    from pynetdicom import AE

    from node.outcome import AssociationWatch
    from node.scu import read_header, store_file

    ae_title, host, port = parse_peer(to)
    failed = 0
    headers = []
    files = _dicom_files(paths)
    total = len(files)
    for f in files:
        ds, why = read_header(f)
        if why:
            typer.echo(f"{f}: failed: {why}", err=True)
            failed += 1
        else:
            headers.append((f, ds))
    if not headers:
        typer.echo("nothing to send", err=True)
        raise typer.Exit(1)
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
    contexts = defaultdict(set)
    for _, ds in headers:
        contexts[ds.SOPClassUID].add(ds.file_meta.TransferSyntaxUID)
    if len(contexts) > 128:
        typer.echo("more than 128 SOP classes: send in several runs", err=True)
        raise typer.Exit(2)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    watch = AssociationWatch(host, port, 60)
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=watch.handlers)
    failure = watch.explain(assoc)
    if failure is not None:
        typer.echo(f"association to {to} failed: {failure.reason} ({failure.outcome})", err=True)
        raise typer.Exit(1)
    try:
        for f, _ in headers:
            ok, text = store_file(assoc, f)
            failed += not ok
            typer.echo(f"{f}: {text}", err=not ok)
    finally:
        if assoc.is_established:
            assoc.release()
    if failed:
        typer.echo(f"{failed} of {total} files not stored", err=True)
    raise typer.Exit(1 if failed else 0)


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
            fate = {d.series_uid: d.role or (f"unused, identified as {d.identified}" if d.identified else "no role") for d in decisions + assigned}
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


@app.command("run")
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
        for ds in results:
            target = out / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
            ds.save_as(target, enforce_file_format=True)
            typer.echo(f"{target} ({ds.get('SeriesDescription', '')})")
        typer.echo(f"{label}: {len(results)} objects in {time.perf_counter() - t:.2f} s; stages {json.dumps({k: round(v, 3) for k, v in ctx.timings.items()})}")
    raise typer.Exit(status)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    limit: Annotated[int, typer.Option(help="How many recent jobs and deliveries.")] = 20,
    config: ConfigOpt = None,
) -> None:
    """Studies, jobs and deliveries, read from the index (works while the node is down)."""
    from node.index import Index
    from node.service import status_report

    cfg = _config(config)
    index = Index(cfg.storage.index_url)
    report = status_report(index, limit)
    index.close()
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    for name, by_state in report["counts"].items():
        typer.echo(f"{name:<11} " + ", ".join(f"{k}: {v}" for k, v in sorted(by_state.items())) if by_state else f"{name:<11} -")
    typer.echo("\nrecent jobs:")
    for j in report["jobs"]:
        typer.echo(f"  #{j['id']:<5} {j['pipeline']:<12} {j['state']:<14} series {j['series_uid']}  {j['error'] or ''}")
    typer.echo("\nrecent deliveries:")
    for d in report["deliveries"]:
        typer.echo(
            f"  #{d['id']:<5} job {d['job_id']:<5} -> {d['destination']:<12} {d['state']:<9} attempts {d['attempts']}  {d['last_error'] or ''}"
        )


jobs_app = typer.Typer(help="Jobs: queue failed ones again.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def _utc(value: str | None) -> dt.datetime | None:
    """ISO 8601 -> naive UTC (the index's clock); a time without an offset is UTC."""
    import datetime as dt

    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"--since: expected an ISO 8601 time such as 2025-01-31T08:00, got {value!r}") from None
    return t.astimezone(dt.UTC).replace(tzinfo=None) if t.tzinfo else t


def _os_user() -> str:
    import getpass
    import os

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (containers)
        return f"uid {os.getuid()}"


@jobs_app.command("retry")
def jobs_retry(
    job_ids: Annotated[list[int] | None, typer.Argument(help="Job ids; each may be failed or not_applicable.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every failed job (not_applicable ones only by id).")] = False,
    since: Annotated[str | None, typer.Option(help="With --failed: finished at or after this ISO 8601 time (UTC without an offset).")] = None,
    pipeline: Annotated[str | None, typer.Option(help="With --failed: only this pipeline's jobs.")] = None,
    by: Annotated[str | None, typer.Option(help="Who asks, recorded with the retry; default: the OS user.")] = None,
    reason: Annotated[str | None, typer.Option(help="Why, recorded with the retry.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Queue failed jobs again, attempts reset (a running node takes them within 1 s).

    Results get the same UIDs as a first run would have (deterministic
    UIDs), so a retry replaces rather than duplicates. Exit status 1 when a
    named job was not queued (unknown, or neither failed nor not_applicable).
    """
    from node.index import Index

    if not job_ids and not failed:
        typer.echo("name job ids, or --failed", err=True)
        raise typer.Exit(2)
    if (since or pipeline) and not failed:
        raise typer.BadParameter("--since and --pipeline select among --failed jobs")
    cfg = _config(config)
    index = Index(cfg.storage.index_url)
    try:
        queued, refused = index.retry_jobs(
            job_ids or (), failed=failed, since=_utc(since), pipeline=pipeline, by=by or _os_user(), reason=reason
        )
    finally:
        index.close()
    for job_id, why in refused.items():
        typer.echo(f"#{job_id}: not queued: {why}", err=True)
    typer.echo(f"queued again: {', '.join(f'#{i}' for i in queued)}" if queued else "no job queued again")
    raise typer.Exit(1 if refused else 0)


deliveries_app = typer.Typer(help="Deliveries: send results again.", no_args_is_help=True)
app.add_typer(deliveries_app, name="deliveries")


@deliveries_app.command("resend")
def deliveries_resend(
    delivery_ids: Annotated[list[int] | None, typer.Argument(help="Delivery ids, in any state.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every failed delivery.")] = False,
    destination: Annotated[str | None, typer.Option(help="With --failed: only to this destination.")] = None,
    since: Annotated[str | None, typer.Option(help="With --failed: last attempt at or after this ISO 8601 time (UTC without an offset).")] = None,
    by: Annotated[str | None, typer.Option(help="Who asks, recorded with the re-send; default: the OS user.")] = None,
    reason: Annotated[str, typer.Option(help="Why, recorded with the re-send.")] = "manual re-send",
    config: ConfigOpt = None,
) -> None:
    """Put deliveries back to pending, due now, for a new cycle of attempts.

    Earlier attempts stay in the index; the re-send is recorded (who, when,
    why) as a transition of each delivery. A running node sends them within
    about 1 s. A delivered result is sent again as the same file (same SOP
    Instance UID), which a PACS stores once. Exit status 1 when a named
    delivery does not exist, 2 on bad options.
    """
    from node.index import Index

    if bool(delivery_ids) == failed:
        typer.echo("name delivery ids, or --failed (not both)", err=True)
        raise typer.Exit(2)
    if (destination or since) and not failed:
        raise typer.BadParameter("--destination and --since select among --failed deliveries")
    cfg = _config(config)
    index = Index(cfg.storage.index_url)
    try:
        requeued, unknown = index.resend_deliveries(
            delivery_ids or (), failed=failed, destination=destination, since=_utc(since),
            by=by or _os_user(), reason=reason,
        )
        rows = [index.delivery(i) for i in requeued]
    except ValueError as exc:  # an empty --by or --reason
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    finally:
        index.close()
    for i in unknown:
        typer.echo(f"#{i}: no such delivery", err=True)
    for d in rows:  # queued all the same: the index records what was asked
        if d.destination not in cfg.destinations:
            typer.echo(f"#{d.id}: destination {d.destination!r} is not configured: the node will not send it", err=True)
        elif not Path(d.path).is_file():
            typer.echo(f"#{d.id}: result file missing ({d.path}): the attempt will fail", err=True)
    typer.echo(f"queued again: {', '.join(f'#{i}' for i in requeued)}" if requeued else "no delivery queued again")
    raise typer.Exit(1 if unknown else 0)


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="TOML configuration file.")]) -> None:
    """Validate FILE (and AINODE_* variables) and print the effective configuration."""
    cfg = _config(file)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
    for warning in cfg.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"{file}: valid", err=True)


@models_app.command("list")
def models_list(config: ConfigOpt = None) -> None:
    """List the model cards the node can load."""
    from models.registry import ModelRegistry

    cfg = _config(config)
    registry = ModelRegistry(cfg.models.card_dirs)
    for name in registry.names():
        card = registry.card(name)
        demo = " (demonstration only)" if card.demonstration_only else ""
        typer.echo(f"{name}  v{card.version}  {card.task}{demo}")


@models_app.command("import-xrv")
def models_import_xrv(
    src: Annotated[Path, typer.Argument(help="torchxrayvision's densenet121-res224-rsna weight file (.pt).")],
    out: Annotated[Path, typer.Option(help="Card folder to write to (list it in [models] card_dirs).")],
    name: Annotated[str, typer.Option(help="Card name.")] = "xrv-densenet121-res224-rsna",
) -> None:
    """Convert the published torchxrayvision RSNA weights into a state dict + model card, offline."""
    from models.xrv_import import import_xrv_weights

    card = import_xrv_weights(src, out, name=name)
    typer.echo(f"wrote {card}; set [models] card_dirs = [\"{out}\"] and [pipelines.pneumonia] model = \"{name}\"")


@models_app.command("import-bundle")
def models_import_bundle(
    bundle: Annotated[Path, typer.Argument(help="MONAI bundle folder (configs/metadata.json, configs/inference.json, models/model.pt).")],
    out: Annotated[Path, typer.Option(help="Card folder to write to (list it in [models] card_dirs).")],
    name: Annotated[str | None, typer.Option(help="Card name (brain_tumour: brats-mri-segmentation; "
                                             "bundle_segmentation: the folder's name).")] = None,
    pipeline: Annotated[str, typer.Option(help="Pipeline whose checks the bundle must pass: brain_tumour "
                                          "(BraTS) or bundle_segmentation (any single-input bundle).")] = "brain_tumour",
) -> None:
    """Write a model card for a MONAI bundle (e.g. brats_mri_segmentation), used in place, offline."""
    from models.bundle_import import IMPORTERS

    if pipeline not in IMPORTERS:
        raise typer.BadParameter(f"unknown pipeline {pipeline!r}; expected one of {sorted(IMPORTERS)}")
    try:
        card = IMPORTERS[pipeline](bundle, out, name=name)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {card}; set [models] card_dirs = [\"{out}\"] and [pipelines.{pipeline}] model = \"{card.stem}\"")


@train_app.command("pneumonia")
def train_pneumonia_cmd(
    data: Annotated[Path, typer.Option(help="cxr14 folder: labels.csv and images/*.png (read in place).")],
    out: Annotated[Path, typer.Option(help="Model root: writes weights/ and cards/ under it.")] = Path("models"),
    name: Annotated[str, typer.Option(help="Card name.")] = "pneumonia-densenet121-demo",
    version: Annotated[str, typer.Option(help="Card version.")] = "0.1.0",
    size: Annotated[int, typer.Option(help="Network input side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Seeds the split, initialisation, batches and augmentation.")] = 20250101,
    budget_min: Annotated[float, typer.Option(help="Wall-clock budget for both training stages, minutes.")] = 28.0,
    max_epochs_stage1: Annotated[int, typer.Option(help="Epoch limit of the multi-task stage.")] = 40,
    max_epochs_stage2: Annotated[int, typer.Option(help="Epoch limit of the pneumonia fine-tuning stage.")] = 30,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only N images (smoke runs).")] = None,
) -> None:
    """Train the pneumonia demonstration weights and write their model card.

    Reports the held-out AUROC with its 95 % bootstrap interval in the card.
    """
    import logging
    import shlex

    from pipelines.pneumonia.train import TrainConfig, train_pneumonia

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    command = "ainode " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = train_pneumonia(
        TrainConfig(
            data_dir=data, out_dir=out, name=name, version=version, size=size, seed=seed,
            time_budget_s=budget_min * 60, max_epochs_stage1=max_epochs_stage1,
            max_epochs_stage2=max_epochs_stage2, threads=threads, limit=limit, command=command,
        )
    )
    for m in result.card.metrics:
        ci = f" (95% CI {m.ci95_low:.3f}-{m.ci95_high:.3f})" if m.ci95_low is not None else ""
        typer.echo(f"{m.name} [{m.split.split(' (')[0]}]: {m.value:.3f}{ci}, n={m.n}")
    typer.echo(f"wrote {result.card_path} and {result.weights_path} in {result.wall_time_s / 60:.1f} min")


@train_app.command("brain-tumour", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_brain_tumour_cmd(ctx: typer.Context) -> None:
    """Train the brain tumour demonstration weights (SegResNet, BraTS labels) and write their model card.

    Takes the options of ``python -m pipelines.brain_tumour.train``, e.g.
    ``ainode train brain-tumour --data ../shared/data/brats/TCGA-FG-6692-preprocessed --out models``;
    ``python -m pipelines.brain_tumour.train --help`` lists them. Reports Dice TC/WT/ET on held-out
    data in the card.
    """
    from pipelines.brain_tumour.train import main as train_main

    raise typer.Exit(train_main(list(ctx.args)))


@tools_app.command("nifti-to-dicom")
def nifti_to_dicom_cmd(
    case_dir: Annotated[Path, typer.Argument(help="BraTS-style case folder: *-t1n/-t1c/-t2w/-t2f or *_t1/_t1c/_t2/_fla(ir) .nii.gz.")],
    out: Annotated[Path, typer.Option(help="Folder for the DICOM study (one subfolder per series).")],
    patient_name: Annotated[str, typer.Option(help="Patient's Name, PN: Family^Given.")] = "Phantom^Brain",
    patient_id: Annotated[str, typer.Option(help="Patient ID.")] = "BRATS0001",
    study_date: Annotated[str, typer.Option(help="Study Date, YYYYMMDD.")] = "20000101",
    config: ConfigOpt = None,
) -> None:
    """Turn a BraTS-style NIfTI case into a DICOM MR study of four series
    (T1, T1c, T2, FLAIR) with one Study Instance UID and Frame of Reference."""
    from pipelines.brain_tumour.convert import nifti_to_dicom

    cfg = _config(config)
    try:
        study = nifti_to_dicom(
            case_dir, out, patient_name=patient_name, patient_id=patient_id,
            uid_prefix=cfg.node.uid_prefix, study_date=study_date,
        )
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for role, series in study.series.items():
        typer.echo(f"{role:<6} {len(series.paths):>4} files  {series.paths[0].parent}")
    typer.echo(f"Study Instance UID {study.study_instance_uid}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
