"""The agent's local HTTP API (DESIGN.md section 7), on the standard library's threading HTTP server.

    POST /v1/detect   image bytes (JPEG, PNG, ...) -> detections and the version that answered
    GET  /v1/status   the agent's state, serving version, queued reports, last poll
    GET  /healthz     200 while a validated model serves, 503 before the first one
    GET  /metrics     Prometheus text format (built in ``edge_agent.metrics``)

Meant for the line's own software on the same host: bind it to loopback (the default). Where other machines can
reach it, set ``api_token``: every route but ``/healthz`` then needs ``Authorization: Bearer <token>`` (compared in
constant time; ``/metrics`` too, as it names the model and version that serve: Prometheus sends the token with
``authorization: {credentials_file: ...}``).

``/v1/detect`` is bounded before it costs memory: a body over ``max_image_bytes`` is refused (413) from its
Content-Length, unread (a client that sends ``Expect: 100-continue``, as curl does, is refused before it sends
the body); at most ``max_concurrent_decodes`` requests read, decode and detect at once, a further one waits up to
``decode_wait_s`` and is then answered 503 with Retry-After; the whole body must arrive within
``BODY_READ_TIMEOUT_S``; and an image whose header declares more than ``max_image_pixels`` is refused (413) before
it is decoded (``edge_agent.image_limits``).
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent.errors import DetectBusy, ImageRefused, ModelOutputError, NoModelError
from edge_agent.image_limits import DecodeSlots
from edge_agent.metrics import CONTENT_TYPE_LATEST, exposition
from edge_agent.settings import AgentSettings

if TYPE_CHECKING:
    import numpy as np
    from prometheus_client import CollectorRegistry

    from edge_agent.runtime import DetectResult, InferenceRuntime

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 60.0  # a connection silent this long (between frames, or mid-body) is closed
BODY_READ_TIMEOUT_S = 30.0  # the whole body of one /v1/detect: a slow sender holds a detect slot meanwhile
# A refused body is read and dropped (never kept) for at most this long and this much, after the answer has gone
# out: closing a socket with unread input resets the connection, which can destroy the answer before the client
# has read it.
LINGER_S = 2.0
LINGER_BYTES = 64 << 20
RETRY_AFTER_BUSY_S = 1
RETRY_AFTER_NO_MODEL_S = 5


class ServedAgent(Protocol):
    """What the local API needs of an agent (``edge_agent.agent.Agent`` is one; this module does not import it)."""

    runtime: InferenceRuntime
    metrics: CollectorRegistry

    def status(self) -> dict[str, Any]: ...

    def detect(self, image: bytes | np.ndarray) -> DetectResult: ...


@dataclass(frozen=True)
class ApiLimits:
    """What the local API enforces: the token (None: open) and the bounds of ``/v1/detect``."""

    token: str | None
    max_image_bytes: int
    max_concurrent_decodes: int
    decode_wait_s: float

    @classmethod
    def of(cls, settings: AgentSettings) -> ApiLimits:
        return cls(settings.api_token, settings.max_image_bytes, settings.max_concurrent_decodes,
                   settings.decode_wait_s)  # fmt: skip

    @classmethod
    def defaults(cls) -> ApiLimits:
        """No token, and the settings' default limits."""
        fields = AgentSettings.model_fields
        return cls(None, fields["max_image_bytes"].default, fields["max_concurrent_decodes"].default,
                   fields["decode_wait_s"].default)  # fmt: skip


class LocalApi:
    """Serves one agent on ``host:port`` in a background thread, with the limits of ``settings`` (None: defaults)."""

    def __init__(self, agent: ServedAgent, host: str, port: int, settings: AgentSettings | None = None) -> None:
        limits = ApiLimits.of(settings) if settings is not None else ApiLimits.defaults()
        slots = DecodeSlots(limits.max_concurrent_decodes, limits.decode_wait_s)
        handler = type("Handler", (_Handler,), {"agent": agent, "limits": limits, "slots": slots})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-api", daemon=True)
        self._token_required = limits.token is not None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> LocalApi:
        self._thread.start()
        token = "a bearer token on every route but /healthz" if self._token_required else "no token"
        log.info("local API on http://%s:%d (%s)", *self.address, token)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass(frozen=True)
class _Refusal:
    status: HTTPStatus
    detail: str
    headers: tuple[tuple[str, str], ...] = ()


class _Handler(BaseHTTPRequestHandler):
    agent: ServedAgent
    limits: ApiLimits
    slots: DecodeSlots
    protocol_version = "HTTP/1.1"  # keep-alive: a line camera posts frames back to back
    timeout = IDLE_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            serving = self.agent.runtime.serving
            body = {"status": "ok" if serving else "no model", "version": serving.version if serving else None}
            self._json(HTTPStatus.OK if serving else HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif not self._authorized():
            self._answer(_UNAUTHORIZED)
        elif self.path == "/v1/status":
            self._json(HTTPStatus.OK, self.agent.status())
        elif self.path == "/metrics":
            self._send(HTTPStatus.OK, exposition(self.agent.metrics), CONTENT_TYPE_LATEST)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"detail": f"no route {self.path}"})

    def handle_expect_100(self) -> bool:
        # A client that waits for "100 Continue" before sending its body learns of a refusal without sending it.
        refusal = self._refusal_before_body() if self.command == "POST" else None
        if refusal is None:
            return super().handle_expect_100()
        self._answer(refusal, close=True)
        return False

    def do_POST(self) -> None:
        refusal = self._refusal_before_body()
        if refusal is not None:
            self._refuse_unread(refusal)
            return
        length = int(self.headers["Content-Length"])
        try:
            with self.slots.hold():
                data = self._read_body(length)
                if data is None:
                    self._answer(_Refusal(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within "
                                          f"{BODY_READ_TIMEOUT_S:.0f} s"), close=True)  # fmt: skip
                    return
                result = self.agent.detect(data)
        except DetectBusy as exc:
            self._refuse_unread(_Refusal(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), _retry_after(RETRY_AFTER_BUSY_S)))
        except ImageRefused as exc:
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"detail": str(exc)})
        except ValueError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"detail": str(exc)})
        except NoModelError as exc:
            self._answer(_Refusal(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), _retry_after(RETRY_AFTER_NO_MODEL_S)))
        except (RuntimeError, ModelOutputError) as exc:
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"detail": f"inference failed: {exc}"})
        else:
            self._json(
                HTTPStatus.OK,
                {
                    "model": result.model,
                    "version": result.version,
                    "variant": result.variant,
                    "device": result.device,
                    "latency_ms": result.latency_ms,
                    "detections": result.detections,
                },
            )

    # -- before the body ---------------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        token = self.limits.token
        if token is None:
            return True
        scheme, _, presented = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())

    def _refusal_before_body(self) -> _Refusal | None:
        """Why a POST is refused from its request line and headers alone; None to go on and read its body."""
        if not self._authorized():
            return _UNAUTHORIZED
        if self.path != "/v1/detect":
            return _Refusal(HTTPStatus.NOT_FOUND, f"no route {self.path}")
        limit = self.limits.max_image_bytes
        declared = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or declared is None:
            return _Refusal(HTTPStatus.LENGTH_REQUIRED, f"send the image as the body, with a Content-Length (at most "
                            f"{limit} bytes)")  # fmt: skip
        if not declared.strip().isdigit() or int(declared) == 0:
            return _Refusal(HTTPStatus.BAD_REQUEST, f"send the image as the body (1 byte to {limit})")
        if int(declared) > limit:
            return _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is {int(declared)} bytes; max_image_bytes"
                            f" is {limit}: refused unread")  # fmt: skip
        return None

    # -- the body ----------------------------------------------------------------------------------------------

    def _read_body(self, length: int) -> bytes | None:
        """The body, or None when it did not arrive whole within ``BODY_READ_TIMEOUT_S`` (or the client left)."""
        deadline = time.monotonic() + BODY_READ_TIMEOUT_S
        chunks: list[bytes] = []
        left = length
        try:
            while left:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return None
                self.connection.settimeout(min(remaining_s, IDLE_TIMEOUT_S))
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    return None
                chunks.append(chunk)
                left -= len(chunk)
        except TimeoutError:
            return None
        finally:
            self.connection.settimeout(IDLE_TIMEOUT_S)
        return b"".join(chunks)

    def _refuse_unread(self, refusal: _Refusal) -> None:
        """Answer ``refusal`` to a request whose body is not read, then close: half-close, and drop what still
        arrives, bounded in time and bytes (``LINGER_S``, ``LINGER_BYTES``), so that the client reads the answer
        instead of a reset."""
        self._answer(refusal, close=True)
        deadline = time.monotonic() + LINGER_S
        dropped = 0
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while dropped < LINGER_BYTES and (left_s := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left_s)
                chunk = self.rfile.read1(1 << 16)
                if not chunk:
                    return
                dropped += len(chunk)
        except OSError:  # the client has gone, or the time is up
            return

    # -- answers -----------------------------------------------------------------------------------------------

    def _answer(self, refusal: _Refusal, *, close: bool = False) -> None:
        headers = refusal.headers + ((("Connection", "close"),) if close else ())
        self._json(refusal.status, {"detail": refusal.detail}, headers=headers)

    def _json(self, status: HTTPStatus, body: dict[str, Any], *, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", headers=headers)

    def _send(
        self, status: HTTPStatus, payload: bytes, content_type: str, *, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


def _retry_after(seconds: int) -> tuple[tuple[str, str], ...]:
    return (("Retry-After", str(seconds)),)


_UNAUTHORIZED = _Refusal(
    HTTPStatus.UNAUTHORIZED,
    "this agent's API needs Authorization: Bearer <api_token>",
    (("WWW-Authenticate", "Bearer"),),
)
