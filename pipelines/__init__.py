"""Clinical pipelines, one package per task.

``PIPELINES`` maps a routing name to ``module:Class``; the class is imported
only when a job first needs it, so the node starts without loading torch.
"""

from __future__ import annotations

import importlib

PIPELINES: dict[str, str] = {
    "pneumonia": "pipelines.pneumonia.pipeline:PneumoniaPipeline",
    "brain_tumour": "pipelines.brain_tumour.pipeline:BrainTumourPipeline",
}


def pipeline_class(name: str) -> type:
    """Import and return the pipeline class registered as ``name``.

    Raises
    ------
    KeyError
        ``name`` is not registered.
    """
    module, _, attr = PIPELINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)
