"""The torch device a model runs on, and the arithmetic of its forward
passes, checked once for every pipeline."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import structlog
import torch

__all__ = ["PRECISIONS", "inference_precision", "torch_device"]

#: ``[worker] precision`` value -> the dtype ``torch.autocast`` runs in on CUDA (None: no autocast).
_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: The precisions a pipeline accepts (``PipelineContext.precision``).
PRECISIONS: tuple[str, ...] = tuple(_AUTOCAST_DTYPES)


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


@functools.cache
def _log_cpu_fp32(precision: str) -> None:
    """Say once per process and precision that the CPU ignores it."""
    structlog.get_logger("pipelines").info(
        "precision_ignored_on_cpu", precision=precision, runs="fp32",
        reason="autocast is used on CUDA only; the CPU path is the tested fp32 one",
    )


def inference_precision(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context to run a model's forward pass in at ``precision``.

    ``"bf16"`` and ``"fp16"`` on a CUDA device give
    ``torch.autocast(device_type="cuda", dtype=torch.bfloat16 / torch.float16)``
    (matrix products and convolutions in that dtype, reductions in float32;
    PyTorch "Automatic Mixed Precision"). ``"fp32"``, and any precision on the
    CPU, give a null context: the CPU always runs float32 (logged once), so a
    CPU result does not depend on the setting. Callers cast outputs to
    float32 before post-processing. Autocast is valid around a backward pass
    too (Grad-CAM): the gradients come back in the forward's dtypes.

    Parameters
    ----------
    device:
        torch device or device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    precision:
        One of :data:`PRECISIONS` (``[worker] precision``, ``PipelineContext.precision``).

    Raises
    ------
    ValueError
        ``precision`` is not one of :data:`PRECISIONS`, or is ``"bf16"`` on a
        GPU without bfloat16 support; ``device`` as :func:`torch_device`.
    """
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dev = device if isinstance(device, torch.device) else torch_device(device)
    dtype = _AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dev.type != "cuda":
        _log_cpu_fp32(precision)
        return contextlib.nullcontext()
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16': the GPU of {str(dev)!r} has no bfloat16 support; use 'fp16' or 'fp32'")
    return torch.autocast(device_type="cuda", dtype=dtype)
