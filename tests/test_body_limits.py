"""A stranger on the factory network POSTs huge bodies to the routes that read a body before any credential is
checked (a device's reports, MLflow's webhook): the real service under uvicorn answers ``413`` without reading them,
and its memory stays flat. Bodies at the limit still work for those who hold the credentials.

The huge bodies are 300 MB, made by a generator as they are sent (the client holds 1 MiB at a time), once with a
``Content-Length`` and once chunked. The service's memory is read from ``/proc/<pid>/status`` of its process:
``VmHWM``, the most it held since the measurement began, so that a spike that was freed again still counts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet import Fleet
from servers import OPERATOR_TOKEN, WEBHOOK_SECRET, start_rollout_service

from exporters.device_identity import DeviceKey, enrollment_body
from exporters.fingerprint import collect
from registry.rollout_service.settings import ServiceSettings
from yolo_ota.processes import RunningServer

HUGE_BYTES = 300 * 1000 * 1000
CHUNK_BYTES = 1 << 20
MAX_GROWTH_BYTES = 50 * 1000 * 1000


class LIMITS:
    """The default limits, which the service under test runs with."""

    max_enroll_bytes, max_report_bytes, max_rollout_bytes, max_webhook_bytes, max_body_bytes = (
        int(ServiceSettings.model_fields[name].default)
        for name in ("max_enroll_bytes", "max_report_bytes", "max_rollout_bytes", "max_webhook_bytes", "max_body_bytes")
    )


REPORTS = "/v1/devices/edge-1/reports"
WEBHOOK = "/v1/hooks/mlflow"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The service with its default limits, on SQLite, without MLflow (nothing here needs it)."""
    server = start_rollout_service(tmp_path_factory.mktemp("limits"), settings={"ALIAS_POLL_INTERVAL_S": "3600"})
    yield server
    server.stop()


def reset_peak(server: RunningServer) -> None:
    """Start ``VmHWM`` again from the process's present size (Linux: ``5`` to ``clear_refs``)."""
    Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")


def memory_kb(server: RunningServer) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of the service's process, in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def huge_report(total_bytes: int = HUGE_BYTES) -> Iterator[bytes]:
    """A report of ``total_bytes`` (events upon events), made as it is sent."""
    event = b'{"state":"idle","ok":true,"reason":"' + b"x" * 900 + b'"},'
    chunk = event * (CHUNK_BYTES // len(event))
    head, tail = b'{"events":[', b'{"state":"idle"}]}'
    sent = len(head) + len(tail)
    yield head
    while sent + len(chunk) <= total_bytes:
        yield chunk
        sent += len(chunk)
    yield b" " * (total_bytes - sent) + tail


def refused(answer: httpx.Response, limit: int) -> bool:
    return answer.status_code == 413 and answer.json() == {
        "detail": f"the request body is larger than this route's limit of {limit} bytes"
    }


@pytest.mark.parametrize("path", [REPORTS, WEBHOOK], ids=["reports", "webhook"])
def test_a_huge_body_from_a_stranger_is_refused_before_it_is_read(service: RunningServer, path: str) -> None:
    limit = LIMITS.max_report_bytes if path == REPORTS else LIMITS.max_webhook_bytes
    with httpx.Client(base_url=service.url, timeout=120) as client:
        client.post(path, json={"events": []})  # the route's code is loaded before memory is measured
        reset_peak(service)
        before = memory_kb(service)
        started = time.monotonic()
        declared = client.post(path, content=huge_report(), headers={"Content-Length": str(HUGE_BYTES)})
        streamed = client.post(path, content=huge_report())  # no Content-Length: chunked
        took_s = time.monotonic() - started
    after = memory_kb(service)

    growth = {name: (after[name] - before[name]) * 1000 for name in after}
    print(f"{path}: two 300 MB bodies sent in {took_s:.2f} s; growth RSS {growth['VmRSS'] / 1e6:.1f} MB, peak "
          f"{growth['VmHWM'] / 1e6:.1f} MB")  # fmt: skip
    assert growth["VmHWM"] < MAX_GROWTH_BYTES, growth
    assert refused(declared, limit), (declared.status_code, declared.text)
    assert refused(streamed, limit), (streamed.status_code, streamed.text)
    assert took_s < 30  # refused as the body started, not after 600 MB went through


def _over(limit: int) -> bytes:
    return b'{"pad":"' + b"x" * limit + b'"}'


@pytest.mark.parametrize(
    ("method", "path", "limit"),
    [
        ("POST", "/v1/devices/enroll", LIMITS.max_enroll_bytes),
        ("POST", REPORTS, LIMITS.max_report_bytes),
        ("POST", WEBHOOK, LIMITS.max_webhook_bytes),
        ("POST", "/v1/rollouts", LIMITS.max_rollout_bytes),
        ("POST", "/v1/tokens", LIMITS.max_body_bytes),
        ("POST", "/v1/rollouts/1/pause", LIMITS.max_body_bytes),
    ],
    ids=["enroll", "reports", "webhook", "rollouts", "tokens", "control"],
)
def test_every_route_refuses_a_body_over_its_own_limit(service: RunningServer, method: str, path: str, limit: int):
    """Just over the limit, with the operator's token, declared or chunked: 413 either way."""
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    body = _over(limit)
    with httpx.Client(base_url=service.url, timeout=60, headers=headers) as client:
        declared = client.request(method, path, content=body)
        streamed = client.request(method, path, content=iter([body[:1000], body[1000:]]))
    assert refused(declared, limit), (declared.status_code, declared.text[:300])
    assert refused(streamed, limit), (streamed.status_code, streamed.text[:300])


def padded(payload: dict[str, Any], size: int) -> bytes:
    """``payload`` as JSON, padded with spaces (still the same JSON) to exactly ``size`` bytes."""
    body = json.dumps(payload).encode()
    assert len(body) <= size
    return body[:-1] + b" " * (size - len(body)) + body[-1:]


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_bodies_at_the_limit_still_work_with_credentials(service: RunningServer, chunked: bool) -> None:
    fleet = Fleet(service.url)
    device_id = f"edge-limit-{int(chunked)}"
    try:
        enroll = padded(
            enrollment_body(
                DeviceKey.generate(), device_id, fingerprint=collect().model_dump(mode="json"),
                enrollment_token="test-enrollment-token",
            ),
            LIMITS.max_enroll_bytes,
        )  # fmt: skip
        enrolled = _post(fleet.http, "/v1/devices/enroll", enroll, {}, chunked)
        assert enrolled.status_code == 200, enrolled.text
        token = enrolled.json()["device_token"]

        report = padded({"events": [{"state": "idle", "reason": "at the limit"}]}, LIMITS.max_report_bytes)
        answer = _post(
            fleet.http, f"/v1/devices/{device_id}/reports", report, {"Authorization": f"Bearer {token}"}, chunked
        )
        assert answer.status_code == 200 and answer.json()["events"] == 1, answer.text
        one_more = _post(
            fleet.http, f"/v1/devices/{device_id}/reports", report + b" ", {"Authorization": f"Bearer {token}"}, chunked
        )
        assert refused(one_more, LIMITS.max_report_bytes), one_more.text

        webhook = padded({"entity": "model_version_alias", "action": "deleted", "data": {}}, LIMITS.max_webhook_bytes)
        answer = _post(fleet.http, WEBHOOK, webhook, _webhook_headers(webhook), chunked)
        assert answer.status_code == 200 and answer.json()["outcome"].startswith("ignored"), answer.text
    finally:
        fleet.close()


def _post(client: httpx.Client, path: str, body: bytes, headers: dict[str, str], chunked: bool) -> httpx.Response:
    content = iter([body[: len(body) // 2], body[len(body) // 2 :]]) if chunked else body
    return client.post(path, content=content, headers={"Content-Type": "application/json", **headers})


def _webhook_headers(body: bytes) -> dict[str, str]:
    delivery, when = str(uuid.uuid4()), str(int(time.time()))
    digest = hmac.new(WEBHOOK_SECRET.encode(), f"{delivery}.{when}.".encode() + body, hashlib.sha256).digest()
    return {
        "X-MLflow-Signature": "v1," + base64.b64encode(digest).decode(),
        "X-MLflow-Timestamp": when,
        "X-MLflow-Delivery-Id": delivery,
    }
