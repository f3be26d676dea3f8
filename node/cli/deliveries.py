"""``ainode deliveries resend``: put deliveries back to pending."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config, _os_user, _utc

deliveries_app = typer.Typer(help="Deliveries: send results again.", no_args_is_help=True)


@deliveries_app.command("resend")
def deliveries_resend(
    delivery_ids: Annotated[list[int] | None, typer.Argument(help="Delivery ids, in any state.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every failed delivery.")] = False,
    destination: Annotated[str | None, typer.Option(help="With --failed: only to this destination.")] = None,
    since: Annotated[
        str | None, typer.Option(help="With --failed: last attempt at or after this ISO 8601 time (UTC without an offset).")
    ] = None,
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
    index = Index(cfg.storage.engine_url())
    try:
        requeued, unknown = index.resend_deliveries(
            delivery_ids or (), failed=failed, destination=destination, since=_utc(since),
            by=by or _os_user(), reason=reason,
        )
        rows = [d for i in requeued if (d := index.delivery(i)) is not None]
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
