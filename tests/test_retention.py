"""Rows that grow with every report and every request (device events, telemetry windows, audit records, the replay
guard's statements) are pruned once older than their setting, in batches, on SQLite and PostgreSQL; what is recent,
what an active rollout still needs and what still guards against a replay stays.

Old rows are written straight into the database with old timestamps: weeks cannot pass in a test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from servers import ENROLLMENT_TOKEN, OPERATOR_TOKEN, start_rollout_service
from sqlalchemy.orm import Session, sessionmaker

from exporters.device_identity import DeviceKey, enrollment_body
from exporters.fingerprint import collect
from registry.rollout_service.db import (
    AuditRecord,
    Device,
    DeviceEvent,
    Rollout,
    SeenStatement,
    Telemetry,
    make_engine,
    migrate,
    session_factory,
    transaction,
    utcnow,
)
from registry.rollout_service.retention import REPLAY_MARGIN_S, Pruned, Retention
from registry.rollout_service.settings import ServiceSettings

DAY = timedelta(days=1)
DEVICE = "edge-retained"


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    migrate(engine)
    yield session_factory(engine)
    engine.dispose()


def settings(tmp_path: Path, **values: Any) -> ServiceSettings:
    return ServiceSettings(data_dir=tmp_path, dev_mode=True, **values)


def _device(session: Session, now: datetime) -> None:
    session.add(
        Device(
            id=DEVICE, labels={}, fingerprint=collect().model_dump(mode="json"), token_sha256="0" * 64,
            enrolled_at=now, status="accepted",
        )
    )  # fmt: skip


def _rollout(session: Session, state: str, now: datetime) -> int:
    row = Rollout(
        model="m", version="2", strategy="canary", state=state, selector={}, selector_key=state.ljust(64, "0"),
        waves=[], created_by="test", reason="", created_at=now, updated_at=now,
    )  # fmt: skip
    session.add(row)
    session.flush()
    return row.id


def _events(session: Session, count: int, received_at: datetime) -> None:
    session.add_all(
        DeviceEvent(device_id=DEVICE, state="idle", ok=True, reason="", at=received_at, received_at=received_at)
        for _ in range(count)
    )


def _telemetry(session: Session, count: int, at: datetime, rollout_id: int | None = None) -> None:
    session.add_all(
        Telemetry(
            rollout_id=rollout_id, arm="treatment" if rollout_id else None, device_id=DEVICE, model="m", version="2",
            inferences=10, errors=0, latency_p50_ms=1.0, latency_p99_ms=2.0, detections_per_image=1.0,
            mean_confidence=0.5, at=at,
        )
        for _ in range(count)
    )  # fmt: skip


def _audit(session: Session, count: int, at: datetime) -> None:
    session.add_all(AuditRecord(at=at, actor="test", action="seeded", reason="") for _ in range(count))


def _statements(session: Session, count: int, expires_at: datetime, tag: str) -> None:
    session.add_all(
        SeenStatement(kind="enroll", digest=f"{tag}{i}".ljust(64, "0"), expires_at=expires_at) for i in range(count)
    )


def _counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as session:
        return {
            table.__tablename__: session.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (DeviceEvent, Telemetry, AuditRecord, SeenStatement)
        }


def test_old_rows_go_in_batches_and_what_is_recent_or_needed_stays(tmp_path: Path, sessions: sessionmaker[Session]):
    now = utcnow()
    with transaction(sessions) as session:
        _device(session, now)
        _events(session, 25, now - 10 * DAY)
        _events(session, 5, now - 1 * DAY)
        active, ended = _rollout(session, "running", now), _rollout(session, "completed", now)
        _telemetry(session, 20, now - 10 * DAY)
        _telemetry(session, 5, now - 10 * DAY, rollout_id=ended)
        _telemetry(session, 5, now - 10 * DAY, rollout_id=active)  # its analysis still reads them
        _telemetry(session, 5, now - 1 * DAY)
        _audit(session, 18, now - 40 * DAY)
        _audit(session, 4, now - 20 * DAY)
        _statements(session, 9, now - timedelta(seconds=REPLAY_MARGIN_S + 60), "gone")  # no replica accepts these
        _statements(session, 3, now - timedelta(seconds=60), "margin")  # expired, but a replica's clock may lag
        _statements(session, 3, now + timedelta(seconds=300), "live")

    forever = Retention(
        sessions,
        settings(tmp_path, device_event_retention_days=0, telemetry_retention_days=0, audit_retention_days=0),
    )
    assert [p.kind for p in forever.prune(now=now)] == ["replay-guard statements"]  # 0: the other kinds stay
    assert _counts(sessions) == {"device_events": 30, "telemetry": 35, "audit_log": 22, "seen_statements": 6}

    retention = Retention(
        sessions,
        settings(
            tmp_path, device_event_retention_days=7, telemetry_retention_days=7, audit_retention_days=30,
            retention_batch_rows=7,
        ),
    )  # fmt: skip
    _statements_again(sessions, now)
    pruned = retention.prune(now=now)

    assert pruned == [
        Pruned("device events", 25, 4),  # 7 + 7 + 7 + 4
        Pruned("telemetry windows", 25, 4),
        Pruned("audit records", 18, 3),
        Pruned("replay-guard statements", 9, 2),
    ]
    assert _counts(sessions) == {"device_events": 5, "telemetry": 10, "audit_log": 4, "seen_statements": 6}
    with sessions() as session:
        kept = session.execute(sa.select(Telemetry.rollout_id).where(Telemetry.at < now - 7 * DAY)).scalars().all()
    assert kept == [active] * 5
    assert all(p.rows == 0 for p in retention.prune(now=now))  # nothing left to do


def _statements_again(sessions: sessionmaker[Session], now: datetime) -> None:
    """The statements the first pass pruned, back for the second."""
    with transaction(sessions) as session:
        _statements(session, 9, now - timedelta(seconds=REPLAY_MARGIN_S + 60), "gone")


def test_replicas_pruning_at_the_same_moment_delete_each_row_once(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    with transaction(sessions) as session:
        _device(session, now)
        _events(session, 1500, now - 10 * DAY)
        _events(session, 20, now)
    engines = [make_engine(database_url) for _ in range(3)]
    replicas = [
        Retention(session_factory(engine), settings(tmp_path, device_event_retention_days=7, retention_batch_rows=40))
        for engine in engines
    ]
    barrier = threading.Barrier(len(replicas))
    results: list[Pruned] = []
    failures: list[BaseException] = []

    def prune(retention: Retention) -> None:
        barrier.wait()
        try:
            results.extend(p for p in retention.prune(now=now) if p.kind == "device events")
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=prune, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for engine in engines:
        engine.dispose()

    assert failures == []
    assert sum(p.rows for p in results) == 1500, results
    assert all(p.batches >= 1 for p in results) and max(p.batches for p in results) > 1
    assert _counts(sessions)["device_events"] == 20


@pytest.fixture
def pruning_service(tmp_path: Path, database_url: str) -> Iterator[tuple[str, Path]]:
    """The real service pruning every 0.3 s, 5 rows per DELETE, keeping events, telemetry and audit for a day."""
    server = start_rollout_service(
        tmp_path / "svc",
        database_url=database_url,
        settings={
            "RETENTION_INTERVAL_S": "0.3", "RETENTION_BATCH_ROWS": "5", "DEVICE_EVENT_RETENTION_DAYS": "1",
            "TELEMETRY_RETENTION_DAYS": "1", "AUDIT_RETENTION_DAYS": "1", "ALIAS_POLL_INTERVAL_S": "3600",
        },
    )  # fmt: skip
    yield server.url, server.log_path
    server.stop()


def test_the_service_prunes_in_its_background_and_a_replay_is_still_refused(
    pruning_service: tuple[str, Path], database_url: str
) -> None:
    url, log_path = pruning_service
    key = DeviceKey.generate()
    captured = enrollment_body(
        key, DEVICE, fingerprint=collect().model_dump(mode="json"), enrollment_token=ENROLLMENT_TOKEN
    )
    http = httpx.Client(base_url=url, timeout=30)
    engine = make_engine(database_url)
    sessions = session_factory(engine)
    try:
        enrolled = http.post("/v1/devices/enroll", json=captured)
        assert enrolled.status_code == 200, enrolled.text
        token = enrolled.json()["device_token"]
        reported = http.post(
            f"/v1/devices/{DEVICE}/reports",
            json={"events": [{"state": "idle", "reason": "recent"}]},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert reported.status_code == 200, reported.text
        old = utcnow() - 3 * DAY
        with transaction(sessions) as session:
            _events(session, 12, old)
            _telemetry(session, 12, old)
            _audit(session, 12, old)

        def pruned() -> bool:
            with sessions() as session:
                return all(
                    session.execute(sa.select(sa.func.count()).select_from(t).where(column < utcnow() - DAY)).scalar()
                    == 0
                    for t, column in ((DeviceEvent, DeviceEvent.received_at), (Telemetry, Telemetry.at),
                                      (AuditRecord, AuditRecord.at))
                )  # fmt: skip

        _wait(pruned, "the service to prune the old rows", timeout_s=30)
        log = log_path.read_text()
        assert "12 device events (3 batches)" in log and "12 audit records (3 batches)" in log, log[-2000:]
        events = http.get(f"/v1/devices/{DEVICE}", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        assert [e["reason"] for e in events.json()["last_events"]] == ["recent"]
        time.sleep(1.0)  # several more passes

        replayed = http.post("/v1/devices/enroll", json=captured)
        assert replayed.status_code == 401 and "used before" in replayed.text, replayed.text
        fresh = enrollment_body(
            key, DEVICE, fingerprint=collect().model_dump(mode="json"), enrollment_token=ENROLLMENT_TOKEN
        )
        assert http.post("/v1/devices/enroll", json=fresh).status_code == 200
    finally:
        http.close()
        engine.dispose()


def _wait(check: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)
