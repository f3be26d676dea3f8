"""``kind = "webhook"``: the node's events (:mod:`node.notify`) as signed
JSON POSTs to an HTTP(S) receiver (an alerting gateway, a chat bridge).

A notification target, not a destination of results
(:class:`~node.destinations.base.NotificationKind`): routes may not name it.

Each request (one event) carries::

    Content-Type: application/json
    X-Ainode-Event: job.failed
    X-Ainode-Delivery: <the event's id, a UUID: the same on each retry>
    X-Ainode-Timestamp: <Unix time of this attempt, seconds, decimal>
    X-Ainode-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + raw body)>

the scheme of Stripe's ``Stripe-Signature`` and GitHub's
``X-Hub-Signature-256``: the key is the secret's UTF-8 bytes, the message the
timestamp's ASCII digits, a full stop and the request body exactly as sent.
A receiver recomputes it over the raw body, compares with
:func:`hmac.compare_digest`, and refuses a timestamp more than a few minutes
from its clock (a replayed request), and an ``X-Ainode-Delivery`` it has
already seen. Redirects are not followed (a 3xx is a wrong URL).

Answers are classified by :func:`node.outcome.classify_http` (2xx success;
408, 425, 429 and most 5xx retried; other 4xx permanent); a connection that
fails or times out is retried.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import requests
from pydantic import Field, SecretStr, field_validator

from node.destinations.base import NotificationConfig, NotificationEvent, NotificationKind
from node.outcome import Outcome, OutcomeClass, classify_http
from node.secrets import secret_or_file

SIGNATURE_HEADER = "X-Ainode-Signature"
TIMESTAMP_HEADER = "X-Ainode-Timestamp"
EVENT_HEADER = "X-Ainode-Event"
DELIVERY_HEADER = "X-Ainode-Delivery"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 (RFC 2104, FIPS 180-4) keyed by ``secret``
    (UTF-8) over ``timestamp`` (ASCII), ``"."`` and ``body``, the raw request body."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def encode(event: dict[str, Any]) -> bytes:
    """The request body of ``event``: compact UTF-8 JSON (RFC 8259)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


class WebhookDestination(NotificationConfig):
    """An HTTP(S) URL that takes the node's events as signed JSON POSTs."""

    kind: Literal["webhook"]
    url: str = Field(description="The receiver, e.g. https://alerts.example.org/ainode")
    secret: SecretStr = Field(min_length=16, description="The HMAC-SHA256 key, shared with the receiver; 16+ characters.")
    secret_file: Path | None = Field(None, description="File holding the secret (preferred to secret).")
    verify_tls: bool = True
    timeout_seconds: float = Field(10.0, gt=0, description="Bound on the connect and on each read, seconds.")

    _secrets = secret_or_file("secret")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError("expected an http:// or https:// URL")
        return v


class WebhookSender(NotificationKind):
    """Signed JSON POSTs to one URL (module docstring)."""

    kind = "webhook"
    Config = WebhookDestination
    config: WebhookDestination

    def __init__(self, config: WebhookDestination, context=None):
        super().__init__(config, context)
        self.session = requests.Session()
        self.session.verify = config.verify_tls
        self.session.headers["User-Agent"] = "ainode-webhook"

    @property
    def target(self) -> str:
        return self.config.url

    def classify(self, result: object) -> OutcomeClass:
        """``result``: the HTTP status of the response (int)."""
        if not isinstance(result, int):
            raise TypeError(f"expected an HTTP status (int), got {type(result).__name__}")
        return classify_http(result)

    def post(self, event: dict[str, Any]) -> Outcome:
        """POST ``event`` once, signed now (a retry gets a fresh timestamp)."""
        body = encode(event)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: str(event.get("type", "")),
            DELIVERY_HEADER: str(event.get("id", "")),
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(self.config.secret.get_secret_value(), timestamp, body),
        }
        try:
            response = self.session.post(
                self.config.url, data=body, headers=headers, timeout=self.config.timeout_seconds, allow_redirects=False
            )
        except requests.RequestException as exc:
            return Outcome(OutcomeClass.TRANSIENT, None, f"POST {self.config.url} failed: {type(exc).__name__}: {exc}")
        code = response.status_code
        response.close()
        return self.outcome(code, str(code), f"POST {self.config.url}: HTTP {code} {response.reason or ''}".strip())

    def echo(self) -> Outcome:
        """POST a signed ``ping`` event: the receiver answers, and checks the signature if it does."""
        event = {
            "id": str(uuid.uuid4()),
            "type": str(NotificationEvent.PING),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "node": {"ae_title": self.context.calling_ae},
            "data": {"destination": self.context.name},
        }
        return self.post(event)
