"""What the ``ainode`` commands share: ``--config``, reading the configuration,
logging, ``AE@HOST:PORT`` peers, file lists and ``--since`` times."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated

import typer

from node.config import DEFAULT_CONFIG_PATH, ConfigError, NodeConfig, load_config

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


def _utc(value: str | None) -> dt.datetime | None:
    """ISO 8601 -> naive UTC (the index's clock); a time without an offset is UTC."""
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
