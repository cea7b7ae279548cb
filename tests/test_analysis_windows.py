"""Small report windows: joined per device into samples of ``min_window_frames``, and a PSI that only counts when
there are enough detections for it to mean something."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from exporters.telemetry_buckets import CONFIDENCE_BUCKETS, LATENCY_MS_EDGES
from registry.rollout_service.analysis.spec import AnalysisSpec, Verdict
from registry.rollout_service.analysis.stats import Window, psi, psi_by_chance
from registry.rollout_service.analysis.verdict import analyse
from registry.rollout_service.analysis.windows import baselines_of, coalesce, on_own_scale

CLASSES = ("chip", "capacitor", "solder_bridge")
RATES = (2.0, 1.5, 0.5)
CONFIDENCE_EDGES = np.linspace(0, 1, CONFIDENCE_BUCKETS + 1)


def tiny_windows(
    n: int, *, seed: int, devices: int = 2, frames: int = 2, rates: tuple[float, ...] = RATES
) -> list[Window]:
    """``n`` windows of ``frames`` frames each, round-robin over ``devices``: what a device reporting every 0.3 s
    under light traffic sends. Poisson class counts, Beta(8, 2) confidences, 100 ms +/- 10 % latency."""
    rng = np.random.default_rng(seed)
    bucket_p = np.diff(stats.beta.cdf(CONFIDENCE_EDGES, 8, 2))
    out = []
    for i in range(n):
        counts = rng.poisson(np.array(rates) * frames)
        latency = 100 * rng.lognormal(0, 0.1, frames)
        latency_hist = np.bincount(np.searchsorted(LATENCY_MS_EDGES, latency, side="right"), minlength=21)
        out.append(
            Window(
                device_id=f"d{i % devices}",
                inferences=frames,
                errors=0,
                nonfinite=0,
                frames=frames,
                latency_p99_ms=float(np.percentile(latency, 99)),
                detections=int(counts.sum()),
                class_counts={k: int(c) for k, c in enumerate(counts) if c},
                confidence=tuple(int(c) for c in rng.multinomial(int(counts.sum()), bucket_p / bucket_p.sum())),
                latency_hist=tuple(int(c) for c in latency_hist),
                detections_hist=tuple([0] * 21),
            )
        )
    return out


def test_a_devices_windows_are_joined_until_they_hold_enough_frames() -> None:
    windows = tiny_windows(25, seed=1, devices=2, frames=2)  # d0: 13 windows (26 frames), d1: 12 (24)
    blocks = coalesce(windows, 10)
    assert [b.device_id for b in blocks] == ["d0", "d1", "d0", "d1"]  # d0's last 3 windows still wait
    assert all(b.inferences == 10 and b.frames == 10 for b in blocks)
    first = [w for w in windows if w.device_id == "d0"][:5]
    assert blocks[0].detections == sum(w.detections for w in first)
    assert blocks[0].confidence == tuple(np.sum([w.confidence for w in first], axis=0))
    assert dict(blocks[0].class_counts) == {
        k: sum(w.class_counts.get(k, 0) for w in first) for k in range(3) if any(k in w.class_counts for w in first)
    }
    assert blocks[0].latency_p99_ms == pytest.approx(np.mean([w.latency_p99_ms for w in first]))
    assert coalesce(windows, 1) == windows  # large windows (or 1) are kept as they are


def test_old_form_windows_join_without_rates() -> None:
    new = tiny_windows(1, seed=2, devices=1, frames=5)[0]
    old = Window("d0", 5, 1, 0, 0, 80.0, 0, {})
    (block,) = coalesce([new, old], 10)
    assert (block.inferences, block.errors, block.frames, block.confidence) == (10, 1, 0, ())
    assert block.latency_p99_ms == pytest.approx((new.latency_p99_ms * 5 + 80.0 * 4) / 9)


def test_equal_models_on_tiny_windows_pass_once_joined_not_before() -> None:
    """Two 0.3 s-window devices per arm and the same detector: the raw windows' verdict is noise."""
    spec = AnalysisSpec(min_windows=15)
    verdicts_raw, verdicts_joined = [], []
    for seed in range(20):
        treatment, control = tiny_windows(400, seed=seed), tiny_windows(400, seed=1000 + seed)
        verdicts_joined.append(analyse(treatment, control, spec, CLASSES).verdict)
        raw = spec.model_copy(update={"min_window_frames": 1})
        verdicts_raw.append(analyse(treatment[:34], control[:60], raw, CLASSES).verdict)
    assert verdicts_joined.count(Verdict.passed) >= 19, verdicts_joined
    assert verdicts_raw.count(Verdict.passed) < verdicts_joined.count(Verdict.passed), verdicts_raw


def test_psi_by_chance_is_the_mean_psi_of_equal_samples() -> None:
    rng = np.random.default_rng(7)
    bucket_p = np.diff(stats.beta.cdf(CONFIDENCE_EDGES, 8, 2))
    bucket_p /= bucket_p.sum()
    for n in (200, 2000):
        draws = [psi(rng.multinomial(n, bucket_p), rng.multinomial(n, bucket_p)) for _ in range(300)]
        chance = psi_by_chance(rng.multinomial(n, bucket_p), rng.multinomial(n, bucket_p))
        assert float(np.mean(draws)) == pytest.approx(chance, rel=0.35), (n, np.mean(draws), chance)


def test_confidence_on_too_few_detections_is_not_scored() -> None:
    treatment, control = tiny_windows(40, seed=3, frames=2), tiny_windows(40, seed=4, frames=2)
    spec = AnalysisSpec(min_windows=2, min_window_frames=1)
    confidence = next(m for m in analyse(treatment, control, spec, CLASSES).metrics if m.name == "confidence")
    assert confidence.verdict == Verdict.inconclusive
    assert "equal models would show PSI" in confidence.reason


def test_a_rollout_can_count_only_drops_as_bad() -> None:
    """A retrain expected to find more: ``directions`` makes rate increases pass while a drop still fails."""
    control = tiny_windows(60, seed=5, devices=6, frames=40)
    more = tiny_windows(60, seed=6, devices=6, frames=40, rates=(3.0, 1.5, 0.5))  # 50 % more chips
    fewer = tiny_windows(60, seed=6, devices=6, frames=40, rates=(2.0, 1.5, 0.3))  # 40 % fewer solder bridges
    both, drops = (
        AnalysisSpec(),
        AnalysisSpec(directions={"class_rate": "decrease", "detections_per_image": "decrease"}),
    )
    assert analyse(more, control, both, CLASSES).verdict == Verdict.failed
    judged = analyse(more, control, drops, CLASSES)
    assert judged.verdict == Verdict.passed, judged.reason
    chip = next(m for m in judged.metrics if m.name == "class_rate:chip")
    assert chip.effect is not None and chip.effect > 0.4 and chip.direction == "decrease"
    dropped = analyse(fewer, control, drops, CLASSES)
    assert dropped.verdict == Verdict.failed and dropped.reason.startswith("fail: class_rate:solder_bridge"), (
        dropped.reason
    )


def test_directions_name_known_families() -> None:
    with pytest.raises(ValueError, match="unknown metric family"):
        AnalysisSpec.model_validate({"directions": {"class_rates": "decrease"}})
    with pytest.raises(ValueError):
        AnalysisSpec.model_validate({"directions": {"class_rate": "down"}})


def _device_scaled(windows: list[Window], factors: dict[str, float], prefix: str) -> list[Window]:
    """``windows`` renamed ``prefix + device`` with each device's latency multiplied by its factor (its hardware)."""
    return [
        replace(w, device_id=prefix + w.device_id, latency_p99_ms=w.latency_p99_ms * factors[w.device_id])
        for w in windows
    ]


def test_latency_is_judged_on_each_devices_own_scale() -> None:
    """Slow treatment devices are not a slow model; a slower model on them is, and only the pairing tells them apart."""
    spec = AnalysisSpec(min_windows=20, min_window_frames=1)
    t_factors = {"d0": 1.3, "d1": 1.25, "d2": 1.35}  # the canary happened to land on older boxes
    c_factors = {"d0": 1.0, "d1": 0.95, "d2": 1.05}
    t_before = _device_scaled(tiny_windows(30, seed=3, devices=3, frames=200), t_factors, "t")
    c_before = _device_scaled(tiny_windows(30, seed=4, devices=3, frames=200), c_factors, "c")
    base = baselines_of([(w.device_id, w.latency_p99_ms) for w in (*t_before, *c_before)], 3)
    assert sorted(base) == ["c" + d for d in c_factors] + ["t" + d for d in t_factors]
    control = _device_scaled(tiny_windows(60, seed=5, devices=3, frames=200), c_factors, "c")
    for model_factor, paired_verdict in ((1.0, Verdict.passed), (1.2, Verdict.failed)):
        same = _device_scaled(tiny_windows(60, seed=6, devices=3, frames=200), t_factors, "t")
        treatment = [replace(w, latency_p99_ms=w.latency_p99_ms * model_factor) for w in same]
        unpaired = analyse(treatment, control, spec, CLASSES)
        paired = analyse(treatment, control, spec, CLASSES, base)
        latency = {m.name: m for m in paired.metrics}["latency_p99"]
        assert latency.verdict == paired_verdict, latency.reason
        assert "own scale" in latency.reason
        assert {m.name: m for m in unpaired.metrics}["latency_p99"].verdict == Verdict.failed
    partial = {k: v for k, v in base.items() if k != "td0"}  # one device without a baseline: raw p99s, and says so
    reason = {m.name: m for m in analyse(treatment, control, spec, CLASSES, partial).metrics}["latency_p99"].reason
    assert "unpaired" in reason


def test_own_scale_keeps_milliseconds_of_a_typical_device() -> None:
    windows = tiny_windows(4, seed=7, devices=2, frames=20)
    scaled = on_own_scale(windows, {"d0": 50.0, "d1": 200.0})  # median of the baselines: 125 ms
    assert scaled[0].latency_p99_ms == pytest.approx(windows[0].latency_p99_ms * 125 / 50)
    assert scaled[1].latency_p99_ms == pytest.approx(windows[1].latency_p99_ms * 125 / 200)
    assert baselines_of([("a", 10.0), ("a", 30.0), ("b", 5.0)], 2) == {"a": 20.0}  # b: too few windows
