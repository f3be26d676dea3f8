"""Model registry: finds model cards, checks weight files, builds networks.

Cards (:class:`~models.card.ModelCard` JSON files) are read from the shipped
``models/cards/`` and from directories the configuration adds. Loading a model
verifies the SHA-256 of its weight file first and only then reads it, offline:

* ``state_dict``: ``torch.load(weights_only=True)`` (no code runs), floating
  tensors cast to float32, loaded into the card's architecture with
  ``strict=True``;
* ``torchscript``: ``torch.jit.load``;
* ``monai_bundle``: a bundle directory (``configs/metadata.json``,
  ``configs/inference.json``, ``models/model.pt``), e.g. the MONAI model-zoo
  ``brats_mri_segmentation`` bundle unchanged; the network is ``network_def``
  of ``configs/inference.json`` (MONAI ``ConfigParser``), the hash covers
  ``models/model.pt`` and, when the card gives ``weights.config_sha256``,
  ``configs/inference.json`` too (``ConfigParser`` evaluates its ``$``
  expressions, so it is checked like code). For segmentation cards the card's
  ``architecture`` must name ``network_def``'s ``_target_`` and parameters,
  which :func:`models.bundle_import.import_monai_bundle` copies from it.

The registry is read-only after construction and safe to share between threads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from models.card import ModelCard
from models.densenet import GRADCAM_LAYER, XRVDenseNet121
from models.segresnet import build_segresnet

#: The folder of the cards shipped with the package.
SHIPPED_CARDS = Path(__file__).resolve().parent / "cards"


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to build one ``architecture.name``.

    Attributes
    ----------
    build:
        Called with the card's ``architecture.params`` as keyword arguments;
        returns an untrained ``nn.Module``.
    cam_layer:
        Module name (as in ``named_modules``) whose output Grad-CAM uses, or
        None when the architecture has no sensible one.
    """

    build: Callable[..., nn.Module]
    cam_layer: str | None = None


#: Architectures that ``state_dict`` cards may name.
ARCHITECTURES: Mapping[str, ArchitectureSpec] = MappingProxyType(
    {
        "xrv-densenet121": ArchitectureSpec(XRVDenseNet121, GRADCAM_LAYER),
        # MONAI SegResNet (Myronenko 2018, arXiv:1810.11654), as in the brats_mri_segmentation bundle
        "monai-segresnet": ArchitectureSpec(build_segresnet),
    }
)


class ModelNotFoundError(LookupError):
    """No card of that name in the registry's directories."""


class WeightsIntegrityError(ValueError):
    """A weight file's SHA-256 differs from its card's."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Lower-case hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ModelRegistry:
    """The model cards the node knows, by name.

    Parameters
    ----------
    card_dirs:
        Extra directories of ``*.json`` cards, searched after the shipped one.
    include_shipped:
        Also read :data:`SHIPPED_CARDS`.
    architectures:
        Architecture name -> :class:`ArchitectureSpec`; :data:`ARCHITECTURES`
        by default.
    cards:
        Cards held in memory rather than in a directory, each with the path
        it stands for (relative weight paths resolve against its folder):
        a MONAI bundle configured by path gets its card this way
        (:func:`models.bundle_import.bundle_registry`). Verified and loaded
        like the others.

    Raises
    ------
    ValueError
        A card directory does not exist or is not a directory, a card is
        invalid (the message names the file and attribute), or two cards share
        a name (both files are named: the node must not guess which one runs).
    """

    def __init__(
        self,
        card_dirs: Sequence[Path] = (),
        *,
        include_shipped: bool = True,
        architectures: Mapping[str, ArchitectureSpec] = ARCHITECTURES,
        cards: Sequence[tuple[ModelCard, Path]] = (),
    ) -> None:
        dirs = ([SHIPPED_CARDS] if include_shipped else []) + [Path(d) for d in card_dirs]
        self._architectures = MappingProxyType(dict(architectures))
        extra = list(cards)
        found: dict[str, tuple[ModelCard, Path]] = {}
        for d in dirs:
            if not d.is_dir():
                if d == SHIPPED_CARDS:
                    continue
                raise ValueError(f"card_dirs: {d} is not a directory")
            for path in sorted(d.glob("*.json")):
                card = ModelCard.from_file(path)
                if card.name in found:
                    raise ValueError(
                        f"model card name {card.name!r} is defined twice: {found[card.name][1]} and {path}"
                    )
                found[card.name] = (card, path.resolve())
        for card, path in extra:
            if card.name in found:
                raise ValueError(f"model card name {card.name!r} is defined twice: {found[card.name][1]} and {path}")
            found[card.name] = (card, Path(path).resolve())
        self._cards = MappingProxyType(found)

    def names(self) -> list[str]:
        """Names of all cards, sorted."""
        return sorted(self._cards)

    def card(self, name: str) -> ModelCard:
        """The card called ``name``. Raises :class:`ModelNotFoundError`."""
        return self._entry(name)[0]

    def card_path(self, name: str) -> Path:
        """The JSON file of card ``name``. Raises :class:`ModelNotFoundError`."""
        return self._entry(name)[1]

    def weights_path(self, name: str) -> Path:
        """Absolute path of the weight file (or bundle directory) of ``name``."""
        card, path = self._entry(name)
        return card.weights_path(path.parent)

    def cam_layer(self, name: str) -> str | None:
        """Grad-CAM target layer of ``name``'s architecture, if known."""
        spec = self._architectures.get(self.card(name).architecture.name)
        return spec.cam_layer if spec else None

    def verify(self, name: str) -> Path:
        """Check that the weight file exists and its SHA-256 matches the card.

        Returns
        -------
        The path of the hashed file.

        Raises
        ------
        ModelNotFoundError
            Unknown ``name``.
        FileNotFoundError
            The weight file (or the bundle's ``models/model.pt``) is missing.
        WeightsIntegrityError
            The hash differs; the message names the file and both hashes.
        """
        card = self.card(name)
        path = self.weights_path(name)
        bundle = card.weights.format == "monai_bundle"
        hashed = path / "models" / "model.pt" if bundle else path
        checks = [(hashed, card.weights.sha256)]
        if bundle and card.weights.config_sha256 is not None:
            checks.append((path / "configs" / "inference.json", card.weights.config_sha256))
        for file, expected in checks:
            if not file.is_file():
                raise FileNotFoundError(
                    f"model {name!r}: file {file} not found (card {self.card_path(name)}, weights.path "
                    f"{card.weights.path!r})"
                )
            actual = sha256_file(file)
            if actual != expected:
                raise WeightsIntegrityError(
                    f"model {name!r}: SHA-256 of {file} is {actual}, but the card {self.card_path(name)} "
                    f"expects {expected}; refusing to load"
                )
        return hashed

    def load(self, name: str, device: str | torch.device = "cpu") -> nn.Module:
        """Verify and load model ``name`` onto ``device``, in eval mode.

        Parameters
        ----------
        name:
            Card name.
        device:
            torch device string, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.

        Returns
        -------
        The network in eval mode; float32 parameters.

        Raises
        ------
        ModelNotFoundError, FileNotFoundError, WeightsIntegrityError
            As :meth:`verify`.
        ValueError
            Unknown architecture, or the weights do not fit it (strict loading);
            the message names the file.
        """
        card = self.card(name)
        path = self.verify(name)
        fmt = card.weights.format
        if fmt == "state_dict":
            model = self._load_state_dict(card, path)
        elif fmt == "torchscript":
            model = torch.jit.load(str(path), map_location="cpu")
        elif fmt == "monai_bundle":
            model = _load_monai_bundle(self.weights_path(name), path, card)
        else:  # pragma: no cover - the card schema allows only the above
            raise ValueError(f"model {name!r}: unknown weights.format {fmt!r}")
        return model.to(device).eval()

    def _entry(self, name: str) -> tuple[ModelCard, Path]:
        try:
            return self._cards[name]
        except KeyError:
            raise ModelNotFoundError(
                f"no model card named {name!r}; known: {', '.join(self.names()) or '(none)'}"
            ) from None

    def _load_state_dict(self, card: ModelCard, path: Path) -> nn.Module:
        spec = self._architectures.get(card.architecture.name)
        if spec is None:
            raise ValueError(
                f"model {card.name!r}: architecture.name {card.architecture.name!r} is not one of "
                f"{sorted(self._architectures)}"
            )
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
        # float16 storage keeps committed files small; compute in float32
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
        model = spec.build(**card.architecture.params)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path}: does not fit architecture {card.architecture.name!r}: {exc}") from exc
        return model


def read_bundle_json(path: Path) -> dict:
    """A MONAI bundle's JSON file (``configs/*.json``) as a dict.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        It is not JSON, or not a JSON object.
    """
    if not path.is_file():
        raise FileNotFoundError(f"MONAI bundle: {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"MONAI bundle: {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"MONAI bundle: {path}: expected a JSON object")
    return data


def bundle_network_def(bundle: Path) -> tuple[str, dict]:
    """``_target_`` (last dotted part, e.g. ``"SegResNet"``) and the other
    arguments of ``network_def`` in a bundle's ``configs/inference.json``, as
    written (nothing is evaluated).

    Raises
    ------
    FileNotFoundError
        No ``configs/inference.json``.
    ValueError
        The file is not JSON or has no ``network_def`` with a ``_target_``.
    """
    config = Path(bundle) / "configs" / "inference.json"
    net = read_bundle_json(config).get("network_def")
    if not isinstance(net, dict) or not isinstance(net.get("_target_"), str):
        raise ValueError(f"MONAI bundle {bundle}: {config} has no network_def with a _target_")
    return net["_target_"].rsplit(".", 1)[-1], {k: v for k, v in net.items() if not k.startswith("_")}


def _load_monai_bundle(bundle: Path, weights: Path, card: ModelCard) -> nn.Module:
    """``network_def`` of a MONAI bundle with ``models/model.pt`` loaded
    strictly. The bundle's config is parsed by MONAI's ``ConfigParser``;
    only ``network_def`` and what it references are instantiated."""
    from monai.bundle import ConfigParser

    config = bundle / "configs" / "inference.json"
    target, args = bundle_network_def(bundle)
    if card.task in ("segmentation", "bundle_segmentation"):
        # The pipeline trusts the card's channel counts; they must describe this network_def.
        want = json.loads(json.dumps(card.architecture.params))
        if card.architecture.name != target or want != json.loads(json.dumps(args)):
            raise ValueError(
                f"model {card.name!r}: the card's architecture {card.architecture.name} {want} differs from "
                f"network_def {target} {args} in {config}"
            )
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle)
    model = parser.get_parsed_content("network_def")
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]  # MONAI CheckpointSaver layout
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights}: does not fit the bundle's network_def: {exc}") from exc
    return model
