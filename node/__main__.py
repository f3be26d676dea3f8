"""``python -m node`` is ``ainode``."""

from node.cli import app

app()
