"""The rollout service's REST layer as a newcomer should find it: routers that call services, typed dependencies
that resolve to objects, and a device poll that stays free of per-request dependency machinery.

The source checks read the code (AST); the dependency checks serve the real app (``create_app`` on SQLite) with
uvicorn on loopback, with one extra router of probe routes that only echo what the dependencies handed them.
"""

from __future__ import annotations

import ast
import dataclasses
import threading
import time
import typing
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from exporters.device_identity import DeviceKey, enrollment_body
from registry.rollout_service.api import deps, devices, operations, rollouts
from registry.rollout_service.app import create_app
from registry.rollout_service.auth import AuthenticatedDevice, Operator
from registry.rollout_service.settings import ServiceSettings
from yolo_ota.processes import free_port

PACKAGE = Path(__file__).resolve().parents[1] / "registry" / "rollout_service"
ROUTE_MODULES = sorted((PACKAGE / "api").glob("*.py"))
# What a route module must not reach for: the store, and status codes raised by hand.
FORBIDDEN_IMPORTS = ("sqlalchemy", "registry.rollout_service.db")
FORBIDDEN_CALLS = {"session", "execute", "transaction", "sessionmaker", "HTTPException"}
OPERATOR_TOKEN = "layout-operator-token"
ENROLLMENT_TOKEN = "layout-enrollment-token"


def _imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {node.module or ""} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _called(tree: ast.AST) -> set[str]:
    called: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return called


def test_there_are_route_modules_to_check() -> None:
    assert {p.stem for p in ROUTE_MODULES} >= {"deps", "devices", "rollouts", "operations"}


@pytest.mark.parametrize("path", ROUTE_MODULES, ids=lambda p: p.name)
def test_route_modules_call_services_not_the_store(path: Path) -> None:
    tree = ast.parse(path.read_text())
    reached = {name for name in _imported(tree) if name.startswith(FORBIDDEN_IMPORTS) or "HTTPException" in name}
    assert reached == set(), f"{path.name} imports {sorted(reached)}"
    calls = _called(tree) & FORBIDDEN_CALLS
    assert calls == set(), f"{path.name} calls {sorted(calls)}"


def test_nothing_imports_the_app_back() -> None:
    importers = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "app.py"
        and any(name.startswith("registry.rollout_service.app") for name in _imported(ast.parse(path.read_text())))
    ]
    assert importers == []


@pytest.mark.parametrize("module", [devices, rollouts, operations], ids=lambda m: m.__name__.rpartition(".")[2])
def test_each_resource_has_a_module_level_router(module: object) -> None:
    router = getattr(module, "router", None)
    assert isinstance(router, APIRouter) and router.routes


def test_dependencies_resolve_to_objects() -> None:
    for alias, kind in ((deps.CurrentOperator, Operator), (deps.CurrentDevice, AuthenticatedDevice)):
        assert typing.get_origin(alias) is typing.Annotated
        assert typing.get_args(alias)[0] is kind
        assert dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_the_device_poll_takes_no_dependencies() -> None:
    """The hot path: its headers are read by hand, and only the path's device id is a declared parameter."""
    (poll,) = [
        r for r in devices.router.routes if isinstance(r, APIRoute) and r.path == "/v1/devices/{device_id}/desired"
    ]
    assert poll.dependant.dependencies == []
    assert [p.name for p in poll.dependant.path_params] == ["device_id"]
    assert poll.dependant.header_params == [] and poll.dependant.query_params == []
    documented = {p["name"] for p in (poll.openapi_extra or {})["parameters"]}
    assert documented == {"authorization", "if-none-match"}


# -- the dependencies, on the running app ---------------------------------------------------------------------

_probes = APIRouter(prefix="/probe")


@_probes.get("/operator")
def _probe_operator(operator: deps.CurrentOperator) -> dict[str, str]:
    return {"kind": type(operator).__name__, "name": operator.name, "actor": operator.actor}


@_probes.get("/devices/{device_id}")
def _probe_device(device: deps.CurrentDevice) -> dict[str, str]:
    return {"kind": type(device).__name__, "device_id": device.device_id}


@_probes.get("/service")
def _probe_service(service: deps.ServiceDep) -> dict[str, str]:
    return {"kind": type(service).__name__, "poll_interval_s": str(service.settings.poll_interval_s)}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[httpx.Client]:
    settings = ServiceSettings(
        data_dir=tmp_path,
        operator_tokens=f"alice={OPERATOR_TOKEN}",
        enrollment_token=ENROLLMENT_TOKEN,
        poll_interval_s=17,
    )
    app: FastAPI = create_app(settings)
    app.include_router(_probes)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the service did not start"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _enroll(client: httpx.Client, device_id: str) -> str:
    fingerprint = {
        "torch": "2.5.1",
        "torchvision": None,
        "ultralytics": None,
        "python": "3.11.9",
        "os": "Linux",
        "arch": "x86_64",
        "cuda_runtime": None,
        "cudnn": None,
        "gpu_name": None,
        "gpu_capability": None,
        "gpu_memory_bytes": None,
        "driver": None,
        "tf32_matmul": False,
        "tf32_cudnn": False,
        "cudnn_benchmark": False,
        "deterministic": False,
    }
    body = enrollment_body(DeviceKey.generate(), device_id, fingerprint=fingerprint, enrollment_token=ENROLLMENT_TOKEN)
    answer = client.post("/v1/devices/enroll", json=body)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["device_token"])


def test_current_operator_is_the_operator_of_the_token(client: httpx.Client) -> None:
    answer = client.get("/probe/operator", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    assert answer.json() == {"kind": "Operator", "name": "alice", "actor": "operator:alice"}
    refused = client.get("/probe/operator", headers={"Authorization": "Bearer not-an-operator"})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"


def test_current_device_is_the_device_of_the_path_and_token(client: httpx.Client) -> None:
    own, other = _enroll(client, "cam-1"), _enroll(client, "cam-2")
    answer = client.get("/probe/devices/cam-1", headers={"Authorization": f"Bearer {own}"})
    assert answer.json() == {"kind": "AuthenticatedDevice", "device_id": "cam-1"}
    assert client.get("/probe/devices/cam-1", headers={"Authorization": f"Bearer {other}"}).status_code == 403
    assert client.get("/probe/devices/cam-1", headers={"Authorization": "Bearer unknown"}).status_code == 401
    assert client.get("/probe/devices/cam-1").status_code == 401


def test_service_dep_is_the_apps_service(client: httpx.Client) -> None:
    assert client.get("/probe/service").json() == {"kind": "Service", "poll_interval_s": "17"}
