"""A real agent process with a bundle in every format: it validates each variant it can run, serves the fastest
that passed and says why the others were not chosen; an AOTInductor package for another torch is refused before
it is downloaded; a chosen variant that no longer loads falls back to TorchScript."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_stack import AgentStack
from agents import RunningAgent, start_agent

from exporters.bundle import read_manifest
from exporters.drills import (
    load_variant,
    replace_variant,
    set_latency_budget,
    set_product_line,
    set_variant_compatibility,
    sign,
    slowed,
)
from exporters.formats import all_variants
from exporters.signing import generate_keypair
from yolo_ota.processes import RunningServer

MODEL = "agent-formats"  # a product line of these tests' own: no other test registers versions of it
OTHER_FORMATS = {"cpu-fp32-aoti", "cpu-fp32-onnx"}
SLOWDOWN = 3  # the TorchScript file does its work this many times (same outputs): another format is the fastest


@dataclass(frozen=True)
class FormatVersions:
    public_key: Path
    versions: dict[str, str]  # role -> registered version


@pytest.fixture(scope="module")
def format_versions(
    formats_bundle: Path, mlflow_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> FormatVersions:
    """``pcb-parts`` versions of the formats bundle, signed. formats: its TorchScript file made slower. other_torch:
    the same with its AOTInductor package said to be compiled for torch 2.0.0."""
    from registry.mlflow_gateway import MlflowGateway

    root = tmp_path_factory.mktemp("format-versions")
    private_key, public_key = generate_keypair(root / "keys")
    built: dict[str, Path] = {}
    for role in ("formats", "other_torch"):
        target = root / role
        shutil.copytree(formats_bundle, target)
        set_product_line(target, MODEL)
        set_latency_budget(target, 60_000 if role == "formats" else 61_000)  # distinct manifests
        replace_variant(target, slowed(load_variant(target), SLOWDOWN))
        if role == "other_torch":
            set_variant_compatibility(target, "cpu-fp32-aoti", torch="2.0.0")
        sign(target, private_key)
        built[role] = target
    gateway = MlflowGateway(mlflow_server.url)
    versions = {role: gateway.register_bundle(path, MODEL).version.version for role, path in built.items()}
    return FormatVersions(public_key, versions)


def _agent(stack: AgentStack, keys: FormatVersions, tmp_path: Path, lane: str, role: str) -> RunningAgent:
    """A new agent labelled ``lane=<lane>``, and an immediate rollout of ``role`` to it; serving it once it runs."""
    agent = start_agent(tmp_path / lane, server_url=stack.service_proxy.url, device_id=f"dev-{lane}",
                        labels={"lane": lane}, public_key=keys.public_key)  # fmt: skip
    stack.fleet.create_rollout(model=MODEL, version=keys.versions[role], strategy="immediate",
                               selector={"labels": {"lane": lane}}, supersede=True)  # fmt: skip
    agent.wait_serving(keys.versions[role], timeout_s=240)
    return agent


def test_the_device_serves_the_fastest_passing_variant_says_why_and_falls_back_when_it_no_longer_loads(
    agent_stack: AgentStack, format_versions: FormatVersions, tmp_path: Path, bus_jpg: bytes
) -> None:
    agent = _agent(agent_stack, format_versions, tmp_path, "formats", "formats")
    version = format_versions.versions["formats"]
    status = agent.status()
    chosen = status["serving"]["variant"]
    assert chosen in OTHER_FORMATS, status  # its TorchScript file does three times the work
    choice = status["variant_choice"]
    assert choice["chosen"] == chosen and choice["why"].startswith("fastest that passed: p50 ")
    assert set(choice["not_chosen"]) == {"cpu-fp32"} | (OTHER_FORMATS - {chosen})
    for name, reason in choice["not_chosen"].items():
        assert reason.startswith("slower: p50 "), (name, reason)
    answer = agent.detect(bus_jpg)
    assert answer.status_code == 200 and answer.json()["variant"] == chosen
    events = agent_stack.fleet.wait_for(
        "the choice to reach the service",
        lambda: [e for e in agent_stack.events(agent.device_id) if f"serving {chosen} (fastest" in str(e["reason"])],
    )
    assert "slower: p50" in str(events[-1]["reason"])

    # The installed file of the chosen variant no longer loads (say, the device's torch changed under it): at the
    # next start the agent serves the same version's TorchScript variant and says so.
    agent.stop()
    installed = agent.data_dir / "versions" / MODEL / version
    spec = all_variants(installed, read_manifest(installed))[chosen]
    (installed / spec.path).write_bytes(b"not a model any more")
    agent = agent.restart()
    status = agent.wait_for("serving again", lambda s: s["serving"] is not None, timeout_s=90)
    assert (status["serving"]["version"], status["serving"]["variant"]) == (version, "cpu-fp32")
    assert agent.detect(bus_jpg).status_code == 200
    fallbacks = agent_stack.fleet.wait_for(
        "the fallback to reach the service",
        lambda: [
            e for e in agent_stack.events(agent.device_id)
            if str(e["reason"]).startswith(f"fallback: {chosen} failed to load, serving cpu-fp32")
        ],
    )  # fmt: skip
    assert fallbacks
    agent.stop()


def test_an_aoti_package_for_another_torch_is_refused_before_it_is_downloaded(
    agent_stack: AgentStack, format_versions: FormatVersions, tmp_path: Path
) -> None:
    proxy = agent_stack.mlflow_proxy
    packages, onnx_files = len(proxy.requests_to("/model.pt2")), len(proxy.requests_to("/model.onnx"))
    agent = _agent(agent_stack, format_versions, tmp_path, "othertorch", "other_torch")
    status = agent.status()
    refused = status["variant_choice"]["not_chosen"]["cpu-fp32-aoti"]
    assert refused.startswith("incompatible: cpu-fp32-aoti was compiled for torch 2.0.0"), refused
    assert status["serving"]["variant"] != "cpu-fp32-aoti"
    # Every download goes through the MLflow proxy: the package was never asked for, the ONNX file was.
    assert len(proxy.requests_to("/model.pt2")) == packages
    assert len(proxy.requests_to("/model.onnx")) > onnx_files
    agent.stop()
