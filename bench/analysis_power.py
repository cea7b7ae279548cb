"""Power and cost of the canary analysis on simulated fleets.

    uv run --extra server python bench/analysis_power.py [--canaries 200] [--seed 1] [--json PATH]

Simulates canaries (treatment devices against control devices over the same span) and runs
``registry.rollout_service.analysis.verdict.analyse`` with the default ``AnalysisSpec`` on each:

- equal models: how often the verdict is fail (the false-fail rate), pass, marginal, inconclusive;
- one class's rate 20 % lower (each class in turn): how often the analysis fails, and names that class;
- latency p99 +20 % and +40 %: how often it fails (the default band allows +10 % on each device's own scale:
  its p99 before the canary, from ``sim.baseline_windows_per_device`` windows on the control model; ``--unpaired``
  compares raw p99s instead).

Then the cost of one ``analyse`` call at 10,000 devices (windows capped at ``max_windows``) and the JSON size of
one telemetry window as the agent sends it (contract section A). Every simulation parameter is in ``SIM`` and is
printed with the results; nothing here is tuned to meet a goal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import stats

from exporters.telemetry_buckets import CONFIDENCE_BUCKETS, LATENCY_MS_EDGES, MAX_DETECTIONS_BUCKET
from registry.rollout_service.analysis.fleet import BASELINE_MIN_WINDOWS
from registry.rollout_service.analysis.spec import AnalysisSpec, Verdict, merged
from registry.rollout_service.analysis.stats import Window
from registry.rollout_service.analysis.verdict import analyse
from registry.rollout_service.analysis.windows import baselines_of


@dataclass(frozen=True)
class Simulation:
    classes: tuple[str, ...] = ("chip", "capacitor", "solder_bridge")
    rates_per_frame: tuple[float, ...] = (2.0, 1.5, 0.5)  # mean detections per frame, Poisson per frame
    frames_per_window: int = 150  # 30 s at 5 fps
    device_rate_sigma: float = 0.07  # lognormal multiplier per device and class (different lines, lighting)
    window_rate_sigma: float = 0.05  # lognormal multiplier per window and class (what passes the camera)
    latency_median_ms: float = 30.0  # per frame; p99 of a window comes out near 40 ms
    latency_frame_sigma: float = 0.12  # lognormal, per frame
    device_latency_sigma: float = 0.10  # lognormal multiplier per device (hardware, thermals)
    window_latency_sigma: float = 0.05  # lognormal multiplier per window (load)
    confidence_beta: tuple[float, float] = (8.0, 2.0)  # detection confidence ~ Beta(a, b), mean 0.8
    device_confidence_sigma: float = 0.05  # lognormal multiplier of a, per device
    error_rate: float = 0.001  # per frame
    treatment_devices: int = 5
    control_devices: int = 20
    windows_per_device: int = 10  # 5 minutes of 30 s windows: 50 treatment, 200 control windows
    baseline_windows_per_device: int = 10  # the 5 minutes before, on the control model: each device's own scale


@dataclass(frozen=True)
class Change:
    """What the treatment model does differently."""

    rate_factor: tuple[float, ...] = (1.0, 1.0, 1.0)
    latency_factor: float = 1.0


SIM = Simulation()
LATENCY_EDGES = np.array(LATENCY_MS_EDGES)
CONFIDENCE_EDGES = np.linspace(0, 1, CONFIDENCE_BUCKETS + 1)


@dataclass(frozen=True)
class Arm:
    """One arm's windows in the canary's span, and every device's windows on the control model before it."""

    windows: list[Window]
    before: list[Window]


def simulate_arm(
    rng: np.random.Generator, sim: Simulation, devices: int, change: Change, prefix: str, chunk: int = 200
) -> Arm:
    """``devices`` x ``sim.windows_per_device`` windows, oldest first, generated ``chunk`` devices at a time."""
    arm = Arm([], [])
    for first in range(0, devices, chunk):
        part = _chunk(rng, sim, range(first, min(devices, first + chunk)), change, prefix)
        arm.windows.extend(part.windows)
        arm.before.extend(part.before)
    return arm


def _chunk(rng: np.random.Generator, sim: Simulation, devices: range, change: Change, prefix: str) -> Arm:
    n_dev, k = len(devices), len(sim.classes)
    device = {  # what stays with a device: its line's parts and light, its hardware, its camera
        "rate": rng.lognormal(0, sim.device_rate_sigma, (n_dev, 1, k)),
        "latency": rng.lognormal(0, sim.device_latency_sigma, (n_dev, 1, 1)),
        "confidence_a": sim.confidence_beta[0] * rng.lognormal(0, sim.device_confidence_sigma, n_dev),
    }
    before = _windows(rng, sim, devices, device, Change(), prefix, sim.baseline_windows_per_device)
    return Arm(_windows(rng, sim, devices, device, change, prefix, sim.windows_per_device), before)


def _windows(
    rng: np.random.Generator, sim: Simulation, devices: range, device: dict[str, np.ndarray], change: Change,
    prefix: str, n_win: int,
) -> list[Window]:  # fmt: skip
    n_dev, n_frames, k = len(devices), sim.frames_per_window, len(sim.classes)
    shape = (n_dev, n_win)
    rates = np.array(sim.rates_per_frame) * np.array(change.rate_factor)
    rate = rates * device["rate"] * rng.lognormal(0, sim.window_rate_sigma, (*shape, k))
    per_frame = rng.poisson(rate[:, :, None, :], (*shape, n_frames, k))  # detections per frame and class
    detections_per_frame = per_frame.sum(axis=3)
    latency = (
        sim.latency_median_ms
        * change.latency_factor
        * device["latency"]
        * rng.lognormal(0, sim.window_latency_sigma, (*shape, 1))
        * rng.lognormal(0, sim.latency_frame_sigma, (*shape, n_frames))
    )
    errors = rng.binomial(n_frames, sim.error_rate, shape)
    bucket_p = np.diff(
        stats.beta.cdf(CONFIDENCE_EDGES[None, :], device["confidence_a"][:, None], sim.confidence_beta[1]), axis=1
    )
    bucket_p /= bucket_p.sum(axis=1, keepdims=True)
    out = []
    for d, device_number in enumerate(devices):
        for w in range(n_win):
            # a frame that errored answers nothing: drop its detections and latency
            answered = n_frames - int(errors[d, w])
            frame_latency = latency[d, w, :answered]
            frame_detections = detections_per_frame[d, w, :answered]
            counts = per_frame[d, w, :answered].sum(axis=0)
            conf = rng.multinomial(int(counts.sum()), bucket_p[d])
            out.append(
                Window(
                    device_id=f"{prefix}-{device_number}",
                    inferences=n_frames,
                    errors=int(errors[d, w]),
                    nonfinite=0,
                    frames=answered,
                    latency_p99_ms=float(np.percentile(frame_latency, 99)),
                    detections=int(frame_detections.sum()),
                    class_counts={i: int(c) for i, c in enumerate(counts) if c},
                    confidence=tuple(conf.tolist()),
                    latency_hist=tuple(
                        np.bincount(np.searchsorted(LATENCY_EDGES, frame_latency, side="right"), minlength=21).tolist()
                    ),
                    detections_hist=tuple(
                        np.bincount(np.minimum(frame_detections, MAX_DETECTIONS_BUCKET), minlength=21).tolist()
                    ),
                )
            )
    return out


def baselines(treatment: Arm, control: Arm, spec: AnalysisSpec) -> dict[str, float] | None:
    """Each device's latency baseline, as the service takes it (None when the spec turns baselines off)."""
    if spec.latency_baseline_s <= 0:
        return None
    rows = [(w.device_id, w.latency_p99_ms) for w in (*treatment.before, *control.before)]
    return baselines_of(rows, BASELINE_MIN_WINDOWS)


def run_scenario(
    name: str,
    change: Change,
    canaries: int,
    rng: np.random.Generator,
    spec: AnalysisSpec,
    watch: str | None,
    sim: Simulation = SIM,
) -> dict:
    """``canaries`` simulated canaries of ``change``; the share of each verdict, and of ``watch`` failing."""
    verdicts: Counter[str] = Counter()
    failed_metrics: Counter[str] = Counter()  # canaries in which each metric failed
    watched_failed = 0
    started = time.perf_counter()
    for i in range(canaries):
        treatment = simulate_arm(rng, sim, sim.treatment_devices, change, "t")
        control = simulate_arm(rng, sim, sim.control_devices, Change(), "c")
        result = analyse(treatment.windows, control.windows, spec, sim.classes, baselines(treatment, control, spec))
        verdicts[result.verdict.value] += 1
        failed_metrics.update(m.name for m in result.metrics if m.verdict == Verdict.failed)
        if watch is not None:
            watched_failed += any(m.name == watch and m.verdict == Verdict.failed for m in result.metrics)
        if (i + 1) % 50 == 0:
            print(f"  {name}: {i + 1}/{canaries} canaries, {time.perf_counter() - started:.0f} s", flush=True)
    shares = {v.value: verdicts[v.value] / canaries for v in Verdict}
    interval = stats.binomtest(verdicts[Verdict.failed.value], canaries).proportion_ci(method="wilson")
    return {
        "scenario": name,
        "canaries": canaries,
        "verdicts": shares,
        "fail_95ci": [interval.low, interval.high],
        "failed_metrics": dict(failed_metrics.most_common()),
        "watched_metric": watch,
        "watched_metric_failed": None if watch is None else watched_failed / canaries,
    }


def scenarios() -> list[tuple[str, Change, str | None]]:
    listed: list[tuple[str, Change, str | None]] = [("equal models", Change(), None)]
    for k, cls in enumerate(SIM.classes):
        rates = tuple(0.8 if i == k else 1.0 for i in range(len(SIM.classes)))
        listed.append((f"{cls} rate -20%", Change(rate_factor=rates), f"class_rate:{cls}"))
    for slower in (1.2, 1.4):
        listed.append((f"latency +{slower - 1:.0%}", Change(latency_factor=slower), "latency_p99"))
    return listed


def analysis_cost(rng: np.random.Generator, spec: AnalysisSpec, devices: int = 10_000, calls: int = 7) -> dict:
    """ms per ``analyse`` call at ``devices`` devices: 5 % treatment, 10 windows each, both capped at max_windows."""
    treatment_devices = devices // 20
    treatment = simulate_arm(rng, SIM, treatment_devices, Change(), "t")
    control = simulate_arm(rng, SIM, devices - treatment_devices, Change(), "c")
    started = time.perf_counter()
    own_scale = baselines(treatment, control, spec)
    baselines_ms = (time.perf_counter() - started) * 1000
    times_ms = []
    for _ in range(calls):
        started = time.perf_counter()
        analyse(treatment.windows, control.windows, spec, SIM.classes, own_scale)
        times_ms.append((time.perf_counter() - started) * 1000)
    return {
        "devices": devices,
        "treatment_windows": len(treatment.windows),
        "control_windows": len(control.windows),
        "max_windows": spec.max_windows,
        "calls": calls,
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "baseline_rows": len(treatment.before) + len(control.before),
        "baselines_ms": baselines_ms,
    }


def window_json_bytes(rng: np.random.Generator) -> dict:
    """Bytes of one report with one telemetry window as the agent posts it (httpx: compact JSON)."""
    window = simulate_arm(rng, replace(SIM, windows_per_device=1), 1, Change(), "t").windows[0]
    sizes = {"3 classes (simulated window)": len(_body(window, 3))}
    # worst case: every class seen and every bucket filled, with 4-digit counts (a 30 s window at up to 30 fps)
    worst = replace(
        window,
        class_counts={k: 1000 + k for k in range(80)},
        confidence=tuple(1000 + i for i in range(CONFIDENCE_BUCKETS)),
        latency_hist=tuple(1000 + i for i in range(21)),
        detections_hist=tuple(1000 + i for i in range(21)),
    )
    sizes["80 classes, every bucket and class filled, 4-digit counts"] = len(_body(worst, 80))
    return sizes


def _body(w: Window, n_classes: int) -> bytes:
    telemetry = {
        "version": "12",
        "model": "pcb-line-3",
        "inferences": w.inferences,
        "errors": w.errors,
        "latency_ms": {"p50": 31.234, "p99": round(w.latency_p99_ms, 3)},
        "detections_per_image": round(w.detections / max(w.frames, 1), 4),
        "mean_confidence": 0.8012,
        "frames": w.frames,
        "empty_frames": w.detections_hist[0],
        "nonfinite": w.nonfinite,
        "histograms": {
            "latency_ms": list(w.latency_hist),
            "detections": list(w.detections_hist),
            "confidence": list(w.confidence),
        },
        "class_counts": {str(k): v for k, v in w.class_counts.items() if k < n_classes},
    }
    return json.dumps({"events": [], "telemetry": telemetry}, separators=(",", ":")).encode()


def print_table(results: list[dict]) -> None:
    print("\n| scenario | canaries | fail (95% CI) | marginal | pass | inconclusive | watched metric fails "
          "| metrics that failed (canaries) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        v, (low, high) = r["verdicts"], r["fail_95ci"]
        watched = "-" if r["watched_metric"] is None else f"{r['watched_metric']} {r['watched_metric_failed']:.1%}"
        failed = ", ".join(f"{name} {n}" for name, n in r["failed_metrics"].items()) or "-"
        print(
            f"| {r['scenario']} | {r['canaries']} | {v['fail']:.1%} ({low:.1%}-{high:.1%}) | {v['marginal']:.1%} "
            f"| {v['pass']:.1%} | {v['inconclusive']:.1%} | {watched} | {failed} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=200, help="simulated canaries per scenario")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--band", action="append", default=[], metavar="NAME=VALUE", help="a band other than the default's"
    )
    parser.add_argument("--treatment-devices", type=int, default=SIM.treatment_devices, help="devices in the canary")
    parser.add_argument(
        "--unpaired", action="store_true", help="latency_baseline_s 0: raw p99s, each device not on its own scale"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    spec = AnalysisSpec(latency_baseline_s=0) if args.unpaired else AnalysisSpec()
    if args.band:
        spec = merged(spec, {"bands": {name: float(value) for name, _, value in (b.partition("=") for b in args.band)}})
    sim = replace(SIM, treatment_devices=args.treatment_devices)
    print("simulation:", json.dumps(asdict(sim)))
    print(
        f"spec: confidence {spec.confidence}, min_windows {spec.min_windows}, bands {spec.bands.model_dump()}, "
        f"min_class_detections {spec.min_class_detections}, critical {spec.critical}, "
        f"latency_baseline_s {spec.latency_baseline_s:g}"
    )
    results = [run_scenario(n, change, args.canaries, rng, spec, watch, sim) for n, change, watch in scenarios()]
    print_table(results)
    cost = analysis_cost(rng, spec)
    print(
        f"\nanalyse() at {cost['devices']:,} devices ({cost['treatment_windows']:,} treatment and "
        f"{cost['control_windows']:,} control windows, capped at {cost['max_windows']:,} per arm): median "
        f"{cost['median_ms']:.0f} ms over {cost['calls']} calls (min {cost['min_ms']:.0f}, max {cost['max_ms']:.0f}); "
        f"the latency baselines of every device from {cost['baseline_rows']:,} windows: {cost['baselines_ms']:.0f} ms"
    )
    sizes = window_json_bytes(rng)
    for label, size in sizes.items():
        print(f"report body with one telemetry window, {label}: {size} bytes")
    if args.json:
        payload = {
            "simulation": asdict(sim),
            "spec": spec.model_dump(mode="json"),
            "scenarios": results,
            "cost": cost,
            "window_json_bytes": sizes,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
