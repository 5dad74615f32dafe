"""What every response of the server shares, as OpenAI's API does it: an ``x-request-id`` header,
the API key checked before anything else, and an OpenAI error body for whatever goes wrong.

A plain ASGI middleware around the app, so it runs before routing and body parsing: without
the key, a request gets 401 whatever its path or body (a malformed body included), and
``/openapi.json`` is not served either; only ``/health`` stays open. An exception no route
handles becomes a JSON 500 (507 for a full disk) instead of Starlette's ``text/plain`` one.
"""

from __future__ import annotations

import errno
import logging
import secrets
import sqlite3

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})


def as_api_error(exc: BaseException) -> APIError:
    """The OpenAI error answered for an exception no route turned into one: 507 when the disk
    (or the database on it) is full, else a 500 that names the exception."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return APIError(507, f"the server's disk is full: {exc}", type="server_error")
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
        return APIError(507, f"the server's disk is full: {exc}", type="server_error")
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error")


class OpenAIEnvelope:
    """The middleware; ``api_key`` None leaves every path open."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            key.strip().encode(), self.api_key.encode()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(16)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        if not self._authorized(scope):
            error = APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
            await _answer(error, scope, receive, send_with_id)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:  # the status line is out: nothing else can be said
                raise
            log.exception("%s %s failed", scope.get("method"), scope["path"])
            await _answer(as_api_error(exc), scope, receive, send_with_id)


async def _answer(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
