"""The agent's local HTTP API (DESIGN.md section 7), on the standard library's threading HTTP server.

    POST /v1/detect   image bytes (JPEG, PNG, ...) -> detections and the version that answered
    GET  /v1/status   the agent's state, serving version, queued reports, last poll
    GET  /healthz     200 while a validated model serves, 503 before the first one
    GET  /metrics     Prometheus text format (built in ``edge_agent.metrics``)

Meant for the line's own software on the same host: bind it to loopback (the default).
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent.errors import ModelOutputError, NoModelError
from edge_agent.metrics import CONTENT_TYPE_LATEST, exposition

if TYPE_CHECKING:
    import numpy as np
    from prometheus_client import CollectorRegistry

    from edge_agent.runtime import DetectResult, InferenceRuntime

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 32 << 20


class ServedAgent(Protocol):
    """What the local API needs of an agent (``edge_agent.agent.Agent`` is one; this module does not import it)."""

    runtime: InferenceRuntime
    metrics: CollectorRegistry

    def status(self) -> dict[str, Any]: ...

    def detect(self, image: bytes | np.ndarray) -> DetectResult: ...


class LocalApi:
    """Serves one agent on ``host:port`` in a background thread."""

    def __init__(self, agent: ServedAgent, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"agent": agent})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-api", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> LocalApi:
        self._thread.start()
        log.info("local API on http://%s:%d", *self.address)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    agent: ServedAgent
    protocol_version = "HTTP/1.1"  # keep-alive: a line camera posts frames back to back

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            serving = self.agent.runtime.serving
            body = {"status": "ok" if serving else "no model", "version": serving.version if serving else None}
            self._json(HTTPStatus.OK if serving else HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif self.path == "/v1/status":
            self._json(HTTPStatus.OK, self.agent.status())
        elif self.path == "/metrics":
            self._send(HTTPStatus.OK, exposition(self.agent.metrics), CONTENT_TYPE_LATEST)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"detail": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/v1/detect":
            self._drain()
            self._json(HTTPStatus.NOT_FOUND, {"detail": f"no route {self.path}"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_IMAGE_BYTES:
            self._drain()
            self._json(HTTPStatus.BAD_REQUEST, {"detail": f"send the image as the body (1 byte to {MAX_IMAGE_BYTES})"})
            return
        data = self.rfile.read(length)
        try:
            result = self.agent.detect(data)
        except ValueError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"detail": str(exc)})
        except NoModelError as exc:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"detail": str(exc)}, retry_after=True)
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

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= MAX_IMAGE_BYTES:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _json(self, status: HTTPStatus, body: dict[str, Any], *, retry_after: bool = False) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", retry_after=retry_after)

    def _send(self, status: HTTPStatus, payload: bytes, content_type: str, *, retry_after: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if retry_after:
            self.send_header("Retry-After", "5")
        self.end_headers()
        self.wfile.write(payload)
