"""Secrets in the configuration: passwords, tokens, key passphrases.

Each secret is a pydantic :class:`~pydantic.SecretStr`, so ``repr``, logs and
``model_dump(mode="json")`` (``ainode config check``) show ``'**********'``.
A secret ``NAME`` can also be read from a file named by ``NAME_file`` (e.g.
``password_file = "/run/secrets/pacs"``, as Docker and systemd credentials
provide them); :func:`secret_or_file` adds that to a configuration class.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pydantic import model_validator

MAX_SECRET_FILE_BYTES = 64 * 1024


def read_secret_file(path: str | os.PathLike, key: str) -> str:
    """The secret in ``path``: its text with surrounding whitespace (the final
    newline) removed.

    Raises
    ------
    ValueError
        The file cannot be read, is larger than 64 KiB, or is empty; the
        message names ``key`` and the path, never the content.
    """
    p = Path(path)
    try:
        if p.stat().st_size > MAX_SECRET_FILE_BYTES:
            raise ValueError(f"{key}: {p} is larger than {MAX_SECRET_FILE_BYTES} bytes; expected one secret")
        value = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{key}: cannot read {p}: {exc.__class__.__name__}: {getattr(exc, 'strerror', None) or exc}") from None
    if not value:
        raise ValueError(f"{key}: {p} is empty")
    return value


def secret_or_file(*names: str):
    """A ``model_validator(mode="before")`` letting each secret field ``NAME``
    be given directly or as ``NAME_file`` (a path; the class declares both
    fields, ``NAME_file: Path | None = None``). Giving both is an error.

    Use in a class body: ``_secrets = secret_or_file("password")``.
    """

    def fill(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name in names:
            path = data.get(f"{name}_file")
            if path is None:
                continue
            if data.get(name) is not None:
                raise ValueError(f"{name}: give {name} or {name}_file, not both")
            data = {**data, name: read_secret_file(path, f"{name}_file")}
        return data

    # pydantic makes ``fill`` a classmethod itself: its first parameter is ``cls``.
    return model_validator(mode="before")(fill)


def token_digest(value: str) -> bytes:
    """SHA-256 of a bearer token's UTF-8 bytes: what the node keeps in memory
    and compares (with :func:`hmac.compare_digest`), never the token itself."""
    return hashlib.sha256(value.encode("utf-8")).digest()
