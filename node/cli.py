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

app = typer.Typer(help="dicom-ai-node: a DICOM AI node.", no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Validate and show the configuration.", no_args_is_help=True)
models_app = typer.Typer(help="Model cards and weights.", no_args_is_help=True)
train_app = typer.Typer(help="Train demonstration weights on local data.", no_args_is_help=True)
tools_app = typer.Typer(help="Tools for building test studies.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(tools_app, name="tools")
app.add_typer(models_app, name="models")
app.add_typer(train_app, name="train")

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
    Node(cfg).serve_forever()


@app.command()
def echo(
    to: Annotated[str | None, typer.Option(help="AE@HOST:PORT; default: this node as configured.")] = None,
    destinations: Annotated[bool, typer.Option("--destinations", help="Echo every DICOM destination instead.")] = False,
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "AINODE_SCU",
    config: ConfigOpt = None,
) -> None:
    """C-ECHO a peer (Verification, PS3.4 Annex A)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    cfg = _config(config)
    if destinations:
        peers = [
            (name, d.ae_title, d.host, d.port) for name, d in cfg.destinations.items() if d.kind == "dicom"
        ]
    elif to:
        peers = [(to, *parse_peer(to))]
    else:
        host = "127.0.0.1" if cfg.node.bind_address in ("0.0.0.0", "::") else cfg.node.bind_address
        peers = [("node", cfg.node.ae_title, host, cfg.node.port)]
    failed = 0
    for label, ae_title, host, port in peers:
        ae = AE(ae_title=calling_ae)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
        assoc = ae.associate(host, port, ae_title=ae_title)
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            code = int(status.Status) if status and "Status" in status else None
            ok = code == 0
            typer.echo(f"{label}: {ae_title}@{host}:{port} C-ECHO status {'0x%04X' % code if code is not None else 'none'}")
        else:
            ok = False
            why = "rejected" if assoc.is_rejected else "no association"
            typer.echo(f"{label}: {ae_title}@{host}:{port} {why}", err=True)
        failed += not ok
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
    """C-STORE files to a peer on one association, like dcmtk's storescu."""
    import pydicom
    from pynetdicom import AE

    ae_title, host, port = parse_peer(to)
    files = _dicom_files(paths)
    datasets = []
    for f in files:
        try:
            datasets.append((f, pydicom.dcmread(f, stop_before_pixels=True)))
        except Exception as exc:
            typer.echo(f"skip {f}: not DICOM ({exc})", err=True)
    if not datasets:
        typer.echo("nothing to send", err=True)
        raise typer.Exit(1)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
    contexts = defaultdict(set)
    for _, ds in datasets:
        contexts[ds.SOPClassUID].add(ds.file_meta.TransferSyntaxUID)
    if len(contexts) > 128:
        typer.echo("more than 128 SOP classes: send in several runs", err=True)
        raise typer.Exit(2)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        typer.echo(f"association to {to} failed", err=True)
        raise typer.Exit(1)
    failed = 0
    try:
        for f, _ in datasets:
            status = assoc.send_c_store(f)
            code = int(status.Status) if status and "Status" in status else None
            ok = code is not None and (code == 0 or code & 0xF000 == 0xB000)
            failed += not ok
            typer.echo(f"{f}: {'0x%04X' % code if code is not None else 'no response'}")
    finally:
        if assoc.is_established:
            assoc.release()
    raise typer.Exit(1 if failed else 0)


@app.command("run")
def run_offline(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name, e.g. pneumonia.")],
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders.")],
    out: Annotated[Path, typer.Option(help="Folder for the derived objects.")] = Path("out"),
    config: ConfigOpt = None,
) -> None:
    """Run a pipeline on files, offline, and write its outputs to a folder."""
    import time

    import pydicom
    import structlog

    from node.run import PipelineCache, resolve_device
    from pipelines import PIPELINES
    from pipelines.base import PipelineContext, PipelineInputError, Study

    cfg = _config(config)
    _logging(cfg, "WARNING")
    if pipeline not in PIPELINES:
        raise typer.BadParameter(f"unknown pipeline {pipeline!r}; expected one of {sorted(PIPELINES)}")
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for f in _dicom_files(paths):
        ds = pydicom.dcmread(f)
        groups[(ds.StudyInstanceUID, ds.SeriesInstanceUID)].append(ds)
    runner = PipelineCache(cfg).get(pipeline)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for (study_uid, series_uid), datasets in groups.items():
        ctx = PipelineContext(
            uid_prefix=cfg.node.uid_prefix,
            device=resolve_device(cfg.worker.device),
            log=structlog.get_logger("ainode.run").bind(series_uid=series_uid),
        )
        t = time.perf_counter()
        try:
            results = runner.run(Study(study_uid, {series_uid: datasets}), ctx)
        except PipelineInputError as exc:
            typer.echo(f"{series_uid}: {exc}", err=True)
            status = 1
            continue
        for ds in results:
            target = out / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
            ds.save_as(target, enforce_file_format=True)
            typer.echo(f"{target} ({ds.get('SeriesDescription', '')})")
        typer.echo(f"{series_uid}: {len(results)} objects in {time.perf_counter() - t:.2f} s; stages {json.dumps({k: round(v, 3) for k, v in ctx.timings.items()})}")
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
        typer.echo(f"  #{j['id']:<5} {j['pipeline']:<12} {j['state']:<8} series {j['series_uid']}  {j['error'] or ''}")
    typer.echo("\nrecent deliveries:")
    for d in report["deliveries"]:
        typer.echo(
            f"  #{d['id']:<5} job {d['job_id']:<5} -> {d['destination']:<12} {d['state']:<9} attempts {d['attempts']}  {d['last_error'] or ''}"
        )


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="TOML configuration file.")]) -> None:
    """Validate FILE (and AINODE_* variables) and print the effective configuration."""
    cfg = _config(file)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
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
    name: Annotated[str, typer.Option(help="Card name.")] = "brats-mri-segmentation",
) -> None:
    """Write a model card for a MONAI bundle (e.g. brats_mri_segmentation), used in place, offline."""
    from models.bundle_import import import_monai_bundle

    try:
        card = import_monai_bundle(bundle, out, name=name)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {card}; set [models] card_dirs = [\"{out}\"] and [pipelines.brain_tumour] model = \"{name}\"")


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
