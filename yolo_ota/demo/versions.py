"""The demo's versions as bundles, built the way a workstation would build them: exported from trained weights
(``detectors``), gated against their own eager model, signed. Every one of them passes its gates, v3 and v4
included: what they get wrong shows only against the version they replace, on the line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporters.export import ExportRequest, ExportResult, export_bundle
from exporters.gate_report import GateThresholds
from yolo_ota.errors import DemoError

VARIANTS = ("cpu-fp32",)  # the demo's fleet runs on the CPU
# The p99 a device's validation allows. Far above any inference time here, because the demo's machine is shared
# by four agents, their validations and the exports (a p99 over two seconds was measured on a loaded two-core
# machine); so v4, slower by tens of milliseconds, passes every device's own check, and only the fleet analysis,
# which compares it with the other devices in the same minutes, sees it.
LATENCY_BUDGET_MS = 5000.0
GOLDEN_SEED = 1234  # synthetic golden scenes: parity then compares real detections, not empty sets
# Latency is timed over 3 warm-up and 15 timed runs (the defaults: 10 and 50), at export and in each device's
# validation: the demo's devices validate while sharing two cores, and its p99 budget is far above any run anyway.
WARMUP_ITERS, TIMED_ITERS = 3, 15


@dataclass(frozen=True)
class Built:
    label: str  # v1 .. v4: the demo's names; MLflow numbers versions itself
    source: Path  # the weights it was exported from
    note: str
    bundle_dir: Path
    result: ExportResult


def golden_scenes(folder: Path, imgsz: int) -> tuple[Path, ...]:
    from exporters.synthetic import write_scenes

    return tuple(write_scenes(folder, count=4, size=imgsz, seed=GOLDEN_SEED))


def export_version(
    label: str,
    source: Path,
    *,
    out_dir: Path,
    imgsz: int,
    model: str,
    signing_key: Path,
    note: str,
    golden: tuple[Path, ...],
    say: Callable[[str], None],
) -> Built:
    """Export ``source`` to a signed cpu-fp32 bundle with its gates; ``DemoError`` when a gate fails."""
    result = export_bundle(
        ExportRequest(
            model=str(source),
            out_dir=out_dir,
            imgsz=(imgsz, imgsz),
            variants=VARIANTS,
            name=model,
            release=int(label.removeprefix("v")),  # v1 < v2 < v3 < v4: each later one a newer release of the line
            signing_key=signing_key,
            latency_budget_ms=LATENCY_BUDGET_MS,
            thresholds=GateThresholds(warmup_iters=WARMUP_ITERS, timed_iters=TIMED_ITERS),
            golden_images=golden,
            force=True,
        ),
        progress=lambda message: say(f"{label}: {message}"),
    )
    if not result.passed:
        raise DemoError(f"{label} ({source}) failed its export gates: {result.manifest.gates}")
    gates = result.manifest.gates[VARIANTS[0]]
    say(
        f"{label}: gates pass (MSE {gates.raw_parity.mse:.1e}, detections matched "
        f"{gates.detection_parity.matched_fraction_reference:.0%}, p99 {gates.latency.stats[0].p99_ms:.0f} ms of "
        f"{LATENCY_BUDGET_MS:g}, {TIMED_ITERS} timed runs), signed"
    )
    return Built(label, source, note, out_dir, result)
