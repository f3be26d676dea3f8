"""``ainode serve``, ``ainode status`` and ``ainode config check``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config, _logging

config_app = typer.Typer(help="Validate and show the configuration.", no_args_is_help=True)


def serve(config: ConfigOpt = None) -> None:
    """Run the whole node in one process until SIGINT or SIGTERM."""
    from node.service import Node

    cfg = _config(config)
    _logging(cfg)
    import structlog

    for warning in cfg.warnings:
        structlog.get_logger("node.config").warning("config_warning", warning=warning)
    Node(cfg).serve_forever()


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    limit: Annotated[int, typer.Option(help="How many recent jobs and deliveries.")] = 20,
    config: ConfigOpt = None,
) -> None:
    """Studies, jobs and deliveries, read from the index (works while the node is down)."""
    from node.index import Index
    from node.service import status_report

    cfg = _config(config)
    index = Index(cfg.storage.engine_url())
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
            f"  #{d['id']:<5} job {d['job_id']:<5} -> {d['destination']:<12} {d['state']:<9} "
            f"attempts {d['attempts']}  {d['last_error'] or ''}"
        )


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="TOML configuration file.")]) -> None:
    """Validate FILE (and AINODE_* variables) and print the effective configuration."""
    cfg = _config(file)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
    for warning in cfg.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"{file}: valid", err=True)
