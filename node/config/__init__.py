"""The node's one configuration object.

It is read from a TOML file (``config/node.toml`` by default) and then from
environment variables, which win: ``AINODE_<SECTION>__<KEY>``, e.g.
``AINODE_NODE__PORT=11113`` or ``AINODE_STORAGE__INDEX_URL=postgresql+psycopg://...``.
Values that are lists or tables take JSON in the environment.

A wrong value is refused by :func:`load_config` with a :class:`ConfigError`
naming the key and what was expected.

One module per topic: :mod:`~node.config.base` (what sections share),
:mod:`~node.config.node` (``[node]``), :mod:`~node.config.storage`
(``[storage]``, ``[completion]``, ``[retention]``), :mod:`~node.config.routing`
(``[[routes]]``, ``[sequences]``), :mod:`~node.config.pipelines` (``[worker]``,
``[models]``, ``[pipelines]``), :mod:`~node.config.api` (``[api]``) and
:mod:`~node.config.model` (:class:`NodeConfig`, :func:`load_config`).
"""

from node.config.api import MIN_TOKEN_LENGTH, ApiSection, ApiTls, ApiToken, Scope
from node.config.base import DEFAULT_CONFIG_PATH, AETitle, ConfigError, Port, _check_ae_title, _Section
from node.config.model import Destination, LogSection, NodeConfig, load_config
from node.config.node import CallerRule, DicomTls, NodeSection
from node.config.pipelines import ModelsSection, PipelinesSection, pipelines_section
from node.config.routing import Match, MatchValue, NumericRange, Presence, RouteRule
from node.config.storage import CompletionSection, RetentionSection, StorageSection
from node.config.worker import (
    CelerySection,
    DeviceClass,
    Precision,
    WorkerBackend,
    WorkerInput,
    WorkerOutput,
    WorkerSection,
    queue_name,
)
from node.destinations.base import RetryPolicy

__all__ = [
    "CelerySection",
    "DeviceClass",
    "Precision",
    "WorkerBackend",
    "WorkerInput",
    "WorkerOutput",
    "queue_name",
    "DEFAULT_CONFIG_PATH",
    "MIN_TOKEN_LENGTH",
    "AETitle",
    "ApiSection",
    "ApiTls",
    "ApiToken",
    "CallerRule",
    "CompletionSection",
    "ConfigError",
    "Destination",
    "DicomTls",
    "LogSection",
    "Match",
    "MatchValue",
    "ModelsSection",
    "NodeConfig",
    "NodeSection",
    "NumericRange",
    "PipelinesSection",
    "Port",
    "Presence",
    "RetentionSection",
    "RetryPolicy",
    "RouteRule",
    "Scope",
    "StorageSection",
    "WorkerSection",
    "_Section",
    "_check_ae_title",
    "load_config",
    "pipelines_section",
]
