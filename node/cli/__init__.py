"""The ``ainode`` command line (typer).

Every command takes ``--config`` (default ``config/node.toml``); environment
variables ``AINODE_<SECTION>__<KEY>`` override the file.

One module per command or sub-app; this one puts them together on
:data:`app` (pyproject's ``ainode = "node.cli:app"``), in the order
``ainode --help`` lists them.
"""

from __future__ import annotations

import sys

import typer

from node.cli.audit import audit_trail
from node.cli.common import _config, parse_peer
from node.cli.deliveries import deliveries_app
from node.cli.dicom import echo, send
from node.cli.jobs import jobs_app
from node.cli.main import config_app, serve, status
from node.cli.models import models_app, train_app
from node.cli.pipelines import orthanc_routing, pipelines_app
from node.cli.replay import replay
from node.cli.run import run_offline
from node.cli.tools import tools_app
from node.cli.validate import validate
from node.cli.worker import worker

__all__ = ["_config", "app", "main", "parse_peer"]

app = typer.Typer(help="dicom-ai-node: a DICOM AI node.", no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(config_app, name="config")
app.add_typer(tools_app, name="tools")
app.add_typer(models_app, name="models")
app.add_typer(train_app, name="train")
app.add_typer(pipelines_app, name="pipelines")
app.command("orthanc-routing")(orthanc_routing)
app.command()(serve)
app.command()(worker)
app.command()(echo)
app.command()(send)
app.command("run")(run_offline)
app.command()(replay)
app.command()(validate)
app.command()(status)
app.add_typer(jobs_app, name="jobs")
app.add_typer(deliveries_app, name="deliveries")
app.command("audit")(audit_trail)


def main() -> None:  # pragma: no cover
    sys.exit(app())
