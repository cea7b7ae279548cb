"""A/B comparison: the same metrics as the canary, read as "which arm is better" instead of "is the new one worse".

Per metric the better arm, where the difference is significant (p < alpha; for confidence PSI >= the marginal
threshold; for nan_rate non-finite outputs only one arm has) and beyond the band:
- latency_p99, error_rate, nan_rate: lower is better;
- detections_per_image and every class rate: higher is better. Without labels a model that finds more of the
  same classes on the same kind of traffic is read as having the better recall; a model that invents detections
  would look better too, which the canary's both-direction bands and shadow validation are there to catch;
- confidence: the higher mean.
The winner is better on more metrics than the other arm and worse on no metric of a ``spec.critical`` family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from registry.rollout_service.analysis.spec import (
    CONFIDENCE,
    DETECTIONS_PER_IMAGE,
    ERROR_RATE,
    LATENCY_P99,
    NAN_RATE,
    AnalysisSpec,
)
from registry.rollout_service.analysis.stats import Measurement, Window, measure_all
from registry.rollout_service.analysis.verdict import Arms, MetricResult, judge

TREATMENT, CONTROL = "treatment", "control"
# +1: the higher value is better; class rates (family class_rate) count as detections.
BETTER_SIGN = {LATENCY_P99: -1, ERROR_RATE: -1, NAN_RATE: -1, DETECTIONS_PER_IMAGE: 1, CONFIDENCE: 1}


@dataclass(frozen=True)
class ArmMetric(MetricResult):
    """A metric of an A/B test: its canary verdict (the treatment judged against the control) and the better arm."""

    better: str | None = None  # "treatment" | "control" | None (no significant difference beyond the band)


@dataclass(frozen=True)
class ArmComparison:
    winner: str | None  # "treatment" | "control" | None
    reason: str
    metrics: list[ArmMetric]
    treatment_windows: int
    control_windows: int


def compare_arms(
    treatment: Sequence[Window], control: Sequence[Window], spec: AnalysisSpec, class_names: Sequence[str],
    baselines: Mapping[str, float] | None = None,
) -> ArmComparison:  # fmt: skip
    """Which arm of an A/B test is better; no winner below ``spec.min_windows`` per arm or when mixed.
    ``baselines`` as for ``verdict.analyse``."""
    arms = Arms.of(treatment, control, spec, len(class_names), baselines)
    metrics = [
        ArmMetric(**vars(judge(m, spec, arms.enough)), better=_better(m, arms.enough) if arms.enough else None)
        for m in measure_all(arms.treatment, arms.control, spec, class_names)
    ]
    t_windows, c_windows = arms.treatment.windows, arms.control.windows
    if not arms.enough:
        return ArmComparison(None, f"inconclusive: {arms.shortfall}", metrics, t_windows, c_windows)
    winner, reason = _winner(metrics)
    return ArmComparison(winner, reason, metrics, t_windows, c_windows)


def _better(m: Measurement, enough: bool) -> str | None:
    needed = 1 if m.family == CONFIDENCE else 2
    if not (enough and m.judged and m.shift) or m.evidence < needed:
        return None
    return TREATMENT if m.shift * BETTER_SIGN.get(m.family, 1) > 0 else CONTROL


def _winner(metrics: list[ArmMetric]) -> tuple[str | None, str]:
    by_arm = {arm: [m for m in metrics if m.better == arm] for arm in (TREATMENT, CONTROL)}
    if not any(by_arm.values()):
        return None, "no difference: neither arm is better on any metric beyond its band"
    listing = "; ".join(
        f"{arm} better on " + ", ".join(f"{m.name} {m.reason}" for m in better)
        for arm, better in by_arm.items()
        if better
    )
    for arm, other in ((TREATMENT, CONTROL), (CONTROL, TREATMENT)):
        worse_critical = [m.name for m in by_arm[other] if m.critical]
        if len(by_arm[arm]) > len(by_arm[other]) and not worse_critical:
            return arm, f"{arm} wins: {listing}"
    return None, f"mixed: {listing}"
