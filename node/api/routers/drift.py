"""``GET /api/drift`` (scope ``read``): the input-drift table of each model
(:mod:`node.drift`): per feature its statistic (PSI or KS), value,
threshold, number of values in the window and whether it alerts. The same
rows as the dashboard's "Input drift" panel and the ``ainode_input_drift``
gauges."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from pydantic import BaseModel, Field

from node.api.auth import Scope, requires
from node.api.deps import NodeDep
from node.api.models import ERRORS

if TYPE_CHECKING:
    from node.drift import ModelDrift

router = APIRouter(prefix="/api", tags=["drift"], dependencies=[requires(Scope.READ)], responses=ERRORS)


class FeatureDriftOut(BaseModel):
    feature: str
    statistic: str = Field(description="'psi' (categorical feature) or 'ks' (numerical feature).")
    value: float | None = Field(description="Dimensionless; null while the window holds fewer than min_count values.")
    threshold: float
    n: int = Field(description="Values of the feature in the window.")
    reference_n: int = Field(description="Values of the feature in the model card's reference.")
    alert: bool


class ModelDriftOut(BaseModel):
    pipeline: str
    model_version: str
    card: str | None = Field(description="The model card compared with; null: it has no drift_reference.")
    reference_source: str | None
    jobs: int = Field(description="Jobs in the sliding window.")
    window: int
    min_count: int
    features: list[FeatureDriftOut]
    alerts: list[str]


class DriftOut(BaseModel):
    models: list[ModelDriftOut]


def drift_report(node: object) -> list[ModelDrift]:
    """The drift tables of ``node``'s monitor (``node.runner.drift``); [] where it has none."""
    monitor = getattr(getattr(node, "runner", None), "drift", None)
    return monitor.report() if monitor is not None else []


@router.get("/drift", response_model=DriftOut)
def drift(node: NodeDep) -> DriftOut:
    return DriftOut.model_validate({"models": [m.as_dict() for m in drift_report(node)]})
