"""Detect latency of the agent's serving path against the bare TorchScript forward and Ultralytics' predict.

    uv run --all-extras python bench/serve.py [--model yolov8n.yaml] [--imgsz 640] [--iters 100] [--device cpu|cuda]

One process, one exported bundle, the same image (ultralytics' bus.jpg), measured side by side in interleaved
rounds so that the machine's drift touches all three alike:

- bare forward: the TorchScript variant on an already letterboxed input tensor (what the latency gate times);
- agent detect: ``edge_agent.runtime.InferenceRuntime.detect_bytes``, the code behind ``POST /v1/detect``:
  JPEG decode, letterbox, forward, decode + NMS, boxes mapped back to the image;
- Ultralytics predict: ``YOLO(<the same .torchscript>).predict(bus.jpg)`` from the file path.

Prints p50/p99/mean per path and each path's overhead over the bare forward.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-ota-bench-"))

import numpy as np
import torch

from edge_agent.runtime import InferenceRuntime, load_model
from exporters.bundle import read_manifest, safe_join
from exporters.export import ExportRequest, export_bundle
from exporters.gates import first_tensor
from exporters.preprocess import decode_image_bytes, letterbox, to_input_array


def percentiles(values: list[float]) -> tuple[float, float, float]:
    array = np.array(values)
    return float(np.percentile(array, 50)), float(np.percentile(array, 99)), float(array.mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    import ultralytics
    from ultralytics import YOLO

    variant = "cuda-fp32" if args.device == "cuda" else "cpu-fp32"
    image_path = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
    image_bytes = image_path.read_bytes()
    with tempfile.TemporaryDirectory(prefix="yolo-ota-serve-") as tmp:
        bundle = Path(tmp) / "bundle"
        print(f"exporting {args.model} at {args.imgsz} px ({variant}) ...", flush=True)
        export_bundle(
            ExportRequest(model=args.model, out_dir=bundle, imgsz=(args.imgsz, args.imgsz), variants=(variant,))
        )
        manifest = read_manifest(bundle)
        loaded = load_model(bundle, manifest, variant, model="bench", version="1")
        runtime = InferenceRuntime()
        runtime.swap(loaded, keep_standby=False)
        padded, _ = letterbox(decode_image_bytes(image_bytes), loaded.input_hw)
        x = torch.from_numpy(to_input_array([padded])).to(loaded.device)
        module = loaded.module
        ultra = YOLO(str(safe_join(bundle, manifest.variants[variant].path)), task="detect")
        device = 0 if args.device == "cuda" else "cpu"

        def bare() -> None:
            with torch.inference_mode():
                first_tensor(module(x))
            if args.device == "cuda":
                torch.cuda.synchronize()

        def agent() -> None:
            runtime.detect_bytes(image_bytes)

        def predict() -> None:
            ultra.predict(str(image_path), imgsz=args.imgsz, device=device, verbose=False)

        paths = {"bare TorchScript forward": bare, "agent detect (decode+pre+forward+NMS)": agent,
                 "Ultralytics YOLO(file).predict": predict}  # fmt: skip
        timings: dict[str, list[float]] = {name: [] for name in paths}
        threads_used: dict[str, set[int]] = {name: set() for name in paths}
        threads = torch.get_num_threads()
        for fn in paths.values():
            for _ in range(args.warmup):
                fn()
        # Ultralytics' predictor sets torch's CPU threads to cpu_count - 1 when it is first set up (in the warm-up
        # above); put the process's own count back so that all three paths run with the same threads.
        torch.set_num_threads(threads)
        for _ in range(args.iters):  # interleaved rounds
            for name, fn in paths.items():
                started = time.perf_counter()
                fn()
                timings[name].append((time.perf_counter() - started) * 1000.0)
                threads_used[name].add(torch.get_num_threads())
    assert all(used == {threads} for used in threads_used.values()), threads_used
    base_p50 = percentiles(timings["bare TorchScript forward"])[0]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(f"\nmachine: {machine}; device {args.device}, {args.imgsz} px, {args.iters} interleaved rounds")
    print("\n| path | p50 ms | p99 ms | mean ms | p50 vs bare forward |\n|---|---:|---:|---:|---:|")
    for name, values in timings.items():
        p50, p99, mean = percentiles(values)
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {mean:.1f} | {p50 / base_p50:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
