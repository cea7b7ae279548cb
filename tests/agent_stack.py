"""Fixtures for the edge-agent tests: a registered model with good and faulty versions, and a stack of real
processes (MLflow, the rollout service, fault proxies in front of both) that agent subprocesses talk to.

Topology of ``agent_stack``::

    agent --> service proxy --> rollout service --> MLflow proxy --> MLflow (session)
    agent ------------------------------------------> MLflow proxy (file downloads: URLs point at the proxy)
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agents import RunningAgent, start_agent
from faultproxy import FaultProxy
from fleet import Fleet
from servers import start_rollout_service

from exporters.bundle import read_manifest, write_manifest
from exporters.drills import (
    load_variant,
    nan_after,
    replace_variant,
    set_export_torch,
    set_latency_budget,
    set_product_line,
    set_release,
    shifted,
    sign,
    unsign,
)
from exporters.signing import generate_keypair
from yolo_ota.processes import RunningServer

AGENT_MODEL = "agent-line"
NAN_AFTER_CALLS = 24  # validation makes 8 golden + 2 warm-up + 5 timed calls in its own process; serving: 3 warm-up


@dataclass(frozen=True)
class AgentVersions:
    model: str
    public_key: Path
    versions: dict[str, str]  # role -> registered version number

    def __getitem__(self, role: str) -> str:
        return self.versions[role]


def _variant(source: Path, target: Path, budget_ms: float, key: Path | None) -> Path:
    shutil.copytree(source, target)
    set_product_line(target, AGENT_MODEL)  # what it may be registered as
    set_latency_budget(target, budget_ms)  # a distinct manifest per version: the registry refuses duplicates
    if key is not None:
        sign(target, key)
    return target


def _failed_at_export(trained_detector: Path, trained_bundle: Path, target: Path, key: Path) -> Path:
    """The trained detector exported with a latency budget no machine meets (its gates fail, recorded in the
    manifest), then given a budget devices meet: an export machine slower than the line."""
    from exporters.export import ExportRequest, export_bundle

    manifest = read_manifest(trained_bundle)
    result = export_bundle(
        ExportRequest(
            model=str(trained_detector), out_dir=target, imgsz=manifest.imgsz, variants=("cpu-fp32",),
            name=AGENT_MODEL, release=manifest.release, latency_budget_ms=0.001,
        )
    )  # fmt: skip
    assert not result.passed
    set_latency_budget(target, 35_000)
    _few_latency_runs(target)
    sign(target, key)
    return target


def _few_latency_runs(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    thresholds = manifest.thresholds.model_copy(update={"warmup_iters": 2, "timed_iters": 5})
    write_manifest(bundle, manifest.model_copy(update={"thresholds": thresholds}))


@pytest.fixture(scope="session")
def agent_versions(
    trained_detector: Path, trained_bundle: Path, mlflow_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> AgentVersions:
    """Model ``agent-line``: versions made from the trained detector; all passed their gates at export.

    good1, good2, good3: fine. shifted: boxes moved (fails detection parity on the device). slow: a budget no
    device meets. nan: NaN outputs after a few calls (passes validation, fails probation). unsigned, badsig (signed
    by another key), newer_torch (exported with torch 99.0). older: good1 as a release before it (a downgrade for
    a device that runs good1). failed_gates: its latency gate failed at export (an export machine slower than the
    devices), with a budget the devices meet: it runs on a device only on an operator's recorded force.
    """
    from registry.mlflow_gateway import MlflowGateway

    root = tmp_path_factory.mktemp("agent-versions")
    private_key, public_key = generate_keypair(root / "keys")
    other_key, _ = generate_keypair(root / "other-keys")
    built: dict[str, Path] = {}
    # First: the line's releases only grow as versions are registered (an older release after a newer is refused).
    older = _variant(trained_bundle, root / "older", 15_000, None)
    set_release(older, (read_manifest(older).release or 2) - 1)
    sign(older, private_key)
    built["older"] = older
    built["good1"] = _variant(trained_bundle, root / "good1", 10_000, private_key)
    built["good2"] = _variant(trained_bundle, root / "good2", 20_000, private_key)
    built["good3"] = _variant(trained_bundle, root / "good3", 25_000, private_key)
    built["failed_gates"] = _failed_at_export(trained_detector, trained_bundle, root / "failed_gates", private_key)
    shifted_dir = _variant(trained_bundle, root / "shifted", 10_000, None)
    replace_variant(shifted_dir, shifted(load_variant(shifted_dir), 24.0))
    sign(shifted_dir, private_key)
    built["shifted"] = shifted_dir
    built["slow"] = _variant(trained_bundle, root / "slow", 0.001, private_key)
    nan_dir = _variant(trained_bundle, root / "nan", 10_000, None)
    replace_variant(nan_dir, nan_after(load_variant(nan_dir), NAN_AFTER_CALLS))
    _few_latency_runs(nan_dir)
    sign(nan_dir, private_key)
    built["nan"] = nan_dir
    built["unsigned"] = _variant(trained_bundle, root / "unsigned", 30_000, None)
    unsign(built["unsigned"])
    built["badsig"] = _variant(trained_bundle, root / "badsig", 40_000, other_key)
    newer = _variant(trained_bundle, root / "newer_torch", 50_000, None)
    set_export_torch(newer, "99.0")
    sign(newer, private_key)
    built["newer_torch"] = newer
    gateway = MlflowGateway(mlflow_server.url)
    versions = {role: gateway.register_bundle(path, AGENT_MODEL).version.version for role, path in built.items()}
    return AgentVersions(model=AGENT_MODEL, public_key=public_key, versions=versions)


@dataclass
class AgentStack:
    service: RunningServer
    service_proxy: FaultProxy
    mlflow_proxy: FaultProxy
    fleet: Fleet
    versions: AgentVersions

    def roll_out(self, lane: str, role: str, **body: object) -> dict[str, object]:
        """An immediate rollout of ``role``'s version to the devices labelled ``lane=<lane>``."""
        return self.fleet.create_rollout(
            model=self.versions.model,
            version=self.versions[role],
            strategy="immediate",
            selector={"labels": {"lane": lane}},
            supersede=True,
            **body,
        )

    def device(self, device_id: str) -> dict[str, object]:
        return self.fleet.op("GET", f"/v1/devices/{device_id}")

    def events(self, device_id: str) -> list[dict[str, object]]:
        """The device's events as the service stored them, oldest first."""
        return list(reversed(self.device(device_id)["last_events"]))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def agent_stack(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server: RunningServer, agent_versions: AgentVersions
) -> Iterator[AgentStack]:
    mlflow_proxy = FaultProxy(mlflow_server.url).start()
    service = start_rollout_service(
        tmp_path_factory.mktemp("agent-service"),
        mlflow_url=mlflow_proxy.url,
        settings={
            "WATCH_MODELS": AGENT_MODEL,
            "ALIAS_POLL_INTERVAL_S": "3600",
            "POLL_INTERVAL_S": "1",
            "RELEASE_PUBLIC_KEY": str(agent_versions.public_key),  # revocation lists must verify under it
        },
    )
    service_proxy = FaultProxy(service.url).start()
    fleet = Fleet(service.url)
    yield AgentStack(service, service_proxy, mlflow_proxy, fleet, agent_versions)
    fleet.close()
    service_proxy.stop()
    service.stop()
    mlflow_proxy.stop()


@pytest.fixture(scope="session")
def bus_jpg() -> bytes:
    import ultralytics

    return (Path(ultralytics.__file__).parent / "assets" / "bus.jpg").read_bytes()


def lane_agent(stack: AgentStack, tmp_path: Path, lane: str, **kwargs: object) -> RunningAgent:
    """An agent labelled ``lane=<lane>`` that verifies signatures, already serving good1."""
    agent = start_agent(
        tmp_path / lane,
        server_url=stack.service_proxy.url,
        device_id=f"dev-{lane}",
        labels={"lane": lane},
        public_key=stack.versions.public_key,
        **kwargs,  # type: ignore[arg-type]
    )
    stack.roll_out(lane, "good1")
    agent.wait_serving(stack.versions["good1"])
    return agent


def refused(stack: AgentStack, agent: RunningAgent, role: str, fragment: str) -> dict[str, object]:
    """Roll out ``role``; wait until the agent refused it, still serving good1; the service has the reason."""
    version = stack.versions[role]
    stack.roll_out(agent.device_id.removeprefix("dev-"), role)
    status = agent.wait_for(
        f"v{version} refused", lambda s: s["state"] == "idle" and any(f":{version}:" in k for k in s["rejected"])
    )
    assert status["serving"]["version"] == stack.versions["good1"]
    events = stack.fleet.wait_for(
        "the refusal to reach the service",
        lambda: [e for e in stack.events(agent.device_id) if e["version"] == version and not e["ok"]],
    )
    assert any(fragment in str(e["reason"]) for e in events), events
    return status
