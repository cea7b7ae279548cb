"""The rollout service under uvicorn with a real MLflow server, on SQLite and on PostgreSQL.

Devices are simulated over the real REST API (tests/fleet.py); waves are short (bake 0.5-1 s) and the scheduler
runs every 0.25 s, so a whole canary takes seconds.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from fleet import Fleet
from servers import start_rollout_service, start_webhook_service

from registry.rollout_service.db import Device, make_engine
from yolo_ota.processes import RunningServer

MODEL = "pcb-line"
FAST_WAVES = [
    {"percent": 25, "bake_s": 0.5, "max_failure_rate": 0.3, "min_success_rate": 0.8},
    {"percent": 60, "bake_s": 0.5, "max_failure_rate": 0.3, "min_success_rate": 0.8},
    {"percent": 100, "bake_s": 0, "max_failure_rate": 0.3, "min_success_rate": 0.8},
]


def _mlflow(mlflow_server: RunningServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


@pytest.fixture
def no_alias(mlflow_server: RunningServer, fleet_model: dict[str, str]) -> dict[str, str]:
    """The model without a production alias, so a new service starts no rollout of its own."""
    client = _mlflow(mlflow_server)
    if "production" in (client.get_registered_model(MODEL).aliases or {}):
        client.delete_registered_model_alias(MODEL, "production")
    return fleet_model


@pytest.fixture
def service(
    tmp_path: Path, database_url: str, mlflow_server: RunningServer, no_alias: dict[str, str]
) -> Iterator[RunningServer]:
    """A rollout service that learns of promotions by polling MLflow every second (no webhook)."""
    server = start_rollout_service(tmp_path / "svc", database_url=database_url, mlflow_url=mlflow_server.url)
    yield server
    server.stop()


@pytest.fixture
def fleet(service: RunningServer) -> Iterator[Fleet]:
    client = Fleet(service.url)
    yield client
    client.close()


def _actions(fleet: Fleet, rollout_id: int) -> list[str]:
    return [entry["action"] for entry in fleet.audit(rollout_id)]


def test_canary_waves_advance_on_success_and_complete(fleet: Fleet, no_alias: dict[str, str]) -> None:
    good, better = no_alias["good"], no_alias["better"]
    devices = fleet.enroll_many(40, "cam", {"line": "3"})
    created = fleet.create_rollout(
        model=MODEL,
        version=better,
        previous_version=good,
        strategy="canary",
        waves=FAST_WAVES,
        selector={"labels": {"line": "3"}},
        reason="new lighting",
    )
    rollout_id = created["id"]
    assert created["state"] == "running" and created["targeted"] == 40 and created["skipped_incompatible"] == 0

    # Wave 1 sends the new version to about a quarter of the devices; the rest are told to stay on the old one.
    first = Counter(fleet.follow(devices).values())
    assert set(first) == {good, better}
    assert 4 <= first[better] <= 18, first

    shares = [first[better]]
    for wave in (1, 2):
        fleet.wait_for(f"wave {wave + 1}", lambda w=wave: fleet.rollout(rollout_id)["current_wave"] == w)
        time.sleep(0.3)  # the scheduler's thread drops the desired-state cache just after its commit
        shares.append(Counter(fleet.follow(devices).values())[better])
    assert shares[0] < shares[1] < shares[2] == 40, shares

    done = fleet.wait_state(rollout_id, "completed")
    assert [w["state"] for w in done["wave_progress"]] == ["passed", "passed", "passed"]
    assert done["wave_progress"][-1]["succeeded"] == 40
    assert _actions(fleet, rollout_id) == ["created", "advance", "advance", "complete"]
    assert {e["actor"] for e in fleet.audit(rollout_id)} == {"operator:tester", "scheduler"}

    # A device's detail shows what it runs, its events and whether it could run another version.
    detail = fleet.op("GET", f"/v1/devices/{devices[0].device_id}", params={"model": MODEL, "version": good})
    assert detail["current_version"] == better and detail["desired_version"] == better
    assert detail["last_events"][0]["state"] == "committed" and detail["last_events"][0]["rollout_id"] == rollout_id
    assert detail["compatibility"] == {
        "model": MODEL,
        "version": good,
        "compatible": True,
        "variant": "cpu-fp32",
        "reason": None,
    }
    assert detail["last_seen_at"] is not None


def test_failures_halt_the_wave_and_rollback_returns_devices(fleet: Fleet, no_alias: dict[str, str]) -> None:
    good, better = no_alias["good"], no_alias["better"]
    devices = fleet.enroll_many(30, "halt")
    rollout_id = fleet.create_rollout(model=MODEL, version=better, previous_version=good, waves=FAST_WAVES)["id"]
    first = fleet.follow(devices, fail=frozenset(d.device_id for d in devices))  # every updated device fails
    assert better in first.values()

    halted = fleet.wait_state(rollout_id, "halted")
    wave = halted["wave_progress"][0]
    assert wave["state"] == "halted" and wave["failed"] == wave["devices"] > 0
    halt = [e for e in fleet.audit(rollout_id) if e["action"] == "halt"]
    assert len(halt) == 1 and halt[0]["actor"] == "scheduler" and "failed" in halt[0]["reason"]
    # Halted means no further wave, whatever happens now.
    assert fleet.rollout(rollout_id)["current_wave"] == 0

    back = fleet.op("POST", f"/v1/rollouts/{rollout_id}/rollback", json={"reason": "parity failures on line 3"})
    assert back["state"] == "rolled_back"
    assert set(fleet.follow(devices).values()) == {good}
    entry = fleet.audit(rollout_id)[-1]
    assert (entry["action"], entry["actor"], entry["version"], entry["reason"]) == (
        "rollback",
        "operator:tester",
        good,
        "parity failures on line 3",
    )
    fleet.op("POST", f"/v1/rollouts/{rollout_id}/resume", expect=409)


def test_pause_resume_and_abort_do_what_they_say(fleet: Fleet, no_alias: dict[str, str]) -> None:
    good, better = no_alias["good"], no_alias["better"]
    devices = fleet.enroll_many(20, "ctl")
    waves = [{**FAST_WAVES[0], "percent": 30}, {**FAST_WAVES[2]}]
    rollout_id = fleet.create_rollout(model=MODEL, version=better, previous_version=good, waves=waves)["id"]
    assert fleet.op("POST", f"/v1/rollouts/{rollout_id}/pause", json={"reason": "shift change"})["state"] == "paused"
    before = fleet.follow(devices)  # successes while paused must not advance the wave
    fleet.wait_for("a few scheduler passes", lambda: len(fleet.audit(rollout_id)) >= 2)
    assert fleet.rollout(rollout_id)["current_wave"] == 0

    assert fleet.op("POST", f"/v1/rollouts/{rollout_id}/abort", json={"reason": "wrong model"})["state"] == "aborted"
    # Aborted: no device is moved any more; those already on the new version keep it, the rest stay.
    assert fleet.follow(devices) == before
    assert fleet.rollout(rollout_id)["current_wave"] == 0
    assert _actions(fleet, rollout_id) == ["created", "pause", "abort"]
    fleet.op("POST", f"/v1/rollouts/{rollout_id}/resume", expect=409)
    fleet.op("POST", f"/v1/rollouts/{rollout_id}/pause", expect=409)

    # A paused rollout resumes from where it stood.
    second = fleet.create_rollout(model=MODEL, version=better, previous_version=good, waves=waves)["id"]
    fleet.op("POST", f"/v1/rollouts/{second}/pause")
    assert fleet.op("POST", f"/v1/rollouts/{second}/resume")["state"] == "running"
    fleet.wait_for("completion", lambda: fleet.follow(devices) and fleet.rollout(second)["state"] == "completed")


def test_ab_split_is_sticky_and_close_to_the_ratio(
    tmp_path: Path, database_url: str, mlflow_server: RunningServer, no_alias: dict[str, str]
) -> None:
    good, better = no_alias["good"], no_alias["better"]
    server = start_rollout_service(tmp_path / "ab", database_url=database_url, mlflow_url=mlflow_server.url)
    fleet = Fleet(server.url)
    try:
        devices = fleet.enroll_many(400, "ab")
        rollout_id = fleet.create_rollout(
            model=MODEL, version=better, strategy="ab", ab={"control_version": good, "split": 0.3}
        )["id"]
        arms = {d.device_id: fleet.desired_version(d) for d in devices}
        treated = sum(v == better for v in arms.values()) / len(arms)
        assert abs(treated - 0.3) < 0.07, treated  # 400 draws: 3.1 standard deviations is 0.07
        assert set(arms.values()) == {good, better}

        for device in devices[:40]:
            version = arms[device.device_id]
            fleet.commit(device, version)
            fleet.report(
                device,
                version=version,
                inferences=100,
                errors=1 if version == better else 0,
                latency_ms={"p50": 10.0, "p99": 20.0},
                detections_per_image=3.0,
                mean_confidence=0.8,
            )
        detail = fleet.rollout(rollout_id)
        by_arm = {arm["arm"]: arm for arm in detail["arms"]}
        expected_treated = sum(arms[d.device_id] == better for d in devices[:40])
        assert by_arm["treatment"]["version"] == better and by_arm["control"]["version"] == good
        assert by_arm["treatment"]["inferences"] == 100 * expected_treated
        assert by_arm["treatment"]["errors"] == expected_treated
        assert by_arm["control"]["errors"] == 0 and by_arm["control"]["reports"] == 40 - expected_treated
        assert by_arm["treatment"]["latency_p50_ms"] == 10.0 and by_arm["treatment"]["mean_confidence"] == 0.8
        assert by_arm["treatment"]["devices"] + by_arm["control"]["devices"] == 400

        server.stop()  # the same assignment after a restart
        server = start_rollout_service(tmp_path / "ab", database_url=database_url, mlflow_url=mlflow_server.url)
        fleet.close()
        fleet = Fleet(server.url)
        fleet.devices = {}
        again = {d.device_id: fleet.desired_version(d) for d in devices}
        assert again == arms
    finally:
        fleet.close()
        server.stop()


def test_small_fleets_get_exact_wave_and_arm_sizes(fleet: Fleet, no_alias: dict[str, str]) -> None:
    """A 25 % wave of four devices is one device, and a 50/50 split two and two, for every rollout id; a device
    that enrolls later does not move those already placed."""
    good, better = no_alias["good"], no_alias["better"]
    devices = fleet.enroll_many(4, "small", {"line": "small"})
    waves = [
        {"percent": 25, "bake_s": 3600, "max_failure_rate": 0, "min_success_rate": 1},
        {"percent": 100, "bake_s": 0, "max_failure_rate": 0, "min_success_rate": 1},
    ]
    selector = {"labels": {"line": "small"}}
    # By the plain hash, one of four devices lands in a 25 % wave with probability 0.42: six in a row is 0.006.
    for _ in range(6):
        fleet.create_rollout(
            model=MODEL,
            version=better,
            previous_version=good,
            strategy="canary",
            waves=waves,
            selector=selector,
            supersede=True,
        )
        assert Counter(fleet.follow(devices).values()) == {better: 1, good: 3}
    for _ in range(6):
        rollout_id = fleet.create_rollout(
            model=MODEL,
            version=better,
            strategy="ab",
            ab={"control_version": good, "split": 0.5},
            selector=selector,
            supersede=True,
        )["id"]
        arms = fleet.follow(devices)
        assert Counter(arms.values()) == {better: 2, good: 2}

    late = fleet.enroll("small-late", {"line": "small"})
    assert fleet.follow(devices) == arms
    assert fleet.desired_version(late) in {good, better}
    by_arm = {arm["arm"]: arm["devices"] for arm in fleet.rollout(rollout_id)["arms"]}
    assert by_arm["treatment"] + by_arm["control"] == 5 and min(by_arm.values()) >= 2


def _stored_last_seen(database_url: str, device_id: str) -> datetime:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            found = connection.execute(sa.select(Device.last_seen_at).where(Device.id == device_id)).scalar_one()
    finally:
        engine.dispose()
    return found


def test_unchanged_desired_state_answers_304(fleet: Fleet, no_alias: dict[str, str], database_url: str) -> None:
    good, better = no_alias["good"], no_alias["better"]
    device = fleet.enroll("etag-1")
    enrolled = _stored_last_seen(database_url, "etag-1")
    assert fleet.poll(device) == 200 and device.desired["version"] is None
    assert fleet.poll(device) == 304
    # Polls are heartbeats, written to the database in batches (every 0.5 s here).
    fleet.wait_for("the heartbeat in the database", lambda: _stored_last_seen(database_url, "etag-1") > enrolled)
    fleet.create_rollout(model=MODEL, version=good, strategy="immediate")
    fleet.wait_for("the new state", lambda: fleet.poll(device) == 200)
    assert device.desired["version"] == good and device.desired["variant"] == "cpu-fp32"
    paths = {f["path"] for f in device.desired["files"]}
    assert paths == {"variants/cpu-fp32/model.torchscript", "golden.npz"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in device.desired["files"])
    assert device.desired["manifest_url"].startswith(fleet_url_of_mlflow(device.desired))
    assert fleet.poll(device) == 304
    assert fleet.poll(device) == 304
    metrics = fleet.http.get("/metrics").text
    assert 'yolo_ota_desired_polls_total{status="304"} 3.0' in metrics
    # A different rollout changes the ETag again.
    fleet.create_rollout(model=MODEL, version=better, strategy="immediate", supersede=True)
    fleet.wait_for("the newer state", lambda: fleet.poll(device) == 200)
    assert device.desired["version"] == better


def fleet_url_of_mlflow(desired: dict[str, object]) -> str:
    return str(desired["manifest_url"]).split("/api/2.0/mlflow-artifacts/")[0]


def test_incompatible_devices_are_skipped_and_counted(fleet: Fleet, no_alias: dict[str, str]) -> None:
    old_torch = fleet.enroll("old-torch", {"line": "9"}, torch="1.13.1")
    fine = fleet.enroll("fine", {"line": "9"})
    fleet.enroll("elsewhere", {"line": "8"})
    rollout = fleet.create_rollout(
        model=MODEL, version=no_alias["good"], strategy="immediate", selector={"labels": {"line": "9"}}
    )
    assert rollout["targeted"] == 2 and rollout["skipped_incompatible"] == 1
    (reason,) = rollout["incompatible_reasons"]
    assert "newer than this device's torch 1.13.1" in reason
    assert fleet.desired_version(old_torch) is None
    assert fleet.desired_version(fine) == no_alias["good"]
    check = fleet.op("GET", "/v1/devices/old-torch", params={"model": MODEL, "version": no_alias["good"]})
    assert check["compatibility"]["compatible"] is False and "torch" in check["compatibility"]["reason"]


def test_one_active_rollout_per_model_and_device_set(fleet: Fleet, no_alias: dict[str, str]) -> None:
    good, better = no_alias["good"], no_alias["better"]
    first = fleet.create_rollout(model=MODEL, version=good, waves=FAST_WAVES, selector={"labels": {"line": "1"}})
    refused = fleet.op(
        "POST",
        "/v1/rollouts",
        json={"model": MODEL, "version": better, "selector": {"labels": {"line": "1"}}},
        expect=409,
    )
    assert f"rollout {first['id']}" in refused["detail"] and "supersede" in refused["detail"]
    # Another device set is another rollout; superseding ends the older one cleanly.
    fleet.create_rollout(model=MODEL, version=better, selector={"labels": {"line": "2"}})
    second = fleet.create_rollout(model=MODEL, version=better, selector={"labels": {"line": "1"}}, supersede=True)
    assert fleet.rollout(first["id"])["state"] == "aborted"
    assert fleet.audit(first["id"])[-1]["reason"] == f"superseded by rollout {second['id']}"
    failed = fleet.op("POST", "/v1/rollouts", json={"model": MODEL, "version": no_alias["failed"]}, expect=422)
    assert "gates" in failed["detail"]
    missing = fleet.op("POST", "/v1/rollouts", json={"model": MODEL, "version": "999"}, expect=422)
    assert "999" in missing["detail"]
    assert fleet.op("GET", "/v1/rollouts/424242", expect=404)["detail"] == "no rollout 424242"
    bad = fleet.op(
        "POST",
        "/v1/rollouts",
        json={"model": MODEL, "version": good, "waves": [{"percent": 50}, {"percent": 20}]},
        expect=422,
    )
    assert "increase" in bad["detail"]


def test_promotion_in_mlflow_starts_a_canary_and_a_failed_version_is_refused(
    fleet: Fleet, mlflow_server: RunningServer, no_alias: dict[str, str]
) -> None:
    client = _mlflow(mlflow_server)
    devices = fleet.enroll_many(5, "promo")
    client.set_registered_model_alias(MODEL, "production", no_alias["good"])
    first = fleet.wait_for("a rollout from the alias", lambda: fleet.op("GET", "/v1/rollouts")["rollouts"])[0]
    assert (first["model"], first["version"], first["strategy"], first["state"]) == (
        MODEL,
        no_alias["good"],
        "canary",
        "running",
    )
    assert first["created_by"] == "mlflow-alias" and "alias production moved" in first["reason"]
    assert len(first["waves"]) == 3  # the configured default waves
    tag = fleet.wait_for(
        "the version's tag", lambda: client.get_model_version(MODEL, no_alias["good"]).tags.get("ota.rollout")
    )
    assert tag.startswith(f"rollout {first['id']} (canary) started")
    fleet.follow(devices)

    client.set_registered_model_alias(MODEL, "production", no_alias["failed"])
    promotion = fleet.wait_for(
        "the refusal", lambda: [p for p in fleet.op("GET", "/v1/promotions")["promotions"] if p["outcome"] == "refused"]
    )[0]
    assert promotion["version"] == no_alias["failed"] and "gates" in promotion["reason"]
    refusal = [e for e in fleet.audit() if e["action"] == "promotion_refused"]
    assert len(refusal) == 1 and refusal[0]["version"] == no_alias["failed"]
    tag = fleet.wait_for(
        "the refusal tag", lambda: client.get_model_version(MODEL, no_alias["failed"]).tags.get("ota.rollout")
    )
    assert tag.startswith("refused") and "gates" in tag
    assert [r["id"] for r in fleet.op("GET", "/v1/rollouts")["rollouts"]] == [first["id"]]

    # The next good promotion supersedes the first rollout and rolls back to what production was.
    client.set_registered_model_alias(MODEL, "production", no_alias["better"])
    newest = fleet.wait_for(
        "the second rollout", lambda: [r for r in fleet.op("GET", "/v1/rollouts")["rollouts"] if r["id"] != first["id"]]
    )[0]
    assert newest["version"] == no_alias["better"] and newest["previous_version"] == no_alias["good"]
    assert fleet.rollout(first["id"])["state"] == "aborted"


def test_webhook_from_mlflow_starts_the_rollout(
    tmp_path: Path, database_url: str, mlflow_server: RunningServer, no_alias: dict[str, str]
) -> None:
    """With polling all but off, only MLflow's signed webhook can tell the service about the promotion."""
    server = start_webhook_service(tmp_path / "hook", mlflow_server.url, database_url=database_url)
    fleet = Fleet(server.url)
    try:
        _mlflow(mlflow_server).set_registered_model_alias(MODEL, "production", no_alias["better"])
        rollout = fleet.wait_for("a rollout from the webhook", lambda: fleet.op("GET", "/v1/rollouts")["rollouts"])[0]
        assert rollout["version"] == no_alias["better"] and "seen by webhook" in rollout["reason"]
        # A forged delivery is refused.
        forged = fleet.http.post(
            "/v1/hooks/mlflow",
            json={"entity": "model_version_alias", "action": "created"},
            headers={"X-MLflow-Signature": "v1,AAAA", "X-MLflow-Timestamp": "1", "X-MLflow-Delivery-Id": "x"},
        )
        assert forged.status_code == 401
        # Counted once the delivery's handling (rollout, then the version's tag in MLflow) is over.
        fleet.wait_for(
            "the accepted delivery in the metrics",
            lambda: 'yolo_ota_webhooks_total{result="accepted"} 1.0' in fleet.http.get("/metrics").text,
        )
    finally:
        fleet.close()
        server.stop()


def test_ab_test_halts_when_the_treatment_arm_fails(fleet: Fleet, no_alias: dict[str, str]) -> None:
    good, better = no_alias["good"], no_alias["better"]
    devices = fleet.enroll_many(20, "abfail")
    rollout_id = fleet.create_rollout(
        model=MODEL,
        version=better,
        strategy="ab",
        ab={"control_version": good, "split": 0.5},
        waves=[{"percent": 100, "max_failure_rate": 0.25}],
    )["id"]
    treated = [d for d in devices if fleet.desired_version(d) == better]
    assert 3 <= len(treated) <= 17
    fleet.follow(devices, fail=frozenset(d.device_id for d in treated))  # control commits, treatment fails
    halted = fleet.wait_state(rollout_id, "halted")
    arms = {arm["arm"]: arm for arm in halted["arms"]}
    assert arms["treatment"]["failed"] == len(treated) and arms["control"]["failed"] == 0
    assert arms["control"]["succeeded"] == 20 - len(treated)
    assert "treatment arm" in fleet.audit(rollout_id)[-1]["reason"]
