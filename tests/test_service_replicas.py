"""Several replicas on one database: a wave advances once, however many schedulers look at it at the same time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fleet import Fleet
from servers import start_rollout_service

from exporters.fingerprint import collect
from registry.rollout_service.db import BundleRecord, transaction, utcnow
from registry.rollout_service.schemas import RolloutCreate, WaveSpec
from registry.rollout_service.service import build_service
from registry.rollout_service.settings import ServiceSettings
from yolo_ota.processes import RunningServer

MODEL = "pcb-line"


def test_two_services_on_one_database_do_not_double_advance(
    tmp_path: Path, database_url: str, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> None:
    fast = {"SCHEDULER_INTERVAL_S": "0.05", "ALIAS_POLL_INTERVAL_S": "3600"}
    first = start_rollout_service(
        tmp_path / "a", database_url=database_url, mlflow_url=mlflow_server.url, settings=fast
    )
    second = start_rollout_service(
        tmp_path / "b", database_url=database_url, mlflow_url=mlflow_server.url, settings=fast
    )
    fleets = [Fleet(first.url), Fleet(second.url)]
    try:
        devices = fleets[0].enroll_many(60, "replica")
        waves = [
            {"percent": p, "bake_s": 0.3, "max_failure_rate": 0.5, "min_success_rate": 0.9} for p in (10, 30, 60, 100)
        ]
        rollout_id = fleets[1].create_rollout(
            model=MODEL, version=fleet_model["better"], previous_version=fleet_model["good"], waves=waves
        )["id"]
        turn = 0

        def finished() -> bool:
            nonlocal turn
            turn += 1
            fleet = fleets[turn % 2]  # devices talk to either replica, as behind a load balancer
            fleet.devices = fleets[0].devices
            fleet.follow(devices)
            return fleet.rollout(rollout_id)["state"] == "completed"

        fleets[0].wait_for("the rollout to complete", finished, timeout_s=90)
        actions = [e["action"] for e in fleets[0].audit(rollout_id)]
        assert actions == ["created", "advance", "advance", "advance", "complete"], actions
        waves_reached = [e["reason"] for e in fleets[0].audit(rollout_id) if e["action"] == "advance"]
        assert [r.split(";")[1].strip() for r in waves_reached] == [
            "on to wave 2 (30%)",
            "on to wave 3 (60%)",
            "on to wave 4 (100%)",
        ]
    finally:
        for fleet in fleets:
            fleet.close()
        first.stop()
        second.stop()


def test_concurrent_evaluations_of_one_wave_make_one_transition(tmp_path: Path, database_url: str) -> None:
    """Eight schedulers evaluate the same ready wave at the same instant: exactly one advances it."""
    settings = ServiceSettings(
        database_url=database_url, operator_tokens="t=" + "t" * 16, enrollment_token="e" * 16, data_dir=tmp_path
    )
    service = build_service(settings)
    try:
        sessions = service.rollouts._sessions
        with transaction(sessions) as session:  # the bundle as the service would have cached it from MLflow
            session.add(
                BundleRecord(
                    model=MODEL,
                    version="7",
                    manifest_sha256="0" * 64,
                    gates_passed=True,
                    variants={"cpu-fp32": True},
                    fingerprint=collect().model_dump(mode="json"),
                    resolved_at=utcnow(),
                )
            )
        waves = [WaveSpec(percent=50, bake_s=0), WaveSpec(percent=100, bake_s=0)]
        rollout = service.rollouts.create(RolloutCreate(model=MODEL, version="7", waves=waves), actor="test")
        barrier = threading.Barrier(8)
        made: list[int] = []

        def evaluate() -> None:
            barrier.wait()
            made.append(service.rollouts.evaluate(rollout, now=utcnow()))

        threads = [threading.Thread(target=evaluate) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(made) == [0] * 7 + [1]
        after = service.rollouts.get(rollout.id)
        assert after.current_wave == 1 and after.revision == rollout.revision + 1
        with sessions() as session:
            from registry.rollout_service.db import AuditRecord

            advances = session.query(AuditRecord).filter_by(rollout_id=rollout.id, action="advance").count()
        assert advances == 1
    finally:
        service.engine.dispose()


@pytest.fixture(autouse=True)
def _fresh_alias(mlflow_server: RunningServer) -> None:
    """No production alias, so the services start no rollout of their own."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    try:
        if "production" in (client.get_registered_model(MODEL).aliases or {}):
            client.delete_registered_model_alias(MODEL, "production")
    except Exception:  # the model does not exist yet in this session: nothing to clear
        pass


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_revocation_a_decommission_and_a_new_token_on_one_replica_hold_on_the_other(
    tmp_path: Path, database_url: str, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> None:
    """Revoked on replica A, refused on replica B within the state-check interval (0.1 s here), though B had the
    token and the device cached from requests just before."""
    settings = {"ALIAS_POLL_INTERVAL_S": "3600"}
    first = start_rollout_service(
        tmp_path / "a", database_url=database_url, mlflow_url=mlflow_server.url, settings=settings
    )
    second = start_rollout_service(
        tmp_path / "b", database_url=database_url, mlflow_url=mlflow_server.url, settings=settings
    )
    on_a, on_b = Fleet(first.url), Fleet(second.url)
    try:
        device = on_a.enroll("replica-retired")
        moved = on_a.enroll("replica-moved")
        old_token = moved.token
        assert on_b.poll(moved, conditional=False) == 200  # B caches its token
        moved = on_a.enroll("replica-moved")  # the same device, the same key: a new token, the old one retired
        time.sleep(0.5)  # a few state-check intervals of B
        refused = on_b.http.get("/v1/devices/replica-moved/desired", headers={"Authorization": f"Bearer {old_token}"})
        assert refused.status_code == 401, refused.text
        assert on_b.poll(moved, conditional=False) == 200
        made = on_a.op("POST", "/v1/tokens", json={"name": "replica-ops", "scope": "operate"}, expect=201)["token"]
        ops = {"Authorization": f"Bearer {made}"}
        assert on_b.http.get("/v1/rollouts", headers=ops).status_code == 200  # cached on B now
        assert on_b.poll(device, conditional=False) == 200

        on_a.op("POST", "/v1/tokens/replica-ops/revoke")
        on_a.op("POST", f"/v1/devices/{device.device_id}/decommission")
        time.sleep(0.5)

        assert on_b.http.get("/v1/rollouts", headers=ops).status_code == 401
        polled = on_b.http.get(
            f"/v1/devices/{device.device_id}/desired", headers={"Authorization": f"Bearer {device.token}"}
        )
        assert polled.status_code == 401, polled.text
        report = on_b.http.post(
            f"/v1/devices/{device.device_id}/reports",
            json={"events": []},
            headers={"Authorization": f"Bearer {device.token}"},
        )
        assert report.status_code == 401, report.text
    finally:
        on_a.close()
        on_b.close()
        first.stop()
        second.stop()


def test_every_replica_signs_desired_states_with_the_key_devices_pinned(
    tmp_path: Path, database_url: str, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> None:
    """The first replica makes the service's key and keeps it in the database: a device enrolled through one
    replica verifies what the other answers. With YOLO_OTA_STATE_KEY_FILE, that file's key signs instead."""
    from exporters.desired_statement import DesiredStatement
    from exporters.signed_documents import SignedDocument, open_document, public_key_from_text
    from exporters.signing import generate_keypair

    idle = {"ALIAS_POLL_INTERVAL_S": "3600"}
    replicas = [
        start_rollout_service(tmp_path / n, database_url=database_url, mlflow_url=mlflow_server.url, settings=idle)
        for n in ("a", "b")
    ]
    fleets = [Fleet(r.url) for r in replicas]
    try:
        enrolled = fleets[0].http.post("/v1/devices/enroll", json=_enrollment(fleets[0], "pinned-1"))
        assert enrolled.status_code == 200, enrolled.text
        pinned = public_key_from_text(enrolled.json()["state_key"])
        token = enrolled.json()["device_token"]
        answer = fleets[1].http.get("/v1/devices/pinned-1/desired", headers={"Authorization": f"Bearer {token}"})
        statement = open_document(pinned, SignedDocument.model_validate(answer.json()["statement"]), DesiredStatement)
        assert statement.device_id == "pinned-1"
    finally:
        for fleet in fleets:
            fleet.close()
        for replica in replicas:
            replica.stop()

    private, _ = generate_keypair(tmp_path / "state-key")
    settings = {**idle, "STATE_KEY_FILE": str(private)}
    replica = start_rollout_service(tmp_path / "c", database_url=database_url, mlflow_url=mlflow_server.url,
                                    settings=settings)  # fmt: skip
    fleet = Fleet(replica.url)
    try:
        enrolled = fleet.http.post("/v1/devices/enroll", json=_enrollment(fleet, "pinned-2"))
        from exporters.signed_documents import public_key_text
        from exporters.signing import load_private_key

        assert enrolled.json()["state_key"] == public_key_text(load_private_key(private).public_key())
        assert enrolled.json()["state_key"] != public_key_text(pinned)
    finally:
        fleet.close()
        replica.stop()


def _enrollment(fleet: Fleet, device_id: str) -> dict[str, object]:
    from fleet import device_fingerprint
    from servers import ENROLLMENT_TOKEN

    from exporters.device_identity import DeviceKey, enrollment_body

    key = fleet.keys.setdefault(device_id, DeviceKey.generate())
    return enrollment_body(key, device_id, fingerprint=device_fingerprint(), enrollment_token=ENROLLMENT_TOKEN)
