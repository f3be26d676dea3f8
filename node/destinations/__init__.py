"""Kinds of destination: where results go (``[destinations.<name>] kind``).

- :mod:`.base`: what a kind is (:class:`DestinationKind`, its
  :class:`DestinationConfig`), and :class:`RetryPolicy`;
- :mod:`.registry`: the kinds found in this package and in the
  ``ainode.destinations`` entry points; the configuration's union;
- one module per kind: :mod:`.dicom` (C-STORE SCU, DICOM TLS),
  :mod:`.dicomweb` (STOW-RS), :mod:`.folder` (a directory tree), and
  :mod:`.webhook`, a :class:`~.base.NotificationKind`: the node's events
  (:mod:`node.notify`), not results.

Importing this package imports no kind: ``node.destinations.registry.registry()``
does, when first asked.
"""

from node.destinations.base import DestinationConfig, DestinationContext, DestinationKind, RetryPolicy
from node.destinations.registry import DestinationRegistry, UnknownKind

__all__ = [
    "DestinationConfig",
    "DestinationContext",
    "DestinationKind",
    "DestinationRegistry",
    "RetryPolicy",
    "UnknownKind",
]
