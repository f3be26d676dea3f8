"""What routers get from the node: ``node: NodeDep`` in an endpoint's
parameters gives the object :func:`node.api.app.create_app` was built with."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Protocol

from fastapi import Depends, Request

from node.config import NodeConfig
from node.ingest import Ingest
from node.metrics import Metrics

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

    from node.dispatch import Dispatcher
    from node.index import Index
    from node.monitor import DestinationMonitor
    from node.queue import JobQueue
    from node.receive import Receiver
    from node.retention import Retention
    from node.route import Router
    from node.run import Runner
    from node.spool import Spool


class NodeLike(Protocol):
    """The part of :class:`node.service.Node` the API uses."""

    config: NodeConfig
    metrics: Metrics
    ingest: Ingest  # STOW-RS stores through it, as C-STORE does
    # The operator's views and actions (routers reports, actions, ready; node.actions).
    index: Index
    spool: Spool
    runner: Runner
    queue: JobQueue  # [worker] backend (node.queue)
    dispatcher: Dispatcher
    router: Router
    retention: Retention
    scheduler: BaseScheduler
    receiver: Receiver
    monitor: DestinationMonitor

    def health(self) -> tuple[bool, dict]: ...

    def status(self) -> dict: ...


def get_node(request: Request) -> NodeLike:
    return request.app.state.node


NodeDep = Annotated[NodeLike, Depends(get_node)]
