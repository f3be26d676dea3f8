"""``[storage]``, ``[completion]`` and ``[retention]``: where files live,
when series are complete, how long files are kept."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, SecretStr, field_validator
from sqlalchemy.engine import make_url

from node.config.base import _Section
from node.secrets import secret_or_file


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

    index_password: SecretStr | None = Field(None, description="PostgreSQL password, kept out of index_url.")
    index_password_file: Path | None = None
    index_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        None, description="libpq sslmode for a PostgreSQL index; verify-full on a network shared with workers."
    )
    index_sslrootcert: FilePath | None = None
    index_sslcert: FilePath | None = None
    index_sslkey: FilePath | None = None

    _secrets = secret_or_file("index_password")

    @field_validator("index_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", v):
            raise ValueError("expected an SQLAlchemy URL starting sqlite:/// or postgresql+psycopg://")
        return v

    def engine_url(self) -> str:
        """``index_url`` with ``index_password`` and the ``index_ssl*``
        settings (libpq connection parameters) filled in: what
        :class:`node.index.Index` opens. Never log it."""
        if self.index_url.startswith("sqlite"):
            return self.index_url
        url = make_url(self.index_url)
        if self.index_password is not None:
            url = url.set(password=self.index_password.get_secret_value())
        ssl = {"sslmode": self.index_sslmode, "sslrootcert": self.index_sslrootcert,
               "sslcert": self.index_sslcert, "sslkey": self.index_sslkey}
        url = url.update_query_dict({k: str(v) for k, v in ssl.items() if v is not None})
        return url.render_as_string(hide_password=False)


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
