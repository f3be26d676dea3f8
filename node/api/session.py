"""The dashboard's login session: a signed, expiring cookie.

``POST /login`` takes a bearer token from ``[[api.tokens]]`` once and sets
the cookie ``ainode_session``: the token's *name*, its scopes and a CSRF
token, signed with itsdangerous (HMAC-SHA1 over a timestamped value, the
signer Flask and Starlette use) under a key drawn at random when the process
starts, so a restart ends every session. The token itself is never kept.

Cookie attributes (RFC 6265bis): ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page sends it), ``Secure`` when the API
is served over HTTPS, ``Max-Age`` = ``[api] dashboard_session_hours``; the
signature's timestamp enforces the same expiry on the server.

A form that acts carries the session's CSRF token in a hidden field
``csrf``; :meth:`Sessions.check_form` compares it in constant time and also
requires the request's ``Origin`` (or, without one, ``Referer``) to be the
node's own origin (OWASP CSRF Prevention Cheat Sheet: synchroniser token
and origin verification).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from node.config import ApiToken, Scope

COOKIE = "ainode_session"


@dataclass(frozen=True)
class Viewer:
    """Who is looking at the dashboard: a token's name and scopes, or the
    open read of loopback without tokens (``name`` None, scope ``read``)."""

    name: str | None
    scopes: frozenset[Scope]
    csrf: str = ""

    @property
    def operator(self) -> bool:
        return Scope.OPERATOR in self.scopes


OPEN_VIEWER = Viewer(None, frozenset({Scope.READ}))


class Sessions:
    """Issue and read session cookies; ``secure``: set ``Secure`` (HTTPS)."""

    def __init__(self, *, secure: bool, max_age_seconds: float):
        self.secure = secure
        self.max_age = int(max_age_seconds)
        self._serializer = URLSafeTimedSerializer(secrets.token_bytes(32), salt="ainode-dashboard-session")

    def issue(self, response: Response, token: ApiToken) -> Viewer:
        """Set the cookie for ``token`` on ``response``; returns the session."""
        viewer = Viewer(token.name, frozenset(token.scopes), secrets.token_urlsafe(24))
        value = self._serializer.dumps({"n": viewer.name, "s": sorted(viewer.scopes), "c": viewer.csrf})
        response.set_cookie(
            COOKIE, value, max_age=self.max_age, path="/", secure=self.secure, httponly=True, samesite="strict"
        )
        return viewer

    def clear(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path="/", secure=self.secure, httponly=True, samesite="strict")

    def read(self, request: Request) -> Viewer | None:
        """The session of ``request``'s cookie; None when absent, forged or expired."""
        value = request.cookies.get(COOKIE)
        if not value:
            return None
        try:
            data = self._serializer.loads(value, max_age=self.max_age)
            return Viewer(str(data["n"]), frozenset(Scope(s) for s in data["s"]), str(data["c"]))
        except (BadSignature, KeyError, TypeError, ValueError):
            return None

    @staticmethod
    def same_origin(request: Request) -> bool:
        """Whether ``Origin`` (else ``Referer``) names this server's own
        scheme, host and port; False when the request carries neither."""
        claimed = request.headers.get("origin") or request.headers.get("referer")
        if not claimed or claimed == "null":
            return False
        parts = urlsplit(claimed)
        own = request.url
        return (parts.scheme, parts.netloc) == (own.scheme, own.netloc)

    def check_form(self, request: Request, viewer: Viewer, csrf: str) -> str | None:
        """Why a POST of a dashboard form is refused, or None when it passes
        (same origin, the session's CSRF token)."""
        if not self.same_origin(request):
            return "the request's Origin is not this dashboard"
        if not viewer.csrf or not hmac.compare_digest(viewer.csrf.encode(), (csrf or "").encode()):
            return "the form's CSRF token does not match the session (reload the page)"
        return None
