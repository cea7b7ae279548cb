"""The edge agent against an attacker on the factory network, as real processes over loopback.

The local API: a decompression bomb (refused from its header, the agent's memory measured in /proc), an oversized
body (refused unread, also before it is sent), more concurrent detects than the cap (503 with Retry-After), the
optional bearer token. What the service sends: a poll period of 0, an offer bigger than the device takes, a file
URL that redirects to another origin. A disk that fills up mid-download (a real tmpfs, filled while the fault
proxy holds the transfer): reported as failed, the part file removed, the device serving and not stuck.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agent_stack import AgentStack, lane_agent, refused
from agents import FAST_AGENT_SETTINGS, RunningAgent
from faultproxy import FaultProxy, Redirect, Rewrite, Stall, rewrite_json
from images import png_bomb
from mounts import fill, tmpfs
from servers import ENROLLMENT_TOKEN

from yolo_ota.processes import started
from yolo_ota.servers import launch_agent

pytestmark = pytest.mark.slow  # agent processes, some through whole updates

MB = 1_000_000
IMAGE_BYTES_LIMIT = 4 << 20
# One slot and a short wait, so that a test can hold the slot and see the next request turned away.
API_LIMITS = {"MAX_IMAGE_BYTES": str(IMAGE_BYTES_LIMIT), "MAX_CONCURRENT_DECODES": "1", "DECODE_WAIT_S": "0.3"}


def memory_kib(pid: int, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of a process, in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class PeakRss:
    """The highest VmRSS of a process while the block runs: sampled every 2 ms, and read from the kernel's own
    peak (VmHWM, reset first through /proc/<pid>/clear_refs where that is permitted)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before_kib = memory_kib(pid, "VmRSS")
        self.peak_kib = self.before_kib
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            self.kernel_peak = True
        except OSError:
            self.kernel_peak = False

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak_kib = max(self.peak_kib, memory_kib(self.pid, "VmRSS"))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        if self.kernel_peak:
            self.peak_kib = max(self.peak_kib, memory_kib(self.pid, "VmHWM"))

    @property
    def growth_mb(self) -> float:
        return (self.peak_kib - self.before_kib) * 1024 / MB


@pytest.fixture(scope="module")
def guarded(agent_stack: AgentStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    """An agent serving good1 with a 4 MiB body limit, one detect slot and a 0.3 s wait for it (pixels: default)."""
    agent = lane_agent(agent_stack, tmp_path_factory.mktemp("guarded"), "guarded", settings=API_LIMITS)
    yield agent
    agent.stop()


def address(agent: RunningAgent) -> tuple[str, int]:
    host, _, port = agent.url.removeprefix("http://").rpartition(":")
    return host, int(port)


def read_head(sock: socket.socket) -> bytes:
    """The status line and headers of one answer on ``sock``."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    return head


# -- the local API -------------------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_refused_from_its_header(guarded: RunningAgent, bus_jpg: bytes) -> None:
    bomb = png_bomb(12_000, 12_000)  # 412 MiB once decoded
    assert len(bomb) < 500_000
    with PeakRss(guarded.process.pid) as rss:
        answer = guarded.detect(bomb)
    print(f"bomb of {len(bomb)} bytes: agent RSS {rss.before_kib / 1024:.0f} MiB before, peak growth "
          f"{rss.growth_mb:.1f} MB (kernel peak: {rss.kernel_peak})")  # fmt: skip
    assert answer.status_code == 413, answer.text
    detail = answer.json()["detail"]
    assert "12000 x 12000" in detail and "max_image_pixels is 36000000" in detail, detail
    assert rss.growth_mb < 100, f"the agent's RSS grew {rss.growth_mb:.0f} MB"
    assert guarded.detect(bus_jpg).status_code == 200  # and it serves on


def test_a_4k_frame_passes_the_default_pixel_limit(guarded: RunningAgent, bus_jpg: bytes) -> None:
    import cv2
    import numpy as np

    frame = cv2.resize(cv2.imdecode(np.frombuffer(bus_jpg, np.uint8), cv2.IMREAD_COLOR), (3840, 2160))
    jpeg = cv2.imencode(".jpg", frame)[1].tobytes()
    answer = guarded.detect(jpeg)
    assert answer.status_code == 200, answer.text
    assert all(0 <= d["box"][2] <= 3840 and 0 <= d["box"][3] <= 2160 for d in answer.json()["detections"])


def test_an_oversized_body_is_refused_unread(guarded: RunningAgent, bus_jpg: bytes) -> None:
    answer = httpx.post(guarded.url + "/v1/detect", content=bytes(IMAGE_BYTES_LIMIT + 1), timeout=30)
    assert answer.status_code == 413, answer.text
    assert f"{IMAGE_BYTES_LIMIT + 1} bytes; max_image_bytes is {IMAGE_BYTES_LIMIT}" in answer.json()["detail"]
    # A client that asks first (curl does above 1 MB) hears the refusal before it sends a byte of a 10 GB body.
    with socket.create_connection(address(guarded), timeout=10) as sock:
        sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: agent\r\nContent-Length: 10000000000\r\n"
                     b"Expect: 100-continue\r\n\r\n")  # fmt: skip
        head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 413"), head
    unframed = httpx.post(guarded.url + "/v1/detect", content=iter([bus_jpg]), timeout=30)  # chunked: no length
    assert unframed.status_code == 411
    assert guarded.detect(bus_jpg).status_code == 200


def test_detects_over_the_cap_are_turned_away_with_retry_after(guarded: RunningAgent, bus_jpg: bytes) -> None:
    """A sender whose body trickles in holds the only slot; others wait DECODE_WAIT_S (0.3 s), then get 503."""
    with socket.create_connection(address(guarded), timeout=30) as slow:
        slow.sendall(f"POST /v1/detect HTTP/1.1\r\nHost: agent\r\nContent-Length: {len(bus_jpg)}\r\n\r\n".encode())
        slow.sendall(bus_jpg[:1000])
        deadline = time.monotonic() + 10
        while True:  # until the slow request has its slot (it takes it as soon as its headers are read)
            started_at = time.monotonic()
            answer = guarded.detect(bus_jpg)
            waited_s = time.monotonic() - started_at
            if answer.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        assert "max_concurrent_decodes" in answer.json()["detail"]
        assert 0.25 <= waited_s < 5, waited_s  # a short bounded wait, not a queue
        slow.sendall(bus_jpg[1000:])
        assert read_head(slow).startswith(b"HTTP/1.1 200")
    assert guarded.detect(bus_jpg).status_code == 200  # the slot is free again


def launch(
    stack: AgentStack, data_dir: Path, device_id: str, settings: dict[str, str], **options: object
) -> RunningAgent:
    """An agent process of ``device_id`` without waiting for it (its readiness is each test's own)."""
    server = launch_agent(
        data_dir, server_url=stack.service_proxy.url, device_id=device_id, enrollment_token=ENROLLMENT_TOKEN,
        public_key=stack.versions.public_key, settings=settings, **options,  # type: ignore[arg-type]
    )  # fmt: skip
    return RunningAgent(**vars(server), device_id=device_id)


def test_the_api_token_guards_every_route_but_healthz(agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes) -> None:
    token = secrets.token_urlsafe(32)
    token_file = tmp_path / "api-token"
    token_file.write_text(token + "\n")
    agent = launch(agent_stack, tmp_path / "agent", "dev-token", dict(FAST_AGENT_SETTINGS),
                   extra_args=["--api-token-file", str(token_file)])  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(agent.url + "/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert agent.running and time.monotonic() < deadline, agent.log_tail()
                time.sleep(0.2)
        assert health.status_code == 503  # open: no model yet, and no token asked
        wrong = [{}, {"Authorization": "Bearer " + "x" * len(token)}, {"Authorization": f"Basic {token}"},
                 {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Bearer {token[:-1]}"}]  # fmt: skip
        for method, path in (("GET", "/v1/status"), ("GET", "/metrics"), ("POST", "/v1/detect"), ("GET", "/x")):
            for headers in wrong:
                answer = httpx.request(method, agent.url + path, headers=headers, timeout=10,
                                       content=bus_jpg if method == "POST" else None)  # fmt: skip
                assert answer.status_code == 401, (method, path, headers, answer.status_code)
                assert answer.headers["www-authenticate"] == "Bearer"
        right = {"Authorization": f"Bearer {token}"}
        assert httpx.get(agent.url + "/v1/status", headers=right, timeout=10).json()["device_id"] == "dev-token"
        assert "yolo_ota_agent_state" in httpx.get(agent.url + "/metrics", headers=right, timeout=10).text
        detect = httpx.post(agent.url + "/v1/detect", headers=right, content=bus_jpg, timeout=30)
        assert detect.status_code == 503 and "no validated model" in detect.text  # past the token
        assert token not in agent.log_tail(100_000)
    finally:
        agent.stop()


# -- what the service sends ----------------------------------------------------------------------------------------


def test_a_poll_interval_of_zero_from_the_service_is_clamped(agent_stack: AgentStack, tmp_path: Path) -> None:
    """The service's desired state, rewritten on its way to say ``poll_interval_s: 0``: the agent (no poll period
    of its own) polls no faster than ``min_poll_interval_s``."""
    stack = agent_stack
    rule = stack.service_proxy.add_rule(
        Rewrite("dev-pollzero/desired", rewrite_json(lambda d: {**d, "poll_interval_s": 0}))
    )
    settings = {k: v for k, v in FAST_AGENT_SETTINGS.items() if k != "POLL_INTERVAL_S"}
    settings |= {"MIN_POLL_INTERVAL_S": "1", "POLL_JITTER": "0"}
    agent = started(launch(stack, tmp_path / "agent", "dev-pollzero", settings), 60)
    try:
        agent.wait_for("a first poll", lambda s: s["last_poll"]["ok"] is True)
        assert rule.applied >= 1
        before = len(stack.service_proxy.requests_to("dev-pollzero/desired"))
        time.sleep(5)
        polls = len(stack.service_proxy.requests_to("dev-pollzero/desired")) - before
        assert polls <= 6, f"{polls} polls in 5 s with a 1 s minimum"  # 5 or 6; unclamped: about 100
        assert agent.status()["last_poll"]["ok"] is True  # the rewritten answer was taken, not refused
        assert "asked for a poll every 0 s; polling every 1.0 s" in agent.log_tail(100_000)
    finally:
        stack.service_proxy.clear_rules()
        agent.stop()


def test_an_offer_over_max_bundle_bytes_is_refused_before_downloading(agent_stack: AgentStack, tmp_path: Path) -> None:
    stack = agent_stack
    agent = started(
        launch(stack, tmp_path / "agent", "dev-bytes", {**FAST_AGENT_SETTINGS, "MAX_BUNDLE_BYTES": str(MB)},
               labels={"lane": "bytes"}), 60,
    )  # fmt: skip
    try:
        before = len(stack.mlflow_proxy.seen)
        stack.roll_out("bytes", "good1")
        version = stack.versions["good1"]
        agent.wait_for("the refusal", lambda s: any(f":{version}:" in k for k in s["rejected"]))
        events = stack.fleet.wait_for(
            "the failed event", lambda: [e for e in stack.events("dev-bytes") if e["state"] == "failed"]
        )
        assert "max_bundle_bytes is 1000000" in events[0]["reason"], events
        # (The service reads the manifest through this proxy too, so the bundle's files are what tells.)
        fetched = [s.path for s in stack.mlflow_proxy.seen[before:] if "variants/" in s.path or "golden" in s.path]
        assert fetched == []
        assert agent.status()["serving"] is None
    finally:
        agent.stop()


def test_a_redirect_to_another_origin_is_refused(agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes) -> None:
    """MLflow's proxy redirects the model file to another origin, which would serve the very same bytes."""
    stack = agent_stack
    agent = lane_agent(stack, tmp_path, "redirect")
    elsewhere = FaultProxy(stack.mlflow_proxy.upstream).start()
    stack.mlflow_proxy.add_rule(Redirect("model.torchscript", elsewhere.url))
    try:
        refused(stack, agent, "good2", "to another origin")
        assert elsewhere.seen == []
        assert agent.detect(bus_jpg).json()["version"] == stack.versions["good1"]
    finally:
        stack.mlflow_proxy.clear_rules()
        elsewhere.stop()
        agent.stop()


# -- a full disk -----------------------------------------------------------------------------------------------------


def test_a_disk_that_fills_up_mid_download_fails_the_update(
    agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes
) -> None:
    """The staging folder on a 48 MiB tmpfs; the fault proxy holds the model file after 1 MiB while the test fills
    the tmpfs, then lets the rest through."""
    stack = agent_stack
    good1, good2 = stack.versions["good1"], stack.versions["good2"]
    agent = lane_agent(stack, tmp_path, "diskfull", settings={"HTTP_TIMEOUT_S": "60"})
    stall = Stall("model.torchscript", 1 << 20, pause_s=60)
    try:
        with tmpfs(agent.data_dir / "staging", 48 << 20) as staging:
            stack.mlflow_proxy.add_rule(stall)
            rollout = stack.roll_out("diskfull", "good2")
            assert stall.stalled.wait(90), agent.log_tail()
            deadline = time.monotonic() + 30
            while not [p for p in staging.rglob("*.part") if p.stat().st_size >= (1 << 20) - (1 << 16)]:
                assert time.monotonic() < deadline, list(staging.rglob("*"))
                time.sleep(0.05)
            filler = fill(staging)
            stall.release()

            status = agent.wait_for(
                "the update to fail", lambda s: s["state"] == "idle" and s["reason"].startswith("downloading:")
            )
            assert status["serving"]["version"] == good1
            assert not list(staging.rglob("*.part")), list(staging.rglob("*"))
            assert agent.detect(bus_jpg).json()["version"] == good1
            failed = stack.fleet.wait_for(
                "the failed event at the service",
                lambda: [e for e in stack.events(agent.device_id) if e["version"] == good2 and not e["ok"]],
            )
            assert "ENOSPC" in failed[0]["reason"] and "model.torchscript" in failed[0]["reason"], failed
            assert stack.device(agent.device_id)["state"] == "failed"
            (wave,) = stack.fleet.wait_for(
                "the wave to count the failure",
                lambda: (w := stack.fleet.rollout(rollout["id"])["wave_progress"]) and w[0]["failed"] == 1 and w,
            )
            assert (wave["failed"], wave["pending"]) == (1, 0), wave
            assert agent.status()["rejected"] == []  # not remembered as refused: tried again once offered again
            filler.unlink()
    finally:
        stall.release()
        stack.mlflow_proxy.clear_rules()
        agent.stop()
