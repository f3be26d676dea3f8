"""Settings of the brain tumour pipeline, part of the node's one configuration object."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ROLES = ("T1", "T1c", "T2", "FLAIR")


class BrainTumourSettings(BaseModel):
    """``[pipelines.brain_tumour]`` in the node configuration."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "brats-segresnet-demo",
        description="Name of the model card to use (see `ainode models list`).",
    )
    reference_role: Literal["T1", "T1c", "T2", "FLAIR"] = Field(
        "T1c", description="The series whose grid the SEG lies on."
    )
    roi_size: tuple[int, int, int] | None = Field(
        None, description="Sliding-window roi (voxels); empty uses the model card's."
    )
    overlap: float | None = Field(None, ge=0.0, lt=1.0, description="Sliding-window overlap; empty uses the card's.")
    skull_strip: Literal["auto", "always", "never"] = Field(
        "auto", description="'auto' strips only volumes that are not already skull-stripped."
    )
    n4: bool | None = Field(
        None,
        description="N4 bias-field correction on/off; empty follows the model card "
        "(volume_input.bias_field_correction: how the model was trained).",
    )
    n4_shrink_factor: int = Field(4, ge=1, le=8, description="N4 runs on a volume shrunk by this factor.")
