"""MLflow's "Promote model" button as a promotion: a version copied into `<line>-prod` becomes a rollout of its
source version, with the same gate check and the same de-duplication as an alias move. Driven through MLflow's
REST API, as the UI's dialog is (it creates a version of the target whose source is `models:/<line>/<version>`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fleet import Fleet
from servers import mlflow_client, start_rollout_service, start_webhook_service

from yolo_ota.processes import RunningServer

MODEL, TARGET = "pcb-line", "pcb-line-prod"


@pytest.fixture
def fleet(tmp_path: Path, mlflow_server: RunningServer, fleet_model: dict[str, str]) -> Iterator[Fleet]:
    """A service polling MLflow every second; the target model exists (created once, as the docs say) and is
    deleted after, so that no other test's service sees its copies."""
    client = mlflow_client(mlflow_server)
    if "production" in (client.get_registered_model(MODEL).aliases or {}):
        client.delete_registered_model_alias(MODEL, "production")
    client.create_registered_model(TARGET)
    server = start_rollout_service(tmp_path / "svc", mlflow_url=mlflow_server.url)
    sim = Fleet(server.url)
    try:
        yield sim
    finally:
        sim.close()
        server.stop()
        client.delete_registered_model(TARGET)


def _copy(mlflow_server: RunningServer, source_model: str, version: str) -> str:
    """What the Promote-model dialog does: a new version of the target, its source the promoted version."""
    source = httpx.get(
        f"{mlflow_server.url}/api/2.0/mlflow/model-versions/get", params={"name": source_model, "version": version}
    ).json()["model_version"]
    answer = httpx.post(
        f"{mlflow_server.url}/api/2.0/mlflow/model-versions/create",
        json={"name": TARGET, "source": f"models:/{source_model}/{version}", "run_id": source["run_id"]},
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["model_version"]["version"])


def test_a_version_copied_into_the_prod_model_becomes_a_rollout_of_its_source(
    fleet: Fleet, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> None:
    copied = _copy(mlflow_server, MODEL, fleet_model["better"])
    rollout = fleet.wait_for("the rollout from the copy", lambda: fleet.op("GET", "/v1/rollouts")["rollouts"])[0]
    assert (rollout["model"], rollout["version"], rollout["strategy"]) == (MODEL, fleet_model["better"], "canary")
    assert f"promoted into {TARGET} (as its version {copied})" in rollout["reason"]
    promotions = fleet.op("GET", "/v1/promotions")["promotions"]
    assert [(p["alias"], p["version"], p["outcome"]) for p in promotions] == [
        (f"copy:{TARGET}", fleet_model["better"], "rollout")
    ]

    # A copy of a version whose gates failed is refused, and starts nothing.
    _copy(mlflow_server, MODEL, fleet_model["failed"])
    refused = fleet.wait_for(
        "the refusal",
        lambda: [p for p in fleet.op("GET", "/v1/promotions")["promotions"] if p["outcome"] == "refused"],
    )[0]
    assert refused["version"] == fleet_model["failed"] and "gates" in refused["reason"]
    assert [r["id"] for r in fleet.op("GET", "/v1/rollouts")["rollouts"]] == [rollout["id"]]


def test_the_copy_reaches_the_service_by_mlflows_webhook(
    tmp_path: Path, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> None:
    """With polling all but off, only MLflow's signed ``model_version.created`` webhook can tell the service."""
    client = mlflow_client(mlflow_server)
    client.create_registered_model(TARGET)
    server = start_webhook_service(tmp_path / "hook", mlflow_server.url)
    fleet = Fleet(server.url)
    try:
        _copy(mlflow_server, MODEL, fleet_model["good"])
        rollout = fleet.wait_for("a rollout from the webhook", lambda: fleet.op("GET", "/v1/rollouts")["rollouts"])[0]
        assert rollout["version"] == fleet_model["good"] and "seen by webhook" in rollout["reason"]
    finally:
        fleet.close()
        server.stop()
        client.delete_registered_model(TARGET)
