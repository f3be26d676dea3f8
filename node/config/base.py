"""What every configuration section shares: :class:`ConfigError`, the base
model of a section, AE title and port checks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_CONFIG_PATH = Path("config/node.toml")

# PS3.5 6.2: AE is at most 16 characters, no backslash or control characters,
# and not only spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class ConfigError(ValueError):
    """A configuration file or environment variable holds a wrong value."""


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            "expected an AE title: 1 to 16 printable ASCII characters, no backslash, not only spaces"
        )
    return value.strip()


AETitle = Annotated[str, Field(description="DICOM AE title (PS3.5 6.2)")]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

