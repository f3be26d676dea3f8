"""Intended-use rules of a model card (``intended_use_rules``).

Each rule states one condition of the model's intended use over the DICOM
attributes of its input, in the routing rule language of ``[[routes]]
match`` (:mod:`node.config.routing`): a list of accepted values, a regular
expression, a numeric range or a presence test, per PS3.6 keyword or
:data:`DERIVED_ATTRIBUTES`. The node evaluates them before a job runs
(:mod:`node.guard`). This module imports neither torch nor the node.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom.datadict import tag_for_keyword

_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleRange(_Strict):
    """A numeric value within [min, max] (either bound optional): the
    ``{ min = ..., max = ... }`` form of the routing rule language
    (:class:`node.config.routing.NumericRange`)."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> RuleRange:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class RulePresence(_Strict):
    """``{ present = true | false }`` (:class:`node.config.routing.Presence`)."""

    present: bool


#: A value of an intended-use rule, as in ``[[routes]] match``: a list of
#: accepted values (case-insensitive, ``""`` = absent), a regular
#: expression, a numeric range or a presence test.
RuleValue = list[str] | str | RuleRange | RulePresence

#: Attributes an intended-use rule may test besides DICOM keywords, derived
#: by :mod:`node.guard` from the series: name -> what it holds.
DERIVED_ATTRIBUTES = {
    "PatientAgeInYears": "Patient's Age (0010,1010), an AS value like 045Y, 006M, 010W or 003D, in years",
    "PixelSpacingMm": "Pixel Spacing (0028,0030), else Imager Pixel Spacing (0018,1164): row, column spacing in mm",
    "NumberOfSlices": "images in the series (single-frame instances, or the frames of a multi-frame one)",
}


class IntendedUseRule(_Strict):
    """One condition of the model's intended use, over the DICOM attributes
    of its input (PS3.6 keywords) and the :data:`DERIVED_ATTRIBUTES`.

    Attributes
    ----------
    name:
        Identifier (lower case, digits, ``._-``): the key of
        ``intended_use.rules`` in the configuration, a metrics label.
    description:
        What the condition means and why (shown in the SR and the job's reason).
    match:
        Keyword -> accepted value (:data:`RuleValue`); the input is in scope
        when every keyword matches. A numeric range must hold for every value
        of a multi-valued attribute (both Pixel Spacing values).
    applies_to:
        ``"series"``: every input series of the job; else a sequence role
        (e.g. ``"FLAIR"``) of a study-level pipeline: the series filling it
        (a missing role is out of scope).
    absent:
        ``"out_of_scope"`` (default): an attribute the input lacks fails the
        rule; ``"in_scope"``: it is not held against the input ("when present").
    """

    name: str = Field(pattern=_NAME_PATTERN)
    description: str = Field(min_length=1)
    match: dict[str, RuleValue] = Field(min_length=1)
    applies_to: str = Field("series", min_length=1)
    absent: Literal["out_of_scope", "in_scope"] = "out_of_scope"

    @model_validator(mode="after")
    def _keywords(self) -> IntendedUseRule:
        for keyword, accepted in self.match.items():
            if keyword not in DERIVED_ATTRIBUTES and tag_for_keyword(keyword) is None:
                raise ValueError(
                    f"intended use rule {self.name!r}: {keyword!r} is neither a DICOM keyword (PS3.6) nor one of "
                    f"{', '.join(DERIVED_ATTRIBUTES)}"
                )
            if isinstance(accepted, str):
                try:
                    re.compile(accepted)
                except re.error as exc:
                    raise ValueError(
                        f"intended use rule {self.name!r}: {keyword}: invalid regular expression {accepted!r}: {exc}"
                    ) from exc
        return self
