"""Detect latency of the device serving path against the agent's current path, and camera throughput with and
without micro-batching.

    uv run --all-extras python bench/gpu_serve.py --out gpu_serve.json [--bundle DIR | --model yolov8n.yaml]
        [--imgsz 640] [--device cuda|cpu] [--iters 200] [--warmup 20] [--cameras 4] [--frames 100]
        [--max-wait-ms 1.5]

Without ``--bundle`` the model is exported at ``--imgsz`` (``exporters.export.export_bundle``, as bench/serve.py
does) with the variants of ``--device``: cuda-fp32 and cuda-fp16 on CUDA, cpu-fp32 on the CPU. For each variant
of the bundle that runs on ``--device``, on ultralytics' bus.jpg and zidane.jpg (decoded once, so JPEG decoding
is in no figure), in interleaved rounds so that the machine's drift touches every path alike:

- bare forward: the TorchScript module on a ready input tensor on the device (synchronised);
- agent path: ``edge_agent.runtime.LoadedModel.detect``: OpenCV letterbox, float32 upload, forward, the whole
  raw output to the host, decode + NMS there;
- device pipeline: ``edge_agent.device_pipeline.DevicePipeline.detect`` without and with a CUDA graph
  (on the CPU both are the plain forward).

Then cameras: threads that each run ``--frames`` detections back to back through an
``edge_agent.micro_batcher.MicroBatcher`` over the device pipeline: 1 camera at batch 1, N cameras at batch 1
(concurrency alone), N cameras gathered into batches of N (the batched forward runs the batch-1 TorchScript at
batch N after checking that it gives the same raw output per image). Prints tables and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-ota-bench-"))

import numpy as np
import torch

from edge_agent.device_pipeline import DevicePipeline
from edge_agent.micro_batcher import MicroBatcher
from edge_agent.runtime import load_model
from exporters.bundle import Manifest, read_manifest
from exporters.export import ExportRequest, export_bundle
from exporters.formats import all_variants
from exporters.gates import first_tensor
from exporters.postprocess import Detections
from exporters.preprocess import letterbox, read_image, to_input_array
from exporters.variant_export import parse_formats

Forward = Callable[[torch.Tensor], object]
DEVICE_VARIANTS = {"cuda": ("cuda-fp32", "cuda-fp16"), "cpu": ("cpu-fp32",)}
ULTRALYTICS_LOADS = ("torchscript", "onnx")  # formats ``YOLO(file)`` reads (it has no AOTInductor loader)


def _images() -> list[np.ndarray]:
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    return [read_image(assets / name) for name in ("bus.jpg", "zidane.jpg")]


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _summary(values_ms: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values_ms)
    mean = float(array.mean())
    return {
        "p50_ms": float(np.percentile(array, 50)),
        "p99_ms": float(np.percentile(array, 99)),
        "mean_ms": mean,
        "fps": 1000.0 / mean if mean > 0 else 0.0,
    }


def _time_interleaved(paths: dict[str, Callable[[int], object]], iters: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call of each path, in interleaved rounds; each call gets the round number."""
    for fn in paths.values():
        for index in range(warmup):
            fn(index)
    timings: dict[str, list[float]] = {name: [] for name in paths}
    for index in range(iters):
        for name, fn in paths.items():
            started = time.perf_counter()
            fn(index)
            timings[name].append((time.perf_counter() - started) * 1000.0)
    return timings


def bench_variant(
    bundle: Path, manifest: Manifest, variant: str, images: list[np.ndarray], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], DevicePipeline]:
    """Latency rows of the four paths for one variant, and its graph pipeline (for the cameras, whose batched
    pipeline wraps the same module: ``pipeline.graph.forward``)."""
    device = args.device
    loaded = load_model(bundle, manifest, variant, model="bench", version="1")
    plain = DevicePipeline.from_bundle(bundle, manifest, variant, cuda_graph=False)
    graph = DevicePipeline.from_bundle(bundle, manifest, variant, cuda_graph=True)
    ready = torch.from_numpy(to_input_array([letterbox(images[0], loaded.input_hw)[0]]))
    ready = ready.to(device=loaded.device, dtype=loaded.dtype)

    def bare(_: int) -> None:
        with torch.inference_mode():
            first_tensor(loaded.module(ready))
        _synchronize(device)

    paths: dict[str, Callable[[int], object]] = {
        "bare forward": bare,
        "agent path (LoadedModel.detect)": lambda i: loaded.detect(images[i % len(images)]),
        "device pipeline": lambda i: plain.detect(images[i % len(images)]),
        "device pipeline + CUDA graph": lambda i: graph.detect(images[i % len(images)]),
    }
    spec = all_variants(bundle, manifest)[variant]
    if spec.format in ULTRALYTICS_LOADS:
        predict = _ultralytics_predict(bundle / spec.path, device, spec.dtype == "float16")
        paths["Ultralytics YOLO(file).predict"] = lambda i: predict(images[i % len(images)])
    print(f"{variant}: timing {len(paths)} paths, {args.iters} interleaved rounds ...", flush=True)
    timings = _time_interleaved(paths, args.iters, args.warmup)
    rows = [{"variant": variant, "path": name, **_summary(values)} for name, values in timings.items()]
    rows[-1]["captured"] = graph.captured
    if graph.graph is not None and not graph.captured:
        rows[-1]["fallback_reason"] = graph.graph.fallback_reason
    return rows, graph


def _ultralytics_predict(path: Path, device: str, half: bool) -> Callable[[np.ndarray], object]:
    """``YOLO(path).predict`` on one BGR image, on ``device``; torch's CPU thread count kept (Ultralytics sets it)."""
    from ultralytics import YOLO

    threads = torch.get_num_threads()
    model = YOLO(str(path), task="detect")

    def predict(image: np.ndarray) -> object:
        result = model.predict(image, device="0" if device == "cuda" else "cpu", half=half, verbose=False)
        _synchronize(device)
        return result

    predict(np.full((64, 64, 3), 114, dtype=np.uint8))  # sets up its predictor (and the thread count)
    torch.set_num_threads(threads)
    return predict


def _batch_runs_like_singles(batched: DevicePipeline, single: DevicePipeline, images: list[np.ndarray]) -> bool:
    """Whether the forward at ``batched.batch`` gives each image about the raw output it gets alone: a file traced
    at batch 1 may have frozen its batch size (the error would be gross, so the tolerance is loose)."""
    chosen = [images[i % len(images)] for i in range(batched.batch)]
    try:
        together = batched.raw(chosen)[0].float()
    except Exception as exc:  # torch.jit.Error is no RuntimeError; any failure means the same here
        print(f"  batch {batched.batch} fails: {' '.join(str(exc).split())[:200]}", flush=True)
        return False
    alone = torch.cat([single.raw([image])[0] for image in chosen]).float()
    if together.shape != alone.shape:
        return False
    relative = float((together - alone).abs().max() / alone.abs().max().clamp(min=1e-6))
    return relative <= (1e-2 if single.dtype == torch.float16 else 1e-3)


def _run_cameras(
    batcher: MicroBatcher[np.ndarray, Detections], cameras: int, frames: int, images: list[np.ndarray]
) -> float:
    """Wall seconds for ``cameras`` threads to get ``frames`` detections each through ``batcher``."""
    start = threading.Barrier(cameras + 1)
    errors: list[BaseException] = []

    def camera(index: int) -> None:
        start.wait()
        try:
            for frame in range(frames):
                batcher.submit(images[(index + frame) % len(images)])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=camera, args=(i,)) for i in range(cameras)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed_s = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed_s


def bench_cameras(
    single: DevicePipeline, forward: Forward, images: list[np.ndarray], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Throughput of 1 camera, N cameras one at a time, and N cameras micro-batched."""
    batched = DevicePipeline(
        forward,
        device=single.device,
        dtype=single.dtype,
        input_hw=single.input_hw,
        batch=args.cameras,
        thresholds=single.thresholds,
        cuda_graph=True,
    )
    setups: list[tuple[str, DevicePipeline, int]] = [
        ("1 camera, batch 1", single, 1),
        (f"{args.cameras} cameras, batch 1", single, args.cameras),
    ]
    if _batch_runs_like_singles(batched, single, images):
        setups.append((f"{args.cameras} cameras, micro-batched to {args.cameras}", batched, args.cameras))
    else:
        print(f"  the variant does not run at batch {args.cameras} like at batch 1: no micro-batched run", flush=True)
    rows: list[dict[str, Any]] = []
    for label, pipeline, cameras in setups:
        print(f"  {label}: {args.frames} frames per camera ...", flush=True)
        with MicroBatcher(pipeline.detect_batch, pipeline.batch, max_wait_s=args.max_wait_ms / 1000.0) as batcher:
            _run_cameras(batcher, cameras, min(args.frames, args.warmup), images)  # warm-up, also of the graph
            warm = batcher.stats
            elapsed_s = _run_cameras(batcher, cameras, args.frames, images)
            stats = batcher.stats
        frames = cameras * args.frames
        batches = stats.batches - warm.batches
        rows.append(
            {
                "setup": label,
                "cameras": cameras,
                "max_batch": pipeline.batch,
                "captured": pipeline.captured,
                "frames": frames,
                "seconds": elapsed_s,
                "fps": frames / elapsed_s,
                "mean_batch": frames / batches if batches else 0.0,
            }
        )
    base = rows[0]["fps"]
    for row in rows:
        row["fps_vs_1_camera"] = row["fps"] / base
    return rows


def _export(args: argparse.Namespace, out: Path) -> Path:
    variants = DEVICE_VARIANTS[args.device]
    formats = parse_formats(args.formats)
    print(f"exporting {args.model} at {args.imgsz} px ({', '.join(variants)}; {', '.join(formats)}) ...", flush=True)
    result = export_bundle(
        ExportRequest(model=args.model, out_dir=out, imgsz=(args.imgsz, args.imgsz), variants=variants,
                      formats=formats),
        progress=lambda line: print(f"  {line}", flush=True),
    )  # fmt: skip
    for name, reason in result.manifest.skipped_variants.items():
        print(f"  skipped {name}: {reason}", flush=True)
    return out


def _machine(device: str) -> dict[str, Any]:
    machine: dict[str, Any] = {
        "platform": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
        machine["cuda"] = torch.version.cuda
    return machine


def _print_tables(result: dict[str, Any]) -> None:
    machine = result["machine"]
    print(f"\nmachine: {machine}; {result['imgsz']} px; {result['iters']} rounds")
    print("\n| variant | path | p50 ms | p99 ms | mean ms | FPS | agent p50 / p50 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in result["latency"]:
        agent = next(
            r["p50_ms"] for r in result["latency"] if r["variant"] == row["variant"] and r["path"].startswith("agent")
        )
        note = "" if row.get("captured", True) else " (not captured)"
        print(
            f"| {row['variant']} | {row['path']}{note} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['mean_ms']:.2f} | {row['fps']:.0f} | {agent / row['p50_ms']:.2f}x |"
        )
    print("\n| variant | cameras | FPS (all cameras) | mean batch | vs 1 camera |")
    print("|---|---|---:|---:|---:|")
    for row in result["cameras"]:
        print(
            f"| {row['variant']} | {row['setup']} | {row['fps']:.0f} | {row['mean_batch']:.2f} | "
            f"{row['fps_vs_1_camera']:.2f}x |"
        )


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, help="an exported bundle directory")
    source.add_argument("--model", default="yolov8n.yaml", help="exported first when no --bundle is given")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--frames", type=int, default=100, help="detections per camera")
    parser.add_argument("--max-wait-ms", type=float, default=1.5)
    parser.add_argument("--formats", default="torchscript,aoti,onnx", help="formats to export (without --bundle)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (use --device cpu for a smoke run)")
    return args


def main() -> int:
    args = _arguments()
    images = _images()
    with tempfile.TemporaryDirectory(prefix="yolo-ota-gpu-serve-") as tmp:
        bundle = args.bundle or _export(args, Path(tmp) / "bundle")
        manifest = read_manifest(bundle)
        every = all_variants(bundle, manifest)
        variants = sorted(name for name, v in every.items() if v.device == args.device)
        if not variants:
            raise SystemExit(f"{bundle} has no {args.device} variant (it has {', '.join(every)})")
        latency: list[dict[str, Any]] = []
        cameras: list[dict[str, Any]] = []
        for variant in variants:
            rows, pipeline = bench_variant(bundle, manifest, variant, images, args)
            latency += rows
            print(f"{variant}: cameras ...", flush=True)
            forward = pipeline.graph.forward if pipeline.graph is not None else pipeline.forward  # the module
            cameras += [{"variant": variant, **row} for row in bench_cameras(pipeline, forward, images, args)]
    result = {
        "machine": _machine(args.device),
        "bundle": str(args.bundle) if args.bundle else f"{args.model} exported at {args.imgsz}",
        "imgsz": int(manifest.imgsz[0]),
        "iters": args.iters,
        "max_wait_ms": args.max_wait_ms,
        "latency": latency,
        "cameras": cameras,
    }
    _print_tables(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
