"""Two operators (or a promotion and an operator) starting a rollout for the same device set at the same moment
leave exactly one of them active, on SQLite and on PostgreSQL, with two replicas of the service on one database.

Each burst fires several ``POST /v1/rollouts`` with ``supersede: true`` (and, in the approval test,
``POST /v1/rollouts/{id}/approve`` of rollouts waiting for approval) from threads released together by a barrier,
half of them to each replica. After every burst: one active rollout for the device set, every other rollout of
the burst ended as superseded (with its audit record) or answered ``409``, and no answer a 5xx.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from servers import OPERATOR_TOKEN, TOKENS, start_rollout_service

from exporters.fingerprint import collect
from registry.rollout_service import db as store
from registry.rollout_service.db import BundleRecord, make_engine, migrate, transaction, utcnow
from registry.rollout_service.schemas import ACTIVE_STATES, RolloutCreate, RolloutState, Selector
from registry.rollout_service.service import Service, build_service
from registry.rollout_service.settings import ServiceSettings
from yolo_ota.processes import RunningServer

MODEL = "race-line"
VERSIONS = ("1", "2", "3")
SELECTOR = {"labels": {"line": "race"}}
BURSTS = 8
WRITERS = 6  # concurrent requests per burst
ACTIVE = {state.value for state in ACTIVE_STATES}
HEADERS = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


@dataclass
class Replicas:
    servers: list[RunningServer]
    service: Service  # the same database, in this process: makes rollouts that wait for approval

    def rollouts(self) -> list[dict[str, Any]]:
        answer = httpx.get(
            self.servers[0].url + "/v1/rollouts", params={"model": MODEL, "limit": 1000}, headers=HEADERS, timeout=30
        )
        assert answer.status_code == 200, answer.text
        return list(answer.json()["rollouts"])

    def superseded(self) -> set[int]:
        answer = httpx.get(self.servers[0].url + "/v1/audit", params={"limit": 10_000}, headers=HEADERS, timeout=30)
        assert answer.status_code == 200, answer.text
        return {e["rollout_id"] for e in answer.json()["entries"] if e["action"] == "superseded"}


@pytest.fixture
def replicas(tmp_path: Path, database_url: str) -> Iterator[Replicas]:
    """Two services on one database (schedulers idle: only the requests change rollouts), the versions known."""
    settings = ServiceSettings(
        database_url=database_url, data_dir=tmp_path / "here", **{k.lower(): v for k, v in TOKENS.settings().items()}
    )
    service = build_service(settings)  # migrates; the bundles as the service would have cached them from MLflow
    with transaction(service.rollouts._sessions) as session:
        for version in VERSIONS:
            session.add(
                BundleRecord(
                    model=MODEL, version=version, manifest_sha256=version * 64, gates_passed=True,
                    variants={"cpu-fp32": True}, fingerprint=collect().model_dump(mode="json"), resolved_at=utcnow(),
                )
            )  # fmt: skip
    idle = {"SCHEDULER_INTERVAL_S": "3600", "ALIAS_POLL_INTERVAL_S": "3600"}
    servers = [start_rollout_service(tmp_path / name, database_url=database_url, settings=idle) for name in ("a", "b")]
    try:
        yield Replicas(servers, service)
    finally:
        for server in servers:
            server.stop()
        service.engine.dispose()


def _burst(replicas: Replicas, requests: list[tuple[str, dict[str, Any] | None]]) -> list[httpx.Response]:
    """Send ``requests`` (path, JSON body) at once, alternating replicas; every answer, in order."""
    barrier = threading.Barrier(len(requests))

    def send(index: int) -> httpx.Response:
        path, body = requests[index]
        with httpx.Client(base_url=replicas.servers[index % 2].url, headers=HEADERS, timeout=60) as client:
            client.get("/healthz")  # connected before the barrier: the requests leave together
            barrier.wait()
            return client.post(path, json=body)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, range(len(requests))))


def _check_one_active(replicas: Replicas, answers: list[httpx.Response], started: Callable[[], set[int]]) -> None:
    """No 5xx; only 201/200 or 409; exactly one active rollout of the device set; every other one the burst
    started ended as superseded."""
    assert all(a.status_code in (200, 201, 409) for a in answers), [(a.status_code, a.text) for a in answers]
    active = [r for r in replicas.rollouts() if r["state"] in ACTIVE]  # all of one device set
    assert len(active) == 1, f"{len(active)} active rollouts for one device set: {[r['id'] for r in active]}"
    superseded = replicas.superseded()
    ended = started() - {active[0]["id"]}
    assert ended <= superseded, f"rollouts that ended without being superseded: {sorted(ended - superseded)}"


def _create_body(version: str) -> dict[str, Any]:
    return {"model": MODEL, "version": version, "strategy": "immediate", "selector": SELECTOR, "supersede": True}


def test_concurrent_superseding_creates_leave_one_active_rollout(replicas: Replicas) -> None:
    for burst in range(BURSTS):
        bodies = [_create_body(VERSIONS[(burst + i) % len(VERSIONS)]) for i in range(WRITERS)]
        answers = _burst(replicas, [("/v1/rollouts", body) for body in bodies])
        created = {a.json()["id"] for a in answers if a.status_code == 201}
        assert created, [(a.status_code, a.text) for a in answers]
        _check_one_active(replicas, answers, lambda created=created: created)


def test_concurrent_approvals_and_a_create_leave_one_active_rollout(replicas: Replicas) -> None:
    """Rollouts waiting for approval (as a promotion in MLflow makes them) approved at once, while an operator
    also creates one for the same devices."""
    for burst in range(BURSTS):
        waiting = [
            replicas.service.rollouts.create(
                RolloutCreate(model=MODEL, version=VERSIONS[i % len(VERSIONS)], selector=Selector(**SELECTOR)),
                actor="test-promotion",
                waiting=True,
            ).id
            for i in range(WRITERS - 1)
        ]
        requests: list[tuple[str, dict[str, Any] | None]] = [(f"/v1/rollouts/{i}/approve", None) for i in waiting]
        requests.insert(burst % WRITERS, ("/v1/rollouts", _create_body(VERSIONS[burst % len(VERSIONS)])))
        answers = _burst(replicas, requests)
        started = {a.json()["id"] for a in answers if a.status_code in (200, 201)}
        assert started, [(a.status_code, a.text) for a in answers]
        _check_one_active(replicas, answers, lambda started=started: started)


def test_the_index_covers_exactly_the_active_states(tmp_path: Path, database_url: str) -> None:
    """The database's rule names the states the code calls active: a new active state must be added to both."""
    engine = make_engine(database_url)
    try:
        migrate(engine)
        indexes = {i["name"]: i for i in sa.inspect(engine).get_indexes("rollouts")}
        index = indexes["ux_rollouts_one_active"]
        where = str(index.get("dialect_options", {}).get(f"{engine.dialect.name}_where", ""))
        assert index["unique"] and index["column_names"] == ["model", "selector_key"]
        named = {state.value for state in RolloutState if f"'{state.value}'" in where}
        assert named == ACTIVE, where
    finally:
        engine.dispose()


def test_a_database_that_already_holds_two_active_rollouts_keeps_the_newest(database_url: str) -> None:
    """Migration 0005 on a database the race already hit: the older rollout is superseded, with its audit record."""
    from alembic import command
    from alembic.config import Config

    engine = make_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(Path(store.__file__).with_name("migrations")))
    rollouts = sa.table(
        "rollouts", *(sa.column(name) for name in ("model", "version", "strategy", "state", "selector",
                                                   "selector_key", "waves", "current_wave", "revision",
                                                   "created_by", "reason", "created_at", "updated_at")),
    )  # fmt: skip
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0004")
            now = utcnow()
            for state, key in (("running", "a"), ("paused", "a"), ("running", "b"), ("completed", "a")):
                connection.execute(
                    sa.insert(rollouts).values(
                        model=MODEL, version="1", strategy="canary", state=state, selector="{}",
                        selector_key=key * 64, waves="[]", current_wave=0, revision=0, created_by="test", reason="",
                        created_at=now, updated_at=now,
                    )
                )  # fmt: skip
        migrate(engine)
        with engine.connect() as connection:
            states = connection.execute(sa.text("SELECT id, state FROM rollouts ORDER BY id")).all()
            audited = connection.execute(sa.text("SELECT rollout_id, reason FROM audit_log")).all()
        assert [tuple(row) for row in states] == [(1, "aborted"), (2, "paused"), (3, "running"), (4, "completed")]
        assert [(row[0], row[1].split(":")[0]) for row in audited] == [(1, "superseded by rollout 2")]
    finally:
        engine.dispose()
