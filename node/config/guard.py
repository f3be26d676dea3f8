"""``intended_use`` in every ``[pipelines.<name>]`` table: what the node does
with an input outside the intended use its model card declares
(:mod:`node.guard`)::

    [pipelines.pneumonia]
    intended_use = { default = "warn", rules = { frontal_view = "refuse" } }

:func:`node.config.pipelines.pipelines_section` adds the field to each
pipeline's settings model, so every pipeline gets it, plug-ins included.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, field_validator

from node.config.base import _Section


class GuardAction(StrEnum):
    """What an input outside one intended-use rule leads to."""

    #: Processed; the SR and the SEG say it is out of the intended use.
    WARN = "warn"
    #: Not processed: the job ends ``out_of_scope`` and nothing is sent.
    REFUSE = "refuse"


class GuardSettings(_Section):
    """``intended_use = { default = ..., rules = { <rule> = ... } }``.

    ``default`` applies to every rule of the model card not named in
    ``rules``. A rule name the card does not have is refused when the
    pipeline loads (its jobs fail naming it), not here: the card is read then.
    """

    default: GuardAction = Field(GuardAction.WARN, description="'warn' or 'refuse'.")
    rules: dict[str, GuardAction] = Field(default_factory=dict, description="Rule name -> 'warn' or 'refuse'.")

    @field_validator("rules")
    @classmethod
    def _names(cls, v: dict[str, GuardAction]) -> dict[str, GuardAction]:
        for name in v:
            if not name.strip():
                raise ValueError("rule names must be non-empty")
        return v

    def action(self, rule: str) -> GuardAction:
        """The action for rule ``rule``."""
        return self.rules.get(rule, self.default)
