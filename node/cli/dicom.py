"""``ainode echo`` (C-ECHO, or a check of each destination) and ``ainode send``
(C-STORE SCU, :mod:`node.scu`)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config, _dicom_files, parse_peer


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
    from node.destinations.dicom import c_echo
    from node.destinations.registry import registry as destination_registry

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
        if ds is None:
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
