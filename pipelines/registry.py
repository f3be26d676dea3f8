"""Which pipelines this node can run: the built-ins and the plug-ins.

Two sources, both read without importing any pipeline's code (only its
:class:`~pipelines.spec.PipelineSpec` and settings model):

- built-in: every subpackage of ``pipelines`` with a ``spec`` module holding
  ``SPEC`` (found with :func:`pkgutil.iter_modules`); the spec's name must be
  the package's;
- plug-in: every entry point of the group ``ainode.pipelines``
  (:func:`importlib.metadata.entry_points`), named as the pipeline and
  pointing at a ``PipelineSpec``, e.g. in the plug-in's ``pyproject.toml``::

      [project.entry-points."ainode.pipelines"]
      tiny = "tiny_pipeline.spec:SPEC"

A spec that cannot be loaded, is not a ``PipelineSpec`` or reuses a name is
not registered; the reason is kept in :attr:`Registry.errors` (shown by
``ainode pipelines list`` and in the configuration error of a route naming it)
rather than stopping the node, so one broken plug-in does not take the
others down.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.spec import PipelineSpec

ENTRY_POINT_GROUP = "ainode.pipelines"


@dataclass(frozen=True)
class Registered:
    """A registered pipeline and where it came from.

    ``origin`` is ``"built-in"`` or ``"entry point"``; ``source`` names the
    module (built-in) or the distribution and entry point (plug-in).
    """

    spec: PipelineSpec
    origin: str
    source: str


class UnknownPipeline(KeyError):
    """No pipeline is registered under this name."""

    def __str__(self) -> str:  # KeyError would show the repr
        return str(self.args[0])


@dataclass(frozen=True)
class Registry:
    """The registered pipelines by name, and what could not be registered."""

    pipelines: Mapping[str, Registered]
    errors: tuple[str, ...] = ()

    def __contains__(self, name: object) -> bool:
        return name in self.pipelines

    def names(self) -> list[str]:
        return sorted(self.pipelines)

    def spec(self, name: str) -> PipelineSpec:
        """The spec registered as ``name``.

        Raises
        ------
        UnknownPipeline
            ``name`` is not registered; the message lists the registered
            names and any plug-in that failed to register.
        """
        if name not in self.pipelines:
            raise UnknownPipeline(self.unknown(name))
        return self.pipelines[name].spec

    def unknown(self, name: str) -> str:
        """The message for an unknown pipeline ``name``."""
        message = f"unknown pipeline {name!r}; registered: {', '.join(self.names()) or 'none'}"
        if self.errors:
            message += "; not registered: " + "; ".join(self.errors)
        return message


def _built_in_specs():
    """(module name, loader) of each ``pipelines/<package>/spec.py``."""
    import pipelines

    for package in pkgutil.iter_modules(pipelines.__path__):
        if not package.ispkg:
            continue
        found = importlib.util.find_spec(f"pipelines.{package.name}")  # locates, does not import
        if found is None or not found.submodule_search_locations:
            continue
        folder = Path(next(iter(found.submodule_search_locations)))
        # Look for spec.py without importing the package, so packages without one stay unimported.
        if any(m.name == "spec" for m in pkgutil.iter_modules([str(folder)])):
            module = f"pipelines.{package.name}.spec"
            yield package.name, module, functools.partial(_module_spec, module)


def _module_spec(module: str) -> object:
    return importlib.import_module(module).SPEC


def _entry_points():
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        yield ep.name, f"{dist}: {ep.name} = {ep.value}", ep.load


def discover() -> Registry:
    """Read every spec now (see the module's docstring); built-ins first."""
    found: dict[str, Registered] = {}
    errors: list[str] = []
    sources = [("built-in", name, module, load) for name, module, load in _built_in_specs()]
    sources += [("entry point", name, source, load) for name, source, load in _entry_points()]
    for origin, name, source, load in sources:
        try:
            spec = load()
        except Exception as exc:  # a broken plug-in is reported, not fatal
            errors.append(f"{origin} {source}: cannot load: {type(exc).__name__}: {exc}")
            continue
        if not isinstance(spec, PipelineSpec):
            errors.append(f"{origin} {source}: expected a pipelines.spec.PipelineSpec, got {type(spec).__name__}")
        elif spec.name != name:
            errors.append(f"{origin} {source}: the spec is named {spec.name!r}, expected {name!r}")
        elif name in found:
            errors.append(f"{origin} {source}: pipeline {name!r} is already registered by {found[name].source}")
        else:
            found[name] = Registered(spec, origin, source)
    return Registry(dict(sorted(found.items())), tuple(errors))


@functools.cache
def registry() -> Registry:
    """The pipelines of this process, discovered once (the configuration's
    ``[pipelines.*]`` sections are built from them at import)."""
    return discover()
