"""What the training commands of every pipeline share: the result, config
checks, the weight file, the facts a card's ``training`` records, the
Markdown card, logging and the command line."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.card import ModelCard
from models.drift_reference import MIN_COUNT, comparable
from models.registry import sha256_file

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


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


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state dict (a checkpoint in memory)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_float16_weights(state: Mapping[str, torch.Tensor], out_dir: Path, name: str) -> tuple[Path, str]:
    """Write ``state`` as ``<out_dir>/weights/<name>.pt``, floating tensors as
    float16 (half the file; the registry casts back to float32), and make
    ``<out_dir>/cards/``.

    Returns
    -------
    path, sha256:
        The weight file and its lower-case hex SHA-256, for the card.
    """
    out = Path(out_dir)
    (out / "weights").mkdir(parents=True, exist_ok=True)
    (out / "cards").mkdir(parents=True, exist_ok=True)
    path = out / "weights" / f"{name}.pt"
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}, path)
    return path, sha256_file(path)


def run_environment(versions: Mapping[str, str]) -> dict[str, object]:
    """``date``, ``hardware`` and ``software`` of a card's ``TrainingRun``:
    now (UTC, ISO 8601), this CPU and torch's thread count, and the versions
    of python, torch, monai and numpy followed by ``versions``."""
    import monai

    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, no GPU",
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "numpy": np.__version__,
            **versions,
        },
    }


def config_hyperparameters(config: DataclassInstance, exclude: Iterable[str] = ()) -> dict[str, object]:
    """The fields of the dataclass ``config`` as card hyperparameters (paths as
    strings), without the run's identity (data and output folders, command,
    name, version) and ``exclude``."""
    skip = {"data_dir", "out_dir", "command", "name", "version", *exclude}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k not in skip}


def intended_use_lines(card: ModelCard) -> list[str]:
    """The card's intended-use rules as a Markdown list (and a blank line), or nothing."""
    if not card.intended_use_rules:
        return []
    lines = ["Intended-use rules (the node checks them before a job runs; `intended_use` in "
             "`[pipelines.<name>]` says whether an input outside one is refused or processed with a warning):", ""]
    for r in card.intended_use_rules:
        match = ", ".join(f"{k} {v.model_dump(exclude_none=True) if hasattr(v, 'model_dump') else v}"
                          for k, v in r.match.items())
        where = "" if r.applies_to == "series" else f" ({r.applies_to} series)"
        when = "; not held against an input lacking it" if r.absent == "in_scope" else ""
        lines.append(f"- `{r.name}`{where}: {r.description} [{match}{when}]")
    return lines + [""]


def drift_reference_lines(card: ModelCard) -> list[str]:
    """The card's input-drift reference (``drift_reference``) as a Markdown section, or nothing."""
    ref = card.drift_reference
    if ref is None:
        return []
    shown = []
    for feature, f in ref.features.items():
        if f.frequencies is not None:
            shown.append(f"{feature} " + ", ".join(f"{k} {v:.0%}" for k, v in f.frequencies.items()))
        elif f.quantiles is not None:
            shown.append(f"{feature} median {f.quantiles[50]:.4g} (5-95 % {f.quantiles[5]:.4g}-{f.quantiles[95]:.4g})")
    small = [f for f, r in ref.features.items() if not comparable(f, r.n, MIN_COUNT)]
    caveat = [] if not small else [
        f"n = {min(ref.features[f].n for f in small)} is too few for the measurements ({', '.join(map(str, small))}): "
        f"below `[drift] min_count` ({MIN_COUNT} by default) the node shows them but does not compare them, since a KS test "
        "against so small a reference cannot decide (models.drift_reference.comparable). Categories and acquisition "
        "settings (pixel spacing, slice thickness) are compared at any n: against a reference of one value the KS "
        "statistic is the share of recent inputs whose value differs from it.", ""]
    return ["", "## Input-drift reference", "", f"{ref.source}; n = {ref.n}. The node compares each model's recent inputs "
            "with it (`[drift]`, `ainode_input_drift` gauges, dashboard): PSI for categories, KS statistic for numbers.",
            "", *[f"- {line}" for line in shown], "", *caveat,
            f"Recomputed without retraining by `ainode models reference models/cards/{card.name}.json --data FOLDER` "
            "(DICOM studies, the chest model's PNG folder with labels.csv, or the brain model's BraTS-style NIfTI case "
            "folders); the training command writes it too."]


def card_markdown(
    card: ModelCard, *, model: Sequence[str], performance: Sequence[str], split: str | None, run_detail: str = "."
) -> str:
    """A short human-readable model card generated from the JSON card.

    The pipeline gives what differs by task: the lines under "Model" and
    "Measured performance", the sentence on the data split (``None``: none)
    and the end of the "Wall time" sentence.
    """
    td = card.training_data
    lines = [
        f"# {card.name} {card.version}", "",
        "**Demonstration weights: not for diagnosis.**" if card.demonstration_only else "", "",
        card.description, "", "## Intended use", "", card.intended_use, "", *intended_use_lines(card),
        "## Model", "", *model,
        "", "## Measured performance", "", *performance,
    ]
    lines += ["", "## Training data", "", td.description, ""] + [f"- {s}" for s in td.sources]
    if split:
        lines += ["", split]
    if card.training:
        lines += ["", "## Training run", "", f"`{card.training.command}`", "",
                  f"Wall time {card.training.wall_time_s:.0f} s on {card.training.hardware}; {card.training.date}"
                  + run_detail, "", card.training.notes or ""]
    lines += drift_reference_lines(card)
    lines += ["", "## Licence", "", f"{card.licence.spdx}. {card.licence.notes or ''}", "", "## References", ""]
    lines += [f"- {r}" for r in card.references]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def write_card(card: ModelCard, card_path: Path, markdown: str) -> None:
    """Write ``card`` as JSON at ``card_path`` and ``markdown`` beside it (``.md``)."""
    card.to_file(card_path)
    Path(card_path).with_suffix(".md").write_text(markdown, encoding="utf-8")


def configure_logging(log_file: Path | None) -> None:
    """INFO lines with a time stamp to stdout, and to ``log_file`` if given."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers, force=True)


def command_line(module: str, argv: Sequence[str] | None, environment: Sequence[str] = ()) -> str:
    """The shell command that reruns ``python -m <module>`` with ``argv``
    (``None``: this process's arguments), preceded by the ``environment``
    variables that are set, for the card's ``training.command``."""
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in environment if k in os.environ)
    args = argv if argv is not None else sys.argv[1:]
    return (env + " " if env else "") + f"python -m {module} " + " ".join(shlex.quote(a) for a in args)
