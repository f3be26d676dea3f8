"""``kind = "dicomweb"``: a STOW-RS service (PS3.18 10.5), with optional
HTTP Basic (RFC 7617) or bearer (RFC 6750) authentication.

One multipart request per batch (dicomweb-client); the HTTP status and, in
a 200, 202 or 409 response, each instance's Failure Reason are classified
by :mod:`node.outcome`. :meth:`StowSender.echo` is a QIDO-RS
``GET {url}/studies?limit=1`` (PS3.18 10.6) with the same authentication:
it checks the service answers and takes our credentials, storing nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import pydicom
import requests
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from node.destinations.base import DestinationConfig, DestinationKind
from node.outcome import Outcome, OutcomeClass, classify_dimse, classify_http, dimse_status_text
from node.secrets import secret_or_file


class BasicAuth(BaseModel):
    """HTTP Basic authentication (RFC 7617); ``password`` or ``password_file``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["basic"]
    username: str
    password: SecretStr = Field(min_length=1)
    password_file: Path | None = Field(None, description="File holding the password (preferred to password).")

    _secrets = secret_or_file("password")


class BearerAuth(BaseModel):
    """A bearer token (RFC 6750); ``token`` or ``token_file``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["bearer"]
    token: SecretStr = Field(min_length=1)
    token_file: Path | None = Field(None, description="File holding the token (preferred to token).")

    _secrets = secret_or_file("token")


class DicomWebDestination(DestinationConfig):
    """A STOW-RS service (PS3.18 10.5)."""

    kind: Literal["dicomweb"]
    url: str = Field(description="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    auth: Annotated[BasicAuth | BearerAuth, Field(discriminator="type")] | None = None
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/")


class StowSender(DestinationKind):
    """STOW-RS client to one destination."""

    kind = "dicomweb"
    Config = DicomWebDestination
    config: DicomWebDestination

    def __init__(self, config: DicomWebDestination, context=None):
        from dicomweb_client.api import DICOMwebClient

        super().__init__(config, context)
        self.session = requests.Session()
        self.session.verify = config.verify_tls
        if config.auth is not None and config.auth.type == "basic":
            self.session.auth = (config.auth.username, config.auth.password.get_secret_value())
        self.headers = {}
        if config.auth is not None and config.auth.type == "bearer":
            self.headers = {"Authorization": f"Bearer {config.auth.token.get_secret_value()}"}
        self.client = DICOMwebClient(
            config.url, session=self.session, headers=self.headers or None, timeout=config.timeout_seconds
        )
        # Dispatch owns retries (backoff, attempts recorded): dicomweb-client's own
        # would silently repeat a 503 five times within one attempt.
        self.client.set_http_retry_params(retry=False)

    @property
    def target(self) -> str:
        return self.config.url

    def classify(self, result: object) -> OutcomeClass:
        """``result``: an HTTP status (int). A STOW-RS Failure Reason (0008,1197)
        is a DIMSE status (PS3.18 10.5.3), classified as one."""
        if not isinstance(result, int):
            raise TypeError(f"expected an HTTP status (int), got {type(result).__name__}")
        return classify_http(result)

    def echo(self) -> Outcome:
        url = f"{self.config.url}/studies"
        try:
            response = self.session.get(
                url, params={"limit": 1}, headers={"Accept": "application/dicom+json", **self.headers},
                timeout=self.config.timeout_seconds,
            )
        except requests.RequestException as exc:
            return Outcome(OutcomeClass.TRANSIENT, None, f"QIDO-RS request failed: {_request_error_text(exc)}")
        code = response.status_code
        return self.outcome(code, str(code), f"QIDO-RS GET {url}?limit=1: HTTP {code} {response.reason or ''}".strip())

    def send(self, paths: Sequence[Path]) -> list[Outcome]:
        datasets = [pydicom.dcmread(p) for p in paths]
        try:
            response = self.client.store_instances(datasets)
        except requests.HTTPError as exc:
            if exc.response is None:
                return [Outcome(OutcomeClass.TRANSIENT, None, f"STOW-RS HTTP error: {exc}") for _ in paths]
            code = exc.response.status_code
            body = _stow_response_body(exc.response) if code == 409 else None
            if body is None:  # 409 Conflict lists why each instance failed (PS3.18 10.5.3)
                return [self.outcome(code, str(code), f"STOW-RS HTTP {code}: {exc}") for _ in paths]
            response = body
        except requests.RequestException as exc:
            return [Outcome(OutcomeClass.TRANSIENT, None, f"STOW-RS request failed: {_request_error_text(exc)}") for _ in paths]
        return self._per_instance(datasets, response)

    def _per_instance(self, datasets: Sequence[pydicom.Dataset], response: pydicom.Dataset | None) -> list[Outcome]:
        """Each instance's outcome from the Store Instances Response Module."""
        failed = {}
        for item in (response or pydicom.Dataset()).get("FailedSOPSequence", []):
            failed[item.ReferencedSOPInstanceUID] = int(item.get("FailureReason", 0x0110))
        stored = {item.ReferencedSOPInstanceUID for item in (response or pydicom.Dataset()).get("ReferencedSOPSequence", [])}
        outcomes = []
        for ds in datasets:
            uid = ds.SOPInstanceUID
            if uid in failed:
                code = failed[uid]
                error = f"STOW-RS failure reason {dimse_status_text(code)}"
                outcomes.append(Outcome(classify_dimse(code), f"0x{code:04X}", error))
            elif uid in stored or not response:
                # A 200 without a body means all stored (some servers omit it).
                outcomes.append(Outcome(OutcomeClass.SUCCESS, "200", "STOW-RS stored"))
            else:
                outcomes.append(Outcome(OutcomeClass.TRANSIENT, "200", "STOW-RS response lists neither success nor failure"))
        return outcomes


def _stow_response_body(response: requests.Response) -> pydicom.Dataset | None:
    """The DICOM JSON Store Instances Response Module of an error response, or None."""
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in ("application/dicom+json", "application/json"):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _request_error_text(exc: requests.RequestException) -> str:
    """``connection refused: ...`` / ``timed out: ...`` where that is the cause, else requests' message."""
    causes: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(causes) < 8:  # requests -> urllib3 MaxRetryError -> reason -> socket error
        causes.append(e)
        e = getattr(e, "reason", None) or e.__cause__ or (e.args[0] if e.args and isinstance(e.args[0], BaseException) else None)
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"connection refused: {exc}"
    if isinstance(exc, requests.Timeout) or any(isinstance(c, TimeoutError) for c in causes):
        return f"timed out: {exc}"
    return str(exc)
