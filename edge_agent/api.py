"""The agent's local HTTP API (DESIGN.md section 7), on the standard library's threading HTTP server.

    POST /v1/detect   image bytes (JPEG, PNG, ...) -> detections and the version that answered
    GET  /v1/status   the agent's state, serving version, queued reports, last poll
    GET  /healthz     200 while a validated model serves, 503 before the first one
    GET  /metrics     Prometheus text format

Meant for the line's own software on the same host: bind it to loopback (the default).
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from edge_agent.errors import ModelOutputError, NoModelError

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 32 << 20


class LocalApi:
    """Serves one agent on ``host:port`` in a background thread."""

    def __init__(self, agent: Agent, host: str, port: int) -> None:
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
    agent: Agent
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
            self._send(HTTPStatus.OK, metrics_text(self.agent).encode(), "text/plain; version=0.0.4")
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


def metrics_text(agent: Agent) -> str:
    """Counters and recent latency per version, plus the agent's state, in Prometheus' text format."""
    lines = [
        "# HELP yolo_ota_agent_inferences_total Detect requests and probes run, per version.",
        "# TYPE yolo_ota_agent_inferences_total counter",
    ]
    totals = agent.telemetry.totals()
    for version, t in totals.items():
        lines.append(f'yolo_ota_agent_inferences_total{{version="{version}"}} {t.inferences}')
    lines += [
        "# HELP yolo_ota_agent_errors_total Failed inferences, per version.",
        "# TYPE yolo_ota_agent_errors_total counter",
    ]
    for version, t in totals.items():
        lines.append(f'yolo_ota_agent_errors_total{{version="{version}"}} {t.errors}')
    lines += [
        "# HELP yolo_ota_agent_latency_ms Recent detect latency, per version.",
        "# TYPE yolo_ota_agent_latency_ms gauge",
    ]
    for version, t in totals.items():
        lines.append(f'yolo_ota_agent_latency_ms{{version="{version}",quantile="0.5"}} {t.latency_ms.p50:.3f}')
        lines.append(f'yolo_ota_agent_latency_ms{{version="{version}",quantile="0.99"}} {t.latency_ms.p99:.3f}')
    serving = agent.runtime.serving
    lines += [
        "# HELP yolo_ota_agent_serving The version serving now (1).",
        "# TYPE yolo_ota_agent_serving gauge",
    ]
    if serving is not None:
        lines.append(
            f'yolo_ota_agent_serving{{model="{serving.model}",version="{serving.version}",'
            f'variant="{serving.variant}",device="{serving.device}"}} 1'
        )
    lines += [
        "# HELP yolo_ota_agent_reports_queued Events waiting for the rollout service.",
        "# TYPE yolo_ota_agent_reports_queued gauge",
        f"yolo_ota_agent_reports_queued {len(agent.reporter.outbox)}",
        "# HELP yolo_ota_agent_state The update state (1 for the current one).",
        "# TYPE yolo_ota_agent_state gauge",
        f'yolo_ota_agent_state{{state="{agent.state.state.value}"}} 1',
    ]
    return "\n".join(lines) + "\n"
