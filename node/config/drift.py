"""``[drift]``: input-drift monitoring (:mod:`node.drift`)::

    [drift]
    window = 500            # the last 500 jobs of each model
    min_count = 30          # no statistic, no alert, below 30 jobs
    psi_threshold = 0.25    # categorical features (PSI)
    ks_threshold = 0.3      # numerical features (KS statistic)
    thresholds = { score = 0.4, manufacturer = 0.5 }   # per feature

The defaults: PSI above 0.25 is a significant shift by the credit-scoring
rule of thumb (Siddiqi 2006); a KS statistic of 0.3 is above the
two-sample 5 % critical value for 30 jobs against a large reference
(1.36 * sqrt(1/30) = 0.25), so a window at the minimum count rarely
alerts by chance.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from models.drift_reference import MIN_COUNT, DriftFeature, FeatureKind
from node.config.base import _Section


class DriftSection(_Section):
    """``[drift]`` (module docstring)."""

    enabled: bool = Field(True, description="Record each job's input features and compare them with the model card's reference.")
    window: int = Field(500, ge=10, le=100_000, description="Jobs per model in the sliding window.")
    min_count: int = Field(MIN_COUNT, ge=2, description="Jobs a window needs before a statistic is computed and an alert can fire; a "
                           "measurement's reference (age, intensity, score) needs as many values (node.drift).")
    psi_threshold: float = Field(0.25, gt=0.0, description="Alert above this PSI (categorical features).")
    ks_threshold: float = Field(0.3, gt=0.0, le=1.0, description="Alert above this KS statistic (numerical features).")
    thresholds: dict[DriftFeature, float] = Field(
        default_factory=dict, description="Feature name -> its own alert threshold (PSI or KS statistic)."
    )

    @field_validator("thresholds")
    @classmethod
    def _positive(cls, v: dict[DriftFeature, float]) -> dict[DriftFeature, float]:
        for feature, t in v.items():
            if not t > 0 or (feature.kind == FeatureKind.NUMERIC and t > 1):
                raise ValueError(f"thresholds.{feature}: expected > 0 (and <= 1 for a KS statistic), got {t}")
        return v

    def threshold(self, feature: DriftFeature) -> float:
        """The alert threshold of ``feature``."""
        if feature in self.thresholds:
            return self.thresholds[feature]
        return self.psi_threshold if feature.kind == FeatureKind.CATEGORICAL else self.ks_threshold
