"""What the training commands of every pipeline share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from models.card import ModelCard


@dataclass(frozen=True)
class TrainResult:
    """Where a training run's outputs went and what was measured.

    Attributes
    ----------
    card_path, weights_path:
        The model card (JSON) and the weight file written.
    card:
        The card as written, with the measured metrics.
    wall_time_s:
        Wall time of the whole run, seconds.
    history:
        One dict per validation (step or epoch, loss, metrics).
    """

    card_path: Path
    weights_path: Path
    card: ModelCard
    wall_time_s: float
    history: list[dict] = field(default_factory=list)


def check_fields(config: object, checks: Mapping[str, bool]) -> None:
    """Raise ``ValueError`` naming the first attribute of ``config`` whose check failed.

    ``checks`` maps attribute name -> whether its value is valid.
    """
    for attr, ok in checks.items():
        if not ok:
            raise ValueError(f"{type(config).__name__}.{attr} is invalid: {getattr(config, attr)!r}")
