"""Rollout-service benchmark: desired-state polls per second for a fleet, against a trivial endpoint as the ceiling.

    uv run --all-extras python bench/server.py [--backend sqlite|postgresql|both] [--devices 10000]

Starts real processes: an MLflow server, one small registered bundle (YOLOv8n from ``yolov8n.yaml`` at 64 px,
cpu-fp32), and per database backend the rollout service (``yolo-ota server``, one uvicorn process). Enrolls
``--devices`` devices, starts an ``immediate`` rollout of the bundle so every device has a desired state, polls
each device once to learn its ETag, then loads three endpoints in turn from a separate load-generator process
(bench/loadgen.py), each for ``--duration-s`` after ``--warmup-s``:

- ``healthz``: GET /healthz, the same server stack with no work: the ceiling;
- ``desired-304``: GET /v1/devices/{id}/desired with If-None-Match = the device's ETag (the steady state);
- ``desired-200``: the same without If-None-Match (the full answer).

Requests cycle over all devices, each with its own token. The service runs with its production intervals except
the alias poll (nothing is promoted here). Besides requests/s and client-side latency, the table shows the
server's CPU time per request, which does not depend on how fast the load generator is, and the generator's and
the whole machine's CPU use, to tell a server-bound figure from a generator-bound or machine-bound one.
PostgreSQL is measured in a fresh database when it is reachable (``YOLO_OTA_TEST_POSTGRES``), else skipped.

The service's background work (wave scheduler and heartbeat flush, every 5 s) is paid by whichever window it
falls in: keep ``--duration-s`` at 10 s or more, and on a noisy machine use ``--rounds`` to interleave the endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from loadgen import ENDPOINTS, Device, LoadResult, run_load, save_devices
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from exporters.device_identity import DeviceKey, enrollment_body
from yolo_ota.processes import RunningServer
from yolo_ota.scratch_postgres import create_postgres_database, drop_postgres_database, postgres_reachable
from yolo_ota.servers import ServiceTokens, start_mlflow, start_service

MODEL_NAME = "bench-fleet"
TOKENS = ServiceTokens(operator_name="bench")
POLL_INTERVAL_S = 30
# Production intervals, written out so the figures say what they were taken with; no alias polling.
SERVICE_SETTINGS = {
    "ALIAS_POLL_INTERVAL_S": "3600",
    "SCHEDULER_INTERVAL_S": "5",
    "STATE_CHECK_INTERVAL_S": "1",
    "HEARTBEAT_FLUSH_S": "5",
    "POLL_INTERVAL_S": str(POLL_INTERVAL_S),
}
TARGET_RATIO = 0.60
# A process using this share of one core or more is taken to be what limited the rate (both are single-threaded
# where it counts: the server's event loop holds the GIL, the generator is one event loop).
SATURATED_PCT = 85.0

console = Console(stderr=True)  # progress
# Figures; wide enough for the table when piped to a file.
out = Console() if sys.stdout.isatty() else Console(width=160)


# -- the fleet -------------------------------------------------------------------------------------------------


def export_and_register(mlflow_url: str, work: Path) -> str:
    """Export one small cpu-fp32 bundle and register it; returns its version."""
    with contextlib.redirect_stdout(sys.stderr):  # Ultralytics and MLflow print; stdout is for the figures
        return _export_and_register(mlflow_url, work)


def _export_and_register(mlflow_url: str, work: Path) -> str:
    from exporters.export import ExportRequest, export_bundle
    from registry.mlflow_gateway import MlflowGateway

    result = export_bundle(
        ExportRequest(
            model="yolov8n.yaml", out_dir=work / "bundle", imgsz=(64, 64), variants=("cpu-fp32",), name=MODEL_NAME
        ),
        progress=lambda msg: console.print(f"  {msg}", highlight=False),
    )
    if not result.passed:
        raise RuntimeError(f"the benchmark bundle failed its gates: {result.manifest.gates}")
    return MlflowGateway(mlflow_url).register_bundle(work / "bundle", MODEL_NAME).version.version


def _progress() -> Progress:
    return Progress(
        TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


async def _each(count: int, concurrency: int, description: str, step: Callable[[int], Awaitable[None]]) -> float:
    """Run ``step(index)`` for every index with ``concurrency`` at a time, with a progress bar; returns seconds.

    A step whose connection breaks is run again (up to twice): both steps here are idempotent, and a connection
    reset during set-up (seen now and then on a loaded machine) is not what this benchmark measures. Retries are
    reported.
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)
    broken: list[str] = []
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task(description, total=count)

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                for attempt in range(3):
                    try:
                        await step(index)
                        break
                    except httpx.TransportError as exc:
                        broken.append(f"{time.perf_counter() - started:.1f} s: {exc!r}")
                        if attempt == 2:
                            raise
                progress.advance(task)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if broken:
        console.print(f"  [yellow]{description}: {len(broken)} step(s) retried after a broken connection[/yellow]")
        for line in broken[:5]:
            console.print(f"    at {line}")
    return time.perf_counter() - started


async def enroll(url: str, count: int, concurrency: int, fingerprint: dict[str, Any]) -> tuple[list[Device], float]:
    """Enroll ``count`` devices through the REST API; returns them (without ETags yet) and the seconds it took."""
    devices: list[Device | None] = [None] * count
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(index: int) -> None:
            device_id = f"bench-{index:06d}"
            body = enrollment_body(
                DeviceKey.generate(),
                device_id,
                fingerprint=fingerprint,
                labels={"line": f"line-{index % 20}", "site": "bench"},
                enrollment_token=TOKENS.enrollment,
            )
            answer = await client.post("/v1/devices/enroll", json=body)
            if answer.status_code != 200:
                raise RuntimeError(f"enrolling {device_id}: HTTP {answer.status_code} {answer.text[:300]}")
            devices[index] = Device(device_id, answer.json()["device_token"], etag="")

        seconds = await _each(count, concurrency, "enrolling devices", one)
    return [d for d in devices if d is not None], seconds


async def learn_etags(url: str, devices: list[Device], version: str, concurrency: int) -> float:
    """Poll every device once (200 path, cold caches after the rollout) and keep its ETag; returns seconds."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(index: int) -> None:
            device = devices[index]
            answer = await client.get(
                f"/v1/devices/{device.device_id}/desired", headers={"Authorization": f"Bearer {device.token}"}
            )
            state = answer.json() if answer.status_code == 200 else {}
            if state.get("version") != version or not state.get("files") or not answer.headers.get("ETag"):
                raise RuntimeError(f"{device.device_id}: no desired state for version {version}: {answer.text[:300]}")
            device.etag = answer.headers["ETag"]

        return await _each(len(devices), concurrency, "first poll of every device", one)


def _operator(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKENS.operator}"}, timeout=60)


def start_rollout(url: str, version: str) -> int:
    with _operator(url) as client:
        answer = client.post("/v1/rollouts", json={"model": MODEL_NAME, "version": version, "strategy": "immediate"})
    if answer.status_code != 201:
        raise RuntimeError(f"creating the rollout: HTTP {answer.status_code} {answer.text[:300]}")
    return int(answer.json()["id"])


def audit_since(url: str, after_id: int) -> list[dict[str, Any]]:
    """Audit entries newer than ``after_id``: anything there changed the state generation mid-run."""
    with _operator(url) as client:
        entries = client.get("/v1/audit", params={"limit": 50}).raise_for_status().json()["entries"]
    return [e for e in entries if e["id"] > after_id]


# -- figures ---------------------------------------------------------------------------------------------------


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def figures(result: LoadResult, processes: int) -> dict[str, Any]:
    ordered = sorted(result.latencies_ms)
    window = result.window_s
    cores = os.cpu_count() or 1
    server_pct = 100 * result.server_cpu_s / window
    loadgen_pct = 100 * result.loadgen_cpu_s / window / processes  # per generator process (each is one thread)
    machine_pct = 100 * result.machine_busy_s / window / cores
    # PostgreSQL, MLflow, and everyone else's processes on this machine.
    others_pct = 100 * (result.machine_busy_s - result.server_cpu_s - result.loadgen_cpu_s) / window
    if server_pct >= SATURATED_PCT:
        bound = "server"
    elif loadgen_pct >= SATURATED_PCT:
        bound = "load generator"
    elif machine_pct >= 90:
        bound = "machine"  # every core busy: server and generator wait for CPU
    else:
        bound = "unclear"  # nothing at its limit: locks, I/O, or too few connections
    return {
        "requests_per_s": result.rate,
        "requests": result.completed,
        "p50_ms": _percentile(ordered, 0.50),
        "p99_ms": _percentile(ordered, 0.99),
        "errors": result.errors,
        "statuses": result.statuses,
        "error_samples": result.error_samples,
        "server_cpu_pct": server_pct,
        "server_cpu_us_per_request": 1e6 * result.server_cpu_s / result.completed if result.completed else None,
        "loadgen_cpu_pct": loadgen_pct,
        "machine_busy_pct": machine_pct,
        "other_processes_cpu_pct": others_pct,
        "bound": bound,
    }


def verdict(phases: dict[str, dict[str, Any]], devices: int) -> dict[str, Any]:
    trivial, steady = phases["healthz"], phases["desired-304"]
    ratio = steady["requests_per_s"] / trivial["requests_per_s"] if trivial["requests_per_s"] else 0.0
    cost_ratio = None
    if steady["server_cpu_us_per_request"] and trivial["server_cpu_us_per_request"]:
        cost_ratio = trivial["server_cpu_us_per_request"] / steady["server_cpu_us_per_request"]
    needed = devices / POLL_INTERVAL_S
    return {
        "ratio_304_vs_trivial": ratio,
        "ratio_passed": ratio >= TARGET_RATIO,
        "cpu_cost_ratio_trivial_vs_304": cost_ratio,
        "needed_polls_per_s": needed,
        "rate_passed": steady["requests_per_s"] >= needed,
        "errors": sum(p["errors"] for p in phases.values()),
    }


_COLUMNS = (
    ("endpoint", "left"),
    ("req/s", "right"),
    ("p50 ms", "right"),
    ("p99 ms", "right"),
    ("errors", "right"),
    ("server CPU %", "right"),
    ("server µs/req", "right"),
    ("loadgen CPU %", "right"),
    ("machine busy %", "right"),
    ("vs trivial", "right"),
    ("bound by", "left"),
)


def print_backend(backend: str, report: dict[str, Any]) -> None:
    phases = report["phases"]
    trivial = phases["healthz"]["requests_per_s"]
    table = Table(
        title=f"{backend}: {report['devices']} devices, {report['concurrency']} connections from "
        f"{report['load_processes']} {report['client']} load process(es), {report['duration_s']:g} s per endpoint",
        caption="CPU %: of one core; server µs/req: server CPU time per answer; loadgen: per process; "
        "machine busy: all cores, everyone's processes",
    )
    for name, justify in _COLUMNS:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for endpoint, p in phases.items():
        us = p["server_cpu_us_per_request"]
        table.add_row(
            endpoint,
            f"{p['requests_per_s']:.0f}",
            f"{p['p50_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
            f"{p['errors']}" if not p["errors"] else f"[red]{p['errors']}[/red]",
            f"{p['server_cpu_pct']:.0f}",
            f"{us:.0f}" if us else "-",
            f"{p['loadgen_cpu_pct']:.0f}",
            f"{p['machine_busy_pct']:.0f}",
            f"{p['requests_per_s'] / trivial:.2f}" if trivial else "-",
            p["bound"],
        )
    out.print(table)
    v = report["verdict"]
    mark = {True: "[green]PASS[/green]", False: "[red]FAIL[/red]"}
    cost = v["cpu_cost_ratio_trivial_vs_304"]
    cost_text = f"{cost:.2f}" if cost is not None else "-"
    out.print(
        f"verdict {backend}: 304 rate / trivial rate = {v['ratio_304_vs_trivial']:.2f} >= {TARGET_RATIO:.2f} "
        f"{mark[v['ratio_passed']]} (server CPU per request, trivial / 304 = {cost_text}); "
        f"304 rate {phases['desired-304']['requests_per_s']:.0f}/s >= {v['needed_polls_per_s']:.0f}/s "
        f"({report['devices']} devices every {POLL_INTERVAL_S} s) {mark[v['rate_passed']]}; errors {v['errors']}"
    )
    for endpoint, p in phases.items():
        if p["bound"] != "server":
            out.print(
                f"  note: {endpoint} was bound by: {p['bound']}, not the server (server {p['server_cpu_pct']:.0f}% "
                f"of a core, generator {p['loadgen_cpu_pct']:.0f}% per process, other processes "
                f"{p['other_processes_cpu_pct']:.0f}%): its rate is a floor; compare server µs/req instead"
            )
        if p["error_samples"]:
            out.print(f"  [red]{endpoint} errors[/red]: {p['statuses']}; e.g. {p['error_samples']}")
    if report["state_changes"]:
        out.print(
            f"  [yellow]warning[/yellow]: the desired state changed during the measurement, caches were rebuilt: "
            f"{[(e['actor'], e['action']) for e in report['state_changes']]}"
        )


# -- one backend -----------------------------------------------------------------------------------------------


def measure_backend(
    backend: str, database_url: str, mlflow_url: str, version: str, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    from exporters.fingerprint import collect

    with contextlib.ExitStack() as stack:
        console.print(f"[bold]{backend}[/bold]: starting the rollout service")
        settings = {"DATABASE_URL": database_url, "MLFLOW_URI": mlflow_url, "WATCH_MODELS": MODEL_NAME}
        service = start_service(
            work, TOKENS, {**settings, **SERVICE_SETTINGS}, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}, verbose=True
        )
        stack.callback(service.stop)
        stack.push(lambda kind, exc, tb: _show_log(service, exc))
        fingerprint = collect().model_dump(mode="json")
        devices, enroll_s = asyncio.run(enroll(service.url, args.devices, args.concurrency, fingerprint))
        rollout_id = start_rollout(service.url, version)
        first_poll_s = asyncio.run(learn_etags(service.url, devices, version, args.concurrency))
        devices_file = work / "devices.json"
        save_devices(devices_file, devices)
        last_audit = max((e["id"] for e in audit_since(service.url, 0)), default=0)
        console.print(
            f"  {len(devices)} devices enrolled in {enroll_s:.1f} s ({len(devices) / enroll_s:.0f}/s), rollout "
            f"{rollout_id} of version {version}; first polls {len(devices) / first_poll_s:.0f}/s (httpx, cold)"
        )
        totals: dict[str, list[LoadResult]] = {name: [] for name in ENDPOINTS}
        for round_index in range(args.rounds):
            for endpoint in ENDPOINTS:
                console.print(
                    f"  round {round_index + 1}/{args.rounds} {endpoint}: {args.warmup_s:g} s warm-up, "
                    f"{args.duration_s:g} s measured"
                )
                result = run_load(
                    url=service.url,
                    endpoint=endpoint,
                    devices_file=devices_file,
                    work_dir=work,
                    server_pid=service.process.pid,
                    connections=args.concurrency,
                    processes=args.load_processes,
                    warmup_s=args.warmup_s,
                    duration_s=args.duration_s,
                    client=args.client,
                )
                if result.worst_late_s >= args.warmup_s:
                    raise RuntimeError(f"a load worker started {result.worst_late_s:.1f} s late, after the warm-up")
                totals[endpoint].append(result)
        changes = audit_since(service.url, last_audit)
    phases = {name: figures(_pool(results), args.load_processes) for name, results in totals.items()}
    return {
        "devices": len(devices),
        "concurrency": args.concurrency,
        "load_processes": args.load_processes,
        "client": args.client,
        "duration_s": args.duration_s * args.rounds,
        "enroll_per_s": len(devices) / enroll_s,
        "first_poll_per_s": len(devices) / first_poll_s,
        "phases": phases,
        "verdict": verdict(phases, len(devices)),
        "state_changes": changes,
    }


def _show_log(service: RunningServer, exc: BaseException | None) -> bool:
    """On a failure, show why the service misbehaved before its folder goes."""
    if exc is not None and not isinstance(exc, KeyboardInterrupt):
        code = service.process.poll()
        state = "running" if code is None else f"exited with {code}"
        console.print(f"[red]rollout service ({state}), end of its log:[/red]\n{service.log_tail(4000)}")
    return False


def _pool(results: list[LoadResult]) -> LoadResult:
    """The rounds of one endpoint as one window: counts and CPU add up, latencies pool."""
    first = results[0]
    for extra in results[1:]:
        first.latencies_ms.extend(extra.latencies_ms)
        first.window_s += extra.window_s
        first.completed += extra.completed
        first.errors += extra.errors
        first.error_samples += extra.error_samples
        first.loadgen_cpu_s += extra.loadgen_cpu_s
        first.server_cpu_s += extra.server_cpu_s
        first.machine_busy_s += extra.machine_busy_s
        for key, count in extra.statuses.items():
            first.statuses[key] = first.statuses.get(key, 0) + count
    return first


# -- main ------------------------------------------------------------------------------------------------------


def _backends(choice: str, work: Path, stack: contextlib.ExitStack) -> dict[str, str]:
    urls: dict[str, str] = {}
    if choice in ("sqlite", "both"):
        urls["sqlite"] = f"sqlite:///{work / 'sqlite' / 'rollouts.db'}"
    if choice in ("postgresql", "both"):
        if postgres_reachable():
            name = f"yolo_ota_bench_server_{os.getpid()}"
            urls["postgresql"] = create_postgres_database(name)
            stack.callback(drop_postgres_database, name)
        else:
            console.print("[yellow]PostgreSQL is not reachable (YOLO_OTA_TEST_POSTGRES); skipping it[/yellow]")
    return urls


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per endpoint and round")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the three endpoints, interleaved")
    parser.add_argument("--concurrency", type=int, default=32, help="keep-alive connections, all processes together")
    parser.add_argument("--load-processes", type=int, default=1, help="load-generator processes")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="see bench/loadgen.py")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder with the servers' logs")
    args = parser.parse_args()
    if args.devices < 1 or args.concurrency < args.load_processes or args.warmup_s <= 0:
        parser.error("need --devices >= 1, --concurrency >= --load-processes and --warmup-s > 0")
    # Ctrl-C and SIGTERM raise at once, also inside the event loops. asyncio.run's own SIGINT handling only cancels
    # the main task, and a Ctrl-C during enrollment was seen to be lost that way (the run went on).
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    reports: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="yolo-ota-bench-server-"))
        if args.keep_work:
            stack.callback(console.print, f"kept {work} (service and MLflow logs)")
        else:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        os.environ.setdefault("YOLO_OFFLINE", "true")
        os.environ.setdefault("YOLO_CONFIG_DIR", str(work / "ultralytics"))
        load1, _, _ = os.getloadavg()
        console.print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load average {load1:.2f} before the run"
        )
        backends = _backends(args.backend, work, stack)
        if not backends:
            console.print("[red]no backend to measure[/red]")
            return 1
        console.print("starting MLflow and registering the benchmark bundle")
        started = time.perf_counter()
        mlflow = start_mlflow(work / "mlflow")
        stack.callback(mlflow.stop)
        version = export_and_register(mlflow.url, work)
        console.print(f"  {MODEL_NAME} version {version} registered ({time.perf_counter() - started:.0f} s)")
        for backend, database_url in backends.items():
            reports[backend] = measure_backend(backend, database_url, mlflow.url, version, args, work / backend)
            print_backend(backend, reports[backend])
    if args.json:
        machine = {"arch": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
        settings = {"service": SERVICE_SETTINGS, **{k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"machine": machine, "settings": settings, "backends": reports}, indent=2))
    return 0 if all(r["verdict"]["errors"] == 0 for r in reports.values()) else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        logging.getLogger("asyncio").disabled = True  # no "Task exception was never retrieved" for the interrupt
        console.print("interrupted; servers stopped and temporary files removed")
        raise SystemExit(130) from None
