"""Detect latency and failures while the agent swaps versions under steady load.

    uv run --all-extras python bench/swap.py [--imgsz 640] [--swaps 4] [--clients 1] [--baseline-s 15]

Starts the real stack on loopback (MLflow server, rollout service, one ``yolo-ota agent`` process), registers two
versions of a YOLOv8n export, and keeps ``--clients`` closed-loop clients posting ultralytics' bus.jpg to the
agent's ``POST /v1/detect``. After a baseline window it rolls out the other version ``--swaps`` times. For each
swap it reports the time from the desired-state change (the rollout's creation) to the first answer from the new
version, the time to commit, the p50/p99 of requests during that window, and failed requests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-ota-bench-"))

import httpx
import numpy as np

from exporters.bundle import read_manifest, write_manifest
from exporters.export import ExportRequest, export_bundle
from yolo_ota.processes import RunningServer, started
from yolo_ota.servers import ServiceTokens, launch_agent, start_mlflow, start_service

MODEL = "bench-line"
# Seconds, not the minutes a factory would use: a swap's figures are the agent's, not the loops' waits.
SERVICE_SETTINGS = {
    "WATCH_MODELS": MODEL,
    "POLL_INTERVAL_S": "1",
    "SCHEDULER_INTERVAL_S": "0.25",
    "ALIAS_POLL_INTERVAL_S": "1",
    "STATE_CHECK_INTERVAL_S": "0.1",
    "HEARTBEAT_FLUSH_S": "0.5",
}
AGENT_SETTINGS = {
    "POLL_INTERVAL_S": "0.5",
    "POLL_JITTER": "0.2",
    "BACKOFF_MAX_S": "1.5",
    "REPORT_INTERVAL_S": "0.5",
    "HTTP_TIMEOUT_S": "10",
    "PROBATION_S": "3",
    "PROBATION_INFERENCES": "50",
    "PROBATION_MIN_INFERENCES": "10",
    "MEMORY_HEADROOM": "0.05",
    "MIN_FREE_BYTES": "0",
}


@dataclass(frozen=True)
class Answer:
    started: float
    ended: float
    ok: bool
    version: str | None


def stats(answers: list[Answer]) -> tuple[float, float, int, int]:
    latencies = np.array([(a.ended - a.started) * 1000 for a in answers if a.ok] or [0.0])
    return (
        float(np.percentile(latencies, 50)),
        float(np.percentile(latencies, 99)),
        len(answers),
        sum(not a.ok for a in answers),
    )


def wait_serving(agent: RunningServer, version: str, timeout_s: float) -> None:
    """Until the agent's ``/v1/status`` says it serves ``version`` and is idle (committed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not agent.running:
            raise RuntimeError(f"the agent exited with {agent.process.returncode}:\n{agent.log_tail()}")
        status = httpx.get(agent.url + "/v1/status", timeout=10).json()
        if status["state"] == "idle" and (status["serving"] or {}).get("version") == version:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the agent did not serve v{version} within {timeout_s:.0f} s:\n{agent.log_tail()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--baseline-s", type=float, default=15.0)
    args = parser.parse_args()
    import ultralytics

    image = (Path(ultralytics.__file__).parent / "assets" / "bus.jpg").read_bytes()
    root = Path(tempfile.mkdtemp(prefix="yolo-ota-swap-"))
    mlflow = service = agent = None
    try:
        print(f"exporting yolov8n.yaml at {args.imgsz} px ...", flush=True)
        first = root / "v1"
        export_bundle(ExportRequest(model="yolov8n.yaml", out_dir=first, imgsz=(args.imgsz, args.imgsz),
                                    variants=("cpu-fp32",), name=MODEL))  # fmt: skip
        second = root / "v2"
        shutil.copytree(first, second)
        manifest = read_manifest(second)  # same model, another manifest: the registry refuses duplicates
        write_manifest(second, manifest.model_copy(update={"latency_budget_ms": 60_000.0}))
        mlflow = start_mlflow(root / "mlflow")
        from registry.mlflow_gateway import MlflowGateway

        gateway = MlflowGateway(mlflow.url)
        versions = [gateway.register_bundle(path, MODEL).version.version for path in (first, second)]
        tokens = ServiceTokens(operator_name="bench")
        service = start_service(root / "service", tokens, {**SERVICE_SETTINGS, "MLFLOW_URI": mlflow.url})
        agent = started(
            launch_agent(
                root / "agent", server_url=service.url, device_id="bench-0", enrollment_token=tokens.enrollment,
                labels={"lane": "bench"}, settings=AGENT_SETTINGS,
            ),
            timeout_s=60,
        )  # fmt: skip

        def roll_out(version: str) -> float:
            at = time.monotonic()
            body = {"model": MODEL, "version": version, "strategy": "immediate",
                    "selector": {"labels": {"lane": "bench"}}, "supersede": True}  # fmt: skip
            headers = {"Authorization": f"Bearer {tokens.operator}"}
            httpx.post(service.url + "/v1/rollouts", json=body, headers=headers, timeout=30).raise_for_status()
            return at

        roll_out(versions[0])
        wait_serving(agent, versions[0], timeout_s=300)
        answers: list[Answer] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        response = http.post(agent.url + "/v1/detect", content=image)
                        ok = response.status_code == 200
                        version = response.json().get("version") if ok else None
                    except httpx.HTTPError:
                        ok, version = False, None
                    answers.append(Answer(started, time.monotonic(), ok, version))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        time.sleep(args.baseline_s)
        baseline = [a for a in answers]
        rows = []
        for swap in range(args.swaps):
            target = versions[(swap + 1) % 2]
            changed_at = roll_out(target)
            wait_serving(agent, target, timeout_s=300)
            committed_at = time.monotonic()
            first_new = min((a.ended for a in answers if a.version == target and a.started >= changed_at),
                            default=float("nan"))  # fmt: skip
            window = [a for a in answers if a.started >= changed_at and a.ended <= committed_at]
            rows.append((swap + 1, target, first_new - changed_at, committed_at - changed_at, *stats(window)))
            time.sleep(2.0)
        stop.set()
        for thread in threads:
            thread.join()
        p50, p99, count, failed = stats(baseline)
        print(f"\n{args.clients} closed-loop client(s), bus.jpg, yolov8n at {args.imgsz} px, cpu-fp32, "
              f"{os.cpu_count()} CPUs\n")  # fmt: skip
        window_s = f"{args.baseline_s:.0f} s"
        print(f"baseline ({window_s}): {count} requests, p50 {p50:.1f} ms, p99 {p99:.1f} ms, {failed} failed\n")
        print("| swap | to version | desired change -> first answer s | -> committed s | requests in window | "
              "p50 ms | p99 ms | p99 vs baseline | failed |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for number, target, to_first, to_commit, wp50, wp99, wcount, wfailed in rows:
            print(f"| {number} | v{target} | {to_first:.1f} | {to_commit:.1f} | {wcount} | {wp50:.1f} | {wp99:.1f} | "
                  f"{wp99 / p99:.2f}x | {wfailed} |")  # fmt: skip
        total_failed = sum(not a.ok for a in answers)
        print(f"\nall requests: {len(answers)}, failed: {total_failed}")
        return 0 if total_failed == 0 else 1
    finally:
        for process in (agent, service, mlflow):
            if process is not None:
                process.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
