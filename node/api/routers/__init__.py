"""One module per group of endpoints, each with a ``router``
(:class:`fastapi.APIRouter`) that :func:`node.api.app.create_app` includes."""
