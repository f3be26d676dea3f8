"""``[[routes]]`` and ``[sequences]``: match values, route rules, the
default sequence recognition and the check of a route against its
pipeline's spec."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator
from pydicom.datadict import tag_for_keyword

from node.config.base import _Section
from node.config.worker import DeviceClass


class NumericRange(_Section):
    """A numeric attribute within [min, max] (either bound optional), e.g.
    ``InversionTime = { min = 1500 }`` (ms)."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> NumericRange:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class Presence(_Section):
    """``{ present = true }``: the attribute has a non-empty value; ``false``: it has none."""

    present: bool


MatchValue = list[str] | str | NumericRange | Presence


def _check_match(v: dict[str, MatchValue]) -> dict[str, MatchValue]:
    for keyword, accepted in v.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword (PS3.6)")
        if isinstance(accepted, str):
            try:
                re.compile(accepted)
            except re.error as exc:
                raise ValueError(f"{keyword}: invalid regular expression {accepted!r}: {exc}") from exc
    return v


Match = Annotated[dict[str, MatchValue], AfterValidator(_check_match)]


class RouteRule(_Section):
    """``[[routes]]``: series or studies matching ``match`` go to ``pipeline``.

    ``match`` maps DICOM keywords to a list of accepted values
    (case-insensitive; ``""`` accepts an absent or empty attribute), a
    regular expression searched case-insensitively, a numeric range
    ``{ min = ..., max = ... }`` or ``{ present = true | false }``.

    ``level = "study"`` rules collect the study's matching series into the
    sequence roles of ``required_roles`` (recognised by ``[sequences]``) and
    run once per study when every role is filled by a complete series.
    """

    name: str
    pipeline: str
    level: Literal["series", "study"] = "series"
    match: Match = Field(default_factory=dict)
    required_roles: list[str] = Field(default_factory=list)
    destinations: list[str] = Field(min_length=1)
    worker: DeviceClass = Field(
        DeviceClass.CPU, description="With [worker] backend = celery: the queue class (cpu or gpu) of this route's jobs."
    )

    @model_validator(mode="after")
    def _roles(self) -> RouteRule:
        if self.level == "study" and not self.required_roles:
            raise ValueError("required_roles: a study-level rule needs the sequence roles it waits for")
        if self.level == "series" and self.required_roles:
            raise ValueError("required_roles: only study-level rules have roles")
        return self


def _default_sequences() -> dict[str, list[dict[str, MatchValue]]]:
    """Sequence recognition for brain MR (role -> alternative rules; a rule
    matches when all its attributes do). Roles are tried in this order, so a
    post-contrast FLAIR is FLAIR and a post-contrast T1 is T1c, never T1.
    Times are in ms (PS3.3 C.8.3.1: Repetition, Echo, Inversion Time)."""
    not_other = r"^(?!.*(dwi|diff|adc|trace|swi|perf|local|scout|survey|mip|\bmpr\b))"
    return {
        "FLAIR": [
            {"SeriesDescription": not_other + r".*(flair|dark.?fluid|\bt2.?f\b|\bfla\b)"},
            {"InversionTime": NumericRange(min=1500), "EchoTime": NumericRange(min=60)},
        ],
        "T1c": [
            {"SeriesDescription": not_other + r".*(t1.*(post|\+\s*c\b|\bc\+|gd|gad|contrast|\bce\b)|\bt1c\b|\bt1ce\b)"},
            {
                "ContrastBolusAgent": Presence(present=True),
                "ScanningSequence": ["SE", "IR"],
                "EchoTime": NumericRange(max=30),
            },
        ],
        "T2": [
            {"SeriesDescription": not_other + r".*(\bt2\b|t2w|\bt2.?(tse|fse|se)\b)(?!.*(\*|star|flair))"},
            {
                "EchoTime": NumericRange(min=60),
                "RepetitionTime": NumericRange(min=2000),
                "InversionTime": Presence(present=False),
            },
        ],
        "T1": [
            {"SeriesDescription": not_other + r".*(\bt1\b|t1w|mprage|spgr|\bt1n\b|\bt1.?(se|tse|fse)\b)"},
            {  # spin-echo T1
                "ScanningSequence": ["SE"],
                "RepetitionTime": NumericRange(max=1000),
                "EchoTime": NumericRange(max=30),
                "ContrastBolusAgent": Presence(present=False),
            },
            {  # MPRAGE-like: inversion-prepared gradient echo
                "ScanningSequence": ["IR"],
                "InversionTime": NumericRange(min=600, max=1300),
                "EchoTime": NumericRange(max=10),
                "ContrastBolusAgent": Presence(present=False),
            },
        ],
    }


def _check_route_spec(i: int, route: RouteRule, spec) -> list[str]:
    """Check a route's level and roles against its pipeline's
    :class:`~pipelines.spec.PipelineSpec`; return warnings about its
    ``match`` on Modality (0008,0060).

    Raises
    ------
    ValueError
        The level differs from the pipeline's, or the roles are not the ones
        it reads; the message names the route.
    """
    where = f"routes[{i}] ({route.name})"
    if route.level != spec.level:
        raise ValueError(f'{where}: pipeline {spec.name} is {spec.level}-level; level "{route.level}" given')
    missing = [r for r in spec.required_roles if r not in route.required_roles]
    extra = [r for r in route.required_roles if r not in spec.required_roles]
    if missing or extra:
        raise ValueError(
            f"{where}.required_roles: pipeline {spec.name} reads {', '.join(spec.required_roles)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; it does not read {', '.join(extra)}" if extra else "")
        )
    accepted = route.match.get("Modality")
    if not spec.modalities or not isinstance(accepted, list):
        return []  # a regular expression or range is not second-guessed
    foreign = [m for m in accepted if str(m).strip().upper() not in spec.modalities]
    if not foreign:
        return []
    return [
        f"{where}.match.Modality: pipeline {spec.name} accepts {', '.join(spec.modalities)}; "
        f"{', '.join(repr(m) for m in foreign)} will reach it and be refused or fail"
    ]
