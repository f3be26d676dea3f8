"""Which kinds of destination this node can send to: built-ins and plug-ins.

- built-in: every module of the :mod:`node.destinations` package (found with
  :func:`pkgutil.iter_modules`; ``base`` and ``registry`` aside) is imported,
  and each concrete :class:`~node.destinations.base.DestinationKind` subclass
  it defines is registered. Adding a kind is adding its module;
- plug-in: every entry point of the group ``ainode.destinations``
  (:func:`importlib.metadata.entry_points`), named as the kind and pointing
  at the class, e.g. in the plug-in's ``pyproject.toml``::

      [project.entry-points."ainode.destinations"]
      xnat = "ainode_xnat.destination:XnatDestination"

:mod:`node.config` builds the ``[destinations]`` union from :func:`registry`
when it is imported: a kind registered later (:meth:`DestinationRegistry.register`)
is in :meth:`DestinationRegistry.config_union` but not in that
``NodeConfig``. A kind that cannot be loaded or is invalid is not registered;
the reason is kept in :attr:`DestinationRegistry.errors` and shown when a
destination names it, so one broken plug-in does not stop the node.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import pkgutil
import re
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BeforeValidator, Field

from node.destinations.base import DestinationConfig, DestinationContext, DestinationKind

ENTRY_POINT_GROUP = "ainode.destinations"
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_NOT_KINDS = frozenset({"base", "registry"})


class UnknownKind(KeyError):
    """No kind of destination is registered under this name."""

    def __str__(self) -> str:  # KeyError would show the repr
        return str(self.args[0])


class DestinationRegistry:
    """Kinds of destination by name, and what could not be registered."""

    def __init__(self) -> None:
        self._kinds: dict[str, type[DestinationKind]] = {}
        self._sources: dict[str, str] = {}
        self.errors: list[str] = []

    def register(self, cls: type[DestinationKind], source: str = "runtime") -> type[DestinationKind]:
        """Register ``cls`` under ``cls.kind``; returns ``cls`` (so it can decorate).

        Raises
        ------
        ValueError
            ``cls`` is not a concrete ``DestinationKind``, its ``kind`` is not
            1-32 of ``a-z 0-9 _ -`` starting with a letter, its ``Config`` is
            not a ``DestinationConfig`` whose ``kind`` field is
            ``Literal[kind]``, or the kind is already registered.
        """
        if not (isinstance(cls, type) and issubclass(cls, DestinationKind)) or inspect.isabstract(cls):
            raise ValueError(f"{cls!r} is not a concrete node.destinations.base.DestinationKind subclass")
        kind = getattr(cls, "kind", None)
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ValueError(f"{cls.__name__}.kind must be 1-32 of a-z 0-9 _ - starting with a letter, got {kind!r}")
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and issubclass(config, DestinationConfig)):
            raise ValueError(f"{cls.__name__}.Config must be a node.destinations.base.DestinationConfig subclass")
        field = config.model_fields["kind"].annotation
        if get_origin(field) is not Literal or get_args(field) != (kind,):
            raise ValueError(f'{config.__name__}.kind must be declared Literal["{kind}"], got {field!r}')
        if kind in self._kinds:
            raise ValueError(f"kind {kind!r} is already registered by {self._sources[kind]}")
        self._kinds[kind] = cls
        self._sources[kind] = source
        return cls

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds

    def kinds(self) -> list[str]:
        return sorted(self._kinds)

    def source(self, kind: str) -> str:
        """Where ``kind`` was registered from (module, entry point, ``runtime``)."""
        return self._sources[kind]

    def kind(self, kind: str) -> type[DestinationKind]:
        """The class registered as ``kind``.

        Raises
        ------
        UnknownKind
            Nothing is registered as ``kind``; the message lists the kinds
            and what failed to register.
        """
        if kind not in self._kinds:
            raise UnknownKind(self.unknown(kind))
        return self._kinds[kind]

    def unknown(self, kind: object) -> str:
        """The message for an unknown ``kind``."""
        what = "kind: missing" if kind is None else f"unknown kind {kind!r}"
        message = f"{what}; registered: {', '.join(self.kinds()) or 'none'}"
        if self.errors:
            message += "; not registered: " + "; ".join(self.errors)
        return message

    def sender(self, config: DestinationConfig, context: DestinationContext | None = None) -> DestinationKind:
        """The sender for one destination's configuration.

        Raises
        ------
        UnknownKind
            ``config.kind`` is not registered.
        """
        return self.kind(config.kind)(config, context)

    def config_union(self) -> Any:
        """The pydantic type of one ``[destinations.<name>]`` table: the
        registered ``Config`` models as a union discriminated on ``kind``,
        refusing an unknown or missing kind with :meth:`unknown`'s message.

        Raises
        ------
        ValueError
            No kind is registered (every built-in failed: the errors say why).
        """
        models = tuple(self._kinds[k].Config for k in self.kinds())
        if not models:
            raise ValueError(self.unknown(None))

        def known(value: Any) -> Any:
            kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
            if kind not in self._kinds:
                raise ValueError(self.unknown(kind))
            return value

        return Annotated[Union[models], Field(discriminator="kind"), BeforeValidator(known)]  # noqa: UP007


def _kinds_in(module: Any) -> list[type[DestinationKind]]:
    """The concrete ``DestinationKind`` subclasses ``module`` defines (not those it imports)."""
    return [
        obj for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, DestinationKind) and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]


def discover() -> DestinationRegistry:
    """Import and register every kind now (see the module's docstring); built-ins first."""
    import node.destinations as package

    found = DestinationRegistry()
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in _NOT_KINDS or info.name.startswith("_"):
            continue
        name = f"{package.__name__}.{info.name}"
        try:
            kinds = _kinds_in(importlib.import_module(name))
        except Exception as exc:  # a broken module is reported, not fatal
            found.errors.append(f"built-in {name}: cannot load: {type(exc).__name__}: {exc}")
            continue
        for cls in kinds:
            _register(found, cls, f"built-in {name}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        source = f"entry point {dist}: {ep.name} = {ep.value}"
        try:
            cls = ep.load()
        except Exception as exc:
            found.errors.append(f"{source}: cannot load: {type(exc).__name__}: {exc}")
            continue
        if getattr(cls, "kind", None) != ep.name:
            found.errors.append(f"{source}: the class's kind is {getattr(cls, 'kind', None)!r}, expected {ep.name!r}")
            continue
        _register(found, cls, source)
    return found


def _register(found: DestinationRegistry, cls: type[DestinationKind], source: str) -> None:
    try:
        found.register(cls, source)
    except ValueError as exc:
        found.errors.append(f"{source}: {exc}")


@functools.cache
def registry() -> DestinationRegistry:
    """The kinds of this process, discovered once (``[destinations]`` is
    built from them when :mod:`node.config` is imported)."""
    return discover()
