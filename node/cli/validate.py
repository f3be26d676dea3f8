"""``ainode validate``: a pipeline scored on the site's own labelled cases
before go-live (:mod:`node.validate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config, _logging


def _replay_into(source: str, pipeline: str, out: Path, cfg, new_run: bool) -> None:
    """Replay SOURCE through ``pipeline`` into the folder ``out`` as ``ainode
    replay`` does (resumable; C-GET for a DICOM peer), recording the source
    headers beside the results."""
    from node.cli.replay import DEFAULT_AE, FetchMode, _loop, _run, _source, _summary
    from node.index import Index
    from node.replay import FetchError, Replay, ReplayFilters, make_target, run_key
    from node.validate.cases import RecordingSource

    target = make_target(cfg, None, out)
    work = (cfg.storage.spool_dir.parent / "replay").resolve()
    src = RecordingSource(_source(source, cfg, FetchMode.GET, DEFAULT_AE, None, None, "0.0.0.0"), out)
    filters = ReplayFilters()
    index = Index(cfg.storage.engine_url())
    run = None
    try:
        run = _run(index, run_key(src, filters, pipeline, target), None, new_run, src, filters, pipeline, target)
        try:
            index.replay_add_studies(run.id, ((s.study_uid, s.study_date, "\\".join(s.modalities)[:64] or None)
                                              for s in src.list_studies(filters)))
        except FetchError as exc:
            typer.echo(f"cannot list {src.label}: {exc}", err=True)
            raise typer.Exit(1) from None
        job = Replay(cfg, index, src, run, target, work, say=lambda _line: None)
        if _loop(job, job.todo()):
            raise typer.Exit(130)
    finally:
        src.close()
        if run is not None:
            _summary(index, run, False)
        index.close()


def validate(
    source: Annotated[str | None, typer.Argument(help="A folder, DICOMweb root or AE@HOST:PORT to replay.")] = None,
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="Pipeline name, e.g. pneumonia.")] = "",
    labels: Annotated[Path, typer.Option("--labels", help="CSV: an identifier column and label.")] = Path(),
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the replay's results (and the report).")] = None,
    results: Annotated[Path | None, typer.Option("--results", help="Score an earlier replay's results folder instead.")] = None,
    threshold: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Your own threshold, besides the card's.")] = None,
    include_leaked: Annotated[bool, typer.Option("--include-leaked", help="Keep cases the model was trained or validated on.")] = False,
    report_dir: Annotated[Path | None, typer.Option(help="Where the report goes (default: the results folder).")] = None,
    new_run: Annotated[bool, typer.Option("--new-run", help="Replay afresh even if the same replay ran before.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Score a pipeline against your own ground truth: replay SOURCE into --out
    (or read --results), match the results to --labels, exclude the model's
    training and validation cases, and write validation-report.html and
    validation-report.json. Exit status 2 for bad input."""
    from node.validate.evaluate import evaluate
    from node.validate.report import write_report
    from pipelines.registry import registry

    cfg = _config(config)
    _logging(cfg, "WARNING")
    if pipeline not in registry():
        raise typer.BadParameter(registry().unknown(pipeline) if pipeline else "--pipeline is required")
    if (source is None) == (results is None):
        raise typer.BadParameter("give SOURCE with --out, or --results DIR")
    if source is not None:
        if out is None:
            raise typer.BadParameter("SOURCE needs --out DIR for the results")
        _replay_into(source, pipeline, out.resolve(), cfg, new_run)
        results = out.resolve()
    assert results is not None
    if not results.is_dir():
        raise typer.BadParameter(f"--results {results}: not a folder")
    from node.cli.common import DEFAULT_CONFIG_PATH

    config_path = Path(config) if config else DEFAULT_CONFIG_PATH
    try:
        report = evaluate(results, pipeline, labels, cfg, config_path if config_path.is_file() else None,
                          threshold=threshold, include_leaked=include_leaked)
    except (OSError, ValueError) as exc:
        typer.echo(f"cannot validate: {exc}", err=True)
        raise typer.Exit(2) from None
    json_path, html_path = write_report(report, report_dir or results)
    _say(report)
    typer.echo(f"report: {html_path}\nfigures: {json_path}")


def _say(report: dict) -> None:
    leak = report["leakage"]
    typer.echo(f"{report['pipeline']}: model {report['model']['card']} {report['model']['version']}; "
               f"scored {report['n_scored']} {report['unit']}; {len(leak['cases'])} training/validation case(s) "
               + ("included" if leak["included"] else "excluded"))
    if "classification" in report:
        a = report["classification"]["auroc"]
        typer.echo(f"AUROC {a['value']} (95 % CI {a['ci95_low']}-{a['ci95_high']}), n = {report['classification']['n']}, "
                   f"positives {report['classification']['n_positive']}")
    for region, block in report.get("segmentation", {}).get("per_region", {}).items():
        typer.echo(f"{region}: Dice {block['dice']['mean']} HD95 {block['hd95_mm']['mean']} mm")
