"""The gates a variant must pass, at export and again on every device before a swap (DESIGN.md section 3).

- raw parity: TorchScript output vs the eager model's golden output (MSE, max abs error, cosine);
  fp32 passes at MSE <= ``raw_mse_max``; for fp16 the figures are reported but not judged.
- detection parity: decode + NMS both outputs, match boxes per image (same class, IoU >= ``det_iou_min``);
  the matched fraction must reach ``det_match_min`` each way.
- latency: warm-up, then timed runs; CUDA events with synchronize on a GPU, ``perf_counter`` on the CPU.
- memory (CUDA only): batch sweep 1, 2, 4, ... until out of memory or a limit; peak bytes and throughput.

Light module: torch, numpy and pydantic only; the edge agent runs exactly this code.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch

from exporters.errors import one_line
from exporters.gate_report import (
    DetectionParity,
    DeviceKind,
    GateThresholds,
    LatencyGate,
    LatencyStats,
    MemoryGate,
    MemoryPoint,
    RawParity,
    VariantGates,
)
from exporters.golden import Golden
from exporters.postprocess import Detections, box_iou, decode

log = logging.getLogger(__name__)

__all__ = [
    "DetectionParity",
    "GateThresholds",
    "LatencyGate",
    "LatencyStats",
    "MemoryGate",
    "MemoryPoint",
    "ProgressCallback",
    "RawParity",
    "VariantGates",
    "detection_parity",
    "measure_latency",
    "memory_sweep",
    "raw_parity",
    "run_gates",
]

ProgressCallback = Callable[[str], None]


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """Turn TF32 off while parity is measured: TF32 convolutions drift far past the fp32 threshold by design."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def first_tensor(output: object) -> torch.Tensor:
    """The detection tensor of a model's output (eager Ultralytics models return ``(y, features)``)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"model returned {type(output).__name__}, expected a tensor")
    return output


def run_batched(
    model: Callable[[torch.Tensor], object],
    inputs: np.ndarray,
    *,
    device: str,
    dtype: torch.dtype,
    batch: int,
) -> np.ndarray:
    """Run ``model`` over ``inputs`` in chunks of exactly ``batch`` (the last one padded); float32 outputs."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch):
            chunk = inputs[start : start + batch]
            real = len(chunk)
            if real < batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
            x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device=device, dtype=dtype)
            y = first_tensor(model(x))[:real]
            outputs.append(y.float().cpu().numpy())
    return np.concatenate(outputs, axis=0)


def raw_parity(
    candidate: np.ndarray,
    reference: np.ndarray,
    *,
    judged: bool,
    mse_max: float,
    reference_device: Literal["cpu", "cuda"] = "cpu",
) -> RawParity:
    """Compare raw outputs element-wise."""
    if candidate.shape != reference.shape:
        return RawParity(
            reference=reference_device, mse=math.inf, max_abs=math.inf, cosine=0.0, judged=judged, passed=False
        )
    a = candidate.astype(np.float64).ravel()
    b = reference.astype(np.float64).ravel()
    diff = a - b
    mse = float(np.mean(diff * diff)) if diff.size else 0.0
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(np.dot(a, b) / norms) if norms > 0 else 1.0
    finite = bool(np.isfinite(a).all())
    passed = finite and (mse <= mse_max if judged else True)
    return RawParity(reference=reference_device, mse=mse, max_abs=max_abs, cosine=cosine, judged=judged, passed=passed)


def match_count(reference: Detections, candidate: Detections, iou_min: float) -> int:
    """Greedy one-to-one matching by reference score: same class and IoU >= ``iou_min``."""
    if len(reference) == 0 or len(candidate) == 0:
        return 0
    iou = box_iou(reference.boxes, candidate.boxes)
    iou[reference.class_ids[:, None] != candidate.class_ids[None, :]] = -1.0
    taken = np.zeros(len(candidate), dtype=bool)
    matched = 0
    for row in np.argsort(-reference.scores, kind="stable"):
        scores = np.where(taken, -1.0, iou[row])
        best = int(np.argmax(scores))
        if scores[best] >= iou_min:
            taken[best] = True
            matched += 1
    return matched


def detection_parity(
    candidate_outputs: np.ndarray, reference: tuple[Detections, ...], thresholds: GateThresholds
) -> DetectionParity:
    """Decode ``candidate_outputs`` like the reference was decoded and match the boxes image by image."""
    candidates = decode(candidate_outputs, conf=thresholds.conf, iou=thresholds.nms_iou, max_det=thresholds.max_det)
    matched = sum(match_count(r, c, thresholds.det_iou_min) for r, c in zip(reference, candidates, strict=True))
    n_ref = sum(len(r) for r in reference)
    n_cand = sum(len(c) for c in candidates)
    frac_ref = matched / n_ref if n_ref else (1.0 if n_cand == 0 else 0.0)
    frac_cand = matched / n_cand if n_cand else (1.0 if n_ref == 0 else 0.0)
    passed = frac_ref >= thresholds.det_match_min and frac_cand >= thresholds.det_match_min
    return DetectionParity(
        reference_detections=n_ref,
        candidate_detections=n_cand,
        matched=matched,
        matched_fraction_reference=frac_ref,
        matched_fraction_candidate=frac_cand,
        passed=passed,
    )


def measure_latency(
    model: Callable[[torch.Tensor], object], example: torch.Tensor, *, warmup_iters: int, timed_iters: int
) -> LatencyStats:
    """Time ``model(example)``: warm-up first; CUDA events and synchronize on a GPU, ``perf_counter`` on CPU."""
    on_cuda = example.device.type == "cuda"
    times_ms: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup_iters):
            model(example)
        if on_cuda:
            torch.cuda.synchronize(example.device)
            for _ in range(timed_iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(example)
                end.record()
                end.synchronize()
                times_ms.append(float(start.elapsed_time(end)))
        else:
            for _ in range(timed_iters):
                t0 = time.perf_counter()
                model(example)
                times_ms.append((time.perf_counter() - t0) * 1000.0)
    values = np.array(times_ms)
    mean_ms = float(values.mean())
    batch = int(example.shape[0])
    return LatencyStats(
        batch=batch,
        iterations=timed_iters,
        timer="cuda-events" if on_cuda else "perf_counter",
        cpu_threads=torch.get_num_threads(),
        p50_ms=float(np.percentile(values, 50)),
        p90_ms=float(np.percentile(values, 90)),
        p99_ms=float(np.percentile(values, 99)),
        mean_ms=mean_ms,
        fps=batch * 1000.0 / mean_ms if mean_ms > 0 else math.inf,
    )


def memory_sweep(
    model: Callable[[torch.Tensor], object],
    sample: torch.Tensor,
    *,
    max_batch: int,
    time_limit_s: float,
    baseline_bytes: int = 0,
) -> MemoryGate:
    """Double the batch from 1 until out of memory, ``max_batch`` or ``time_limit_s``; peak memory per batch.

    ``baseline_bytes`` is what the process held before the model was loaded, so that the figures are the
    variant's own and not whatever else the process keeps on the GPU.
    """
    points: list[MemoryPoint] = []
    deadline = time.monotonic() + time_limit_s
    batch, stopped = 1, f"reached the batch limit {max_batch}"
    device = sample.device
    while batch <= max_batch:
        if time.monotonic() > deadline:
            stopped = f"time limit {time_limit_s:.0f} s"
            break
        try:
            x = sample[:1].expand(batch, *sample.shape[1:]).contiguous()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            stats = measure_latency(model, x, warmup_iters=2, timed_iters=5)
            points.append(
                MemoryPoint(
                    batch=batch,
                    peak_bytes=max(0, int(torch.cuda.max_memory_allocated(device)) - baseline_bytes),
                    fps=stats.fps,
                )
            )
        except torch.cuda.OutOfMemoryError:
            stopped = f"out of memory at batch {batch}"
            break
        except RuntimeError as exc:  # a traced graph that only takes its export batch
            stopped = f"batch {batch} refused: {one_line(exc, 120)}"
            break
        finally:
            torch.cuda.empty_cache()
        batch *= 2
    return MemoryGate(points=points, stopped_because=stopped, passed=bool(points))


def _latency_gate(
    model: Callable[[torch.Tensor], object], example: torch.Tensor, thresholds: GateThresholds, budget_ms: float | None
) -> LatencyGate:
    """Latency of ``example`` through ``model``, judged against ``budget_ms`` when there is one."""
    stats = [measure_latency(model, example, warmup_iters=thresholds.warmup_iters, timed_iters=thresholds.timed_iters)]
    passed = budget_ms is None or stats[0].p99_ms <= budget_ms
    return LatencyGate(budget_ms=budget_ms, stats=stats, passed=passed)


def run_gates(
    model: Callable[[torch.Tensor], object],
    golden: Golden,
    *,
    variant: str,
    device: str,
    dtype: torch.dtype,
    batch: int,
    thresholds: GateThresholds,
    latency_budget_ms: float | None,
    measured_on: str,
    memory_baseline_bytes: int = 0,
    sweep_memory: bool = True,
    progress: ProgressCallback | None = None,
) -> VariantGates:
    """Run every gate of one loaded variant against the golden data.

    ``memory_baseline_bytes``: CUDA memory the process held before the variant was loaded (see memory_sweep).
    ``sweep_memory=False`` skips the batch sweep: a device that is serving checks its headroom instead of
    pushing its GPU to out-of-memory.
    """
    say = progress or (lambda _msg: None)
    device_kind: DeviceKind = "cuda" if device.startswith("cuda") else "cpu"
    fp16 = dtype == torch.float16
    say(f"{variant}: parity on {len(golden.inputs)} golden inputs")
    with strict_fp32():
        outputs = run_batched(model, golden.inputs, device=device, dtype=dtype, batch=batch)
    reference, reference_device = golden.raw_reference(device_kind)
    raw = raw_parity(
        outputs, reference, judged=not fp16, mse_max=thresholds.raw_mse_max, reference_device=reference_device
    )
    det = detection_parity(outputs, golden.detections, thresholds)
    say(f"{variant}: latency ({thresholds.warmup_iters} warm-up + {thresholds.timed_iters} timed runs)")
    example = torch.from_numpy(np.repeat(golden.inputs[:1], batch, axis=0)).to(device=device, dtype=dtype)
    latency = _latency_gate(model, example, thresholds, latency_budget_ms)
    memory = None
    if device_kind == "cuda" and sweep_memory:
        say(f"{variant}: memory sweep")
        memory = memory_sweep(
            model,
            example,
            max_batch=thresholds.memory_max_batch,
            time_limit_s=thresholds.memory_time_limit_s,
            baseline_bytes=memory_baseline_bytes,
        )
    gates = VariantGates(
        variant=variant,
        device=device_kind,
        dtype="float16" if fp16 else "float32",
        measured_on=measured_on,
        raw_parity=raw,
        detection_parity=det,
        latency=latency,
        memory=memory,
        passed=False,
    )
    passed = not gates.failures()
    log.info("gates %s on %s: %s", variant, measured_on, "pass" if passed else "fail " + ",".join(gates.failures()))
    return gates.model_copy(update={"passed": passed})
