"""Closed-loop HTTP load for bench/server.py: keep-alive connections, one or more processes, a fixed window.

Each connection sends its next request as soon as the previous answer is read. Requests are spread over a list
of devices in turn (each with its own token and ETag), so per-device caches on the server see a whole fleet.
Only answers that complete inside the measured window count; the warm-up before it is thrown away.

Two clients: ``raw`` (default) writes pre-encoded HTTP/1.1 requests on asyncio streams and parses just the
status line and framing, so that one process costs a fraction of what the server spends per request; ``httpx``
uses ``httpx.AsyncClient`` and shows how much a real client library adds. ``run_load`` starts the worker
processes (this file, run as a script: ``python bench/loadgen.py SPEC.json OUT.json``) and samples the CPU time
of the server process during the same window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

# time.monotonic is CLOCK_MONOTONIC on Linux (mach time on macOS): one clock for every process on the machine,
# which is what lets the workers and the coordinator agree on the window.
_START_MARGIN_S = 1.5

ENDPOINTS = {
    "healthz": 200,  # the trivial endpoint: same stack (uvicorn, FastAPI routing, JSON answer), no work
    "desired-304": 304,  # GET desired with If-None-Match = the device's current ETag
    "desired-200": 200,  # GET desired without it: the full desired state
}


@dataclass
class Device:
    device_id: str
    token: str
    etag: str


@dataclass
class LoadSpec:
    """What one worker process does; written as JSON for it."""

    url: str
    endpoint: str
    devices_file: str  # JSON list of Device, shared by every phase
    connections: int
    shard: int  # this worker takes devices[shard::shards]
    shards: int
    start_at: float  # time.monotonic() when the warm-up starts
    warmup_s: float
    duration_s: float
    client: str = "raw"
    latency_file: str = ""


@dataclass
class WorkerResult:
    completed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # every status seen in the window, expected or not
    errors: int = 0  # unexpected statuses and broken connections in the window
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # this worker's CPU time during the window
    late_s: float = 0.0  # how late it was ready after start_at (must be less than the warm-up)


@dataclass
class LoadResult:
    """One endpoint under load, all workers together."""

    endpoint: str
    window_s: float
    completed: int
    errors: int
    statuses: dict[str, int]
    error_samples: list[str]
    latencies_ms: array  # type: ignore[type-arg]
    loadgen_cpu_s: float
    server_cpu_s: float
    machine_busy_s: float  # every core's busy time in the window, this machine, everyone's processes
    worst_late_s: float

    @property
    def rate(self) -> float:
        return self.completed / self.window_s


def load_devices(path: str) -> list[Device]:
    return [Device(**d) for d in json.loads(Path(path).read_text())]


def save_devices(path: Path, devices: list[Device]) -> None:
    path.write_text(json.dumps([asdict(d) for d in devices]))


# -- the worker ------------------------------------------------------------------------------------------------


class _Window:
    def __init__(self, spec: LoadSpec) -> None:
        self.begin = spec.start_at + spec.warmup_s
        self.end = self.begin + spec.duration_s
        self.latencies = array("d")
        self.result = WorkerResult()

    def record(self, started: float, finished: float, status: int, expected: int) -> None:
        if not (self.begin <= started and finished < self.end):
            return
        key = str(status)
        self.result.statuses[key] = self.result.statuses.get(key, 0) + 1
        if status == expected:
            self.result.completed += 1
            self.latencies.append((finished - started) * 1000)
        else:
            self.error(f"HTTP {status} (expected {expected})", finished)

    def error(self, text: str, at: float) -> None:
        if self.begin <= at < self.end:
            self.result.errors += 1
            if len(self.result.error_samples) < 5:
                self.result.error_samples.append(text)


def _request_bytes(spec: LoadSpec, device: Device) -> tuple[bytes, str, dict[str, str]]:
    parts = urlsplit(spec.url)
    path = "/healthz" if spec.endpoint == "healthz" else f"/v1/devices/{device.device_id}/desired"
    # Every endpoint gets the same headers, so the trivial one parses as much as the others.
    headers = {"Authorization": f"Bearer {device.token}", "Accept": "application/json"}
    if spec.endpoint == "desired-304":
        headers["If-None-Match"] = device.etag
    lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), path, headers


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status and whether the server will close; reads the body by its framing (HTTP/1.1, no trailers)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if status in (204, 304) or status < 200:
        length = 0
    else:
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
        elif b"\r\ntransfer-encoding: chunked" in lower:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
            length = 0
        else:
            raise ConnectionError(f"HTTP {status} answer without Content-Length or chunked framing")
    if length:
        await reader.readexactly(length)
    return status, b"\r\nconnection: close" in lower


async def _raw_connection(spec: LoadSpec, requests: list[bytes], turn: list[int], window: _Window) -> None:
    parts = urlsplit(spec.url)
    expected = ENDPOINTS[spec.endpoint]
    writer: asyncio.StreamWriter | None = None
    while time.monotonic() < window.end:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            request = requests[turn[0] % len(requests)]
            turn[0] += 1
            started = time.monotonic()
            writer.write(request)
            status, closing = await _read_answer(reader)
            window.record(started, time.monotonic(), status, expected)
            if closing:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            window.error(f"{type(exc).__name__}: {exc}", time.monotonic())
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


async def _httpx_connection(
    spec: LoadSpec, client: object, targets: list[tuple[str, dict[str, str]]], turn: list[int], window: _Window
) -> None:
    import httpx

    assert isinstance(client, httpx.AsyncClient)
    expected = ENDPOINTS[spec.endpoint]
    while time.monotonic() < window.end:
        path, headers = targets[turn[0] % len(targets)]
        turn[0] += 1
        started = time.monotonic()
        try:
            answer = await client.get(path, headers=headers)
        except httpx.HTTPError as exc:
            window.error(f"{type(exc).__name__}: {exc}", time.monotonic())
            await asyncio.sleep(0.05)
            continue
        window.record(started, time.monotonic(), answer.status_code, expected)


async def _cpu_in_window(window: _Window) -> None:
    await asyncio.sleep(max(0.0, window.begin - time.monotonic()))
    begin = time.process_time()
    await asyncio.sleep(max(0.0, window.end - time.monotonic()))
    window.result.cpu_s = time.process_time() - begin


async def run_worker(spec: LoadSpec) -> tuple[WorkerResult, array]:  # type: ignore[type-arg]
    devices = load_devices(spec.devices_file)[spec.shard :: spec.shards]
    built = [_request_bytes(spec, d) for d in devices]
    window = _Window(spec)
    turn = [spec.shard]  # one turn counter per worker, shared by its connections (one event loop: no lock)
    window.result.late_s = max(0.0, time.monotonic() - spec.start_at)
    await asyncio.sleep(max(0.0, spec.start_at - time.monotonic()))
    if spec.client == "raw":
        tasks = [_raw_connection(spec, [b for b, _, _ in built], turn, window) for _ in range(spec.connections)]
        await asyncio.gather(_cpu_in_window(window), *tasks)
    else:
        import httpx

        limits = httpx.Limits(max_connections=spec.connections, max_keepalive_connections=spec.connections)
        async with httpx.AsyncClient(base_url=spec.url, limits=limits, timeout=30) as client:
            targets = [(path, headers) for _, path, headers in built]
            tasks = [_httpx_connection(spec, client, targets, turn, window) for _ in range(spec.connections)]
            await asyncio.gather(_cpu_in_window(window), *tasks)
    return window.result, window.latencies


def _worker_main(spec_path: str, out_path: str) -> int:
    spec = LoadSpec(**json.loads(Path(spec_path).read_text()))
    result, latencies = asyncio.run(run_worker(spec))
    with open(spec.latency_file, "wb") as f:
        latencies.tofile(f)
    Path(out_path).write_text(json.dumps(asdict(result)))
    return 0


# -- the coordinator -------------------------------------------------------------------------------------------


def _machine_busy_s() -> float:
    import psutil

    times = psutil.cpu_times()._asdict()
    # Linux counts guest time inside user and nice already; idle and iowait are the CPU waiting for work.
    not_busy = ("idle", "iowait", "guest", "guest_nice")
    return float(sum(v for k, v in times.items() if k not in not_busy))


def run_load(
    *,
    url: str,
    endpoint: str,
    devices_file: Path,
    work_dir: Path,
    server_pid: int,
    connections: int,
    processes: int,
    warmup_s: float,
    duration_s: float,
    client: str = "raw",
) -> LoadResult:
    """Run ``endpoint`` under load from ``processes`` workers for ``duration_s`` after ``warmup_s``."""
    import psutil

    server = psutil.Process(server_pid)
    start_at = time.monotonic() + _START_MARGIN_S
    begin = start_at + warmup_s
    workers: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    try:
        for shard in range(processes):
            spec = LoadSpec(
                url=url,
                endpoint=endpoint,
                devices_file=str(devices_file),
                connections=connections // processes + (1 if shard < connections % processes else 0),
                shard=shard,
                shards=processes,
                start_at=start_at,
                warmup_s=warmup_s,
                duration_s=duration_s,
                client=client,
                latency_file=str(work_dir / f"{endpoint}-{shard}.lat"),
            )
            spec_path, out_path = work_dir / f"{endpoint}-{shard}.spec.json", work_dir / f"{endpoint}-{shard}.json"
            spec_path.write_text(json.dumps(asdict(spec)))
            command = [sys.executable, __file__, str(spec_path), str(out_path)]
            workers.append((subprocess.Popen(command), out_path, Path(spec.latency_file)))
        time.sleep(max(0.0, begin - time.monotonic()))
        server_before, busy_before = sum(server.cpu_times()[:4]), _machine_busy_s()
        time.sleep(max(0.0, begin + duration_s - time.monotonic()))
        server_cpu_s = sum(server.cpu_times()[:4]) - server_before
        machine_busy_s = _machine_busy_s() - busy_before
        for process, _, _ in workers:
            code = process.wait(timeout=60)
            if code in (130, -2):  # the worker saw the Ctrl-C first
                raise KeyboardInterrupt
            if code != 0:
                raise RuntimeError(f"load worker exited with {code}")
    finally:
        for process, _, _ in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = [WorkerResult(**json.loads(out.read_text())) for _, out, _ in workers]
    latencies = array("d")
    for _, _, lat in workers:
        latencies.frombytes(lat.read_bytes())
    statuses: dict[str, int] = {}
    for r in results:
        for key, count in r.statuses.items():
            statuses[key] = statuses.get(key, 0) + count
    return LoadResult(
        endpoint=endpoint,
        window_s=duration_s,
        completed=sum(r.completed for r in results),
        errors=sum(r.errors for r in results),
        statuses=statuses,
        error_samples=[s for r in results for s in r.error_samples][:5],
        latencies_ms=latencies,
        loadgen_cpu_s=sum(r.cpu_s for r in results),
        server_cpu_s=server_cpu_s,
        machine_busy_s=machine_busy_s,
        worst_late_s=max(r.late_s for r in results),
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(_worker_main(*sys.argv[1:3]))
    raise SystemExit(130)
