"""One-time import of torchxrayvision's released DenseNet weights.

torchxrayvision publishes ``densenet121-res224-rsna`` (file
``kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt``, GitHub
release v1, Apache-2.0) as a whole pickled model: ``torch.load`` needs the
classes ``torchxrayvision.models.DenseNet``, ``_DenseBlock``, ... importable.
We cannot install torchxrayvision (its torchvision dependency replaces our CPU
torch), so :func:`import_xrv_weights` unpickles the file with a restricted
unpickler instead:

* globals from ``torchxrayvision.*`` and ``torchvision.*`` become inert
  placeholder classes that only record the pickled ``__dict__``
  (``__setstate__``); none of their code exists or runs;
* ``torch.nn`` module classes, tensor/parameter rebuild helpers and a few
  containers are allowed; every other global is refused
  (``pickle.UnpicklingError``), so the file cannot run arbitrary code;
* the state dict is rebuilt by walking ``_parameters``, ``_buffers`` (minus
  non-persistent ones) and ``_modules``, as ``nn.Module.state_dict`` does,
  which gives torchvision's key names, ``op_threshs`` included when the pickle
  holds it (older pickles do not; then the thresholds torchxrayvision sets from
  ``model_urls['rsna']`` are used).

The result is checked by loading it into :class:`~models.densenet.XRVDenseNet121`
with ``strict=True``, saved as a plain state dict, and described by a card
built from ``models/templates/xrv-densenet121-res224-rsna.json``.

Source: github.com/mlmed/torchxrayvision, ``torchxrayvision/models.py``.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import copyreg
import json
import pickle
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.card import ModelCard
from models.densenet import LUNG_OPACITY_INDEX, PNEUMONIA_INDEX, XRV_LABELS, XRVDenseNet121
from models.registry import sha256_file

TEMPLATE = Path(__file__).resolve().parent / "templates" / "xrv-densenet121-res224-rsna.json"

#: torchxrayvision ``model_urls['rsna']['op_threshs']``: NaN except Pneumonia and Lung Opacity.
XRV_RSNA_OP_THRESHS: tuple[float, ...] = tuple(
    0.13486601 if i == PNEUMONIA_INDEX else 0.13511065 if i == LUNG_OPACITY_INDEX else float("nan")
    for i in range(len(XRV_LABELS))
)

_PLACEHOLDER_PACKAGES = ("torchxrayvision", "torchvision")
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,  # type: ignore[attr-defined]  # private, not in typeshed
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch.nn.parameter", "Parameter"): nn.Parameter,
    ("numpy", "dtype"): np.dtype,
}
_NUMPY_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class PickledObject:
    """Stand-in for a class of a package we do not have.

    Unpickling creates it with ``__new__`` (no ``__init__``) and hands it the
    pickled instance state, which it keeps in :attr:`pickled_state`.
    """

    pickled_module: str = ""
    pickled_name: str = ""
    pickled_args: tuple[Any, ...]
    pickled_state: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        # pickle protocol 2 creates instances with cls.__new__(cls) and never calls __init__
        obj = super().__new__(cls)
        obj.pickled_args = args
        obj.pickled_state = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        # nn.Module pickles its __dict__; a (dict, slots) pair is also legal pickle state
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        self.pickled_state = dict(state) if isinstance(state, Mapping) else {"state": state}

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_module}.{self.pickled_name}>"


class _RestrictedPickle:
    """A ``pickle_module`` for ``torch.load``: ``Unpickler`` and ``load`` with
    an allow-list of globals. Placeholder classes are created per instance."""

    __name__ = "restricted_pickle"

    def __init__(self) -> None:
        placeholders: dict[tuple[str, str], type] = {}

        def find_class(module: str, name: str) -> Any:
            # protocol-2 pickles name Python 2 modules (e.g. __builtin__.set)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            if module.split(".")[0] in _PLACEHOLDER_PACKAGES:
                key = (module, name)
                if key not in placeholders:
                    placeholders[key] = type(
                        name, (PickledObject,), {"pickled_module": module, "pickled_name": name, "__module__": module}
                    )
                return placeholders[key]
            if (module, name) in _ALLOWED:
                return _ALLOWED[(module, name)]
            if (module, name) in _NUMPY_SCALAR:
                return getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)
            if module == "torch._utils" and name.startswith("_rebuild_"):
                import torch._utils as tu

                return getattr(tu, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if module.startswith("torch.nn.modules."):
                obj = getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name, None)
                if isinstance(obj, type) and issubclass(obj, nn.Module):
                    return obj
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name} (not on the allow-list)")

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:  # noqa: D401
                return find_class(module, name)

        self.Unpickler = Unpickler
        self.placeholders = placeholders

    def load(self, file, **kwargs: Any) -> Any:
        return self.Unpickler(file, **kwargs).load()

    def loads(self, data: bytes, **kwargs: Any) -> Any:
        import io

        return self.Unpickler(io.BytesIO(data), **kwargs).load()


def _attrs(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, PickledObject):
        return obj.pickled_state
    if isinstance(obj, nn.Module):
        return obj.__dict__
    raise ValueError(f"unexpected object in the module tree: {type(obj).__module__}.{type(obj).__name__}")


def state_dict_from_pickled_module(root: Any) -> dict[str, torch.Tensor]:
    """Rebuild ``root.state_dict()`` from an unpickled module tree whose classes
    may be :class:`PickledObject` placeholders.

    Order and keys follow ``nn.Module.state_dict``: per module its parameters,
    then its persistent buffers, then its children, ``None`` entries skipped.

    Raises
    ------
    ValueError
        An object in the tree is neither an ``nn.Module`` nor a placeholder, or
        holds no ``_parameters``/``_modules`` (not a pickled module).
    """
    out: dict[str, torch.Tensor] = {}

    def walk(obj: Any, prefix: str) -> None:
        attrs = _attrs(obj)
        if "_parameters" not in attrs or "_modules" not in attrs:
            raise ValueError(f"{obj!r} at {prefix or '<root>'} is not a pickled torch module")
        for name, p in attrs["_parameters"].items():
            if p is not None:
                out[prefix + name] = p.detach().clone()
        non_persistent = attrs.get("_non_persistent_buffers_set") or set()
        for name, b in attrs.get("_buffers", {}).items():
            if b is not None and name not in non_persistent:
                out[prefix + name] = b.detach().clone()
        for name, child in attrs["_modules"].items():
            if child is not None:
                walk(child, prefix + name + ".")

    walk(root, "")
    return out


def read_pickled_xrv_model(src: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """Unpickle a whole torchxrayvision model file without torchxrayvision.

    Returns
    -------
    ``(state_dict, root)``: tensors in torchvision naming (on CPU) and the
    unpickled root object (a :class:`PickledObject`).

    Raises
    ------
    pickle.UnpicklingError
        The file refers to a global outside the allow-list.
    ValueError
        The file does not hold a pickled module.
    """
    pm = _RestrictedPickle()
    root = torch.load(Path(src), map_location="cpu", pickle_module=pm, weights_only=False)
    return state_dict_from_pickled_module(root), root


def import_xrv_weights(
    src: Path,
    out_dir: Path,
    *,
    name: str = "xrv-densenet121-res224-rsna",
    template: Path = TEMPLATE,
) -> Path:
    """Convert torchxrayvision's ``densenet121-res224-rsna`` file for the registry.

    Parameters
    ----------
    src:
        The released file (``kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt``).
    out_dir:
        A card directory (e.g. one listed in the node's configuration): the
        card goes to ``out_dir/<name>.json``, the weights to
        ``out_dir/weights/<name>.pt`` (float32 state dict, torchvision names).
    name:
        Card name.
    template:
        Card template (JSON without ``name`` and ``weights``).

    Returns
    -------
    Path of the written card.

    Raises
    ------
    FileNotFoundError
        ``src`` does not exist.
    pickle.UnpicklingError
        ``src`` needs a global outside the allow-list.
    ValueError
        The weights do not fit :class:`~models.densenet.XRVDenseNet121` with
        ``strict=True`` (message lists the keys), or the card is invalid.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f"torchxrayvision weight file {src} not found")
    sd, root = read_pickled_xrv_model(src)
    notes = []
    if "op_threshs" not in sd:
        attr = _attrs(root).get("op_threshs")
        if attr is not None:
            sd["op_threshs"] = torch.as_tensor(attr, dtype=torch.float32)
            notes.append("op_threshs taken from the pickled model's attribute")
        else:
            sd["op_threshs"] = torch.tensor(XRV_RSNA_OP_THRESHS, dtype=torch.float32)
            notes.append("op_threshs absent from the pickle; set from torchxrayvision model_urls['rsna']")
    else:
        notes.append("op_threshs taken from the pickled buffer")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    net = XRVDenseNet121()
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{src}: does not fit XRVDenseNet121 with strict=True: {exc}") from exc

    weights_dir = out_dir / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    weights = weights_dir / f"{name}.pt"
    torch.save(net.state_dict(), weights)
    data = json.loads(Path(template).read_text(encoding="utf-8"))
    data["name"] = name
    data["weights"] = {
        "format": "state_dict",
        "path": f"weights/{weights.name}",
        "sha256": sha256_file(weights),
        "dtype": "float32",
    }
    training = dict(data.get("training") or {})
    training["notes"] = "; ".join(filter(None, [training.get("notes"), f"imported from {src.name}", *notes]))
    data["training"] = training
    card = ModelCard(**data)
    card_path = out_dir / f"{name}.json"
    card.to_file(card_path)
    return card_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.xrv_import SRC OUT_DIR``: import and print the card path."""
    summary = (import_xrv_weights.__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m models.xrv_import", description=summary)
    parser.add_argument("src", type=Path, help="densenet121-res224-rsna file from torchxrayvision's release v1")
    parser.add_argument("out_dir", type=Path, help="card directory to write to")
    parser.add_argument("--name", default="xrv-densenet121-res224-rsna")
    args = parser.parse_args(argv)
    print(import_xrv_weights(args.src, args.out_dir, name=args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
