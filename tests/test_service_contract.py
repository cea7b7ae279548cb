"""Property-based run of the rollout service's whole OpenAPI schema against the live service (schemathesis).

The service runs under uvicorn with a real MLflow server behind it. Schemathesis's runner (the engine behind
``st run``) sends every operation boundary values (coverage phase) and generated requests, valid and invalid
(fuzzing phase); every answer must be no 5xx and match the schema: a documented status code, the documented content
type, a body valid against the response schema. It runs twice: with the operator token (the device endpoints then
answer 401/403, which must be documented as well), and with an enrolled device's token on the device's own paths.

Generation mixes in known values (the seeded devices and rollout, the registered model and its versions, the
enrollment token), so that part of the requests reach existing objects and the success paths, not only 404s.

Schemathesis's pytest integration needs the schema at collection time, or a lazy fixture (``from_fixture``) whose
4.32 release reads ``Node._nodeid``, which pytest 9.2 no longer has; so the runner is driven here directly.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events
from servers import ENROLLMENT_TOKEN, OPERATOR_TOKEN

from exporters.device_identity import DeviceKey, enrollment_body
from exporters.fingerprint import collect
from yolo_ota.processes import RunningServer

MODEL = "pcb-line"
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance")
EXAMPLES_PER_OPERATION = 30
DEVICE_PATHS = r"^/v1/devices/\{device_id\}/(desired|reports)$"
# The operator run may re-enroll these (schemathesis reuses ids it saw in answers), so the device run enrolls afresh.
SEEDED_DEVICES = ("contract-edge-a", "contract-edge-b")
# No bearer token needed: enrollment is signed by the device's key and carries the enrollment token in its body.
OPEN_OPERATIONS = frozenset({"POST /v1/devices/enroll", "GET /healthz", "GET /metrics"})


@pytest.fixture(scope="module")
def service(module_service: RunningServer) -> RunningServer:
    return module_service


KEYS: dict[str, DeviceKey] = {}  # each seeded device keeps its key: enrolling again is the same device


def enroll(service: RunningServer, device_id: str) -> str:
    """Enroll ``device_id`` with this machine's fingerprint; returns its new token."""
    answer = httpx.post(
        service.url + "/v1/devices/enroll",
        json=enrollment_body(
            KEYS.setdefault(device_id, DeviceKey.generate()),
            device_id,
            fingerprint=collect().model_dump(mode="json"),
            labels={"line": "smt-1"},
            enrollment_token=ENROLLMENT_TOKEN,
        ),
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["device_token"]


@pytest.fixture(scope="module")
def seeded(service: RunningServer, fleet_model: dict[str, str]) -> dict[str, Any]:
    """Two enrolled devices and a canary rollout of the good version."""
    for device_id in SEEDED_DEVICES:
        enroll(service, device_id)
    answer = httpx.post(
        service.url + "/v1/rollouts",
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        # supersede: a production alias that another test left may have started a rollout already
        json={"model": MODEL, "version": fleet_model["good"], "strategy": "canary", "supersede": True},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    return {"rollout_id": answer.json()["id"], "versions": [fleet_model[k] for k in ("good", "better", "failed")]}


def contract_config(token: str, seeded: dict[str, Any], device_ids: list[str]) -> SchemathesisConfig:
    """The run's settings, as ``schemathesis.toml`` would hold them, with ``token`` sent on every request."""
    return SchemathesisConfig.from_dict(
        {
            "headers": {"authorization": f"Bearer {token}"},
            "seed": 0,
            "workers": 1,  # one request at a time: the run changes state, and stays reproducible
            "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True, "database": "none"},
            "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            "output": {"sanitization": {"enabled": False}},  # test tokens only: keep the reproductions runnable
            "dictionaries": {
                "device_ids": {"values": device_ids},
                "rollout_ids": {"values": [seeded["rollout_id"]]},
                "models": {"values": [MODEL]},
                "versions": {"values": seeded["versions"]},
                "enrollment_tokens": {"values": [ENROLLMENT_TOKEN]},
            },
            "parameters": {
                "path.device_id": {"dictionary": "device_ids", "probability": 0.7},
                "path.rollout_id": {"dictionary": "rollout_ids", "probability": 0.5},
                "query.rollout_id": {"dictionary": "rollout_ids", "probability": 0.5},
                "query.model": {"dictionary": "models", "probability": 0.5},
                "query.version": {"dictionary": "versions", "probability": 0.5},
                "body.model": {"dictionary": "models", "probability": 0.7},
                "body.version": {"dictionary": "versions", "probability": 0.7},
                "body.events[*].version": {"dictionary": "versions", "probability": 0.5},
                "body.telemetry.version": {"dictionary": "versions", "probability": 0.5},
                "body.enrollment_token": {"dictionary": "enrollment_tokens", "probability": 0.5},
            },
        }
    )


@dataclass
class ContractRun:
    """What one schemathesis run sent and got back, by operation label (``GET /v1/devices``)."""

    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    skipped: list[str] = field(default_factory=list)
    # one entry per distinct (operation, status, failed checks), with the first request that showed it
    failures: dict[tuple[str, int | None, tuple[str, ...]], str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def report(self, service: RunningServer) -> str:
        found = [*self.failures.values(), *self.errors]
        return f"{len(found)} distinct contract failure(s) (tracebacks in {service.log_path}):\n\n" + "\n\n".join(found)


def run_contract(schema: Any) -> ContractRun:
    """Run the coverage and fuzzing phases over ``schema``; collect each distinct failure with its reproduction."""
    run = ContractRun()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _collect(run, event)
        elif isinstance(event, events.NonFatalError):
            run.errors.append(f"{event.label} ({event.phase}): {event.info.format()}")
        elif isinstance(event, events.FatalError):
            raise event.exception
    return run


def _collect(run: ContractRun, event: events.ScenarioFinished) -> None:
    recorder = event.recorder
    if event.status == Status.SKIP:
        run.skipped.append(f"{recorder.label} ({event.phase}): {event.skip_reason}")
    for interaction in recorder.interactions.values():
        if interaction.response is not None:
            run.statuses[recorder.label][interaction.response.status_code] += 1
    for case_id, checks in recorder.checks.items():
        failed = [check for check in checks if check.status == Status.FAILURE and check.failure_info is not None]
        if not failed:
            continue
        interaction = recorder.interactions.get(case_id)
        answer = interaction.response if interaction else None
        status = answer.status_code if answer else None
        key = (recorder.label, status, tuple(sorted(check.name for check in failed)))
        if key in run.failures:
            continue
        body = answer.content.decode(errors="replace")[:600] if answer else "(no answer)"
        what = "\n".join(
            f"- {check.failure_info.failure.title} [{check.name}] {check.failure_info.failure.message}".rstrip()
            for check in failed
            if check.failure_info is not None
        )
        sample = failed[0].failure_info.code_sample if failed[0].failure_info else ""
        run.failures[key] = (
            f"{recorder.label} ({event.phase} phase)\n{what}\nanswer: {status} {body}\nreproduce: {sample}"
        )


def _assert_kept(run: ContractRun, operations: set[str], service: RunningServer) -> None:
    assert not run.failures and not run.errors, run.report(service)
    assert not run.skipped, run.skipped
    untested = operations - set(run.statuses)
    assert not untested, f"operations that got no request: {sorted(untested)}"


def test_device_endpoints_keep_the_contract_for_a_device(service: RunningServer, seeded: dict[str, Any]):
    """Device A on its own paths: mostly its own id, at times device B's or a generated one (403 both)."""
    own, other = SEEDED_DEVICES
    config = contract_config(enroll(service, own), seeded, device_ids=[own, own, own, other])
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json", config=config).include(
        path_regex=DEVICE_PATHS
    )
    operations = {f"{op.method.upper()} {op.path}" for op in _operations(schema)}
    assert operations == {"GET /v1/devices/{device_id}/desired", "POST /v1/devices/{device_id}/reports"}

    run = run_contract(schema)

    _assert_kept(run, operations, service)
    for label in operations:  # the token really was the device's: some requests got through
        assert any(200 <= status < 300 for status in run.statuses[label]), (label, run.statuses[label])


def test_every_operation_keeps_the_contract_for_an_operator(service: RunningServer, seeded: dict[str, Any]):
    config = contract_config(OPERATOR_TOKEN, seeded, device_ids=list(SEEDED_DEVICES))
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json", config=config)
    operations = {f"{op.method.upper()} {op.path}" for op in _operations(schema)}
    assert {"GET /v1/rollouts/{rollout_id}", "POST /v1/rollouts", "GET /v1/devices/{device_id}/desired"} <= operations

    run = run_contract(schema)

    _assert_kept(run, operations, service)
    for label in operations - OPEN_OPERATIONS:
        statuses = run.statuses[label]
        if label.endswith(("/desired", "/reports")):  # an operator is no device
            assert 401 in statuses and not any(200 <= status < 300 for status in statuses), (label, statuses)
        else:  # the operator token was accepted: some answers are about the request, not about who sent it
            assert set(statuses) - {400, 401, 403, 405, 422}, (label, statuses)


def _operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]
