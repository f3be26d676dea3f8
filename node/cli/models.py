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


_TASK_PIPELINE = {"classification": "pneumonia", "segmentation": "brain_tumour", "bundle_segmentation": "bundle_segmentation"}


@models_app.command("reference")
def models_reference(
    card_path: Annotated[Path, typer.Argument(metavar="CARD", help="Model card JSON to write the reference into.")],
    data: Annotated[Path, typer.Option(help="Folder of DICOM studies, or (chest) of PNG images with labels.csv, "
                                       "or (brain) BraTS-style NIfTI case folders.")],
    pipeline: Annotated[str | None, typer.Option(help="Pipeline that runs the card (default: from the card's task).")] = None,
    exclude_training: Annotated[bool, typer.Option(help="PNG folder: leave out the card's training members.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: [worker] torch_threads).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Compute the card's input-drift reference from data, without retraining, and write it into the card.

    Each image or study goes through the pipeline's preprocessing and model
    (node.drift). For a DICOM folder the pipeline runs as ``ainode run``
    runs it (study-level roles assigned by [sequences]); a chest PNG folder
    is read as the training command reads it (pipelines/pneumonia/reference.py), and so is a
    brain folder of BraTS-style NIfTI cases (pipelines/brain_tumour/reference.py).
    """
    from collections import defaultdict

    import pydicom

    from models.card import ModelCard
    from models.registry import SHIPPED_CARDS, ModelRegistry
    from node.cli.common import _dicom_files
    from node.cli.run import _offline_studies
    from node.drift import reference_from_studies
    from node.run import resolve_device
    from pipelines.registry import registry

    cfg = _config(config)
    card = ModelCard.from_file(card_path)
    name = pipeline or _TASK_PIPELINE[card.task]
    if name not in registry():
        raise typer.BadParameter(registry().unknown(name))
    shipped = card_path.resolve().parent == SHIPPED_CARDS.resolve()
    models = ModelRegistry() if shipped else ModelRegistry([card_path.resolve().parent], include_shipped=False)
    settings = getattr(cfg.pipelines, name).model_copy(update={"model": card.name})
    device = resolve_device(cfg.worker.device)
    if threads or cfg.worker.torch_threads:
        import torch

        torch.set_num_threads(threads or cfg.worker.torch_threads)
    pngs = sorted((data / "images").glob("*.png")) + sorted(data.glob("*.png"))
    if pngs and name == "pneumonia":
        from pipelines.pneumonia.model import PneumoniaModel
        from pipelines.pneumonia.reference import png_reference

        members = set(card.training_data.training_members) if exclude_training else set()
        reference = png_reference(PneumoniaModel(models, card.name, device), data,
                                  keep=lambda p: p.stem not in members and p.name not in members)
    elif name == "brain_tumour" and (any(data.glob("*.nii*")) or any(data.glob("*/*.nii*"))):
        from pipelines.brain_tumour.model import BrainTumourModel
        from pipelines.brain_tumour.reference import nifti_reference

        reference = nifti_reference(BrainTumourModel(models, card.name, device), data)
    else:
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for f in _dicom_files([data]):
            ds = pydicom.dcmread(f)
            groups[(ds.StudyInstanceUID, ds.SeriesInstanceUID)].append(ds)
        inputs, _ = _offline_studies(groups, cfg, name, registry().spec(name), [])
        runner = registry().spec(name).load_class()(settings, models, device=device)
        reference = reference_from_studies(runner, [study for _, study in inputs], f"{len(inputs)} DICOM "
                                           f"{'studies' if registry().spec(name).level == 'study' else 'series'} of "
                                           f"{data.name}, run through {name} with {card.name} {card.version}", device=device)
    ModelCard(**{**card.model_dump(mode="json"), "drift_reference": reference.model_dump(mode="json")}).to_file(card_path)
    for feature, ref in reference.features.items():
        shown = ref.frequencies if ref.frequencies is not None else f"median {ref.quantiles[50]:g}" if ref.quantiles else ""
        typer.echo(f"{feature}: n={ref.n} {shown}")
    typer.echo(f"wrote the drift reference of {reference.n} inputs into {card_path}")


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
