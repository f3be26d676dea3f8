"""``ainode models`` (model cards: list, import) and ``ainode train``
(demonstration weights)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config

models_app = typer.Typer(help="Model cards and weights.", no_args_is_help=True)
train_app = typer.Typer(help="Train demonstration weights on local data.", no_args_is_help=True)


@models_app.command("list")
def models_list(config: ConfigOpt = None) -> None:
    """List the model cards the node can load."""
    from models.registry import ModelRegistry

    cfg = _config(config)
    registry = ModelRegistry(cfg.models.card_dirs)
    for name in registry.names():
        card = registry.card(name)
        demo = " (demonstration only)" if card.demonstration_only else ""
        typer.echo(f"{name}  v{card.version}  {card.task}{demo}")


@models_app.command("import-xrv")
def models_import_xrv(
    src: Annotated[Path, typer.Argument(help="torchxrayvision's densenet121-res224-rsna weight file (.pt).")],
    out: Annotated[Path, typer.Option(help="Card folder to write to (list it in [models] card_dirs).")],
    name: Annotated[str, typer.Option(help="Card name.")] = "xrv-densenet121-res224-rsna",
) -> None:
    """Convert the published torchxrayvision RSNA weights into a state dict + model card, offline."""
    from models.xrv_import import import_xrv_weights

    card = import_xrv_weights(src, out, name=name)
    typer.echo(f"wrote {card}; set [models] card_dirs = [\"{out}\"] and [pipelines.pneumonia] model = \"{name}\"")


@models_app.command("import-bundle")
def models_import_bundle(
    bundle: Annotated[Path, typer.Argument(help="MONAI bundle folder (configs/metadata.json, configs/inference.json, models/model.pt).")],
    out: Annotated[Path, typer.Option(help="Card folder to write to (list it in [models] card_dirs).")],
    name: Annotated[str | None, typer.Option(help="Card name (brain_tumour: brats-mri-segmentation; "
                                             "bundle_segmentation: the folder's name).")] = None,
    pipeline: Annotated[str, typer.Option(help="Pipeline whose checks the bundle must pass: brain_tumour "
                                          "(BraTS) or bundle_segmentation (any single-input bundle).")] = "brain_tumour",
) -> None:
    """Write a model card for a MONAI bundle (e.g. brats_mri_segmentation), used in place, offline."""
    from models.bundle_import import IMPORTERS

    if pipeline not in IMPORTERS:
        raise typer.BadParameter(f"unknown pipeline {pipeline!r}; expected one of {sorted(IMPORTERS)}")
    try:
        card = IMPORTERS[pipeline](bundle, out, name=name)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {card}; set [models] card_dirs = [\"{out}\"] and [pipelines.{pipeline}] model = \"{card.stem}\"")


@train_app.command("pneumonia")
def train_pneumonia_cmd(
    data: Annotated[Path, typer.Option(help="cxr14 folder: labels.csv and images/*.png (read in place).")],
    out: Annotated[Path, typer.Option(help="Model root: writes weights/ and cards/ under it.")] = Path("models"),
    name: Annotated[str, typer.Option(help="Card name.")] = "pneumonia-densenet121-demo",
    version: Annotated[str, typer.Option(help="Card version.")] = "0.1.0",
    size: Annotated[int, typer.Option(help="Network input side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Seeds the split, initialisation, batches and augmentation.")] = 20250101,
    budget_min: Annotated[float, typer.Option(help="Wall-clock budget for both training stages, minutes.")] = 28.0,
    max_epochs_stage1: Annotated[int, typer.Option(help="Epoch limit of the multi-task stage.")] = 40,
    max_epochs_stage2: Annotated[int, typer.Option(help="Epoch limit of the pneumonia fine-tuning stage.")] = 30,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only N images (smoke runs).")] = None,
) -> None:
    """Train the pneumonia demonstration weights and write their model card.

    Reports the held-out AUROC with its 95 % bootstrap interval in the card.
    """
    import logging
    import shlex

    from pipelines.pneumonia.train import TrainConfig, train_pneumonia

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    command = "ainode " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = train_pneumonia(
        TrainConfig(
            data_dir=data, out_dir=out, name=name, version=version, size=size, seed=seed,
            time_budget_s=budget_min * 60, max_epochs_stage1=max_epochs_stage1,
            max_epochs_stage2=max_epochs_stage2, threads=threads, limit=limit, command=command,
        )
    )
    for m in result.card.metrics:
        ci = f" (95% CI {m.ci95_low:.3f}-{m.ci95_high:.3f})" if m.ci95_low is not None else ""
        typer.echo(f"{m.name} [{m.split.split(' (')[0]}]: {m.value:.3f}{ci}, n={m.n}")
    typer.echo(f"wrote {result.card_path} and {result.weights_path} in {result.wall_time_s / 60:.1f} min")


@train_app.command("brain-tumour", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_brain_tumour_cmd(ctx: typer.Context) -> None:
    """Train the brain tumour demonstration weights (SegResNet, BraTS labels) and write their model card.

    Takes the options of ``python -m pipelines.brain_tumour.train``, e.g.
    ``ainode train brain-tumour --data ../shared/data/brats/TCGA-FG-6692-preprocessed --out models``;
    ``python -m pipelines.brain_tumour.train --help`` lists them. Reports Dice TC/WT/ET on held-out
    data in the card.
    """
    from pipelines.brain_tumour.train import main as train_main

    raise typer.Exit(train_main(list(ctx.args)))
