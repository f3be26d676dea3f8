"""Write a model card for a MONAI bundle directory, so the bundle loads unchanged.

A MONAI model-zoo bundle (``configs/metadata.json``, ``configs/inference.json``,
``models/model.pt``) is used in place: the node never copies or converts it.
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
``[pipelines.brain_tumour] model = "brats-mri-segmentation"``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.card import ModelCard
from models.registry import ModelRegistry, bundle_network_def, read_bundle_json, sha256_file

__all__ = ["BRATS_TEMPLATE", "import_monai_bundle", "main"]

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
    bundle = Path(bundle_dir).resolve()
    out = Path(out_dir)
    tpl = read_bundle_json(Path(template))
    metadata = read_bundle_json(bundle / "configs" / "metadata.json")
    config = read_bundle_json(bundle / "configs" / "inference.json")
    weights = bundle / "models" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"MONAI bundle: {weights} not found")

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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.bundle_import BUNDLE_DIR OUT_DIR [--name NAME]``."""
    parser = argparse.ArgumentParser(prog="python -m models.bundle_import", description=__doc__.split("\n")[0])
    parser.add_argument("bundle_dir", type=Path, help="MONAI bundle directory (configs/, models/model.pt)")
    parser.add_argument("out_dir", type=Path, help="card directory to write into")
    parser.add_argument("--name", default="brats-mri-segmentation")
    parser.add_argument("--template", type=Path, default=BRATS_TEMPLATE)
    args = parser.parse_args(argv)
    path = import_monai_bundle(args.bundle_dir, args.out_dir, name=args.name, template=args.template)
    print(f"wrote {path}; set [models] card_dirs = [\"{args.out_dir}\"] and [pipelines.brain_tumour] model = "
          f"\"{args.name}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
