"""Promotions that wait for a person, and webhooks that cannot be replayed, against the live service and a real
MLflow server: with approval required, whoever can move an alias in MLflow can only ask for a rollout.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
from fleet import Fleet
from servers import OPERATOR_TOKEN, WEBHOOK_SECRET, mlflow_client

from yolo_ota.processes import RunningServer

MODEL = "pcb-line"


def _offered(fleet: Fleet, devices: list) -> set[str | None]:
    return {fleet.desired_version(d) for d in devices}


def test_an_alias_move_waits_for_approval_and_a_rejection_offers_nothing(
    approval_fleet: Fleet, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> None:
    fleet = approval_fleet
    client = mlflow_client(mlflow_server)
    devices = fleet.enroll_many(4, "approval")
    running = fleet.create_rollout(model=MODEL, version=fleet_model["good"], strategy="immediate")
    fleet.follow(devices)
    fleet.wait_state(running["id"], "completed")
    assert _offered(fleet, devices) == {fleet_model["good"]}

    client.set_registered_model_alias(MODEL, "production", fleet_model["better"])
    waiting = fleet.wait_for(
        "the promotion's rollout",
        lambda: [r for r in fleet.op("GET", "/v1/rollouts")["rollouts"] if r["id"] != running["id"]],
    )[0]
    assert (waiting["version"], waiting["state"]) == (fleet_model["better"], "waiting_for_approval")
    time.sleep(1.0)  # several scheduler passes and state checks: still nothing new for any device
    assert _offered(fleet, devices) == {fleet_model["good"]}
    reader = fleet.op("POST", "/v1/tokens", json={"name": "approval-reader", "scope": "read"}, expect=201)["token"]
    refused = fleet.http.post(
        f"/v1/rollouts/{waiting['id']}/approve", headers={"Authorization": f"Bearer {reader}"}, json={}
    )
    assert refused.status_code == 403, refused.text

    approved = fleet.op("POST", f"/v1/rollouts/{waiting['id']}/approve", json={"reason": "checked the gates"})
    assert approved["state"] == "running"
    fleet.wait_for("the canary's first wave", lambda: fleet_model["better"] in _offered(fleet, devices))
    assert [e["action"] for e in fleet.audit(waiting["id"])][:2] == ["created", "approve"]

    # Moving the alias back to an older release asks for a downgrade, which no promotion can order.
    client.set_registered_model_alias(MODEL, "production", fleet_model["good"])
    back = fleet.wait_for(
        "the refused promotion",
        lambda: [p for p in fleet.op("GET", "/v1/promotions")["promotions"] if p["version"] == fleet_model["good"]],
    )[0]
    assert back["outcome"] == "refused" and "downgrade" in back["reason"], back

    client.set_registered_model_alias(MODEL, "production", fleet_model["newest"])
    second = fleet.wait_for(
        "the next promotion",
        lambda: [r for r in fleet.op("GET", "/v1/rollouts")["rollouts"] if r["state"] == "waiting_for_approval"],
    )[0]
    before = _offered(fleet, devices)
    assert fleet.op("POST", f"/v1/rollouts/{second['id']}/reject", json={"reason": "not today"})["state"] == "rejected"
    time.sleep(1.0)
    assert _offered(fleet, devices) == before
    assert fleet.rollout(waiting["id"])["state"] == "running"
    again = fleet.http.post(
        f"/v1/rollouts/{second['id']}/approve", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, json={}
    )
    assert again.status_code == 409, again.text  # a rejected promotion stays rejected


def _signed(payload: dict, delivery: str, when: int) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    signed = f"{delivery}.{when}.".encode() + body
    signature = base64.b64encode(hmac.new(WEBHOOK_SECRET.encode(), signed, hashlib.sha256).digest()).decode()
    headers = {
        "X-MLflow-Signature": f"v1,{signature}",
        "X-MLflow-Timestamp": str(when),
        "X-MLflow-Delivery-Id": delivery,
        "Content-Type": "application/json",
    }
    return body, headers


def test_a_captured_webhook_is_refused_when_sent_again(module_service: RunningServer) -> None:
    # A correctly signed alias event for a model this service does not watch: accepted, and changes nothing.
    payload = {
        "entity": "model_version_alias",
        "action": "created",
        "data": {"name": "not-watched", "alias": "production", "version": "1"},
    }
    body, headers = _signed(payload, "delivery-replayed", int(time.time()))
    first = httpx.post(module_service.url + "/v1/hooks/mlflow", content=body, headers=headers, timeout=30)
    assert first.status_code == 200 and first.json()["outcome"].startswith("ignored"), first.text

    replay = httpx.post(module_service.url + "/v1/hooks/mlflow", content=body, headers=headers, timeout=30)
    assert replay.status_code == 401 and "replay" in replay.json()["detail"], replay.text

    fresh_body, fresh_headers = _signed(payload, "delivery-fresh", int(time.time()))
    fresh = httpx.post(module_service.url + "/v1/hooks/mlflow", content=fresh_body, headers=fresh_headers, timeout=30)
    assert fresh.status_code == 200, fresh.text
    metrics = httpx.get(module_service.url + "/metrics", timeout=30).text
    assert 'yolo_ota_webhooks_total{result="replayed"} 1.0' in metrics
