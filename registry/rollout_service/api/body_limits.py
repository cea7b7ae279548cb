"""Request body limits per route, enforced before a body is read: a pure ASGI middleware.

FastAPI reads and parses a JSON body before a route's dependencies run, so before any credential is checked:
without a limit, anyone who can reach the service makes it hold a body of any size (a 300 MB report grew the
process by 1.2 GB). Here a body over its route's limit is answered ``413`` in the problem shape of
``api/problems.py``, and none of it is parsed:

- a ``Content-Length`` over the limit is refused at once, without reading the body;
- a body without one (``Transfer-Encoding: chunked``) is counted as it arrives and refused as soon as it passes
  the limit; what came before is dropped. A chunked body within the limit is handed on as it came.

The refusal says ``Connection: close``, so the server closes the connection instead of draining the rest of what
the client keeps sending. The limits are settings (``ServiceSettings.max_*_bytes``, where their sizes are
reasoned); ``route_limits`` maps them to the routes.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.rollout_service.schemas import Problem
from registry.rollout_service.settings import ServiceSettings
from registry.rollout_service.webhooks import WEBHOOK_PATH

__all__ = ["BodyLimits", "RouteLimit", "route_limits"]


@dataclass(frozen=True)
class RouteLimit:
    """Bodies of ``method`` requests to a path that ``path`` matches whole may hold at most ``max_bytes``."""

    method: str
    path: re.Pattern[str]
    max_bytes: int


def route_limits(settings: ServiceSettings) -> list[RouteLimit]:
    """The routes whose limit is not ``settings.max_body_bytes``."""
    return [
        RouteLimit("POST", re.compile(r"/v1/devices/enroll"), settings.max_enroll_bytes),
        RouteLimit("POST", re.compile(r"/v1/devices/[^/]+/reports"), settings.max_report_bytes),
        RouteLimit("POST", re.compile(r"/v1/rollouts"), settings.max_rollout_bytes),
        RouteLimit("POST", re.compile(re.escape(WEBHOOK_PATH)), settings.max_webhook_bytes),
        # A signed revocation list: at most 1 MiB of document (exporters/signed_documents.py), sent as base64.
        RouteLimit("PUT", re.compile(r"/v1/revocations"), 2 << 20),
    ]


class BodyLimits:
    """The middleware: ``routes`` first, else ``default_max_bytes``; ``on_refused`` is called once per 413."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Sequence[RouteLimit],
        default_max_bytes: int,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self._routes = tuple(routes)
        self._default_max_bytes = default_max_bytes
        self._on_refused = on_refused

    def limit_for(self, method: str, path: str) -> int:
        for route in self._routes:
            if route.method == method and route.path.fullmatch(path):
                return route.max_bytes
        return self._default_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, streamed = _declared_body(scope["headers"])
        if length is None and not streamed:  # no body at all
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], _route_path(scope))
        if length is not None:
            if length > limit:
                await self._refuse(send, limit)
                return
            await self.app(scope, receive, send)  # the server delivers no more than Content-Length says
            return
        received = await _read_within(receive, limit)
        if received is None:
            await self._refuse(send, limit)
            return
        await self.app(scope, _replay(received, receive), send)

    async def _refuse(self, send: Send, limit: int) -> None:
        self._on_refused()
        body = Problem(detail=f"the request body is larger than this route's limit of {limit} bytes")
        content = body.model_dump_json(exclude_none=True).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def _declared_body(headers: Sequence[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """(the Content-Length, or None; whether a body comes without one)."""
    length: int | None = None
    streamed = False
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:  # the HTTP server refuses these before they get here; count the body if one does
                streamed = True
        elif name == b"transfer-encoding":
            streamed = True
    return length, streamed and length is None


def _route_path(scope: Scope) -> str:
    """The path as the routes declare it: without the prefix a proxy mounts the service under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def _read_within(receive: Receive, limit: int) -> list[Message] | None:
    """Every message of the body while it stays within ``limit`` bytes; None as soon as it passes it."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":  # the client went away: the app hears it too
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that gives ``messages`` first, then whatever the server has next (a disconnect)."""
    pending = deque(messages)

    async def replayed() -> Message:
        return pending.popleft() if pending else await receive()

    return replayed
