"""The fleet dashboard (``/ui``) in headless Chromium against a live rollout service, and the REST endpoint its A/B
charts read (``GET /v1/rollouts/{id}/telemetry``), on SQLite and PostgreSQL.

Chromium is Debian's ``/usr/bin/chromium`` (``.ci/run`` installs it; without it the browser tests skip). It runs as
a plain command, once per look: ``--dump-dom`` for the page's DOM, ``--screenshot`` for a picture. With
``--virtual-time-budget`` it runs the page's timers and waits for its fetches before it dumps or shoots; the page
marks ``<body data-state="ready">`` after its first good refresh, and a dump that caught it earlier is taken again.

The fleet is seeded through the REST API only: devices on two lines, a canary with commits and one failure, an A/B
test whose arms report different latencies, error rates and detections. The page must show what the API says.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from browser import VIRTUAL_TIME_MS, chromium, load, needs_chromium
from fleet import Fleet, SimDevice
from servers import OPERATOR_TOKEN, start_rollout_service

from registry.rollout_service.dashboard import UI_DIR
from yolo_ota.processes import RunningServer

REPO = Path(__file__).resolve().parents[1]
MODEL = "pcb-line"
WINDOW = (1400, 1800)
# No alias of this name is ever set: the service starts no rollout of its own from the session's MLflow.
NO_PROMOTIONS = {"PROMOTION_ALIAS": "never-set-by-the-dashboard-tests", "ALIAS_POLL_INTERVAL_S": "3600"}
ARM_COLOURS = {"treatment": (0xD9, 0x5F, 0x02), "control": (0x1F, 0x78, 0xB4)}  # as in dashboard.js
HOSTILE_LABEL = '<img src=x onerror="document.title=1">&amp;'


# -- the live service and its fleet ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> Iterator[RunningServer]:
    server = start_rollout_service(
        tmp_path_factory.mktemp("dashboard"), mlflow_url=mlflow_server.url, settings=NO_PROMOTIONS
    )
    yield server
    server.stop()


def telemetry_window(arm: str, device_index: int, window: int) -> dict[str, Any]:
    """One report window; the treatment arm is faster, fails less and finds more than the control arm."""
    faster = arm == "treatment"
    return {
        "inferences": 200,
        "errors": (1 if faster else 5) + window % 2,
        "latency_ms": {
            "p50": (8.0 if faster else 13.0) + 0.6 * device_index + 0.3 * window,
            "p99": (15.0 if faster else 27.0) + 1.1 * device_index + 0.7 * window,
        },
        "detections_per_image": (4.2 if faster else 3.4) + 0.05 * window,
        "mean_confidence": 0.82 if faster else 0.74,
    }


@pytest.fixture(scope="module")
def seeded(service: RunningServer, fleet_model: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Line A runs a canary (wave 1 commits, one wave-2 device fails); line B an A/B test with telemetry."""
    good, better = fleet_model["good"], fleet_model["better"]
    fleet = Fleet(service.url)
    orin = {"cuda_runtime": "12.6", "gpu_name": "Orin (nvgpu)", "gpu_capability": "8.7", "gpu_memory_bytes": 2**34}
    line_a = [fleet.enroll(f"press-a-{i:02d}", {"line": "line-a"}, **(orin if i % 2 else {})) for i in range(6)]
    line_b = [fleet.enroll(f"press-b-{i:02d}", {"line": "line-b"}) for i in range(6)]
    fleet.enroll("press-c-00", {"line": "line-c", "note": HOSTILE_LABEL})  # in no rollout, label to be escaped

    canary = fleet.create_rollout(
        model=MODEL,
        version=better,
        previous_version=good,
        strategy="canary",
        selector={"labels": {"line": "line-a"}},
        waves=[
            {"percent": 50, "bake_s": 0, "max_failure_rate": 0.5, "min_success_rate": 0.5},
            {"percent": 100, "bake_s": 3600, "max_failure_rate": 0.5, "min_success_rate": 0.9},
        ],
        reason="new lighting on line A",
    )["id"]
    fleet.follow(line_a)
    fleet.wait_for("wave 2 of the canary", lambda: fleet.rollout(canary)["current_wave"] == 1)
    fleet.wait_for("the new wave in the desired states", lambda: _newly_sent(fleet, line_a, better))
    failing = _newly_sent(fleet, line_a, better)[0]
    fleet.follow(line_a, fail=frozenset({failing.device_id}))

    ab = fleet.create_rollout(
        model=MODEL,
        version=better,
        strategy="ab",
        ab={"control_version": good, "split": 0.5},
        selector={"labels": {"line": "line-b"}},
        reason="does the new model find more?",
    )["id"]
    versions = fleet.follow(line_b)
    arms = {device_id: ("treatment" if version == better else "control") for device_id, version in versions.items()}
    assert set(arms.values()) == {"treatment", "control"}, arms
    windows: dict[str, list[dict[str, Any]]] = {"treatment": [], "control": []}
    for index, device in enumerate(line_b):
        arm = arms[device.device_id]
        for window in range(3):
            figures = telemetry_window(arm, index, window)
            fleet.report(device, version=versions[device.device_id], **figures)
            windows[arm].append(figures)
    yield {"fleet": fleet, "canary": canary, "ab": ab, "failing": failing.device_id, "windows": windows}
    fleet.close()


def _newly_sent(fleet: Fleet, devices: list[SimDevice], version: str) -> list[SimDevice]:
    """Devices now told to run ``version`` that have not reported on it yet."""
    return [d for d in devices if fleet.desired_version(d) == version and d.reported[1] != version]


def ui_url(service: RunningServer, token: str | None = OPERATOR_TOKEN) -> str:
    return f"{service.url}/ui" + (f"#token={token}" if token else "")


# -- the page ----------------------------------------------------------------------------------------------------


@needs_chromium
def test_dashboard_shows_devices_rollouts_and_the_ab_test(
    service: RunningServer, seeded: dict[str, Any], tmp_path: Path
) -> None:
    fleet: Fleet = seeded["fleet"]
    dom = load(tmp_path, ui_url(service), until="ready")

    body = dom.one("body")
    assert dom.one(id="token-form").attrs.get("hidden") is not None
    assert "hidden" not in dom.one("main", id="dashboard").attrs
    assert dom.one(id="status").text().startswith("Updated ")
    devices = fleet.op("GET", "/v1/devices")["devices"]
    assert dom.one("h2", id="devices-title").text() == f"Devices ({len(devices)})"
    for device in devices:
        row = dom.one("tr", data_device=device["device_id"])
        assert row.attrs["data-version"] == (device["current_version"] or "")
        text = row.text()
        assert device["device_id"] in text and device["fingerprint"]["torch"] in text
        if device["current_version"]:
            assert f"v{device['current_version']}" in text
        if device["fingerprint"]["gpu_name"]:
            assert "CUDA 12.6" in text and "Orin (nvgpu) (sm 8.7) · 16 GiB" in text
        else:
            assert " cpu" in f" {text}"
    failing_row = dom.one("tr", data_device=seeded["failing"]).text()
    assert "rolled back" in failing_row

    # A label is text, never markup.
    assert not dom.find_all("img")
    assert HOSTILE_LABEL in dom.one("tr", data_device="press-c-00").text()

    canary = fleet.rollout(seeded["canary"])
    row = dom.one("tr", data_rollout=str(canary["id"]))
    assert row.attrs["data-state"] == canary["state"] == "running"
    assert "wave 2 of 2" in row.text() and "from v" in row.text()
    for wave in canary["wave_progress"]:
        line = row.one("div", data_wave=str(wave["index"]))
        for key in ("devices", "succeeded", "failed", "pending"):
            assert line.attrs[f"data-{key}"] == str(wave[key]), (wave, line.attrs)
        assert f"{wave['succeeded']} ok · {wave['failed']} failed · {wave['pending']} pending" in line.text()
        assert line.attrs["data-current"] == str(wave["index"] == canary["current_wave"]).lower()
    assert canary["wave_progress"][1]["failed"] == 1 and canary["wave_progress"][1]["succeeded"] >= 2

    ab = fleet.rollout(seeded["ab"])
    row = dom.one("tr", data_rollout=str(ab["id"]))
    assert row.has_class("shown") and row.attrs["data-state"] == "running"
    for arm in ab["arms"]:
        line = row.one("div", data_arm=arm["arm"])
        for key in ("devices", "succeeded", "failed"):
            assert line.attrs[f"data-{key}"] == str(arm[key]), (arm, line.attrs)

    section = dom.one("section", id="ab")
    assert section.one("p", data_rollout=str(ab["id"]))
    by_arm = {arm["arm"]: arm for arm in ab["arms"]}
    for name, sent in seeded["windows"].items():
        assert f"v{by_arm[name]['version']}" in section.one("tr", data_arm=name).text()
        for metric in ("p50", "p99"):
            dots = section.find_all("circle", data_arm=name, data_metric=metric)
            assert sorted(float(d.attrs["data-value"]) for d in dots) == pytest.approx(
                sorted(w["latency_ms"][metric] for w in sent)
            )
    latency = section.one("figure", data_chart="latency")
    assert len(latency.find_all("line", class_="median")) == 4
    for key, figure in (("error-rate", "error_rate"), ("detections", "detections_per_image")):
        chart = section.one("figure", data_chart=key)
        scale = 100 if key == "error-rate" else 1
        for name, arm in by_arm.items():
            assert float(chart.one("rect", data_arm=name).attrs["data-value"]) == pytest.approx(arm[figure] * scale)
    treatment, control = by_arm["treatment"], by_arm["control"]
    assert treatment["error_rate"] < control["error_rate"]
    assert treatment["detections_per_image"] > control["detections_per_image"]
    for chart in section.find_all("figure", class_="chart"):
        assert chart.find_all("text", class_="axis-label"), chart.attrs
        legend = chart.one("span", class_="legend").text()
        assert f"treatment v{treatment['version']}" in legend and f"control v{control['version']}" in legend
    assert int(body.attrs["data-refreshes"]) >= 2  # it refreshed by itself


@needs_chromium
def test_without_a_token_the_page_asks_for_one_and_shows_no_data(
    service: RunningServer, seeded: dict[str, Any], tmp_path: Path
) -> None:
    dom = load(tmp_path, ui_url(service, None), until="needs-token")

    assert "hidden" not in dom.one("form", id="token-form").attrs
    assert dom.one("input", id="token-input").attrs["type"] == "password"
    assert dom.one("main", id="dashboard").attrs.get("hidden") is not None
    assert not dom.find_all("tr") and "press-a-00" not in dom.text()


@needs_chromium
def test_a_refused_token_says_so(service: RunningServer, seeded: dict[str, Any], tmp_path: Path) -> None:
    dom = load(tmp_path, ui_url(service, "not-an-operator-token"), until="unauthorized")

    banner = dom.one(id="banner")
    assert "hidden" not in banner.attrs
    assert "refused this token (401" in banner.text() and "Paste an operator token" in banner.text()
    assert "hidden" not in dom.one("form", id="token-form").attrs
    assert not dom.find_all("tr") and "press-a-00" not in dom.text()


class _PageWithoutApi(BaseHTTPRequestHandler):
    """Serves the dashboard's files and drops every other request unanswered: to the page the API is down."""

    def do_GET(self) -> None:
        name = self.path.split("?")[0].removeprefix("/ui/") or "index.html"
        kinds = {
            "index.html": "text/html",
            "dashboard.js": "text/javascript",
            "analysis.js": "text/javascript",
            "access.js": "text/javascript",
            "dashboard.css": "text/css",
        }
        if not self.path.startswith("/ui/") or name not in kinds:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        content = (UI_DIR / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", kinds[name])
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@needs_chromium
def test_an_unreachable_api_shows_the_error_banner(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PageWithoutApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dom = load(tmp_path, f"http://127.0.0.1:{server.server_port}/ui/#token=x", until="unreachable")
    finally:
        server.shutdown()
        server.server_close()

    banner = dom.one(id="banner")
    assert "hidden" not in banner.attrs
    assert "Cannot reach the rollout service" in banner.text() and "trying again every 3 s" in banner.text()
    assert dom.one(id="status").text() == "No data yet"


@needs_chromium
def test_screenshot_of_the_dashboard(service: RunningServer, seeded: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    load(tmp_path, ui_url(service), until="ready")  # the data is there to be drawn
    path = tmp_path / "dashboard.png"
    chromium(
        tmp_path,
        ui_url(service),
        f"--screenshot={path}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
    )

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == WINDOW
        rgb = image.convert("RGB")
    assert max(ImageStat.Stat(rgb.convert("L")).stddev) > 20, "the picture is (almost) one colour"
    # The charts were drawn: both arms' colours cover a fair number of pixels.
    counts = {arm: 0 for arm in ARM_COLOURS}
    for pixel, count in _colour_counts(rgb):
        for arm, colour in ARM_COLOURS.items():
            counts[arm] += count if all(abs(a - b) <= 6 for a, b in zip(pixel, colour, strict=True)) else 0
    assert min(counts.values()) > 1000, counts
    print(f"dashboard screenshot: {path}")
    if os.environ.get("YOLO_OTA_SAVE_SCREENSHOTS"):
        target = REPO / "docs" / "img" / "dashboard.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        print(f"copied to {target}")


def _colour_counts(image: Any) -> list[tuple[tuple[int, int, int], int]]:
    colours = image.getcolors(maxcolors=image.size[0] * image.size[1])
    return [(pixel, count) for count, pixel in colours]


# -- the REST endpoint the charts read ---------------------------------------------------------------------------


def test_telemetry_endpoint_returns_each_arms_newest_windows(
    tmp_path: Path, database_url: str, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> None:
    good, better = fleet_model["good"], fleet_model["better"]
    server = start_rollout_service(
        tmp_path / "svc", database_url=database_url, mlflow_url=mlflow_server.url, settings=NO_PROMOTIONS
    )
    fleet = Fleet(server.url)
    try:
        devices = fleet.enroll_many(8, "tele", {"line": "tele"})
        rollout_id = fleet.create_rollout(
            model=MODEL,
            version=better,
            strategy="ab",
            ab={"control_version": good, "split": 0.5},
            selector={"labels": {"line": "tele"}},
        )["id"]
        versions = {d.device_id: fleet.desired_version(d) for d in devices}
        sent: dict[str, list[dict[str, Any]]] = {"treatment": [], "control": []}
        for window in range(3):
            for index, device in enumerate(devices):
                version = versions[device.device_id]
                figures = telemetry_window("treatment" if version == better else "control", index, window)
                fleet.report(device, version=version, **figures)
                sent["treatment" if version == better else "control"].append(
                    {
                        "device_id": device.device_id,
                        "version": version,
                        "inferences": figures["inferences"],
                        "errors": figures["errors"],
                        "p50_ms": figures["latency_ms"]["p50"],
                        "p99_ms": figures["latency_ms"]["p99"],
                        "detections_per_image": figures["detections_per_image"],
                        "mean_confidence": figures["mean_confidence"],
                    }
                )
        # A window of a version that is neither arm's belongs to no arm.
        stray = telemetry_window("control", 0, 0)
        fleet.report(devices[0], version=fleet_model["failed"], **stray)
        assert sent["treatment"] and sent["control"], versions

        answer = fleet.op("GET", f"/v1/rollouts/{rollout_id}/telemetry")

        assert answer["rollout_id"] == rollout_id
        arms = {arm["arm"]: arm for arm in answer["arms"]}
        assert list(arms) == ["treatment", "control"]
        assert (arms["treatment"]["version"], arms["control"]["version"]) == (better, good)
        for name, windows in sent.items():
            got = arms[name]
            assert got["windows_total"] == len(windows)
            assert [{k: v for k, v in w.items() if k != "at"} for w in got["windows"]] == windows[::-1]  # newest first
            stamps = [w["at"] for w in got["windows"]]
            assert stamps == sorted(stamps, reverse=True)

        limited = fleet.op("GET", f"/v1/rollouts/{rollout_id}/telemetry", params={"limit": 2})
        for arm in limited["arms"]:
            assert arm["windows"] == arms[arm["arm"]]["windows"][:2]
            assert arm["windows_total"] == arms[arm["arm"]]["windows_total"]

        # A canary with no version before it has one arm, and nothing reported yet.
        canary = fleet.create_rollout(model=MODEL, version=better, selector={"labels": {"line": "nobody"}})["id"]
        lone = fleet.op("GET", f"/v1/rollouts/{canary}/telemetry")["arms"]
        assert lone == [{"arm": "treatment", "version": better, "windows_total": 0, "windows": []}]

        assert "no rollout 999999" in fleet.op("GET", "/v1/rollouts/999999/telemetry", expect=404)["detail"]
        fleet.op("GET", f"/v1/rollouts/{rollout_id}/telemetry", params={"limit": 0}, expect=422)
        fleet.op("GET", f"/v1/rollouts/{rollout_id}/telemetry", params={"limit": 1001}, expect=422)
        assert fleet.http.get(f"/v1/rollouts/{rollout_id}/telemetry").status_code == 401
    finally:
        fleet.close()
        server.stop()


def test_dashboard_files_are_served_openly_and_nothing_else_is(service: RunningServer) -> None:
    import httpx

    with httpx.Client(base_url=service.url, timeout=30) as http:
        root = http.get("/ui")
        assert root.status_code == 307 and root.headers["location"] == "ui/"
        page = http.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="dashboard.js">' in page.text
        for name, kind in (
            ("dashboard.js", "text/javascript"),
            ("analysis.js", "text/javascript"),
            ("dashboard.css", "text/css"),
        ):
            asset = http.get(f"/ui/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert asset.content == (UI_DIR / name).read_bytes()
        for missing in ("/ui/app.py", "/ui/..%2Fapp.py", "/ui/../app.py", "/ui/ui.py"):
            assert http.get(missing).status_code == 404, missing
        assert http.get("/v1/devices").status_code == 401
        assert not [p for p in http.get("/openapi.json").json()["paths"] if p.startswith("/ui")]
