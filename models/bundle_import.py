"""Write a model card for a MONAI bundle directory, so the bundle loads unchanged.

A MONAI model-zoo bundle (``configs/metadata.json``, ``configs/inference.json``,
``models/model.pt``) is used in place: the node never copies or converts it.

Every bundle first passes the generic checks of :func:`read_monai_bundle`
(the three files, JSON objects, a ``network_def`` with a ``_target_``, a
``preprocessing`` that loads one image with ``LoadImaged``, an ``inferer``
and a ``postprocessing``). Then, per pipeline (``ainode models import-bundle
--pipeline``):

* ``bundle_segmentation`` (:func:`import_segmentation_bundle`): any single-input
  segmentation bundle whose own ``inference.json`` the pipeline runs; the
  card (task ``bundle_segmentation``) takes the modalities and label names
  from ``metadata.json`` ``network_data_format``;
* ``brain_tumour`` (:func:`import_monai_bundle`, the default): the BraTS checks below.

:func:`import_monai_bundle` reads the bundle, checks it against a card template
(by default ``models/templates/brats_mri_segmentation.json``, the MONAI
``brats_mri_segmentation`` bundle), fills in what the bundle says (version,
network, sliding window, threshold, the bundle authors' Dice), records the
SHA-256 of ``models/model.pt`` and of ``configs/inference.json``, writes
``<out_dir>/<name>.json`` and loads the model once through the registry
(``strict=True``) to prove the card works.

What is checked against the template, each refused with a ValueError naming it:

* ``metadata.json`` ``network_data_format.inputs.image.channel_def`` gives the
  template's channel order (T1c, T1, T2, FLAIR) and the outputs' channel count;
* ``inference.json`` ``postprocessing`` applies a sigmoid and its ``Lambdad``
  label map gives, for every on/off combination of the channels, the label the
  template's ``label_rules`` give (ET -> 4, else TC -> 1, else WT -> 2);
* ``inferer`` is a ``SlidingWindowInferer`` with literal ``roi_size`` and ``overlap``.

Run::

    python -m models.bundle_import /path/to/brats_mri_segmentation /etc/ainode/models

then add ``/etc/ainode/models`` to ``[models] card_dirs`` and set
``[pipelines.brain_tumour] model = "brats-mri-segmentation"``; or, for the
generic pipeline, ``--pipeline bundle_segmentation`` and
``[pipelines.bundle_segmentation] model = "<name>"``.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.card import ModelCard
from models.registry import ModelRegistry, WeightsIntegrityError, bundle_network_def, read_bundle_json, sha256_file

__all__ = [
    "BRATS_TEMPLATE",
    "IMPORTERS",
    "MonaiBundle",
    "bundle_registry",
    "import_monai_bundle",
    "import_segmentation_bundle",
    "main",
    "read_monai_bundle",
    "segmentation_bundle_card",
]

#: Card template of the MONAI ``brats_mri_segmentation`` bundle.
BRATS_TEMPLATE = Path(__file__).resolve().parent / "templates" / "brats_mri_segmentation.json"

# metadata.json eval_metrics key -> card metric name
_EVAL_METRICS = {"val_mean_dice_tc": "Dice TC", "val_mean_dice_wt": "Dice WT", "val_mean_dice_et": "Dice ET",
                 "val_mean_dice": "Mean Dice"}


def _literal(value: Any, what: str) -> Any:
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ValueError(f"MONAI bundle: {what} is an expression ({value!r}); write this card by hand")
    return value


def _transforms(config: dict, key: str) -> list[dict]:
    block = config.get(key)
    ts = block.get("transforms") if isinstance(block, dict) else None
    return [t for t in ts if isinstance(t, dict)] if isinstance(ts, list) else []


def _target(t: dict) -> str:
    return str(t.get("_target_", "")).rsplit(".", 1)[-1]


@dataclass(frozen=True)
class MonaiBundle:
    """A MONAI bundle folder as read, nothing evaluated.

    Attributes
    ----------
    root:
        The bundle folder, absolute.
    metadata, config:
        ``configs/metadata.json`` and ``configs/inference.json`` as dicts.
    image_key:
        The one key ``preprocessing``'s ``LoadImaged`` loads (e.g. ``"image"``).
    """

    root: Path
    metadata: dict
    config: dict
    image_key: str

    @property
    def weights(self) -> Path:
        return self.root / "models" / "model.pt"

    @property
    def inference(self) -> Path:
        return self.root / "configs" / "inference.json"


def read_monai_bundle(bundle_dir: Path) -> MonaiBundle:
    """Read a bundle folder and make the checks every pipeline needs.

    Raises
    ------
    FileNotFoundError
        The folder, ``configs/metadata.json``, ``configs/inference.json`` or
        ``models/model.pt`` is missing.
    ValueError
        Naming the file and key: a file is not a JSON object; ``network_def``
        has no ``_target_``; ``preprocessing``, ``inferer`` or
        ``postprocessing`` is missing or has no ``_target_``; preprocessing
        does not load exactly one image key with one ``LoadImaged``.
    """
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"MONAI bundle: {root} is not a folder")
    metadata = read_bundle_json(root / "configs" / "metadata.json")
    config = read_bundle_json(root / "configs" / "inference.json")
    if not (root / "models" / "model.pt").is_file():
        raise FileNotFoundError(f"MONAI bundle: {root / 'models' / 'model.pt'} not found")
    bundle_network_def(root)
    where = root / "configs" / "inference.json"
    for key in ("preprocessing", "inferer", "postprocessing"):
        block = config.get(key)
        if not isinstance(block, dict) or not isinstance(block.get("_target_"), str):
            raise ValueError(f"MONAI bundle {root}: {where} has no {key} with a _target_")
    loaders = [t for t in _transforms(config, "preprocessing") if _target(t) == "LoadImaged"]
    if len(loaders) != 1:
        raise ValueError(f"MONAI bundle {root}: preprocessing#transforms has {len(loaders)} LoadImaged; the node "
                         "feeds one series in place of exactly one")
    keys = _literal(loaders[0].get("keys"), "preprocessing LoadImaged#keys")
    keys = [keys] if isinstance(keys, str) else keys
    if not isinstance(keys, list) or len(keys) != 1 or not isinstance(keys[0], str):
        raise ValueError(f"MONAI bundle {root}: preprocessing LoadImaged#keys is {keys!r}; expected one image key")
    return MonaiBundle(root=root, metadata=metadata, config=config, image_key=keys[0])


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return slug or "monai-bundle"


def _output_labels(bundle: MonaiBundle, out_channels: Any) -> dict[int, str]:
    """Label value -> name from ``outputs.pred.channel_def``: value k is
    ``channel_def[k]``, 0 is background; a one-channel (sigmoid) output's
    value 1 is its one channel."""
    fmt = bundle.metadata.get("network_data_format") or {}
    where = f"MONAI bundle {bundle.root}: configs/metadata.json network_data_format.outputs.pred.channel_def"
    channel_def = ((fmt.get("outputs") or {}).get("pred") or {}).get("channel_def")
    if not isinstance(channel_def, dict) or not channel_def:
        raise ValueError(f"{where} is missing: the node names each segment from it")
    try:
        names = {int(k): str(v).strip() for k, v in channel_def.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{where}: keys must be channel numbers, got {sorted(channel_def)}") from None
    if sorted(names) != list(range(len(names))) or not all(names.values()):
        raise ValueError(f"{where}: expected named channels 0..{len(names) - 1}, got {channel_def}")
    if isinstance(out_channels, int) and out_channels != len(names):
        raise ValueError(f"{where} names {len(names)} channels; network_def out_channels is {out_channels}")
    if len(names) == 1:
        return {1: names[0]}
    if len(names) > 256:
        raise ValueError(f"{where}: {len(names)} channels; a label map holds at most 255 labels")
    return {k: v for k, v in names.items() if k != 0}


def _modalities(bundle: MonaiBundle) -> list[str]:
    image = ((bundle.metadata.get("network_data_format") or {}).get("inputs") or {}).get(bundle.image_key) or {}
    where = f"MONAI bundle {bundle.root}: configs/metadata.json network_data_format.inputs.{bundle.image_key}"
    channels = image.get("num_channels", 1)
    if channels != 1:
        raise ValueError(f"{where}.num_channels is {channels!r}; the pipeline feeds one series (1 channel)")
    modality = image.get("modality")
    values = [modality] if isinstance(modality, str) else modality
    if not isinstance(values, list) or not values or not all(isinstance(m, str) and m.strip() for m in values):
        raise ValueError(f"{where}.modality is {modality!r}; give the DICOM Modality it reads, e.g. \"CT\"")
    return [m.strip().upper() for m in values]


def segmentation_bundle_card(bundle_dir: Path, *, name: str | None = None) -> ModelCard:
    """The card of a generic segmentation bundle (task ``bundle_segmentation``),
    with the SHA-256 of ``models/model.pt`` and ``configs/inference.json``.

    Parameters
    ----------
    bundle_dir:
        The bundle folder (see :func:`read_monai_bundle`).
    name:
        Card name; default: the folder's name in lower case, other characters
        than ``a-z0-9._-`` as ``-``.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_monai_bundle`; also, naming the key: ``metadata.json``
        lacks ``network_data_format.outputs.pred.channel_def`` or the input's
        ``modality``, declares another number of output channels than
        ``network_def``'s ``out_channels``, or more than one input channel.
    """
    bundle = read_monai_bundle(bundle_dir)
    target, args = bundle_network_def(bundle.root)
    labels = _output_labels(bundle, args.get("out_channels"))
    meta = bundle.metadata
    version = str(meta.get("version") or "unknown")
    title = str(meta.get("name") or bundle.root.name)
    evals = meta.get("eval_metrics") or {}
    reported = ", ".join(f"{k} {v}" for k, v in evals.items() if isinstance(v, int | float))
    licence = meta.get("license") or meta.get("copyright")
    return ModelCard(
        name=name or _slug(bundle.root.name),
        version=version,
        task="bundle_segmentation",
        description=f"MONAI bundle {title!r} ({bundle.root.name}), run unchanged by the bundle_segmentation "
                    f"pipeline from its configs/inference.json. {meta.get('description') or ''}".strip(),
        architecture={"name": target, "params": args},
        bundle_output={"modalities": _modalities(bundle), "labels": labels},
        weights={"format": "monai_bundle", "path": str(bundle.root), "sha256": sha256_file(bundle.weights),
                 "config_sha256": sha256_file(bundle.inference)},
        licence={"spdx": "NOASSERTION", "notes": str(licence) if licence else "see the bundle's LICENSE and docs"},
        intended_use=str(meta.get("intended_use") or "research use; not validated in this project")
        + " Not a medical device; results must be read by a radiologist.",
        demonstration_only=True,
        training_data={"description": str(meta.get("data_source") or "as the bundle's docs describe")},
        training={"command": "imported with ainode models import-bundle --pipeline bundle_segmentation",
                  "notes": f"Imported from {bundle.root} (metadata version {version}, MONAI "
                           f"{meta.get('monai_version', '?')}). Reported by the bundle authors, not measured here: "
                           f"{reported or 'no eval_metrics'}."},
    )


def bundle_registry(bundle_dir: Path, *, name: str | None = None,
                    sha256: str | None = None) -> tuple[ModelRegistry, str]:
    """A registry holding only the card of the bundle at ``bundle_dir``
    (:func:`segmentation_bundle_card`, in memory), and the card's name: for a
    bundle configured by path. The registry verifies the hashes again when it
    loads the bundle.

    Parameters
    ----------
    sha256:
        Pinned SHA-256 of ``models/model.pt`` (lower-case hex), or None.

    Raises
    ------
    WeightsIntegrityError
        ``sha256`` is given and ``models/model.pt`` has another.
    FileNotFoundError, ValueError
        As :func:`segmentation_bundle_card`.
    """
    card = segmentation_bundle_card(bundle_dir, name=name)
    if sha256 is not None and sha256.lower() != card.weights.sha256:
        raise WeightsIntegrityError(
            f"MONAI bundle {card.weights.path}: SHA-256 of models/model.pt is {card.weights.sha256}, but the "
            f"configuration pins {sha256}; refusing to load"
        )
    stands_for = Path(card.weights.path) / "configs" / "metadata.json"
    return ModelRegistry(include_shipped=False, cards=[(card, stands_for)]), card.name


def import_segmentation_bundle(bundle_dir: Path, out_dir: Path, *, name: str | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` for a generic segmentation bundle and
    load it once through the registry (SHA-256, ``weights_only=True``,
    ``strict=True``) to prove it works; the card is removed if that fails.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`segmentation_bundle_card`; or the weights do not load
        into ``network_def``.
    """
    card = segmentation_bundle_card(bundle_dir, name=name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{card.name}.json"
    card.to_file(path)
    try:
        ModelRegistry([out], include_shipped=False).load(card.name)
    except Exception:
        path.unlink()
        raise
    return path


def _check_label_map(bundle: Path, config: dict, template: dict) -> str:
    """Evaluate the bundle's ``Lambdad`` label map (MONAI ``ConfigParser``) on
    every on/off combination of the channels and compare it with the
    template's rules. Returns a note for the card."""
    import torch
    from monai.bundle import ConfigParser

    seg = template["segmentation"]
    channels, rules = seg["channels"], seg["label_rules"]
    post = _transforms(config, "postprocessing")
    index = next((i for i, t in enumerate(post) if _target(t) == "Lambdad"), None)
    if index is None:
        return "The bundle's postprocessing has no Lambdad label map; the card's label_rules are the BraTS convention."
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    func = parser.get_parsed_content(f"postprocessing#transforms#{index}#func")
    combos = list(itertools.product([0.0, 1.0], repeat=len(channels)))
    x = torch.tensor(combos, dtype=torch.float32).T.reshape(len(channels), len(combos), 1, 1)
    got = torch.as_tensor(func(x)).reshape(-1).tolist()
    for combo, label in zip(combos, got, strict=True):
        on = {c for c, v in zip(channels, combo, strict=True) if v}
        want = next((r["label"] for r in rules if r["channel"] in on), 0)
        if int(label) != want:
            raise ValueError(
                f"MONAI bundle {bundle}: postprocessing Lambdad gives label {int(label)} where channels {sorted(on)} "
                f"are on; the template's label_rules give {want}"
            )
    return "The bundle's Lambdad label map was evaluated on every on/off combination of the channels and matches."


def import_monai_bundle(
    bundle_dir: Path, out_dir: Path, *, name: str = "brats-mri-segmentation", template: Path = BRATS_TEMPLATE
) -> Path:
    """Write and verify a model card for a MONAI bundle directory.

    Parameters
    ----------
    bundle_dir:
        The bundle: ``configs/metadata.json``, ``configs/inference.json``,
        ``models/model.pt`` (a state dict, or MONAI ``CheckpointSaver``'s
        ``{"model": state_dict}``). It stays where it is; the card points at it
        by absolute path.
    out_dir:
        Card directory to write ``<name>.json`` into (created if missing).
    name:
        Card name (lower case, digits, ``.``, ``_``, ``-``).
    template:
        Card template the bundle must match (default: the MONAI
        ``brats_mri_segmentation`` template).

    Returns
    -------
    Path of the written card.

    Raises
    ------
    FileNotFoundError
        A bundle file or the template is missing.
    ValueError
        The bundle does not match the template (channel order, activation,
        label map, network), uses expressions where literals are needed, or its
        weights do not load into its ``network_def`` with ``strict=True``.
    """
    files = read_monai_bundle(bundle_dir)  # the generic checks first
    bundle, metadata, config, weights = files.root, files.metadata, files.config, files.weights
    out = Path(out_dir)
    tpl = read_bundle_json(Path(template))

    # --- inputs and outputs as metadata.json declares them
    fmt = metadata.get("network_data_format", {})
    in_def = fmt.get("inputs", {}).get("image", {}).get("channel_def")
    if in_def is not None:
        declared = [str(in_def[k]) for k in sorted(in_def, key=int)]
        want = tpl["volume_input"]["channels"]
        if [d.lower() for d in declared] != [w.lower() for w in want]:
            raise ValueError(f"MONAI bundle {bundle}: metadata channel_def {declared} differs from the template's "
                             f"volume_input.channels {want}")
    out_def = fmt.get("outputs", {}).get("pred", {}).get("channel_def")
    if out_def is not None and len(out_def) != len(tpl["segmentation"]["channels"]):
        raise ValueError(f"MONAI bundle {bundle}: metadata declares {len(out_def)} output channels, the template "
                         f"{len(tpl['segmentation']['channels'])}")

    # --- network, inferer and postprocessing as inference.json runs them
    target, args = bundle_network_def(bundle)
    inferer = config.get("inferer", {})
    if not isinstance(inferer, dict) or _target(inferer) != "SlidingWindowInferer":
        raise ValueError(f"MONAI bundle {bundle}: inferer is not a SlidingWindowInferer: {inferer!r}")
    sw = dict(tpl["segmentation"]["sliding_window"])
    sw["roi_size"] = list(_literal(inferer.get("roi_size", sw["roi_size"]), "inferer#roi_size"))
    sw["overlap"] = float(_literal(inferer.get("overlap", 0.25), "inferer#overlap"))  # MONAI's default is 0.25
    sw["sw_batch_size"] = int(_literal(inferer.get("sw_batch_size", 1), "inferer#sw_batch_size"))
    sw["mode"] = str(_literal(inferer.get("mode", "constant"), "inferer#mode"))
    post = _transforms(config, "postprocessing")
    act = next((t for t in post if _target(t) == "Activationsd"), None)
    if act is None or _literal(act.get("sigmoid"), "Activationsd#sigmoid") is not True:
        raise ValueError(f"MONAI bundle {bundle}: postprocessing has no Activationsd(sigmoid=True); the template "
                         "expects sigmoid outputs")
    disc = next((t for t in post if _target(t) == "AsDiscreted"), None)
    threshold = float(_literal(disc.get("threshold"), "AsDiscreted#threshold")) if disc and disc.get(
        "threshold") is not None else tpl["segmentation"]["threshold"]
    note = _check_label_map(bundle, config, tpl)

    card = dict(tpl)
    card["name"] = name
    card["version"] = str(metadata.get("version", "unknown"))
    card["architecture"] = {"name": target, "params": args}
    card["segmentation"] = {**tpl["segmentation"], "sliding_window": sw, "threshold": threshold}
    card["weights"] = {"format": "monai_bundle", "path": str(bundle), "sha256": sha256_file(weights),
                       "config_sha256": sha256_file(bundle / "configs" / "inference.json")}
    evals = metadata.get("eval_metrics", {})
    metrics = []
    for m in tpl.get("metrics", []):
        key = next((k for k, v in _EVAL_METRICS.items() if v == m["name"]), None)
        if key in evals and isinstance(evals[key], int | float):
            m = {**m, "value": float(evals[key])}  # the bundle's own metadata wins over the template
        metrics.append(m)
    card["metrics"] = metrics
    training = dict(tpl.get("training") or {"command": "imported with python -m models.bundle_import"})
    training["notes"] = (f"Imported from {bundle} (metadata version {card['version']}, MONAI "
                         f"{metadata.get('monai_version', '?')}). {note}")
    card["training"] = training

    validated = ModelCard(**card)  # raises ValueError naming the attribute
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    validated.to_file(path)
    try:
        ModelRegistry([out], include_shipped=False).load(name)  # SHA-256 + strict load
    except Exception:
        path.unlink()
        raise
    return path


def _import_brain(bundle_dir: Path, out_dir: Path, *, name: str | None = None) -> Path:
    return import_monai_bundle(bundle_dir, out_dir, name=name or "brats-mri-segmentation")


#: ``--pipeline`` -> the importer whose checks that pipeline needs (brain_tumour: BraTS).
IMPORTERS = {"brain_tumour": _import_brain, "bundle_segmentation": import_segmentation_bundle}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.bundle_import BUNDLE_DIR OUT_DIR [--pipeline P] [--name NAME]``."""
    parser = argparse.ArgumentParser(prog="python -m models.bundle_import", description=__doc__.split("\n")[0])
    parser.add_argument("bundle_dir", type=Path, help="MONAI bundle directory (configs/, models/model.pt)")
    parser.add_argument("out_dir", type=Path, help="card directory to write into")
    parser.add_argument("--pipeline", choices=sorted(IMPORTERS), default="brain_tumour")
    parser.add_argument("--name", default=None)
    parser.add_argument("--template", type=Path, default=BRATS_TEMPLATE, help="brain_tumour only")
    args = parser.parse_args(argv)
    if args.pipeline == "brain_tumour":
        path = import_monai_bundle(args.bundle_dir, args.out_dir, name=args.name or "brats-mri-segmentation",
                                   template=args.template)
    else:
        path = IMPORTERS[args.pipeline](args.bundle_dir, args.out_dir, name=args.name)
    print(f"wrote {path}; set [models] card_dirs = [\"{args.out_dir}\"] and [pipelines.{args.pipeline}] model = "
          f"\"{path.stem}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
