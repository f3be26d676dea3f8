"""Bearer tokens with scopes for the HTTP API (RFC 6750).

Each ``[[api.tokens]]`` entry names a token and its :class:`Scope` s; the
node keeps only the SHA-256 digest of each token and compares digests with
:func:`hmac.compare_digest`.

A router declares what it needs in one line::

    router = APIRouter(dependencies=[requires(Scope.READ)])

or per endpoint, ``caller: ApiToken | None = requires(Scope.INGEST)``.

- no ``Authorization: Bearer`` header, or an unknown token: 401 with
  ``WWW-Authenticate: Bearer`` (RFC 6750 3);
- a known token without the scope: 403 (``error="insufficient_scope"``);
- each refusal is logged as ``api_auth_refused`` with the client address,
  the path and the reason, never the token.

On loopback with no token configured, ``read`` endpoints are open (the
caller is ``None``); ``ingest`` and ``operator`` always need a token.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import NoReturn

import structlog
from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes

from node.config import ApiSection, ApiToken, Scope
from node.secrets import token_digest

__all__ = ["Scope", "TokenAuth", "authorize", "requires"]

log = structlog.get_logger("node.api")

_bearer = HTTPBearer(auto_error=False, description="A token from [[api.tokens]].")


class TokenAuth:
    """The configured tokens, by digest.

    Parameters
    ----------
    tokens:
        The ``[[api.tokens]]`` entries (already read and hashed by the
        configuration).
    open_reads:
        Let requests without a token use ``read`` endpoints (loopback with no
        token configured).
    """

    def __init__(self, tokens: Sequence[ApiToken], *, open_reads: bool = False):
        self.tokens = tuple(tokens)
        if open_reads and self.tokens:
            raise ValueError("open_reads: only without tokens; a configured token closes the read endpoints")
        self.open_reads = open_reads

    @classmethod
    def from_config(cls, api: ApiSection) -> TokenAuth:
        return cls(api.tokens, open_reads=api.loopback and not api.tokens)

    def identify(self, token: str) -> ApiToken | None:
        """The entry whose token is ``token``, or None. Compares every digest
        in constant time, so the answer's timing tells nothing about which."""
        digest = token_digest(token)
        found = None
        for entry in self.tokens:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found


def _refuse(request: Request, status: int, reason: str, needed: list[Scope], *, error: str | None = None,
            token: ApiToken | None = None) -> NoReturn:
    """Log the refusal (never the token) and raise the 401/403 with its
    RFC 6750 3 challenge; ``error`` is its error code, None when no token came."""
    client = request.client
    log.warning(
        "api_auth_refused",
        client=client.host if client else None,
        client_port=client.port if client else None,
        method=request.method,
        path=request.url.path,
        status=status,
        reason=reason,
        token_name=token.name if token else None,
    )
    challenge = 'Bearer realm="ainode"'
    if error is not None:
        challenge += f', error="{error}"'
    if error == "insufficient_scope":
        challenge += f', scope="{" ".join(needed)}"'
    raise HTTPException(status, detail=reason, headers={"WWW-Authenticate": challenge})


def authorize(
    request: Request,
    security_scopes: SecurityScopes,
    credentials: HTTPAuthorizationCredentials | None = Security(_bearer),
) -> ApiToken | None:
    """FastAPI dependency: the calling token if it holds every scope the
    endpoint declares, ``None`` for an open read, else 401 or 403
    (:class:`fastapi.HTTPException`)."""
    auth: TokenAuth = request.app.state.auth
    needed = [Scope(s) for s in security_scopes.scopes]
    if credentials is None:
        if auth.open_reads and set(needed) <= {Scope.READ}:
            return None
        header = request.headers.get("Authorization")
        reason = "no Authorization header" if header is None else "Authorization is not 'Bearer <token>'"
        _refuse(request, 401, reason, needed)
    token = auth.identify(credentials.credentials)
    if token is None:
        _refuse(request, 401, "unknown token", needed, error="invalid_token")
    missing = [s for s in needed if s not in token.scopes]
    if missing:
        reason = f"token {token.name!r} lacks scope {', '.join(missing)}"
        _refuse(request, 403, reason, needed, error="insufficient_scope", token=token)
    return token


def requires(*scopes: Scope):
    """``Security(authorize, scopes=...)``: the dependency an endpoint or a
    router declares to need ``scopes``."""
    return Security(authorize, scopes=[Scope(s).value for s in scopes])
