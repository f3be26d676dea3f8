"""Input-drift features, the reference a model card stores of them, and the
two comparisons the node makes (:mod:`node.drift`).

Features (:class:`DriftFeature`), one sample per job:

- categorical, from the first instance of the job's input: Manufacturer
  (0008,0070), View Position (0018,5101), Photometric Interpretation
  (0028,0004), Bits Stored (0028,0101) (PS3.3 C.7.5.1, C.8.11.5, C.7.6.3);
- numerical, from the same instance: Patient's Age (0010,1010, AS ``045Y``)
  in years, Pixel Spacing (0028,0030, else Imager Pixel Spacing 0018,1164)
  row spacing in mm, Slice Thickness (0018,0050) in mm;
- numerical, reported by the pipeline (``PipelineContext.observations``):
  the mean and standard deviation of the network input's intensity after
  preprocessing (in the pipeline's own units: [0, 1] for the chest
  radiograph before intensity scaling, z-scores for the brain MR volume),
  and the model's output score (the chest model's probability; the brain
  model's whole-tumour volume in ml).

The reference (:class:`DriftReference`, a card's ``drift_reference``) holds,
per feature, the category frequencies or 101 quantiles (0 %, 1 %, ... 100 %)
of the reference sample, with n and the data it came from.

Comparisons:

- :func:`psi`: population stability index over categories,
  ``sum((p_obs - p_ref) * ln(p_obs / p_ref))``, proportions floored at
  :data:`PSI_FLOOR` so that a category absent on one side stays finite
  (Siddiqi N, Credit Risk Scorecards, Wiley 2006; Yurdakul B, Statistical
  properties of the population stability index, PhD thesis, Western
  Michigan University 2018). Rule of thumb: < 0.1 stable, 0.1 to 0.25 a
  moderate shift, > 0.25 a significant one.
- :func:`ks_statistic`: the two-sample Kolmogorov-Smirnov statistic, the
  largest distance between the two empirical CDFs (``scipy.stats.ks_2samp``),
  the reference taken as its quantiles.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom import Dataset

#: Proportions below this are taken as this in :func:`psi` (a category seen
#: on one side only): ln(1e-4) keeps one new category at PSI about 9.
PSI_FLOOR = 1e-4
#: Quantiles a numeric reference keeps: 0, 0.01, ... 1.
QUANTILES = 101
#: Patient's Age, VR AS (PS3.5 Table 6.2-1): nnnD, nnnW, nnnM or nnnY.
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
#: Decimal places of a stored quantile, and of the values compared with it.
DECIMALS = 6
#: The category of a categorical attribute that is absent or empty.
ABSENT = "(absent)"


class FeatureKind(StrEnum):
    CATEGORICAL = "categorical"
    NUMERIC = "numeric"


class DriftFeature(StrEnum):
    """The features the node watches (module docstring)."""

    MANUFACTURER = "manufacturer"
    VIEW_POSITION = "view_position"
    PHOTOMETRIC_INTERPRETATION = "photometric_interpretation"
    BITS_STORED = "bits_stored"
    PATIENT_AGE = "patient_age_years"
    PIXEL_SPACING = "pixel_spacing_mm"
    SLICE_THICKNESS = "slice_thickness_mm"
    INTENSITY_MEAN = "intensity_mean"
    INTENSITY_STD = "intensity_std"
    SCORE = "score"

    @property
    def kind(self) -> FeatureKind:
        return FeatureKind.CATEGORICAL if self in _CATEGORICAL else FeatureKind.NUMERIC


_CATEGORICAL = {
    DriftFeature.MANUFACTURER: "Manufacturer",
    DriftFeature.VIEW_POSITION: "ViewPosition",
    DriftFeature.PHOTOMETRIC_INTERPRETATION: "PhotometricInterpretation",
    DriftFeature.BITS_STORED: "BitsStored",
}
#: The features a pipeline reports itself (``PipelineContext.observations``).
PIPELINE_FEATURES = (DriftFeature.INTENSITY_MEAN, DriftFeature.INTENSITY_STD, DriftFeature.SCORE)
#: Numerical features that are acquisition settings: a protocol picks them
#: from a few values, so a reference of any size stands for them (against a
#: reference of one value the KS statistic is the share of the window's values
#: that differ from it). Other numerical features are measurements.
SETTING_FEATURES = frozenset({DriftFeature.PIXEL_SPACING, DriftFeature.SLICE_THICKNESS})
#: The default ``[drift] min_count`` (:mod:`node.config.drift`).
MIN_COUNT = 30


def comparable(feature: DriftFeature, reference_n: int, min_count: int) -> bool:
    """Whether a reference of ``reference_n`` values can judge ``feature``:
    always for a categorical feature or an acquisition setting
    (:data:`SETTING_FEATURES`); for a measurement (age, intensity, score) only
    when ``reference_n >= min_count``, the count a window needs too. Below it
    the KS test cannot decide: its two-sample 5 % critical value
    1.36 * sqrt(1/n + 1/m) is at least 0.96 for a reference of n = 2 studies,
    whatever the window m, and a reference of one value puts every new value
    at KS 1."""
    return feature.kind == FeatureKind.CATEGORICAL or feature in SETTING_FEATURES or reference_n >= min_count


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureReference(_Strict):
    """One feature's reference: ``frequencies`` (category -> proportion,
    summing to 1) for a categorical feature, ``quantiles`` (:data:`QUANTILES`
    values, non-decreasing) for a numerical one; ``n`` samples."""

    n: int = Field(ge=1)
    frequencies: dict[str, float] | None = None
    quantiles: list[float] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> FeatureReference:
        if (self.frequencies is None) == (self.quantiles is None):
            raise ValueError("expected exactly one of frequencies (categorical) or quantiles (numeric)")
        if self.frequencies is not None:
            if not self.frequencies or any(not 0 <= p <= 1 for p in self.frequencies.values()):
                raise ValueError(f"frequencies: expected proportions in [0, 1], got {self.frequencies}")
            if abs(sum(self.frequencies.values()) - 1) > 1e-6:
                raise ValueError(f"frequencies: proportions sum to {sum(self.frequencies.values())}, expected 1")
        if self.quantiles is not None:
            q = self.quantiles
            if len(q) != QUANTILES or not all(math.isfinite(v) for v in q) or any(b < a for a, b in zip(q, q[1:], strict=False)):
                raise ValueError(f"quantiles: expected {QUANTILES} finite non-decreasing values")
        return self


class DriftReference(_Strict):
    """A model card's ``drift_reference``: per :class:`DriftFeature` value
    its :class:`FeatureReference`; ``source`` says which data and how
    (e.g. the command that computed it); ``n`` the images or studies read.
    A feature the data did not carry (Manufacturer of a PNG) is absent, and
    the node does not compare it."""

    source: str = Field(min_length=1)
    n: int = Field(ge=1)
    features: dict[DriftFeature, FeatureReference]

    @model_validator(mode="after")
    def _kinds(self) -> DriftReference:
        for feature, ref in self.features.items():
            if (ref.frequencies is not None) != (feature.kind == FeatureKind.CATEGORICAL):
                raise ValueError(f"drift_reference.features.{feature}: a {feature.kind} feature needs "
                                 f"{'frequencies' if feature.kind == FeatureKind.CATEGORICAL else 'quantiles'}")
        return self


def _text(value) -> str:
    if value is None or value == "":
        return ABSENT
    return str(value).strip() or ABSENT


def _first_number(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        v = float(value[0] if not isinstance(value, str | bytes) and hasattr(value, "__getitem__") else value)
    except (TypeError, ValueError, IndexError):
        return None
    return v if math.isfinite(v) else None


def dicom_features(ds: Dataset) -> dict[DriftFeature, str | float]:
    """The DICOM features of one instance (module docstring): every
    categorical one (:data:`ABSENT` where the attribute is absent), the
    numerical ones where present and valid."""
    out: dict[DriftFeature, str | float] = {f: _text(ds.get(k)) for f, k in _CATEGORICAL.items()}
    m = _AGE.match(str(ds.get("PatientAge", "") or "").strip().upper())
    age = None if m is None else int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2)]
    spacing = _first_number(ds.get("PixelSpacing")) or _first_number(ds.get("ImagerPixelSpacing"))
    thickness = _first_number(ds.get("SliceThickness"))
    for feature, value in ((DriftFeature.PATIENT_AGE, age), (DriftFeature.PIXEL_SPACING, spacing),
                           (DriftFeature.SLICE_THICKNESS, thickness)):
        if value is not None:
            out[feature] = float(value)
    return out


def build_reference(samples: Sequence[Mapping[Any, str | float]], source: str) -> DriftReference:
    """The reference of ``samples`` (one mapping per image or study).

    Raises
    ------
    ValueError
        ``samples`` is empty, or a value does not fit its feature's kind.
    """
    if not samples:
        raise ValueError("drift reference: no samples (no image or study of the data could be read)")
    values: dict[DriftFeature, list] = {}
    for sample in samples:
        for key, value in sample.items():
            values.setdefault(DriftFeature(key), []).append(value)
    features: dict[DriftFeature, FeatureReference] = {}
    for feature, vs in values.items():
        if feature.kind == FeatureKind.CATEGORICAL:
            features[feature] = FeatureReference(n=len(vs), frequencies=proportions(str(v) for v in vs))
        else:
            arr = np.asarray([float(v) for v in vs if v is not None and math.isfinite(float(v))], dtype=np.float64)
            if arr.size:
                q = np.quantile(arr, np.linspace(0.0, 1.0, QUANTILES))
                features[feature] = FeatureReference(n=int(arr.size), quantiles=[round(float(x), DECIMALS) + 0.0 for x in q])  # no -0.0
    return DriftReference(source=source, n=len(samples), features=dict(sorted(features.items())))


def proportions(values: Iterable[str]) -> dict[str, float]:
    """Category -> share of ``values`` (sorted by category)."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    total = sum(counts.values())
    return {k: counts[k] / total for k in sorted(counts)}


def psi(observed: Mapping[str, float], reference: Mapping[str, float], floor: float = PSI_FLOOR) -> float:
    """Population stability index between two sets of category proportions
    (module docstring), over the union of their categories; each proportion
    floored at ``floor``. 0 for identical distributions; dimensionless."""
    total = 0.0
    for category in set(observed) | set(reference):
        p = max(observed.get(category, 0.0), floor)
        q = max(reference.get(category, 0.0), floor)
        total += (p - q) * math.log(p / q)
    return total


def ks_statistic(observed: Sequence[float], reference_quantiles: Sequence[float]) -> float:
    """Two-sample KS statistic (``scipy.stats.ks_2samp``, two-sided) between
    ``observed`` and the reference's quantiles: in [0, 1], the largest gap
    between the two empirical CDFs. The 101 quantiles stand for the reference
    sample, which moves the statistic by at most about 0.01. Both sides are
    rounded to :data:`DECIMALS` places first, as the quantiles are stored, so
    that a tie (0.143 mm as a DS string, 0.14300000000000002 from a float)
    stays a tie."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.round(np.asarray(observed, float), DECIMALS),
                          np.round(np.asarray(reference_quantiles, float), DECIMALS)).statistic)
