"""Export benchmark: export and gate time per variant, and eager vs TorchScript latency side by side.

    uv run --all-extras python bench/export.py --model yolov8n.yaml --imgsz 640

Every variant this machine can make is exported through ``yolo-ota``'s exporter (CUDA ones only with a GPU).
Then the eager model and each TorchScript variant are timed in the same process, interleaved in rounds so that
a change in machine load hits all of them alike: CPU with ``perf_counter``; CUDA with CUDA events, after
warm-up and synchronize. Prints Markdown tables for docs/benchmarks.md; ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-ota-bench-"))

import torch

from exporters import yolo
from exporters.export import ExportRequest, export_bundle
from exporters.fingerprint import collect, cuda_usable
from exporters.gates import first_tensor, measure_latency
from exporters.runtime import load_torchscript


def _time_side_by_side(
    models: dict[str, tuple[object, torch.Tensor]], rounds: int, iters: int, warmup: int
) -> dict[str, dict[str, float]]:
    per_model: dict[str, list[float]] = {name: [] for name in models}
    p99: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, (model, example) in models.items():
            stats = measure_latency(model, example, warmup_iters=warmup, timed_iters=iters)  # type: ignore[arg-type]
            per_model[name].append(stats.p50_ms)
            p99[name].append(stats.p99_ms)
    return {
        name: {"p50_ms": statistics.median(values), "p99_ms": max(p99[name]), "rounds": rounds, "iters": iters}
        for name, values in per_model.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ("cpu-fp32", "cuda-fp32", "cuda-fp16") if cuda_usable() else ("cpu-fp32",)
    fingerprint = collect()

    with tempfile.TemporaryDirectory(prefix="yolo-ota-bench-") as tmp:
        t0 = time.perf_counter()
        result = export_bundle(
            ExportRequest(
                model=args.model, out_dir=Path(tmp) / "bundle", imgsz=(args.imgsz, args.imgsz), variants=variants
            ),
            progress=lambda msg: print(f"  {msg}", file=sys.stderr),
        )
        total_s = time.perf_counter() - t0
        detector = yolo.load_detector(args.model)
        eager = yolo.eager_model(detector)
        x = torch.rand(1, 3, args.imgsz, args.imgsz, generator=torch.Generator().manual_seed(0))
        models: dict[str, tuple[object, torch.Tensor]] = {
            "eager fp32 (cpu)": (lambda t: first_tensor(eager(t)), x),
            "torchscript cpu-fp32": (
                load_torchscript(result.bundle_dir / "variants/cpu-fp32/model.torchscript", "cpu"),
                x,
            ),
        }
        if cuda_usable():
            eager_cuda = yolo.eager_model(detector).cuda()
            xc = x.cuda()
            models["eager fp32 (cuda)"] = (lambda t: first_tensor(eager_cuda(t)), xc)
            for name, dtype in (("cuda-fp32", torch.float32), ("cuda-fp16", torch.float16)):
                module = load_torchscript(result.bundle_dir / f"variants/{name}/model.torchscript", "cuda:0")
                models[f"torchscript {name}"] = (module, xc.to(dtype))
        latency = _time_side_by_side(models, args.rounds, args.iters, warmup=10)
        gates = {name: g.model_dump(mode="json") for name, g in result.manifest.gates.items()}

    print(
        f"\nmachine: {fingerprint.summary()}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    print(f"model {args.model} at {args.imgsz}x{args.imgsz}, batch 1; whole export {total_s:.1f} s\n")
    print("| variant | export s | gate s | raw MSE | detections matched | p50 ms (gate) | p99 ms (gate) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, g in result.manifest.gates.items():
        stats = g.latency.stats[0]
        print(
            f"| {name} | {result.export_s[name]:.2f} | {result.gate_s[name]:.2f} | {g.raw_parity.mse:.2e} | "
            f"{g.detection_parity.matched}/{g.detection_parity.reference_detections} | {stats.p50_ms:.1f} | "
            f"{stats.p99_ms:.1f} |"
        )
    base = latency["eager fp32 (cpu)"]["p50_ms"]
    print(f"\nSide by side, {args.rounds} interleaved rounds of {args.iters} timed runs (median of round p50s):\n")
    print("| model | p50 ms | worst p99 ms | vs eager cpu |")
    print("|---|---:|---:|---:|")
    for name, figures in latency.items():
        print(f"| {name} | {figures['p50_ms']:.2f} | {figures['p99_ms']:.2f} | {base / figures['p50_ms']:.2f}x |")
    for name, g in result.manifest.gates.items():
        if g.memory:
            print(f"\nMemory sweep {name} ({g.memory.stopped_because}):\n")
            print("| batch | peak MiB | FPS |\n|---:|---:|---:|")
            for point in g.memory.points:
                print(f"| {point.batch} | {point.peak_bytes / 2**20:.0f} | {point.fps:.0f} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "fingerprint": fingerprint.model_dump(mode="json"),
                    "export_s": result.export_s,
                    "gate_s": result.gate_s,
                    "total_s": total_s,
                    "latency": latency,
                    "gates": gates,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
