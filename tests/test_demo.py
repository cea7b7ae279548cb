"""``yolo-ota demo`` end to end: the real command, its real processes, every claim checked from the outside.

While the demo runs, the test reads the rollout service's REST API twice a second and keeps each device's
sequence of versions; when the demo has printed its summary (``--keep-running`` holds the stack up), it checks the
demo's own ``summary.json``, the rollouts, the device events and MLflow's registry, then stops the demo with
SIGINT, as Ctrl-C would, and checks that no process and no temporary folder is left. The demo finds its detectors
in the fixture cache (``tests/conftest.py`` points ``XDG_CACHE_HOME`` there; whichever comes first trains them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import VIRTUAL_TIME_MS, chromium, load, needs_chromium

pytestmark = pytest.mark.slow  # the whole demo, with its detectors already trained

DEMO_TIMEOUT_S = 900
MODEL = "pcb-inspection"


def _demo_command() -> list[str]:
    exe = Path(sys.executable).parent / "yolo-ota"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "yolo_ota.cli"]


class DemoRun:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        self.out_path = tmp_path / "demo.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_OTA_")}
        env.update({"TMPDIR": str(self.tmp), "COLUMNS": "160"})
        with self.out_path.open("wb") as out:
            self.process = subprocess.Popen(
                [*_demo_command(), "demo", "--keep-running"], stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        self.info: dict[str, Any] = {}
        self.timelines: dict[str, list[str | None]] = {}

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def data_dir(self) -> Path | None:
        found = re.search(r"Starting the stack in (\S+)", self.output)
        return Path(found.group(1)) if found else None

    def follow(self) -> None:
        """Record every device's versions until the demo prints its summary; fail if it exits first."""
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        client: httpx.Client | None = None
        while "claims held" not in self.output:
            assert self.process.poll() is None, f"the demo exited with {self.process.returncode}:\n{self.output}"
            assert time.monotonic() < deadline, f"the demo did not finish in {DEMO_TIMEOUT_S} s:\n{self.output}"
            data_dir = self.data_dir()
            if client is None and data_dir is not None and (data_dir / "stack.json").is_file():
                self.info = json.loads((data_dir / "stack.json").read_text())
                client = httpx.Client(
                    base_url=self.info["service_url"],
                    headers={"Authorization": f"Bearer {self.info['operator_token']}"},
                    timeout=10,
                )
            if client is not None:
                self._record(client)
            time.sleep(0.5)
        if client is not None:
            client.close()

    def _record(self, client: httpx.Client) -> None:
        try:
            devices = client.get("/v1/devices").json()["devices"]
        except httpx.TransportError:
            return  # the demo is stopping its stack (it failed): the next turn of follow() reports its output
        for device in devices:
            timeline = self.timelines.setdefault(device["device_id"], [])
            if not timeline or timeline[-1] != device["current_version"]:
                timeline.append(device["current_version"])

    def stop(self, *, twice: bool = False) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            if twice:  # as when ``uv run`` passes a terminal's Ctrl-C on: the second lands while the stack stops
                time.sleep(0.5)
                os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    run = DemoRun(tmp_path_factory.mktemp("demo"))
    try:
        run.follow()
        yield run
    finally:
        run.stop()


def _operator(demo: DemoRun) -> httpx.Client:
    return httpx.Client(
        base_url=demo.info["service_url"],
        headers={"Authorization": f"Bearer {demo.info['operator_token']}"},
        timeout=10,
    )


def _summary(demo: DemoRun) -> dict[str, Any]:
    data_dir = demo.data_dir()
    assert data_dir is not None
    return dict(json.loads((data_dir / "summary.json").read_text()))


def test_the_demo_holds_every_claim_it_prints(demo: DemoRun) -> None:
    summary = _summary(demo)
    claims = summary["claims"]
    assert f"{len(claims)} of {len(claims)} claims held" in demo.output, demo.output
    assert all(c["held"] for c in claims) and len(claims) >= 13, claims
    assert "✗" not in demo.output
    for url in ("MLflow UI:", "Rollout service docs:", "Fleet dashboard:"):
        assert url in demo.output


def test_v2s_canary_passed_the_fleet_analysis_and_v2_won_the_ab_test(demo: DemoRun) -> None:
    summary = _summary(demo)
    canary, ab = summary["v2_canary"], summary["ab"]
    assert canary["state"] == "completed" and canary["verdict"] == "pass", canary
    assert {"latency_p99", "error_rate", "class_rate:solder_bridge"} <= {m["name"] for m in canary["metrics"]}
    assert canary["waves"] == [1, 4]
    # The winner is the service's: computed from both arms' telemetry, with the metrics it won on.
    assert ab["winner"] == "treatment" and ab["winner_version"] == summary["versions"]["v2"], ab
    assert ab["state"] == "completed"
    assert any(better == "treatment" for better in ab["better"].values()), ab["better"]
    assert not any(better == "control" for better in ab["better"].values()), ab["better"]


def test_v3_is_refused_by_shadow_validation_naming_the_class(demo: DemoRun) -> None:
    summary = _summary(demo)
    v3 = summary["v3"]
    assert v3["caught_by"] == "shadow validation" and "solder_bridge" in v3["failed_classes"], v3
    assert v3["state"] in ("halted", "rolled_back")
    assert len(v3["received_by"]) == 1 and len(v3["served_by"]) <= 1, v3
    with _operator(demo) as api:
        (landed,) = v3["received_by"]
        events = api.get(f"/v1/devices/{landed}").json()["last_events"]
    shadow = [e for e in events if e["version"] == summary["versions"]["v3"] and e["state"] == "shadow"]
    assert shadow and not shadow[0]["ok"] and "solder_bridge" in shadow[0]["reason"], shadow


def test_v4_is_halted_by_the_fleet_analysis_on_latency_p99(demo: DemoRun) -> None:
    summary = _summary(demo)
    v4, versions = summary["v4"], summary["versions"]
    assert v4["caught_by"] == "fleet analysis" and "latency_p99" in v4["failed_metrics"], v4
    assert "latency_p99" in v4["reason"]
    assert v4["latency_p99_ms"]["treatment"] > v4["latency_p99_ms"]["control"]
    assert v4["state"] in ("halted", "rolled_back") and v4["seconds_to_stop"] is not None
    assert len(v4["served_by"]) == 1 and v4["received_by"] == v4["served_by"], v4
    with _operator(demo) as api:
        analysis = api.get(f"/v1/rollouts/{v4['rollout_id']}/analysis").json()
        devices = {d["device_id"]: d for d in api.get("/v1/devices").json()["devices"]}
    assert any(a["verdict"] == "fail" and a["action"] == "rollback" for a in analysis["history"]), analysis
    assert {d["current_version"] for d in devices.values()} == {versions["v2"]}


def test_versions_per_device_at_each_step(demo: DemoRun) -> None:
    versions = _summary(demo)["versions"]
    v1, v2, v3, v4 = (versions[k] for k in ("v1", "v2", "v3", "v4"))
    with _operator(demo) as api:
        rollouts = {r["id"]: r for r in api.get("/v1/rollouts", params={"model": MODEL}).json()["rollouts"]}
    strategies = [(r["strategy"], r["version"]) for _, r in sorted(rollouts.items())]
    assert strategies == [("immediate", v1), ("canary", v2), ("ab", v2), ("canary", v3), ("canary", v4)]
    assert rollouts[2]["created_by"] == "mlflow-alias"

    # As the test saw them from outside: v1, v2; the A/B control arm back to v1 and on to v2 again; v3 served
    # nowhere; v4 on one device only, which went back to v2.
    assert len(demo.timelines) == 4
    shapes = [tuple(v for v in timeline if v is not None) for timeline in demo.timelines.values()]
    assert not [s for s in shapes if v3 in s], shapes
    assert sum(v4 in s for s in shapes) <= 1, shapes
    for shape in shapes:
        without_v4 = [v for v in shape if v != v4]
        assert without_v4 in ([v1, v2], [v1, v2, v1, v2], [v1, v2, v2], [v1, v2, v1, v2, v2]), shapes
        assert shape[-1] == v2


def test_mlflow_holds_the_four_signed_versions_and_the_promotion(demo: DemoRun) -> None:
    from mlflow import MlflowClient

    versions = _summary(demo)["versions"]
    client = MlflowClient(tracking_uri=demo.info["mlflow_url"], registry_uri=demo.info["mlflow_url"])
    registered = {v.version: v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert sorted(registered) == sorted(versions.values())
    for version in registered.values():
        assert version.tags["ota.gates"] == "pass" and version.tags["ota.signed"] == "true", version.tags
        assert version.source.endswith("/bundle")
    assert client.get_registered_model(MODEL).aliases == {"production": versions["v2"]}
    assert registered[versions["v4"]].tags.get("ota.fleet.verdict") == "fail", registered[versions["v4"]].tags


@needs_chromium
def test_the_dashboard_shows_the_demo_fleet(demo: DemoRun, tmp_path: Path) -> None:
    url = demo.info["dashboard_url"]
    page = load(tmp_path, url, until="ready")
    devices = page.one("section", id="devices").text()
    rollouts = page.one("section", id="rollouts").text()
    for device_id in demo.timelines:
        assert device_id in devices
    for state in ("completed", "halted" if "halted" in rollouts else "rolled_back"):
        assert state in rollouts
    assert "treatment" in page.one("section", id="ab").text()

    path = tmp_path / "demo-dashboard.png"
    chromium(
        tmp_path, url, f"--screenshot={path}", "--window-size=1400,1500", f"--virtual-time-budget={VIRTUAL_TIME_MS}"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"dashboard of the demo: {path}")
    if os.environ.get("YOLO_OTA_SAVE_SCREENSHOTS"):
        shutil.copyfile(path, Path(__file__).resolve().parents[1] / "docs" / "img" / "demo-dashboard.png")


def test_the_dashboard_is_served_and_ctrl_c_leaves_nothing_behind(demo: DemoRun) -> None:
    assert httpx.get(demo.info["service_url"] + "/ui/", timeout=10).status_code == 200
    data_dir = demo.data_dir()
    assert data_dir is not None and data_dir.is_relative_to(demo.tmp)
    pids = demo.info["pids"]
    assert len(pids) == 6  # MLflow, the service, four agents

    assert demo.stop(twice=True) == 130
    assert "every process of the demo has ended" in demo.output
    alive = [pid for pid in pids if _alive(pid)]
    assert not alive, alive
    assert not [p for p in _processes() if str(data_dir) in p], "a process still uses the demo's data dir"
    assert not data_dir.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def _processes() -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found
