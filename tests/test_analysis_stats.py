"""The canary-analysis engine: its statistics against values computed by hand, then its verdicts.

Reference values come from formulas written out here (a brute-force Mann-Whitney U with the normal approximation,
a hypergeometric sum, a Jeffreys divergence of two small histograms), not from the code under test or scipy.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from exporters.telemetry_buckets import CONFIDENCE_BUCKETS, LATENCY_MS_EDGES
from registry.rollout_service.analysis.ab import compare_arms
from registry.rollout_service.analysis.spec import AnalysisSpec, Verdict
from registry.rollout_service.analysis.stats import Window, psi
from registry.rollout_service.analysis.verdict import Analysis, MetricResult, analyse

CLASSES = ("chip", "capacitor", "solder_bridge")
RATES = (2.0, 1.5, 0.5)
FRAMES = 150
SPEC = AnalysisSpec()
CONFIDENCE_EDGES = np.linspace(0, 1, CONFIDENCE_BUCKETS + 1)


def make_windows(
    n: int = 60,
    *,
    seed: int,
    rates: tuple[float, ...] = RATES,
    latency_ms: float = 40.0,
    beta: tuple[float, float] = (8.0, 2.0),
    error_rate: float = 0.001,
    devices: int = 6,
) -> list[Window]:
    """``n`` windows of ``FRAMES`` frames: Poisson class counts, Beta confidences, lognormal p99 latency."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(np.array(rates) * FRAMES, (n, len(rates)))
    bucket_p = np.diff(stats.beta.cdf(CONFIDENCE_EDGES, *beta))
    confidence = rng.multinomial(counts.sum(axis=1), bucket_p / bucket_p.sum())
    p99 = latency_ms * rng.lognormal(0, 0.05, n)
    errors = rng.binomial(FRAMES, error_rate, n)
    windows = []
    for i in range(n):
        frames = FRAMES - int(errors[i])
        latency_hist = [0] * (len(LATENCY_MS_EDGES) + 1)
        latency_hist[int(np.searchsorted(LATENCY_MS_EDGES, p99[i] * 0.8, side="right"))] = frames
        detections_hist = [0] * 21
        detections_hist[min(20, round(counts[i].sum() / FRAMES))] = frames
        windows.append(
            Window(
                device_id=f"d{i % devices}",
                inferences=FRAMES,
                errors=int(errors[i]),
                nonfinite=0,
                frames=frames,
                latency_p99_ms=float(p99[i]),
                detections=int(counts[i].sum()),
                class_counts={k: int(c) for k, c in enumerate(counts[i]) if c},
                confidence=tuple(int(c) for c in confidence[i]),
                latency_hist=tuple(latency_hist),
                detections_hist=tuple(detections_hist),
            )
        )
    return windows


def metric(analysis: Analysis, name: str) -> MetricResult:
    return next(m for m in analysis.metrics if m.name == name)


def verdicts(analysis: Analysis) -> dict[str, Verdict]:
    return {m.name: m.verdict for m in analysis.metrics}


def replace_spec(**fields: object) -> AnalysisSpec:
    return AnalysisSpec.model_validate({**SPEC.model_dump(), **fields})


def with_p99(values: list[float], seed: int) -> list[Window]:
    return [replace(w, latency_p99_ms=v) for w, v in zip(make_windows(len(values), seed=seed), values, strict=True)]


# --- the statistics against hand computation ----------------------------------------------------------------------


def test_latency_p_value_is_the_tie_corrected_normal_approximation_of_the_brute_force_u() -> None:
    x = [41.0, 44.5, 39.0, 47.0, 52.0, 44.5, 43.0, 49.5, 45.0, 50.0, 46.0, 48.0]  # treatment p99s, ms
    y = [40.0, 38.5, 44.5, 41.0, 39.5, 42.0, 37.0, 43.0, 40.5, 36.0, 41.5, 39.0]  # control
    u = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y)  # every pair counted
    n1, n2 = len(x), len(y)
    n = n1 + n2
    ties = [(x + y).count(v) for v in set(x + y)]
    variance = n1 * n2 / 12 * ((n + 1) - sum(t**3 - t for t in ties) / (n * (n - 1)))
    z = (abs(u - n1 * n2 / 2) - 0.5) / math.sqrt(variance)  # with the continuity correction
    expected = math.erfc(z / math.sqrt(2))  # two-sided
    # by hand, per x, the y below it (+ half per tie): 7.5 + 11.5 + 3.5 + 12 + 12 + 11.5 + 10.5 + 5 x 12
    assert u == 128.5
    result = analyse(with_p99(x, 1), with_p99(y, 2), replace_spec(min_windows=10), CLASSES)
    latency = metric(result, "latency_p99")
    assert latency.p_value == pytest.approx(expected, rel=1e-9)
    assert latency.treatment == pytest.approx(statistics.median(x))
    assert latency.effect == pytest.approx((statistics.median(x) - statistics.median(y)) / statistics.median(y))


def test_psi_of_two_mirrored_histograms_by_hand() -> None:
    a, b = [0] * 20, [0] * 20
    a[18], a[19], b[18], b[19] = 30, 10, 10, 30
    # 0.5 added per bucket: both sum to 50; only buckets 18 and 19 differ, each (p - q) ln(p / q) = 0.4 ln(30.5/10.5)
    assert psi(np.array(a), np.array(b)) == pytest.approx(0.8 * math.log(30.5 / 10.5), rel=1e-12)
    assert psi(np.array(a), np.array(a)) == 0.0


def test_psi_of_uneven_histograms_by_a_plain_loop() -> None:
    a = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 0, 0, 7, 0, 1, 0, 0, 3]
    b = [3, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0]
    p = [(v + 0.5) / (sum(a) + 10) for v in a]
    q = [(v + 0.5) / (sum(b) + 10) for v in b]
    expected = sum((pi - qi) * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert psi(np.array(a), np.array(b)) == pytest.approx(expected, rel=1e-12)


def test_confidence_reason_shows_the_psi_of_the_pooled_histograms() -> None:
    treatment = make_windows(60, seed=1, beta=(4.0, 2.0))
    control = make_windows(60, seed=2)
    pooled_t = np.sum([w.confidence for w in treatment], axis=0)
    pooled_c = np.sum([w.confidence for w in control], axis=0)
    p = (pooled_t + 0.5) / (pooled_t.sum() + 10)
    q = (pooled_c + 0.5) / (pooled_c.sum() + 10)
    expected = float(np.sum((p - q) * np.log(p / q)))
    confidence = metric(analyse(treatment, control, SPEC, CLASSES), "confidence")
    assert f"PSI {expected:.3f}" in confidence.reason
    assert confidence.verdict == Verdict.failed  # mean 0.67 against 0.80 and PSI far above 0.25
    assert confidence.treatment_hist == pytest.approx(list(pooled_t / pooled_t.sum()), abs=1e-4)


def test_error_rate_p_value_is_the_hypergeometric_tail() -> None:
    def window(errors: int) -> Window:
        return Window("d", 10, errors, 0, 10 - errors, 40.0, 0, {}, (), (), ())

    treatment = [window(3), window(2)]  # 5 errors in 20
    control = [window(1), window(0)]  # 1 error in 20
    total, errors, drawn = 40, 6, 20  # treatment errors X ~ hypergeometric: P(X >= 5)
    expected = sum(math.comb(errors, k) * math.comb(total - errors, drawn - k) for k in (5, 6)) / math.comb(40, 20)
    error_rate = metric(
        analyse(treatment, control, replace_spec(min_windows=2, min_window_frames=1), CLASSES), "error_rate"
    )
    assert error_rate.p_value == pytest.approx(expected, rel=1e-9)
    assert error_rate.treatment == 0.25
    assert error_rate.control == 0.05
    assert error_rate.verdict == (Verdict.failed if expected < 0.02 else Verdict.marginal)


# --- verdicts -------------------------------------------------------------------------------------------------------


def test_equal_models_pass_with_a_full_score() -> None:
    result = analyse(make_windows(seed=1), make_windows(seed=2), SPEC, CLASSES)
    assert result.verdict == Verdict.passed, result.reason
    assert result.score == 100
    assert set(verdicts(result).values()) == {Verdict.passed}
    assert (result.treatment_windows, result.control_windows) == (60, 60)
    for m in result.metrics:
        for hist in (m.treatment_hist, m.control_hist):
            assert hist is not None and len(hist) <= 21 and sum(hist) == pytest.approx(1, abs=1e-3), m.name


def test_a_class_dropped_by_20_percent_fails_and_is_named() -> None:
    treatment = make_windows(seed=1, rates=(2.0, 1.2, 0.5))
    result = analyse(treatment, make_windows(seed=2), SPEC, CLASSES)
    assert result.verdict == Verdict.failed
    assert metric(result, "class_rate:capacitor").verdict == Verdict.failed
    assert metric(result, "class_rate:capacitor").effect == pytest.approx(-0.2, abs=0.03)
    assert result.reason.startswith("fail: class_rate:capacitor -2")
    others = {name: v for name, v in verdicts(result).items() if name != "class_rate:capacitor"}
    assert set(others.values()) == {Verdict.passed}, others  # detections_per_image: -7.5 %, inside its 10 % band


def test_a_class_dropped_to_zero_fails_rather_than_being_inconclusive() -> None:
    treatment = make_windows(seed=1, rates=(2.0, 1.5, 0.0))
    result = analyse(treatment, make_windows(seed=2), SPEC, CLASSES)
    bridge = metric(result, "class_rate:solder_bridge")
    assert bridge.verdict == Verdict.failed
    assert bridge.treatment == 0.0
    assert bridge.effect == -1.0
    assert result.verdict == Verdict.failed
    assert "class_rate:solder_bridge -100% (0.000 vs 0.4" in result.reason


def test_fewer_windows_than_the_minimum_is_inconclusive_never_pass() -> None:
    for treatment in (make_windows(49, seed=1), make_windows(49, seed=1, rates=(2.0, 1.5, 0.0))):
        result = analyse(treatment, make_windows(seed=2), SPEC, CLASSES)
        assert result.verdict == Verdict.inconclusive
        assert result.score is None
        assert "treatment 49 of 50 windows" in result.reason
        assert set(verdicts(result).values()) == {Verdict.inconclusive}
        assert metric(result, "latency_p99").treatment is not None  # figures still shown


def test_only_slower_fails_latency_and_nothing_else() -> None:
    result = analyse(make_windows(seed=1, latency_ms=52.0), make_windows(seed=2), SPEC, CLASSES)
    latency = metric(result, "latency_p99")
    assert latency.verdict == Verdict.failed
    assert latency.effect == pytest.approx(0.3, abs=0.03)
    assert {n: v for n, v in verdicts(result).items() if v != Verdict.passed} == {"latency_p99": Verdict.failed}
    assert result.verdict == Verdict.failed  # latency is critical
    assert result.reason.startswith("fail: latency_p99 +3")


def test_slower_inside_the_band_and_faster_pass() -> None:
    for latency_ms in (42.5, 30.0):  # +6 %: significant but inside the 10 % band; faster: harmless
        result = analyse(make_windows(seed=1, latency_ms=latency_ms), make_windows(seed=2), SPEC, CLASSES)
        assert metric(result, "latency_p99").p_value < 1e-6
        assert result.verdict == Verdict.passed, result.reason


def test_a_non_finite_output_fails_alone() -> None:
    treatment = make_windows(seed=1)
    treatment[7] = replace(treatment[7], nonfinite=1, errors=treatment[7].errors + 1)
    result = analyse(treatment, make_windows(seed=2), SPEC, CLASSES)
    assert {n: v for n, v in verdicts(result).items() if v != Verdict.passed} == {"nan_rate": Verdict.failed}
    assert result.verdict == Verdict.failed
    assert result.score == pytest.approx(100 * 7 / 8, abs=0.1)


def test_non_finite_outputs_in_both_arms_need_a_significant_excess() -> None:
    treatment, control = make_windows(seed=1), make_windows(seed=2)
    treatment[3] = replace(treatment[3], nonfinite=1)
    control[4] = replace(control[4], nonfinite=1)
    assert metric(analyse(treatment, control, SPEC, CLASSES), "nan_rate").verdict == Verdict.passed


def test_a_critical_failure_fails_even_with_a_high_score() -> None:
    names = tuple(f"part{k}" for k in range(12))
    treatment = make_windows(seed=1, rates=(0.1, *([0.3] * 11)))
    result = analyse(treatment, make_windows(seed=2, rates=(0.3,) * 12), SPEC, names)
    assert metric(result, "class_rate:part0").verdict == Verdict.failed
    assert result.score is not None and result.score >= SPEC.pass_score
    assert result.verdict == Verdict.failed


def test_a_non_critical_failure_only_lowers_the_score() -> None:
    result = analyse(make_windows(seed=1, beta=(4.0, 2.0)), make_windows(seed=2), SPEC, CLASSES)
    assert metric(result, "confidence").verdict == Verdict.failed
    assert result.score == pytest.approx(100 * 7 / 8, abs=0.1)
    assert result.verdict == Verdict.marginal
    assert result.reason.startswith("marginal: confidence PSI")


def test_higher_confidence_is_harmless() -> None:
    result = analyse(make_windows(seed=1, beta=(16.0, 2.0)), make_windows(seed=2), SPEC, CLASSES)
    assert "PSI" in metric(result, "confidence").reason
    assert metric(result, "confidence").verdict == Verdict.passed
    assert result.verdict == Verdict.passed


def test_a_class_rare_in_both_arms_is_not_scored() -> None:
    rates = (2.0, 1.5, 0.0005)  # about 4 solder bridges in 60 windows of 150 frames
    result = analyse(make_windows(seed=1, rates=rates), make_windows(seed=2, rates=rates), SPEC, CLASSES)
    bridge = metric(result, "class_rate:solder_bridge")
    assert bridge.verdict == Verdict.inconclusive
    assert "too few detections" in bridge.reason
    assert result.verdict == Verdict.passed
    assert result.score == 100


def test_old_form_windows_count_for_latency_and_errors_only() -> None:
    def old(windows: list[Window]) -> list[Window]:
        return [replace(w, class_counts={}, confidence=(), latency_hist=(), detections_hist=()) for w in windows]

    result = analyse(old(make_windows(seed=1, latency_ms=60.0)), old(make_windows(seed=2)), SPEC, CLASSES)
    judged = {n for n, v in verdicts(result).items() if v != Verdict.inconclusive}
    assert judged == {"latency_p99", "error_rate", "nan_rate"}
    assert result.verdict == Verdict.failed


def test_an_error_rate_increase_beyond_the_allowance_fails() -> None:
    result = analyse(make_windows(seed=1, error_rate=0.02), make_windows(seed=2), SPEC, CLASSES)
    assert metric(result, "error_rate").verdict == Verdict.failed
    assert result.verdict == Verdict.failed
    small = analyse(make_windows(seed=1, error_rate=0.004), make_windows(seed=2), SPEC, CLASSES)
    assert metric(small, "error_rate").verdict == Verdict.passed  # +0.3 points, inside the allowed 0.5


# --- A/B ------------------------------------------------------------------------------------------------------------


def test_compare_arms_picks_the_faster_arm_either_way() -> None:
    fast, slow = make_windows(seed=1, latency_ms=28.0), make_windows(seed=2)
    forward = compare_arms(fast, slow, SPEC, CLASSES)
    assert forward.winner == "treatment", forward.reason
    assert next(m for m in forward.metrics if m.name == "latency_p99").better == "treatment"
    backward = compare_arms(slow, fast, SPEC, CLASSES)
    assert backward.winner == "control", backward.reason
    assert backward.reason.startswith("control wins: control better on latency_p99")


def test_compare_arms_of_equal_arms_has_no_winner() -> None:
    result = compare_arms(make_windows(seed=1), make_windows(seed=2), SPEC, CLASSES)
    assert result.winner is None
    assert result.reason.startswith("no difference")
    assert all(m.better is None for m in result.metrics)


def test_compare_arms_has_no_winner_when_the_better_arm_is_worse_on_a_critical_metric() -> None:
    fast_and_more = make_windows(seed=1, latency_ms=28.0, rates=(2.6, 1.5, 0.5), error_rate=0.03)
    result = compare_arms(fast_and_more, make_windows(seed=2), SPEC, CLASSES)
    better = {m.name: m.better for m in result.metrics if m.better}
    assert better == {
        "latency_p99": "treatment",
        "class_rate:chip": "treatment",
        "detections_per_image": "treatment",
        "error_rate": "control",
    }
    assert result.winner is None
    assert result.reason.startswith("mixed: treatment better on")


def test_compare_arms_below_the_minimum_has_no_winner() -> None:
    result = compare_arms(make_windows(20, seed=1, latency_ms=20.0), make_windows(seed=2), SPEC, CLASSES)
    assert result.winner is None
    assert result.reason == "inconclusive: treatment 20 of 50 windows, control 60 of 50"


# --- cost -----------------------------------------------------------------------------------------------------------


def test_five_thousand_windows_a_side_take_well_under_a_second() -> None:
    treatment, control = make_windows(5000, seed=1), make_windows(5000, seed=2)
    started = time.perf_counter()
    result = analyse(treatment, control, SPEC, CLASSES)
    elapsed_s = time.perf_counter() - started
    assert result.verdict == Verdict.passed
    assert elapsed_s < 0.5, f"{elapsed_s:.3f} s"


def test_at_most_max_windows_of_each_arm_are_used() -> None:
    spec = replace_spec(min_windows=10, max_windows=40)
    old_slow = make_windows(30, seed=3, latency_ms=80.0)
    result = analyse([*old_slow, *make_windows(40, seed=1)], make_windows(60, seed=2), spec, CLASSES)
    assert (result.treatment_windows, result.control_windows) == (40, 40)
    assert result.verdict == Verdict.passed, result.reason  # the 30 slow, older windows were left out
