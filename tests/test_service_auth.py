"""Who may call what on the rollout service (DESIGN.md section 6), against the live service under uvicorn.

The routes come from the service's own ``/openapi.json``, so a route added later is checked without editing this
file: every one but the open ones must refuse a request without valid credentials.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servers import ENROLLMENT_TOKEN, OPERATOR_TOKEN

from exporters.device_identity import DeviceKey, enrollment_body
from exporters.fingerprint import collect
from yolo_ota.processes import RunningServer

MODEL = "pcb-line"
# Open: no bearer token (enrollment is signed by the device's key and carries the enrollment token in its body).
OPEN_ROUTES = frozenset({("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/v1/devices/enroll")})
DEVICE_ROUTES = frozenset({("GET", "/v1/devices/{device_id}/desired"), ("POST", "/v1/devices/{device_id}/reports")})
KNOWN_ROUTES = DEVICE_ROUTES | {
    ("GET", "/v1/devices"),
    ("GET", "/v1/devices/{device_id}"),
    ("POST", "/v1/rollouts"),
    ("GET", "/v1/rollouts"),
    ("GET", "/v1/rollouts/{rollout_id}"),
    ("POST", "/v1/rollouts/{rollout_id}/pause"),
    ("POST", "/v1/rollouts/{rollout_id}/resume"),
    ("POST", "/v1/rollouts/{rollout_id}/abort"),
    ("POST", "/v1/rollouts/{rollout_id}/rollback"),
    ("POST", "/v1/rollouts/{rollout_id}/approve"),
    ("POST", "/v1/rollouts/{rollout_id}/reject"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/promotions"),
    ("GET", "/v1/tokens"),
    ("POST", "/v1/tokens"),
    ("POST", "/v1/tokens/{name}/revoke"),
    ("GET", "/v1/enrollment-tokens"),
    ("POST", "/v1/enrollment-tokens"),
    ("POST", "/v1/enrollment-tokens/{name}/revoke"),
    ("POST", "/v1/devices/{device_id}/accept"),
    ("POST", "/v1/devices/{device_id}/reject"),
    ("POST", "/v1/devices/{device_id}/decommission"),
}
BAD_CREDENTIALS = {
    "no header": None,
    "unknown bearer token": "Bearer not-a-token-this-service-issued",
    "basic scheme": "Basic xyz",
    "operator token without a scheme": OPERATOR_TOKEN,
    "bearer without a token": "Bearer",
}


@pytest.fixture(scope="module")
def service(module_service: RunningServer) -> RunningServer:
    return module_service


@pytest.fixture(scope="module")
def http(service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


KEYS: dict[str, DeviceKey] = {}  # each test device's own key, made on its first enrollment


def enroll(http: httpx.Client, device_id: str, enrollment_token: str | None = ENROLLMENT_TOKEN) -> httpx.Response:
    key = KEYS.setdefault(device_id, DeviceKey.generate())
    body = enrollment_body(
        key,
        device_id,
        fingerprint=collect().model_dump(mode="json"),
        labels={"line": "auth"},
        enrollment_token=enrollment_token,
    )
    return http.post("/v1/devices/enroll", json=body)


def enrolled_token(http: httpx.Client, device_id: str) -> str:
    answer = enroll(http, device_id)
    assert answer.status_code == 200, answer.text
    return answer.json()["device_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def seeded(http: httpx.Client, fleet_model: dict[str, str]) -> dict[str, Any]:
    """Devices A and B, and a rollout, so that every path of the API can name an existing object."""
    tokens = {device_id: enrolled_token(http, device_id) for device_id in ("auth-edge-a", "auth-edge-b")}
    answer = http.post(
        "/v1/rollouts",
        headers=bearer(OPERATOR_TOKEN),
        # supersede: a production alias that another test left may have started a rollout already
        json={"model": MODEL, "version": fleet_model["good"], "strategy": "canary", "supersede": True},
    )
    assert answer.status_code == 201, answer.text
    return {
        "tokens": tokens,
        "a": "auth-edge-a",
        "b": "auth-edge-b",
        "rollout_id": answer.json()["id"],
        "version": fleet_model["better"],
    }


@pytest.fixture(scope="module")
def routes(http: httpx.Client) -> set[tuple[str, str]]:
    """Every (method, path template) the service documents, less the open ones."""
    answer = http.get("/openapi.json")
    assert answer.status_code == 200, answer.text
    documented = {
        (method.upper(), path)
        for path, operations in answer.json()["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    }
    assert documented >= OPEN_ROUTES, documented  # the enumeration reads the schema it thinks it reads
    return documented - OPEN_ROUTES


def fill(path: str, *, device_id: str, rollout_id: int) -> str:
    """The path template with its parameters set to existing objects; an unknown parameter fails the test."""
    values = {"device_id": device_id, "rollout_id": str(rollout_id), "name": "auth-check"}
    return re.sub(r"\{(\w+)\}", lambda match: values[match.group(1)], path)


def call(http: httpx.Client, method: str, path: str, seeded: dict[str, Any], authorization: str | None, **kwargs: Any):
    """One request to a route, with a body valid for it where it takes one, so that only the credentials are off."""
    headers = {"Authorization": authorization} if authorization is not None else {}
    url = fill(path, device_id=kwargs.pop("device_id", seeded["a"]), rollout_id=seeded["rollout_id"])
    body = None
    if method == "POST":
        body = {"events": []} if path.endswith("/reports") else {"reason": "auth check"}
        if path == "/v1/rollouts":
            body = {"model": MODEL, "version": seeded["version"], "strategy": "canary", "supersede": True}
        if path in ("/v1/tokens", "/v1/enrollment-tokens"):
            body = {"name": "auth-check", **({"scope": "read"} if path == "/v1/tokens" else {})}
    return http.request(method, url, headers=headers, json=body, **kwargs)


def test_routes_are_enumerated_from_the_schema(routes: set[tuple[str, str]]):
    assert routes >= KNOWN_ROUTES, sorted(KNOWN_ROUTES - routes)


@pytest.mark.parametrize("authorization", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_every_route_but_the_open_ones_refuses_bad_credentials(
    http: httpx.Client, routes: set[tuple[str, str]], seeded: dict[str, Any], authorization: str | None
):
    answers = {(method, path): call(http, method, path, seeded, authorization) for method, path in sorted(routes)}

    wrong = {route: f"{a.status_code} {a.text[:200]}" for route, a in answers.items() if a.status_code != 401}
    assert not wrong, wrong
    for answer in answers.values():
        assert answer.headers.get("WWW-Authenticate") == "Bearer"
        assert answer.json()["detail"]
    assert set(answers) >= KNOWN_ROUTES


def test_a_device_token_opens_no_operator_route(
    http: httpx.Client, routes: set[tuple[str, str]], seeded: dict[str, Any]
):
    token = seeded["tokens"][seeded["a"]]
    operator_routes = sorted(routes - DEVICE_ROUTES)
    assert len(operator_routes) >= len(KNOWN_ROUTES - DEVICE_ROUTES)

    answers = {route: call(http, *route, seeded, f"Bearer {token}") for route in operator_routes}

    wrong = {route: f"{a.status_code} {a.text[:200]}" for route, a in answers.items() if a.status_code != 401}
    assert not wrong, wrong


def test_the_operator_token_opens_no_device_route(http: httpx.Client, seeded: dict[str, Any]):
    # The operator token is no device's token: the service cannot tell it from an unknown one, hence 401, not 403.
    for route in sorted(DEVICE_ROUTES):
        answer = call(http, *route, seeded, f"Bearer {OPERATOR_TOKEN}")
        assert answer.status_code == 401, (route, answer.text)
        # ... while the device's own token on the same request is accepted
        own = call(http, *route, seeded, f"Bearer {seeded['tokens'][seeded['a']]}")
        assert own.status_code == 200, (route, own.text)


def test_a_device_cannot_act_for_another(http: httpx.Client, seeded: dict[str, Any]):
    token_a = seeded["tokens"][seeded["a"]]
    for route in sorted(DEVICE_ROUTES):
        answer = call(http, *route, seeded, f"Bearer {token_a}", device_id=seeded["b"])
        assert answer.status_code == 403, (route, answer.text)
        assert seeded["b"] in answer.json()["detail"]
    # B's own token still works on B's paths, so the 403 was about A's token
    desired = http.get(f"/v1/devices/{seeded['b']}/desired", headers=bearer(seeded["tokens"][seeded["b"]]))
    assert desired.status_code == 200, desired.text


def test_a_device_that_never_enrolled_is_refused(http: httpx.Client, seeded: dict[str, Any]):
    for route in sorted(DEVICE_ROUTES):
        answer = call(http, *route, seeded, "Bearer some-guess", device_id="auth-never-enrolled")
        assert answer.status_code == 401, (route, answer.text)


def test_a_new_id_needs_a_live_enrollment_token(http: httpx.Client, seeded: dict[str, Any]):
    operator = bearer(OPERATOR_TOKEN)
    for wrong in ("not-the-enrollment-token", OPERATOR_TOKEN, ENROLLMENT_TOKEN + "x", None):
        answer = enroll(http, "auth-edge-new", enrollment_token=wrong)
        assert answer.status_code == 401, answer.text
        assert "device_token" not in answer.json()
    assert http.get("/v1/devices/auth-edge-new", headers=operator).status_code == 404
    # B, already enrolled, is untouched by the refusals: its token still works
    desired = http.get(f"/v1/devices/{seeded['b']}/desired", headers=bearer(seeded["tokens"][seeded["b"]]))
    assert desired.status_code == 200, desired.text


def test_reenrolling_rotates_the_device_token(http: httpx.Client, seeded: dict[str, Any]):
    device_id = "auth-edge-rotated"
    old = enrolled_token(http, device_id)
    assert http.get(f"/v1/devices/{device_id}/desired", headers=bearer(old)).status_code == 200

    new = enrolled_token(http, device_id)

    assert new != old
    assert http.get(f"/v1/devices/{device_id}/desired", headers=bearer(old)).status_code == 401
    reports = http.post(f"/v1/devices/{device_id}/reports", headers=bearer(old), json={"events": []})
    assert reports.status_code == 401, reports.text
    assert http.get(f"/v1/devices/{device_id}/desired", headers=bearer(new)).status_code == 200
    reports = http.post(f"/v1/devices/{device_id}/reports", headers=bearer(new), json={"events": []})
    assert reports.status_code == 200, reports.text


def test_refusals_are_counted_in_the_metrics(http: httpx.Client, seeded: dict[str, Any]):
    def refused_401() -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith('yolo_ota_request_errors_total{status="401"}'):
                return float(line.split()[-1])
        return 0.0

    before = refused_401()
    assert http.get("/v1/rollouts", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert refused_401() == before + 1
