"""Settings of the pneumonia pipeline, part of the node's one configuration object."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PneumoniaSettings(BaseModel):
    """``[pipelines.pneumonia]`` in the node configuration."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "pneumonia-densenet121-demo",
        description="Name of the model card to use (see `ainode models list`).",
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Probability at or above which pneumonia is reported present; "
        "empty uses the model card's operating point.",
    )
    cam_threshold: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Fraction of the Grad-CAM maximum above which a pixel joins the SEG's attention region.",
    )
