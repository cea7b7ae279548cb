"""The canary verdict: each metric judged on its measurement, then the whole analysis scored.

Per metric (alpha = 1 - spec.confidence): a shift beyond the band in a bad direction fails with strong evidence
(p < alpha; PSI >= confidence_psi_fail; for nan_rate any non-finite output the control lacks), is marginal with
the weaker kind (p < min(5 alpha, 0.2); PSI >= confidence_psi_marginal), and passes otherwise. Too little data:
inconclusive, not scored. Score = 100 x mean over scored metrics (pass 1, marginal 0.5, fail 0); a fail of a
family in ``spec.critical`` fails the analysis whatever the score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from registry.rollout_service.analysis.spec import AnalysisSpec, Verdict
from registry.rollout_service.analysis.stats import Arm, Measurement, Window, measure_all
from registry.rollout_service.analysis.windows import coalesce, on_own_scale

BAD_SHIFTS = {"increase": (1,), "decrease": (-1,), "both": (1, -1)}
EVIDENCE_VERDICT = {2: Verdict.failed, 1: Verdict.marginal, 0: Verdict.passed}
POINTS = {Verdict.passed: 1.0, Verdict.marginal: 0.5, Verdict.failed: 0.0}


@dataclass(frozen=True)
class MetricResult:
    """One metric's verdict. ``treatment``/``control``: the median p99 (latency), the mean confidence
    (confidence) or the pooled rate (the others). ``effect``: (t - c) / |c|. ``band``: relative, except
    error_rate's (the absolute allowed increase). ``*_hist``: a normalised distribution for the dashboard's bars
    (the pooled histograms for confidence and latency, else 10 bins of the per-window values)."""

    name: str  # "latency_p99", "class_rate:chip", ...
    family: str
    critical: bool
    verdict: Verdict
    treatment: float | None
    control: float | None
    effect: float | None
    band: float | None
    p_value: float | None
    direction: str  # the change that is bad: increase | decrease | both
    reason: str  # the figures, one line
    treatment_hist: list[float] | None = None
    control_hist: list[float] | None = None


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    score: float | None  # 0..100; None when inconclusive
    reason: str  # one line naming the metrics that failed or were marginal, with their figures
    metrics: list[MetricResult]
    treatment_windows: int
    control_windows: int


@dataclass(frozen=True)
class Arms:
    """Both arms as arrays, capped at ``spec.max_windows`` each, and whether both have ``spec.min_windows``."""

    treatment: Arm
    control: Arm
    enough: bool
    shortfall: str  # "" when enough, else "treatment 12 of 50 windows, control 80 of 50"

    @classmethod
    def of(
        cls, treatment: Sequence[Window], control: Sequence[Window], spec: AnalysisSpec, n_classes: int,
        baselines: Mapping[str, float] | None = None,
    ) -> Arms:  # fmt: skip
        # joined into samples of min_window_frames, then the newest (callers pass windows oldest first), then on
        # each device's own latency scale when every device has a baseline (a block is one device's: the same)
        t_blocks = coalesce(treatment, spec.min_window_frames)[-spec.max_windows :]
        c_blocks = coalesce(control, spec.min_window_frames)[-spec.max_windows :]
        devices = {w.device_id for w in (*t_blocks, *c_blocks)}
        paired = baselines is not None and bool(devices) and devices <= baselines.keys()
        if paired:
            assert baselines is not None
            t_blocks, c_blocks = on_own_scale(t_blocks, baselines), on_own_scale(c_blocks, baselines)
        t, c = Arm.of(t_blocks, n_classes, paired), Arm.of(c_blocks, n_classes, paired)
        enough = min(t.windows, c.windows) >= spec.min_windows
        counts = f"treatment {t.windows} of {spec.min_windows} windows, control {c.windows} of {spec.min_windows}"
        return cls(t, c, enough, "" if enough else counts)


def analyse(
    treatment: Sequence[Window], control: Sequence[Window], spec: AnalysisSpec, class_names: Sequence[str],
    baselines: Mapping[str, float] | None = None,
) -> Analysis:  # fmt: skip
    """The canary verdict of ``treatment`` against ``control`` (windows of the same time span and selector);
    ``baselines``: each device's p99 before the rollout (``windows.baselines_of``), None or partial: unpaired."""
    arms = Arms.of(treatment, control, spec, len(class_names), baselines)
    results = judge_all(arms, spec, class_names)
    t_windows, c_windows = arms.treatment.windows, arms.control.windows
    if not arms.enough:
        reason = f"inconclusive: {arms.shortfall}"
        return Analysis(Verdict.inconclusive, None, reason, results, t_windows, c_windows)
    scored = [r for r in results if r.verdict != Verdict.inconclusive]
    if not scored:
        reason = "inconclusive: no metric had the data to be judged"
        return Analysis(Verdict.inconclusive, None, reason, results, t_windows, c_windows)
    score = 100 * sum(POINTS[r.verdict] for r in scored) / len(scored)
    critical_fail = any(r.critical and r.verdict == Verdict.failed for r in scored)
    if critical_fail or score < spec.marginal_score:
        verdict = Verdict.failed
    else:
        verdict = Verdict.passed if score >= spec.pass_score else Verdict.marginal
    return Analysis(verdict, round(score, 1), _reason(verdict, score, scored, spec), results, t_windows, c_windows)


def judge_all(arms: Arms, spec: AnalysisSpec, class_names: Sequence[str]) -> list[MetricResult]:
    """Every metric's verdict; all inconclusive (figures still shown) while either arm lacks windows."""
    return [judge(m, spec, arms.enough) for m in measure_all(arms.treatment, arms.control, spec, class_names)]


def judge(m: Measurement, spec: AnalysisSpec, enough_windows: bool = True) -> MetricResult:
    direction = spec.directions.get(m.family, m.direction)
    if not (m.judged and enough_windows):
        verdict = Verdict.inconclusive
    elif m.shift in BAD_SHIFTS[direction]:
        verdict = EVIDENCE_VERDICT[m.evidence]
    else:
        verdict = Verdict.passed
    return MetricResult(
        name=m.name,
        family=m.family,
        critical=m.family in spec.critical,
        verdict=verdict,
        treatment=m.treatment,
        control=m.control,
        effect=m.effect,
        band=m.band,
        p_value=m.p_value,
        direction=direction,
        reason=m.figures,
        treatment_hist=m.treatment_hist,
        control_hist=m.control_hist,
    )


def _reason(verdict: Verdict, score: float, scored: list[MetricResult], spec: AnalysisSpec) -> str:
    """'fail: class_rate:chip -20% (1.600 vs 2.000 per image, ...); score 86 (6 of 7 judged metrics pass)'.

    Failed metrics first, then marginal ones; a metric whose verdict differs from the whole's says its own."""
    named = [
        f"{r.name} {r.reason}" + ("" if r.verdict == verdict else f" [{r.verdict.value}]")
        for kind in (Verdict.failed, Verdict.marginal)
        for r in scored
        if r.verdict == kind
    ]
    passed = sum(r.verdict == Verdict.passed for r in scored)
    summary = f"score {score:.0f} ({passed} of {len(scored)} judged metrics pass)"
    if score < spec.marginal_score:
        summary += f", below {spec.marginal_score:g}"
    return f"{verdict.value}: " + "; ".join([*named, summary])
