"""Device identity and operator scopes, tried as an attacker on the factory network would, over loopback, against
the live service: a key per device, enrollment tokens that admit new ids only, an operator's say over keys, and
operator tokens that can do no more than their scope.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servers import ENROLLMENT_TOKEN, OPERATOR_TOKEN

from exporters.device_identity import DeviceKey, enrollment_body
from exporters.fingerprint import collect
from yolo_ota.processes import RunningServer

FINGERPRINT = collect().model_dump(mode="json")


@pytest.fixture(scope="module")
def http(module_service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=module_service.url, timeout=30) as client:
        yield client


def operator(token: str = OPERATOR_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def enroll(http: httpx.Client, key: DeviceKey, device_id: str, token: str | None = ENROLLMENT_TOKEN, **kw: Any):
    body = enrollment_body(key, device_id, fingerprint=FINGERPRINT, labels=kw.pop("labels", {"line": "id"}),
                           enrollment_token=token, **kw)  # fmt: skip
    return http.post("/v1/devices/enroll", json=body), body


def works(http: httpx.Client, device_id: str, token: str) -> bool:
    """Whether ``token`` opens both of the device's routes."""
    auth = {"Authorization": f"Bearer {token}"}
    desired = http.get(f"/v1/devices/{device_id}/desired", headers=auth)
    report = http.post(f"/v1/devices/{device_id}/reports", headers=auth, json={"events": []})
    assert desired.status_code == report.status_code, (desired.text, report.text)
    return desired.status_code == 200


def accepted(http: httpx.Client, key: DeviceKey, device_id: str) -> str:
    answer, _ = enroll(http, key, device_id)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["device_token"])


def test_enrolling_a_known_id_with_another_key_is_no_takeover(http: httpx.Client):
    real, attacker = DeviceKey.generate(), DeviceKey.generate()
    token = accepted(http, real, "id-victim")

    # the fleet-wide enrollment token, a changed label: the attacker gets no token, only a request that waits
    answer, _ = enroll(http, attacker, "id-victim", labels={"line": "attacker"})
    assert answer.status_code == 202, answer.text
    assert answer.json()["device_token"] is None and answer.json()["status"] == "pending"
    assert works(http, "id-victim", token)  # the real device goes on being served
    shown = http.get("/v1/devices/id-victim", headers=operator()).json()
    assert shown["status"] == "accepted" and shown["public_key"] == real.public_key
    assert shown["labels"] == {"line": "id"} and shown["key_change_requested_at"]
    waiting = http.get("/v1/devices", params={"waiting": True}, headers=operator()).json()
    assert "id-victim" in [d["device_id"] for d in waiting["devices"]]

    # asking again changes nothing; the operator rejects the request; the real device is still served
    assert enroll(http, attacker, "id-victim")[0].status_code == 202
    assert http.post("/v1/devices/id-victim/reject", headers=operator()).status_code == 200
    assert works(http, "id-victim", token)
    assert http.get("/v1/devices/id-victim", headers=operator()).json()["key_change_requested_at"] is None
    actions = [e["action"] for e in http.get("/v1/audit", headers=operator()).json()["entries"]]
    assert "key_change_pending" in actions and "device_rejected" in actions


def test_an_accepted_key_change_replaces_the_old_key_and_token(http: httpx.Client):
    old, new = DeviceKey.generate(), DeviceKey.generate()
    token = accepted(http, old, "id-replaced")
    assert enroll(http, new, "id-replaced")[0].status_code == 202
    assert http.post("/v1/devices/id-replaced/accept", headers=operator()).status_code == 200
    assert not works(http, "id-replaced", token)  # the old holder is out at once
    assert enroll(http, old, "id-replaced")[0].status_code == 202  # ... and its key is now "another key"
    assert works(http, "id-replaced", accepted(http, new, "id-replaced"))


def test_a_key_change_signed_by_the_old_key_needs_no_operator(http: httpx.Client):
    old, new, forger = DeviceKey.generate(), DeviceKey.generate(), DeviceKey.generate()
    token = accepted(http, old, "id-rotated")
    forged, _ = enroll(http, new, "id-rotated", previous_key=forger)  # signed, but not by the device's key
    assert forged.status_code == 401, forged.text
    assert works(http, "id-rotated", token)
    answer, _ = enroll(http, new, "id-rotated", previous_key=old)
    assert answer.status_code == 200, answer.text
    assert not works(http, "id-rotated", token)
    assert works(http, "id-rotated", answer.json()["device_token"])


def test_a_captured_enrollment_cannot_be_sent_again(http: httpx.Client):
    key = DeviceKey.generate()
    answer, captured = enroll(http, key, "id-replayed")
    assert answer.status_code == 200, answer.text
    token = answer.json()["device_token"]
    replay = http.post("/v1/devices/enroll", json=captured)
    assert replay.status_code == 401 and "replay" in replay.json()["detail"], replay.text
    assert works(http, "id-replayed", token)  # the replay rotated nothing


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda body, key: {**body, "signed_at": body["signed_at"] - 3600}, id="signed an hour ago"),
        pytest.param(lambda body, key: {**body, "public_key": key.public_key}, id="proof by another key"),
        pytest.param(lambda body, key: {**body, "device_id": "id-elsewhere"}, id="proof for another id"),
        pytest.param(lambda body, key: {**body, "proof": body["proof"][:-4] + "AAA="}, id="proof altered"),
    ],
)
def test_an_enrollment_without_a_good_proof_is_refused(http: httpx.Client, spoil: Any):
    body = enrollment_body(DeviceKey.generate(), "id-proof", fingerprint=FINGERPRINT, enrollment_token=ENROLLMENT_TOKEN)
    answer = http.post("/v1/devices/enroll", json=spoil(body, DeviceKey.generate()))
    assert answer.status_code == 401, answer.text
    assert "device_token" not in answer.json()


def test_enrollment_tokens_admit_new_ids_by_name_pattern_and_expiry(http: httpx.Client):
    made = http.post("/v1/enrollment-tokens", headers=operator(), json={"name": "line7", "auto_accept": "line7-*"})
    assert made.status_code == 201, made.text
    line7 = made.json()["token"]
    assert works(
        http, "line7-cam", str(enroll(http, DeviceKey.generate(), "line7-cam", line7)[0].json()["device_token"])
    )

    # an id outside the pattern waits as pending, offered nothing, until an operator accepts it
    key = DeviceKey.generate()
    answer, _ = enroll(http, key, "line9-cam", line7)
    assert answer.status_code == 202 and answer.json()["status"] == "pending", answer.text
    assert http.get("/v1/devices/line9-cam", headers=operator()).json()["status"] == "pending"
    assert enroll(http, key, "line9-cam", None)[0].status_code == 202
    assert http.post("/v1/devices/line9-cam/accept", headers=operator()).status_code == 200
    assert works(http, "line9-cam", accepted(http, key, "line9-cam"))

    # revoked and expired tokens admit nobody; tokens are never listed, only their names
    assert http.post("/v1/enrollment-tokens/line7/revoke", headers=operator()).status_code == 200
    assert enroll(http, DeviceKey.generate(), "line7-cam2", line7)[0].status_code == 401
    short = http.post("/v1/enrollment-tokens", headers=operator(), json={"name": "brief", "expires_in_s": 0.5})
    time.sleep(1.0)
    refused, _ = enroll(http, DeviceKey.generate(), "brief-cam", short.json()["token"])
    assert refused.status_code == 401 and "expired" in refused.json()["detail"], refused.text
    listed = http.get("/v1/enrollment-tokens", headers=operator())
    assert {"line7", "brief"} <= {t["name"] for t in listed.json()["tokens"]}
    assert line7 not in listed.text


def test_a_decommissioned_device_is_refused_and_cannot_come_back(http: httpx.Client):
    key = DeviceKey.generate()
    token = accepted(http, key, "id-retired")
    assert http.post("/v1/devices/id-retired/decommission", headers=operator()).status_code == 200
    assert not works(http, "id-retired", token)
    again, _ = enroll(http, key, "id-retired")
    assert again.status_code == 403, again.text
    assert enroll(http, DeviceKey.generate(), "id-retired")[0].status_code == 403


def test_operator_tokens_do_what_their_scope_allows_and_stop_when_revoked(http: httpx.Client):
    def make(name: str, scope: str) -> str:
        made = http.post("/v1/tokens", headers=operator(), json={"name": name, "scope": scope})
        assert made.status_code == 201, made.text
        return str(made.json()["token"])

    reader, runner = make("scope-reader", "read"), make("scope-runner", "operate")
    rollout = {"model": "pcb-line", "version": "999999", "strategy": "canary"}
    assert http.get("/v1/rollouts", headers=operator(reader)).status_code == 200
    assert http.post("/v1/rollouts", headers=operator(reader), json=rollout).status_code == 403
    past_scope = http.post("/v1/rollouts", headers=operator(runner), json=rollout)  # refused for the version only
    assert past_scope.status_code not in (401, 403) and "999999" in past_scope.json()["detail"], past_scope.text
    for token in (reader, runner):
        escalate = http.post("/v1/tokens", headers=operator(token), json={"name": "mine", "scope": "admin"})
        assert escalate.status_code == 403, escalate.text
        assert http.post("/v1/devices/id-victim/decommission", headers=operator(token)).status_code == 403
    assert http.post("/v1/tokens/scope-reader/revoke", headers=operator()).status_code == 200
    refused = http.get("/v1/rollouts", headers=operator(reader))
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    listed = http.get("/v1/tokens", headers=operator()).json()["tokens"]
    assert {t["name"]: t["active"] for t in listed}["scope-reader"] is False
    assert reader not in str(listed)


def test_a_device_enrolled_before_keys_adopts_its_key_only_with_its_current_token(tmp_path) -> None:
    from registry.rollout_service.db import Device, transaction, utcnow
    from registry.rollout_service.devices import token_digest
    from registry.rollout_service.schemas import DeviceEnroll
    from registry.rollout_service.service import build_service
    from registry.rollout_service.settings import ServiceSettings

    service = build_service(ServiceSettings(data_dir=tmp_path, operator_tokens="ops=" + "o" * 20))
    try:
        with transaction(service.devices._sessions) as session:  # as an older release left it: a token, no key
            now = utcnow()
            session.add(
                Device(
                    id="id-legacy",
                    labels={},
                    fingerprint=FINGERPRINT,
                    token_sha256=token_digest("t" * 32),
                    enrolled_at=now,
                    last_seen_at=now,
                )
            )

        def body(key: DeviceKey) -> DeviceEnroll:
            return DeviceEnroll.model_validate(enrollment_body(key, "id-legacy", fingerprint=FINGERPRINT))

        attacker, real = DeviceKey.generate(), DeviceKey.generate()
        assert service.identity.enroll(body(attacker)).status.value == "pending"
        assert service.identity.enroll(body(attacker), bearer_token="a-guessed-token").status.value == "pending"
        adopted = service.identity.enroll(body(real), bearer_token="t" * 32)
        assert adopted.status.value == "accepted" and adopted.token
        assert service.devices.detail("id-legacy").public_key == real.public_key
    finally:
        service.engine.dispose()
