"""``ainode audit``: the audit trail, read from the index (:mod:`node.index.audit`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config, _utc


def audit_trail(
    since: Annotated[str | None, typer.Option(help="Events at or after this ISO 8601 time (UTC without an offset).")] = None,
    study: Annotated[str | None, typer.Option(help="Only this Study Instance UID's events.")] = None,
    event: Annotated[str | None, typer.Option(help="Only this event, e.g. operator_action, job_finished.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON array.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, the latest.")] = 100,
    config: ConfigOpt = None,
) -> None:
    """Audit events (associations, instances, jobs, deliveries, operator
    actions, configuration loaded), oldest first of the latest --limit;
    works while the node is down. Exit status 2 for an unknown --event."""
    from node.index import AuditEvent, Index

    if event is not None and event not in set(AuditEvent):
        raise typer.BadParameter(f"--event: expected one of {', '.join(AuditEvent)}, got {event!r}")
    cfg = _config(config)
    index = Index(cfg.storage.engine_url())
    try:
        rows = [r.as_dict() for r in index.audit_events(since=_utc(since), study_uid=study, event=event, limit=limit)]
    finally:
        index.close()
    rows.reverse()  # newest first from the index; a trail reads oldest first
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        who = " ".join(f"{k}={r[k]}" for k in ("actor", "client", "study_uid") if r[k])
        typer.echo(f"{r['at']}  {r['event']:<21} {who}  {json.dumps(r['details'], sort_keys=True)}")
