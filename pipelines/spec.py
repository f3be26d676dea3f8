"""What the node knows of a pipeline before it runs one: its :class:`PipelineSpec`.

A spec names the pipeline, says where its class lives (``"module:Class"``,
imported only when a job first needs it), which pydantic model holds its
``[pipelines.<name>]`` settings, whether it runs per series or per study,
the sequence roles a study-level pipeline reads, and the Modalities it
accepts. This module, and every settings model a spec names, imports no
torch: the node reads every spec at start-up.

Built-in pipelines put ``SPEC = PipelineSpec(...)`` in ``pipelines/<name>/spec.py``;
other packages name a spec in the entry-point group ``ainode.pipelines``
(see :mod:`pipelines.registry` and ``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ValidationError

# A TOML bare key and a Python identifier: the name is both [pipelines.<name>] and a field.
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CLASS_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# PS3.3 C.7.3.1.1.1: Modality is a CS value (PS3.5 6.2: upper case, digits, space, underscore; 16 max).
_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")


class Level(StrEnum):
    """What one job of a pipeline reads."""

    SERIES = "series"  # one job per complete series
    STUDY = "study"  # one job per study, once every required role has a complete series


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline as the node registers it.

    Attributes
    ----------
    name:
        Routing name (``[[routes]] pipeline``) and settings section
        (``[pipelines.<name>]``): lower-case letters, digits and ``_``, starting
        with a letter, at most 64 characters.
    pipeline_class:
        ``"module:Class"`` of the class implementing
        :class:`pipelines.base.Pipeline`; it is called as
        ``Class(settings, model_registry, device=...)``.
    settings:
        The pydantic model of ``[pipelines.<name>]``; every field needs a
        default (the section may be absent). Its module must not import torch.
    level:
        :class:`Level` (``"series"`` or ``"study"``).
    required_roles:
        Study level: the sequence roles the pipeline reads (keys of
        ``[sequences]``), e.g. ``("T1", "T1c", "T2", "FLAIR")``. Empty for a
        series-level pipeline.
    modalities:
        Modality (0008,0060) values the pipeline accepts, e.g. ``("CR", "DX")``;
        empty: any. A route whose ``match`` lists other Modalities is warned about.
    description:
        One line for ``ainode pipelines list``.

    Raises
    ------
    ValueError
        An attribute is malformed; the message names it.
    """

    name: str
    pipeline_class: str
    settings: type[BaseModel]
    level: Level = Level.SERIES
    required_roles: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"PipelineSpec.name: expected lower-case letters, digits or _, starting with a letter "
                f"(at most 64), got {self.name!r}"
            )
        if not isinstance(self.pipeline_class, str) or not _CLASS_PATH.match(self.pipeline_class):
            raise ValueError(f"PipelineSpec.pipeline_class: expected 'module:Class', got {self.pipeline_class!r}")
        if not (isinstance(self.settings, type) and issubclass(self.settings, BaseModel)):
            raise ValueError(f"PipelineSpec.settings: expected a pydantic model class, got {self.settings!r}")
        try:
            self.settings()
        except ValidationError as exc:
            raise ValueError(
                f"PipelineSpec.settings: {self.settings.__name__} needs a default for every field "
                f"([pipelines.{self.name}] may be absent): {exc.errors()[0]['loc']}"
            ) from None
        try:
            object.__setattr__(self, "level", Level(self.level))
        except ValueError:
            raise ValueError(f"PipelineSpec.level: expected 'series' or 'study', got {self.level!r}") from None
        object.__setattr__(self, "required_roles", tuple(self.required_roles))
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if self.level is Level.STUDY and not self.required_roles:
            raise ValueError(f"PipelineSpec.required_roles: study-level pipeline {self.name} names no roles")
        if self.level is Level.SERIES and self.required_roles:
            raise ValueError(f"PipelineSpec.required_roles: series-level pipeline {self.name} cannot have roles")
        if len(set(self.required_roles)) != len(self.required_roles) or not all(
            isinstance(r, str) and r for r in self.required_roles
        ):
            raise ValueError(f"PipelineSpec.required_roles: expected distinct non-empty names, got {self.required_roles!r}")
        for modality in self.modalities:
            if not isinstance(modality, str) or not _MODALITY.match(modality):
                raise ValueError(f"PipelineSpec.modalities: {modality!r} is not a Modality code (CS, upper case)")

    def load_class(self) -> type:
        """Import and return the pipeline class (this may import torch).

        Raises
        ------
        ImportError
            The module cannot be imported, or has no such class.
        """
        module, _, attr = self.pipeline_class.partition(":")
        cls = getattr(importlib.import_module(module), attr, None)
        if cls is None:
            raise ImportError(f"pipeline {self.name}: module {module} has no {attr} ({self.pipeline_class})")
        return cls
