"""``GET /metrics`` (scope ``read``): the node's registry
(:class:`node.metrics.Metrics`) in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.api.auth import Scope, requires
from node.api.deps import NodeDep
from node.api.models import ERRORS

router = APIRouter(tags=["metrics"], dependencies=[requires(Scope.READ)], responses=ERRORS)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(node: NodeDep) -> Response:
    return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)
