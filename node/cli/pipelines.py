"""``ainode pipelines list`` and ``ainode orthanc-routing``: the registered
pipelines (:mod:`pipelines.registry`) and the Orthanc routing rules made
from the routes. Registered on the main app by :mod:`node.cli`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from node.cli.common import _config

pipelines_app = typer.Typer(help="Pipelines this node can run: built-in and plug-ins.", no_args_is_help=True)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(?:[a-z_]\w*\.)+(?=[A-Za-z_])", "", str(annotation))  # typing.Literal -> Literal


def settings_fields(settings: type[BaseModel]) -> list[dict[str, Any]]:
    """Field, type, default and description of each field of a settings model."""
    out = []
    for name, info in settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        out.append({
            "field": name,
            "type": _type_name(info.annotation),
            "default": default.model_dump(mode="json") if hasattr(default, "model_dump") else default,
            "description": info.description or "",
        })
    return out


def _describe(registered) -> dict[str, Any]:
    spec = registered.spec
    return {
        "name": spec.name,
        "origin": registered.origin,
        "source": registered.source,
        "class": spec.pipeline_class,
        "level": str(spec.level),
        "required_roles": list(spec.required_roles),
        "modalities": list(spec.modalities),
        "description": spec.description,
        "settings": settings_fields(spec.settings),
    }


@pipelines_app.command("list")
def pipelines_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Each registered pipeline: where it came from (built-in or the entry
    point's distribution), level, roles, Modalities and its
    ``[pipelines.<name>]`` settings. Exit status 1 when a plug-in could not
    be registered (the reason is printed)."""
    from pipelines.registry import registry

    reg = registry()
    described = [_describe(r) for r in reg.pipelines.values()]
    if as_json:
        typer.echo(json.dumps({"pipelines": described, "errors": list(reg.errors)}, indent=2, default=str))
    for d in [] if as_json else described:
        typer.echo(f"{d['name']}  ({d['origin']}: {d['source']})")
        if d["description"]:
            typer.echo(f"  {d['description']}")
        typer.echo(f"  class       {d['class']}")
        typer.echo(f"  level       {d['level']}" + (f"; roles {', '.join(d['required_roles'])}" if d["required_roles"] else ""))
        typer.echo(f"  modalities  {', '.join(d['modalities']) or 'any'}")
        typer.echo(f"  settings    [pipelines.{d['name']}]" + ("" if d["settings"] else " (none)"))
        for f in d["settings"]:
            typer.echo(f"    {f['field']}: {f['type']} = {json.dumps(f['default'], default=str)}  {f['description']}".rstrip())
    for error in reg.errors:
        typer.echo(f"not registered: {error}", err=True)
    if reg.errors:
        raise typer.Exit(1)


def orthanc_routing(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML configuration file.")] = None,
    modality: Annotated[str, typer.Option(help="The node's name under Orthanc's DicomModalities.")] = "AINODE",
) -> None:
    """Print the "AinodeRouting" section deploy/orthanc/autoroute.lua reads,
    made from the [[routes]]: paste it into orthanc.json, or save it as a
    .json file of its own in Orthanc's configuration folder."""
    from node.orthanc_routing import routing_section

    typer.echo(json.dumps(routing_section(_config(config), modality), indent=2))
