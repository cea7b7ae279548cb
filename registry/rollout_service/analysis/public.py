"""What ``GET /v1/rollouts/{id}/analysis`` answers: stored verdicts with their per-metric figures."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from registry.rollout_service.analysis.spec import AnalysisSpec


class MetricPublic(BaseModel):
    name: str
    family: str
    critical: bool
    verdict: str
    treatment: float | None
    control: float | None
    effect: float | None
    band: float | None
    p_value: float | None
    direction: str
    reason: str
    treatment_hist: list[float] | None = None
    control_hist: list[float] | None = None
    better: str | None = None  # A/B only: the arm that is better on this metric


class AnalysisPublic(BaseModel):
    id: int
    at: datetime
    wave: int
    kind: str  # canary | ab
    verdict: str  # pass | marginal | fail | inconclusive
    score: float | None
    reason: str
    action: str  # what the scheduler did with it: wait | advance | complete | halt | rollback | pause
    winner: str | None  # A/B: treatment | control | None
    treatment_version: str
    control_version: str | None
    treatment_windows: int
    control_windows: int
    metrics: list[MetricPublic]


class AnalysisReport(BaseModel):
    rollout_id: int
    strategy: str
    spec: AnalysisSpec
    latest: AnalysisPublic | None
    history: list[AnalysisPublic]  # newest first


def metric_public(metric: Any) -> MetricPublic:
    data = {k: getattr(metric, k, None) for k in MetricPublic.model_fields}
    data["verdict"] = str(getattr(metric.verdict, "value", metric.verdict))
    return MetricPublic.model_validate(data)
