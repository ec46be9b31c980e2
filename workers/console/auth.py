"""Who may use the console, and proof that a form came from it.

* With ``SESSIONQ_API_TOKEN`` set, the sign-in form takes the token (compared in
  constant time) and sets a signed session cookie: HttpOnly, SameSite=Strict, scoped
  to ``/ui``, valid for :data:`SESSION_MAX_AGE` seconds. The signing key is derived
  from the token (HMAC-SHA256), so changing the token signs everyone out.
* Without a token the console answers loopback clients only, like the API.
* Every POST carries a CSRF token: a random value kept in a signed cookie and repeated
  in the form (double submit); a request whose two copies differ is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import parse_qsl

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from ..http import is_loopback

# Cookie names.
SESSION_COOKIE = "sessionq_console"
CSRF_COOKIE = "sessionq_csrf"
# Seconds a console sign-in lasts.
SESSION_MAX_AGE = 12 * 3600
# Bytes of a form body the console reads (its forms are small: ids, filters, a token).
MAX_FORM_BYTES = 256 * 1024


class ConsoleAuth:
    """Signs and checks the console's cookies for one API token (or none)."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        # Without a token there is nothing to derive from: a per-process key (a restart
        # just issues new CSRF cookies).
        key = hmac.new(token.encode(), b"sessionq-console-cookie-key", hashlib.sha256).digest() if token \
            else secrets.token_bytes(32)
        self._session = URLSafeTimedSerializer(key, salt="sessionq-console-session")
        self._csrf = URLSafeTimedSerializer(key, salt="sessionq-console-csrf")

    def allowed(self, request: Request) -> bool:
        """May this request see the console? (Signed in, or loopback when no token is set.)"""
        if self.token is None:
            return request.client is not None and is_loopback(request.client.host)
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return False
        try:
            self._session.loads(raw, max_age=SESSION_MAX_AGE)
        except BadSignature:
            return False
        return True

    def token_matches(self, given: str) -> bool:
        """True when ``given`` is the API token (constant-time)."""
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def sign_in(self, response: Response, *, secure: bool = False) -> None:
        """Set the session cookie on ``response`` (``secure``: HTTPS only, when served over HTTPS)."""
        response.set_cookie(SESSION_COOKIE, self._session.dumps({"v": 1}), max_age=SESSION_MAX_AGE, path="/ui",
                            httponly=True, samesite="strict", secure=secure)

    @staticmethod
    def sign_out(response: Response) -> None:
        """Clear the session cookie on ``response``."""
        response.delete_cookie(SESSION_COOKIE, path="/ui", httponly=True, samesite="strict")

    def csrf_token(self, request: Request) -> tuple[str, str | None]:
        """``(token, cookie)``: this client's CSRF token, and a new cookie value to set
        when it had none (or a forged one)."""
        raw = request.cookies.get(CSRF_COOKIE)
        if raw:
            try:
                return str(self._csrf.loads(raw)), None
            except BadSignature:
                pass
        value = secrets.token_urlsafe(24)
        return value, self._csrf.dumps(value)

    @staticmethod
    def set_csrf_cookie(response: Response, cookie: str, *, secure: bool = False) -> None:
        """Set a CSRF cookie made by :meth:`csrf_token`."""
        response.set_cookie(CSRF_COOKIE, cookie, path="/ui", httponly=True, samesite="strict", secure=secure)

    async def form(self, request: Request) -> dict[str, list[str]] | None:
        """The POSTed form if its CSRF token matches the cookie's, else ``None``."""
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return None
        fields: dict[str, list[str]] = {}
        for name, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
            fields.setdefault(name, []).append(value)
        given = (fields.get("csrf") or [""])[0]
        raw = request.cookies.get(CSRF_COOKIE)
        if not given or not raw:
            return None
        try:
            expected = str(self._csrf.loads(raw))
        except BadSignature:
            return None
        return fields if hmac.compare_digest(given.encode(), expected.encode()) else None
