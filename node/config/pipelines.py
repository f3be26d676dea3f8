"""``[models]`` and ``[pipelines]`` (one table per registered
pipeline, built from :mod:`pipelines.registry`; each also takes
``intended_use``, :mod:`node.config.guard`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, create_model, model_validator

from node.config.base import _Section
from node.config.guard import GuardSettings
from pipelines.registry import Registry
from pipelines.registry import registry as pipeline_registry


class ModelsSection(_Section):
    """``[models]``: where model cards are found, besides the ones shipped in ``models/cards``."""

    card_dirs: list[Path] = Field(default_factory=list)


def _with_guard(settings: type[BaseModel]) -> type[BaseModel]:
    """``settings`` with an ``intended_use`` field (:class:`GuardSettings`),
    unless it has one: a subclass, so the pipeline still gets its own type."""
    if "intended_use" in settings.model_fields:
        return settings
    return create_model(
        settings.__name__,
        __base__=settings,
        __module__=settings.__module__,
        intended_use=(GuardSettings, Field(default_factory=GuardSettings, description="Intended-use guard (node.guard).")),
    )


def pipelines_section(registry: Registry) -> type[_Section]:
    """The ``[pipelines]`` model: one ``[pipelines.<name>]`` table per
    registered pipeline, of its spec's settings model (all defaults when
    absent). A table for an unregistered name is refused, naming the
    registered ones."""

    class _Pipelines(_Section):
        @model_validator(mode="before")
        @classmethod
        def _registered(cls, data: Any) -> Any:
            for name in data if isinstance(data, dict) else ():
                if name not in cls.model_fields:
                    raise ValueError(f"[pipelines.{name}]: {registry.unknown(name)}")
            return data

    fields: dict[str, Any] = {}
    for name, r in registry.pipelines.items():
        settings = _with_guard(r.spec.settings)
        fields[name] = (settings, Field(default_factory=settings, description=r.spec.description or None))
    return create_model("PipelinesSection", __base__=_Pipelines, __doc__="``[pipelines]``: settings per pipeline.", **fields)


#: Built from the pipelines registered when this module is imported (pipelines.registry);
#: to a type checker, any section (its fields are known only at run time).
if TYPE_CHECKING:
    PipelinesSection = _Section
else:
    PipelinesSection = pipelines_section(pipeline_registry())
