"""``[storage]``, ``[completion]`` and ``[retention]``: where files live,
when series are complete, how long files are kept."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator

from node.config.base import _Section


class StorageSection(_Section):
    """``[storage]``: where instances, refused instances, results and the index live."""

    spool_dir: Path = Path("var/spool")
    quarantine_dir: Path = Path("var/quarantine")
    outbox_dir: Path = Path("var/outbox")
    index_url: str = Field(
        "sqlite:///var/index.db",
        description="SQLAlchemy URL: sqlite:///PATH (WAL mode) or postgresql+psycopg://...",
    )
    fsync: bool = Field(True, description="fsync each instance and its directory before answering C-STORE.")
    min_free_mb: float = Field(
        1024, ge=0, description="Below this free space (MiB) on the spool's file system, C-STORE is answered 0xA700."
    )
    min_free_percent: float = Field(
        5.0, ge=0, lt=100, description="Below this free fraction (%) of the spool's file system, C-STORE is answered 0xA700."
    )

    @field_validator("index_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", v):
            raise ValueError("expected an SQLAlchemy URL starting sqlite:/// or postgresql+psycopg://")
        return v


class CompletionSection(_Section):
    """``[completion]``: when a series or study counts as complete."""

    sweep_interval_seconds: float = Field(1.0, gt=0, le=60)
    series_idle_seconds: float = Field(10.0, ge=0)
    complete_on_release: bool = Field(
        True, description="A series is complete as soon as the association that delivered it is released."
    )
    stow_idle_seconds: float = Field(
        2.0, ge=0, description="A series whose latest instance came by STOW-RS is complete after this much silence "
        "(the end of a STOW-RS request is no end of a series; complete_on_release is for C-STORE)."
    )
    study_idle_seconds: float = Field(
        5.0, ge=0, description="Study-level rules wait this long after the study's last instance."
    )
    force_complete_seconds: float = Field(
        900.0, gt=0, description="A study still incomplete this long after its last instance fails clearly."
    )
    unmatched_retention_hours: float = Field(
        24.0, ge=0, description="Series no rule matched are deleted from spool and index after this."
    )


class RetentionSection(_Section):
    """``[retention]``: how long files are kept (:mod:`node.retention`); 0
    keeps them forever. A study with queued or running jobs, pending
    deliveries or series still arriving is never purged. Series no rule
    matched go sooner, by ``[completion] unmatched_retention_hours``."""

    spool_days: float = Field(
        7.0, ge=0, description="Received instances are deleted this many days after their study's last instance."
    )
    quarantine_days: float = Field(30.0, ge=0, description="Refused instances and their reasons are deleted after this.")
    outbox_days: float = Field(30.0, ge=0, description="Written results (SEG, SR) are deleted after this.")
    interval_minutes: float = Field(
        60.0, gt=0, le=1440, description="How often the clean-up runs (also once at start-up)."
    )
