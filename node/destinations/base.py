"""What every kind of destination is: a configuration model and a sender.

A kind is one module of :mod:`node.destinations` (or a plug-in, see
:mod:`node.destinations.registry`) holding a subclass of
:class:`DestinationKind` with

- ``kind``: the name ``[destinations.<name>] kind = "..."`` selects it by;
- ``Config``: its pydantic model, a subclass of :class:`DestinationConfig`
  whose ``kind`` field is ``Literal["<kind>"]`` (the configuration's
  discriminated union is built from these models);
- :meth:`~DestinationKind.send`, :meth:`~DestinationKind.echo` and
  :meth:`~DestinationKind.classify`.

This module imports nothing of :mod:`node.config` (which imports the kinds),
so a kind's module may import this one freely.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from node.outcome import Outcome, OutcomeClass


class RetryPolicy(BaseModel):
    """``[retry]``: delivery retries, exponential backoff with bounded attempts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(10, ge=1)
    initial_delay_seconds: float = Field(2.0, gt=0)
    multiplier: float = Field(2.0, ge=1)
    max_delay_seconds: float = Field(300.0, gt=0)
    jitter: float = Field(0.1, ge=0, le=1, description="Fraction of random spread on each delay.")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``, ``attempt`` >= 1, without jitter."""
        return min(self.max_delay_seconds, self.initial_delay_seconds * self.multiplier ** (attempt - 1))


class DestinationConfig(BaseModel):
    """The settings every ``[destinations.<name>]`` table has; a kind's
    ``Config`` adds its own and narrows ``kind`` to ``Literal["<kind>"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    omit_empty_frames: bool = Field(
        False,
        description="Send SEGs without empty frames (needed by Weasis for >400 frames); "
        "default keeps one frame per source slice and segment.",
    )
    retry: RetryPolicy | None = Field(None, description="Overrides [retry] for this destination.")
    timeout_seconds: float = Field(30.0, gt=0, description="Bound on each network operation, seconds.")


@dataclass(frozen=True)
class DestinationContext:
    """What a sender knows of the node besides its own configuration."""

    name: str = ""  # the destination's name, [destinations.<name>]
    calling_ae: str = "AINODE"  # our AE title as a DICOM SCU ([node] ae_title)


class DestinationKind(ABC):
    """One destination of one kind: built once per delivery thread (or per
    ``ainode echo``), then :meth:`send` is called for each batch.

    Parameters
    ----------
    config:
        The destination's table, an instance of the kind's ``Config``.
    context:
        The node's side (our AE title, the destination's name).

    Raises
    ------
    TypeError
        ``config`` is not an instance of the kind's ``Config``.
    """

    kind: ClassVar[str]
    Config: ClassVar[type[DestinationConfig]]
    #: False for a kind that takes notifications, not results (:class:`NotificationKind`):
    #: routes may not name it and dispatch starts no delivery thread for it.
    carries_results: ClassVar[bool] = True

    def __init__(self, config: DestinationConfig, context: DestinationContext | None = None):
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.context = context or DestinationContext()

    @property
    @abstractmethod
    def target(self) -> str:
        """Where it sends, for messages: ``AE@host:port``, a URL, a folder."""

    @abstractmethod
    def send(self, paths: Sequence[Path]) -> list[Outcome]:
        """Send DICOM files (the outbox's, PS3.10 format); one
        :class:`~node.outcome.Outcome` per path, in order. A failure is an
        outcome, never an exception: dispatch records it and retries a
        transient one."""

    @abstractmethod
    def echo(self) -> Outcome:
        """Check the destination can be reached and would take files, without
        sending any (C-ECHO, an HTTP request, a test write); ``ainode echo
        --destinations`` prints the outcome's text."""

    @abstractmethod
    def classify(self, result: object) -> OutcomeClass:
        """Success, transient or permanent for one of the kind's own answers
        (a DIMSE status, an HTTP status, an :class:`OSError`), by
        :mod:`node.outcome`, the one place that decides it."""

    def outcome(self, result: object, status: str | None, text: str) -> Outcome:
        """An :class:`~node.outcome.Outcome` for ``result``, classified by :meth:`classify`."""
        return Outcome(self.classify(result), status, text)


class NotificationEvent(enum.StrEnum):
    """What the node notifies (:mod:`node.notify`); a notification
    destination's ``events`` lists those it wants."""

    JOB_DONE = "job.done"
    JOB_FAILED = "job.failed"
    #: Valid input the pipeline does not process: not a failure (off by default).
    JOB_NOT_APPLICABLE = "job.not_applicable"
    #: Outside the model card's intended use and refused by configuration (node.guard).
    JOB_OUT_OF_SCOPE = "job.out_of_scope"
    #: A delivery reached state ``failed``: its attempts are used up, or it failed permanently.
    DELIVERY_FAILED = "delivery.failed"
    #: The free-disk guard tripped: the node answers C-STORE 0xA700 until space returns.
    DISK_LOW = "disk.low"
    DISK_RECOVERED = "disk.recovered"
    #: A destination check (``echo``: ``ainode echo --destinations``, the node's periodic check); not subscribable.
    PING = "ping"


#: The events of a notification destination without ``events``.
DEFAULT_EVENTS = (
    NotificationEvent.JOB_DONE,
    NotificationEvent.JOB_FAILED,
    NotificationEvent.DELIVERY_FAILED,
    NotificationEvent.DISK_LOW,
    NotificationEvent.DISK_RECOVERED,
)


class NotificationConfig(DestinationConfig):
    """The settings of a destination that takes notifications (not results)."""

    events: tuple[NotificationEvent, ...] = Field(
        DEFAULT_EVENTS, min_length=1, description="The events sent here; job.not_applicable is off by default."
    )
    include_uids: bool = Field(
        False, description="Add Study/Series/SOP Instance UIDs to events (linkable to a patient: off by default)."
    )
    queue_size: int = Field(1000, ge=1, description="Events held while the receiver is down; the oldest go first.")
    retry: RetryPolicy | None = Field(
        RetryPolicy(max_attempts=5, initial_delay_seconds=1.0, max_delay_seconds=60.0),
        description="Retries of each event (the node's [retry] is for results and does not apply).",
    )

    @field_validator("events")
    @classmethod
    def _subscribable(cls, v: tuple[NotificationEvent, ...]) -> tuple[NotificationEvent, ...]:
        if NotificationEvent.PING in v:
            raise ValueError("'ping' is the destination check's and cannot be subscribed")
        return tuple(dict.fromkeys(v))


class NotificationKind(DestinationKind):
    """A kind that takes notifications (:mod:`node.notify`): routes may not
    name it as a destination of results, and :meth:`send` refuses files."""

    carries_results = False
    config: NotificationConfig

    @abstractmethod
    def post(self, event: dict[str, Any]) -> Outcome:
        """Send one event (a JSON-able dict, :mod:`node.notify`) once; a
        failure is an outcome, never an exception. The caller retries a
        transient one."""

    def send(self, paths: Sequence[Path]) -> list[Outcome]:
        why = f"{self.kind} destination {self.context.name!r} takes notifications, not results"
        return [Outcome(OutcomeClass.PERMANENT, None, why) for _ in paths]
