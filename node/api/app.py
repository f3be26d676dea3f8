"""The node's one HTTP application (FastAPI).

:func:`create_app` includes one router per group of endpoints; adding one is
one ``app.include_router(...)`` line. Routers reach the node through
:data:`node.api.deps.NodeDep` and declare the scope they need with
:func:`node.api.auth.requires`.

The OpenAPI document is served at ``/openapi.json`` without a token: it
describes the endpoints and holds no data (no study, no token, no
configuration value). The interactive pages (``/docs``, ``/redoc``) stay
off: they would load scripts from elsewhere, and a browser on them is no
use without a token anyway.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from node.api.auth import TokenAuth
from node.api.deps import NodeLike
from node.api.routers import actions, dashboard, drift, health, job_results, metrics, ready, reports, status, stow, wado

log = structlog.get_logger("node.api")


def create_app(node: NodeLike, auth: TokenAuth | None = None) -> FastAPI:
    """The app serving ``node``; ``auth`` defaults to the tokens of
    ``node.config.api`` (:meth:`TokenAuth.from_config`)."""
    auth = auth if auth is not None else TokenAuth.from_config(node.config.api)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if auth.open_reads:
            log.warning(
                "api_read_endpoints_open",
                reason="loopback and no [[api.tokens]]: /status and /metrics need no token",
            )
        yield

    app = FastAPI(title="dicom-ai-node", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    app.state.node = node
    app.state.auth = auth
    app.include_router(health.router)
    app.include_router(status.router)
    app.include_router(metrics.router)
    app.include_router(stow.router)
    app.include_router(job_results.router)
    app.include_router(wado.router)
    app.include_router(ready.router)
    app.include_router(reports.router)
    app.include_router(actions.router)
    app.include_router(drift.router)
    app.include_router(dashboard.router)
    return app
