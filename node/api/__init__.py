"""The node's HTTP API: one FastAPI app on uvicorn, in the node's process.

- ``GET /health`` (no token): 200 when the SCP listens and the index
  answers, else 503.
- ``GET /status`` (scope ``read``): JSON counts of series, jobs and
  deliveries by state, and the latest jobs and deliveries.
- ``GET /metrics`` (scope ``read``): Prometheus text format, from the node's
  own registry.
- ``POST /dicom-web/studies[/{StudyInstanceUID}]`` (scope ``ingest``):
  STOW-RS into the node (:mod:`node.api.routers.stow`).
- ``GET /ready`` (no token): readiness, each check named
  (:mod:`node.api.routers.ready`).
- ``GET /api/...`` (scope ``read``): studies, series, jobs, deliveries,
  timelines, results (:mod:`node.api.routers.reports`).
- ``POST /api/...`` (scope ``operator``): the operator's actions, audited
  (:mod:`node.api.routers.actions`, :mod:`node.actions`).
- ``GET /openapi.json`` (no token): the OpenAPI document.

HTTPS with ``[api.tls]``; bearer tokens with scopes with ``[[api.tokens]]``
(:mod:`node.api.auth`). Modules: :mod:`node.api.app` (the app factory),
:mod:`node.api.auth`, :mod:`node.api.server` (uvicorn in a thread),
:mod:`node.api.routers`.
"""

from node.api.app import create_app
from node.api.auth import Scope, TokenAuth, requires
from node.api.server import ApiServer
from node.metrics import Metrics

__all__ = ["ApiServer", "Metrics", "Scope", "TokenAuth", "create_app", "requires"]
