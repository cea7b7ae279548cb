"""``yolo-ota demo`` end to end: the real command, its real processes, every claim checked from the outside.

While the demo runs, the test reads the rollout service's REST API twice a second and keeps each device's
sequence of versions; when the demo has printed its summary (``--keep-running`` holds the stack up), it checks the
rollouts, the device events and MLflow's registry, then stops the demo with SIGINT, as Ctrl-C would, and checks
that no process and no temporary folder is left.
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

pytestmark = pytest.mark.slow  # the whole demo: about three minutes on 2 cores

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
                for device in client.get("/v1/devices").json()["devices"]:
                    timeline = self.timelines.setdefault(device["device_id"], [])
                    if not timeline or timeline[-1] != device["current_version"]:
                        timeline.append(device["current_version"])
            time.sleep(0.5)
        if client is not None:
            client.close()

    def stop(self) -> int:
        if self.process.poll() is None:
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


def test_the_demo_holds_every_claim_it_prints(demo: DemoRun) -> None:
    assert "8 of 8 claims held" in demo.output, demo.output
    assert "✗" not in demo.output
    for url in ("MLflow UI:", "Rollout service docs:", "Fleet dashboard:"):
        assert url in demo.output


def test_versions_per_device_at_each_step(demo: DemoRun) -> None:
    with _operator(demo) as api:
        rollouts = {r["id"]: r for r in api.get("/v1/rollouts", params={"model": MODEL}).json()["rollouts"]}
        details = {r: api.get(f"/v1/rollouts/{r}").json() for r in rollouts}
        audit = {
            r: [e["action"] for e in api.get("/v1/audit", params={"rollout_id": r}).json()["entries"]] for r in rollouts
        }
    assert [(r["strategy"], r["version"], r["state"]) for _, r in sorted(rollouts.items())] == [
        ("canary", "1", "completed"),  # the promotion of v1
        ("canary", "2", "completed"),  # the promotion of v2
        ("ab", "2", "aborted"),  # superseded by the rollout that keeps v2
        ("immediate", "2", "completed"),
        ("canary", "3", "halted"),  # the promotion of v3
    ]
    assert rollouts[1]["created_by"] == rollouts[2]["created_by"] == rollouts[5]["created_by"] == "mlflow-alias"

    # v2's canary went wave by wave: one device of four first, then the rest.
    assert sorted(audit[2]) == sorted(["created", "advance", "complete"])
    assert [(w["devices"], w["succeeded"], w["state"]) for w in details[2]["wave_progress"]] == [
        (1, 1, "passed"),
        (4, 4, "passed"),
    ]
    # The A/B test split the fleet two and two, and both arms reported telemetry.
    arms = {a["arm"]: a for a in details[3]["arms"]}
    assert (arms["treatment"]["version"], arms["control"]["version"]) == ("2", "1")
    assert arms["treatment"]["devices"] == arms["control"]["devices"] == 2
    assert arms["treatment"]["inferences"] > 0 and arms["control"]["inferences"] > 0
    assert arms["treatment"]["errors"] == arms["control"]["errors"] == 0

    # Each device: v1, v2, and for the control arm back to v1 and then to v2 again. v3 never committed anywhere.
    assert len(demo.timelines) == 4
    shapes = sorted(tuple(v for v in timeline if v is not None) for timeline in demo.timelines.values())
    assert shapes == [("1", "2"), ("1", "2"), ("1", "2", "1", "2"), ("1", "2", "1", "2")], demo.timelines


def test_v3_halts_in_its_first_wave_and_rolls_back_only_there(demo: DemoRun) -> None:
    with _operator(demo) as api:
        v3 = api.get("/v1/rollouts/5").json()
        actions = [e["action"] for e in api.get("/v1/audit", params={"rollout_id": 5}).json()["entries"]]
        devices = {d: api.get(f"/v1/devices/{d}").json() for d in demo.timelines}
    first = v3["wave_progress"][0]
    assert v3["state"] == "halted" and v3["current_wave"] == 0 and "halt" in actions
    assert (first["devices"], first["failed"], first["succeeded"]) == (1, 1, 0)
    assert v3["wave_progress"][1]["state"] != "passed"

    took_v3 = {d for d, detail in devices.items() if any(e["version"] == "3" for e in detail["last_events"])}
    assert len(took_v3) == 1, took_v3
    (landed,) = took_v3
    events = [e["state"] for e in reversed(devices[landed]["last_events"]) if e["version"] == "3"]
    assert events[-3:] == ["probation", "rolling_back", "rolled_back"], events  # it served v3 before it was judged
    reason = next(e["reason"] for e in devices[landed]["last_events"] if e["state"] == "rolled_back")
    assert "NaN" in reason
    for device_id, detail in devices.items():
        assert detail["current_version"] == "2", (device_id, detail)
        assert detail["state"] == ("rolled_back" if device_id == landed else "committed")


def test_mlflow_holds_the_three_signed_versions_and_the_promotion(demo: DemoRun) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=demo.info["mlflow_url"], registry_uri=demo.info["mlflow_url"])
    versions = {v.version: v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert sorted(versions) == ["1", "2", "3"]
    for version in versions.values():
        assert version.tags["ota.gates"] == "pass" and version.tags["ota.signed"] == "true", version.tags
        assert version.source.endswith("/bundle")
    assert client.get_registered_model(MODEL).aliases == {"production": "3"}
    assert "rollout 5" in versions["3"].tags.get("ota.rollout", ""), versions["3"].tags


@needs_chromium
def test_the_dashboard_shows_the_demo_fleet(demo: DemoRun, tmp_path: Path) -> None:
    url = demo.info["dashboard_url"]
    page = load(tmp_path, url, until="ready")
    devices = page.one("section", id="devices").text()
    rollouts = page.one("section", id="rollouts").text()
    for device_id in demo.timelines:
        assert device_id in devices
    for state in ("halted", "completed", "aborted"):
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

    assert demo.stop() == 130
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
