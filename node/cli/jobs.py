"""``ainode jobs retry``: queue failed jobs again."""

from __future__ import annotations

from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config, _os_user, _utc

jobs_app = typer.Typer(help="Jobs: queue failed ones again.", no_args_is_help=True)


@jobs_app.command("retry")
def jobs_retry(
    job_ids: Annotated[list[int] | None, typer.Argument(help="Job ids; each may be failed or not_applicable.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every failed job (not_applicable ones only by id).")] = False,
    since: Annotated[
        str | None, typer.Option(help="With --failed: finished at or after this ISO 8601 time (UTC without an offset).")
    ] = None,
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
    index = Index(cfg.storage.engine_url())
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
