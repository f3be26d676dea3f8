"""What routers get from the node: ``node: NodeDep`` in an endpoint's
parameters gives the object :func:`node.api.app.create_app` was built with."""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, Request

from node.config import NodeConfig
from node.ingest import Ingest
from node.metrics import Metrics


class NodeLike(Protocol):
    """The part of :class:`node.service.Node` the API uses."""

    config: NodeConfig
    metrics: Metrics
    ingest: Ingest  # STOW-RS stores through it, as C-STORE does

    def health(self) -> tuple[bool, dict]: ...

    def status(self) -> dict: ...


def get_node(request: Request) -> NodeLike:
    return request.app.state.node


NodeDep = Annotated[NodeLike, Depends(get_node)]
