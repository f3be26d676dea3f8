"""The torch device a model runs on, checked once for every pipeline."""

from __future__ import annotations

import torch


def torch_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a :class:`torch.device`.

    Raises
    ------
    ValueError
        ``device`` is not a torch device, or CUDA is asked for and is not
        available on this machine.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    return dev
