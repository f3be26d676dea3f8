"""The intended-use guard: is a job's input within its model card's intended use?

A model card states its intended use as rules (``intended_use_rules``,
:class:`models.intended_use.IntendedUseRule`) over the DICOM attributes of
the input, in the routing rule language (:func:`node.route.values_match`),
and over derived attributes (:data:`models.intended_use.DERIVED_ATTRIBUTES`:
the age in years from Patient's Age (0010,1010), the pixel spacing from
Pixel Spacing (0028,0030) or Imager Pixel Spacing (0018,1164), the number of
slices of the series). The runner evaluates them before the pipeline runs;
``[pipelines.<name>] intended_use`` (:class:`node.config.guard.GuardSettings`)
says, per rule, what an input outside it leads to:

- ``refuse``: the job ends ``out_of_scope`` with the rules and values that
  decided it, and nothing is sent;
- ``warn`` (the default): the pipeline runs; the warnings reach the writers
  through :attr:`pipelines.base.PipelineContext.intended_use_warnings`.

Only images of the model's kind are judged: objects whose Modality the card
does not list (a SEG, an SR a broad rule routed) and, for a radiograph
classifier, colour or multi-frame images are left to the pipeline, which
ends them ``not_applicable``: they are not this model's kind of input at all.
Every decision is counted (``ainode_intended_use_decisions_total``) and
written into the job's reason (its timeline).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydicom import Dataset

from models.card import ModelCard
from models.intended_use import IntendedUseRule, RulePresence, RuleRange
from node.config import NumericRange, Presence
from node.config.guard import GuardAction, GuardSettings
from node.route import values_match
from pipelines.base import Study

#: Patient's Age (0010,1010), VR AS (PS3.5 6.2): three digits and D, W, M or Y.
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


class OutOfScope(Exception):
    """The input is outside a rule of the model card's intended use that is
    configured ``refuse``: the job ends ``out_of_scope`` with this message
    (the rules and values) as its reason. Not a ``ValueError``: the data are
    not faulty."""


@dataclass(frozen=True)
class Decision:
    """One rule the input is outside of, and what the configuration makes of it.

    Attributes
    ----------
    rule, description:
        The card's rule.
    action:
        :class:`~node.config.guard.GuardAction`.
    values:
        Keyword -> the input's value(s) that failed (``"(absent)"`` when none).
    series_uid:
        The series judged (``None``: a role no series fills).
    """

    rule: str
    description: str
    action: GuardAction
    values: Mapping[str, str]
    series_uid: str | None

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.values.items())
        return f"{self.rule} ({self.description}): {shown}"


def age_in_years(value: str) -> float | None:
    """Patient's Age as AS text (``"045Y"``, ``"006M"``) in years; None when
    absent or malformed (PS3.5 Table 6.2-1, VR AS)."""
    m = _AGE.match(str(value or "").strip().upper())
    return None if m is None else int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2)]


def _text(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [str(value).strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def series_values(datasets: Sequence[Dataset], keyword: str) -> list[str]:
    """The values of ``keyword`` for one series (its first instance, or a
    derived attribute of the whole series), as text; ``[]`` when absent."""
    first = datasets[0]
    if keyword == "PatientAgeInYears":
        years = age_in_years(first.get("PatientAge", ""))
        return [] if years is None else [f"{years:g}"]
    if keyword == "PixelSpacingMm":
        return _text(first, "PixelSpacing") or _text(first, "ImagerPixelSpacing")
    if keyword == "NumberOfSlices":
        return [str(sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets))]
    return _text(first, keyword)


def _as_match(accepted):
    """The card's value as the routing rule language's (node.config.routing)."""
    if isinstance(accepted, RuleRange):
        return NumericRange(min=accepted.min, max=accepted.max)
    if isinstance(accepted, RulePresence):
        return Presence(present=accepted.present)
    return accepted


def _failing(rule: IntendedUseRule, datasets: Sequence[Dataset]) -> dict[str, str]:
    """Keyword -> shown value for each attribute of ``rule`` the series fails."""
    failed = {}
    for keyword, accepted in rule.match.items():
        values = series_values(datasets, keyword)
        if not values and rule.absent == "in_scope" and not isinstance(accepted, RulePresence):
            continue  # "when present"
        match = _as_match(accepted)
        if isinstance(match, NumericRange):  # every value within the range (both spacings)
            ok = bool(values) and all(values_match([v], match) for v in values)
        else:
            ok = values_match(values, match)
        if not ok:
            failed[keyword] = "\\".join(values) or "(absent)"
    return failed


def _of_model_kind(card: ModelCard, ds: Dataset) -> bool:
    """Whether ``ds`` is the kind of object the model reads at all."""
    spec = card.input or card.volume_input or card.bundle_output
    modalities = {m.upper() for m in (spec.modalities if spec is not None else [])}
    if modalities and str(ds.get("Modality", "") or "").upper() not in modalities:
        return False
    if card.task == "classification":
        photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or (photometric and not photometric.startswith("MONOCHROME")):
            return False
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            return False
    return True


def evaluate(card: ModelCard, study: Study, settings: GuardSettings) -> list[Decision]:
    """The rules of ``card`` that ``study`` is outside of, with their actions.

    A ``"series"`` rule judges every series of the study (its images of the
    model's kind; a series with none is not judged); a role rule judges the
    series filling that role (a missing role fails it; a series-level job has
    no roles, so role rules are skipped).

    Raises
    ------
    ValueError
        ``settings.rules`` names a rule the card does not have.
    """
    names = {r.name for r in card.intended_use_rules}
    unknown = sorted(set(settings.rules) - names)
    if unknown:
        raise ValueError(
            f"intended_use.rules: {', '.join(unknown)} not a rule of model card {card.name} "
            f"(it has {', '.join(sorted(names)) or 'none'})"
        )
    decisions = []
    for rule in card.intended_use_rules:
        if rule.applies_to == "series":
            targets = list(study.series.items())
        elif not study.roles:
            continue
        elif rule.applies_to not in study.roles:
            decisions.append(Decision(rule.name, rule.description, settings.action(rule.name),
                                      {"role": f"{rule.applies_to} (absent)"}, None))
            continue
        else:
            uid = study.roles[rule.applies_to]
            targets = [(uid, study.series[uid])]
        for series_uid, datasets in targets:
            images = [ds for ds in datasets if _of_model_kind(card, ds)]
            if not images:
                continue
            failed = _failing(rule, images)
            if failed:
                decisions.append(Decision(rule.name, rule.description, settings.action(rule.name), failed, series_uid))
    return decisions


def pipeline_card(pipeline: object) -> ModelCard | None:
    """The model card a pipeline runs: its ``card`` attribute, else its
    model's (``pipeline.model.card``); None for a pipeline with neither
    (a plug-in without a card is not guarded)."""
    for candidate in (getattr(pipeline, "card", None), getattr(getattr(pipeline, "model", None), "card", None)):
        if isinstance(candidate, ModelCard):
            return candidate
    return None


def describe(decisions: Sequence[Decision], action: GuardAction) -> str:
    """One line for the job's reason: ``out of intended use (refuse): rule (...): Keyword=value; ...``."""
    chosen = [d for d in decisions if d.action == action]
    return f"out of intended use ({action}): " + "; ".join(dict.fromkeys(str(d) for d in chosen))
