"""``ainode worker``: run jobs from the Celery queues on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from node.cli.common import ConfigOpt, _config, _logging
from node.config import DeviceClass, NodeConfig, WorkerBackend, WorkerInput, WorkerOutput, queue_name


def worker_queues(cfg: NodeConfig, names: list[str], device: str) -> tuple[list[str], list[str]]:
    """``--queue`` values -> (pipelines, Celery queue names). A bare
    pipeline name takes the queue of this worker's device class
    (``brain_tumour`` on ``cuda:0`` -> ``brain_tumour.gpu``); ``NAME.cpu`` or
    ``NAME.gpu`` is taken as given. No ``--queue``: every routed pipeline.

    Raises
    ------
    typer.BadParameter
        An unknown pipeline or device class.
    """
    from pipelines.registry import registry

    known = registry()
    device_class = DeviceClass.GPU if device.startswith("cuda") else DeviceClass.CPU
    names = names or sorted({r.pipeline for r in cfg.routes})
    pipelines: list[str] = []
    queues: list[str] = []
    for name in names:
        pipeline, _, cls = name.partition(".")
        if pipeline not in known:
            raise typer.BadParameter(f"--queue {name}: {known.unknown(pipeline)}")
        try:
            queues.append(queue_name(pipeline, cls or device_class))
        except ValueError:
            raise typer.BadParameter(f"--queue {name}: the class after the dot is cpu or gpu") from None
        pipelines.append(pipeline)
    return list(dict.fromkeys(pipelines)), list(dict.fromkeys(queues))


def worker(
    queue: Annotated[list[str], typer.Option(
        "--queue", "-Q", help="Pipeline (or PIPELINE.cpu|gpu) to serve; repeat. Default: every routed pipeline.")] = [],  # noqa: B006
    device: Annotated[str | None, typer.Option(help="torch device: cpu, cuda, cuda:N (default: the worker section's device).")] = None,
    input_: Annotated[WorkerInput | None, typer.Option("--input", help="Override the worker section's input.")] = None,
    output: Annotated[WorkerOutput | None, typer.Option(help="Override the worker section's output.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Override the worker section's metrics_port (0: a free port).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run jobs from the node's Celery queues (worker backend = "celery").

    One process runs one job at a time and keeps its models loaded; start
    one per GPU (``--device cuda:N``) and as many as the cores allow on CPU.
    """
    cfg = _config(config)
    if cfg.worker.backend != WorkerBackend.CELERY:
        typer.echo('ainode worker needs [worker] backend = "celery" (and a PostgreSQL index)', err=True)
        raise typer.Exit(2)
    update = {k: v for k, v in (("device", device), ("input", input_), ("output", output),
                                ("metrics_port", metrics_port)) if v is not None}
    if device is not None:
        try:
            type(cfg.worker).model_validate({"device": device})
        except ValueError as exc:
            raise typer.BadParameter(f"--device {device}: expected cpu, cuda or cuda:N") from exc
    cfg = cfg.model_copy(update={"worker": cfg.worker.model_copy(update=update)})
    try:
        cfg._check_worker()  # the overrides meet the cross-section checks too (node_url for dicomweb/stow)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    from node.run import resolve_device

    pipelines, queues = worker_queues(cfg, queue, resolve_device(cfg.worker.device))
    _logging(cfg)
    from node.worker.main import run_worker

    run_worker(cfg, pipelines, queues, loglevel=cfg.log.level)
