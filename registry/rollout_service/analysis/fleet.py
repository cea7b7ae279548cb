"""The fleet analysis of running rollouts: windows from the store, verdicts stored, audited and tagged.

For a canary wave the treatment is every window of the rollout's new version since the wave started, the control
every window of the previous version from the rollout's other devices in the same span; for an A/B test, the two
arms since the test started. Each device's windows on the previous version before the rollout give its latency
baseline (``windows.on_own_scale``). ``consequence`` turns a verdict into what the scheduler does (docs/analysis.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from registry.rollout_service.analysis.ab import compare_arms
from registry.rollout_service.analysis.public import AnalysisPublic, AnalysisReport, MetricPublic, metric_public
from registry.rollout_service.analysis.spec import AnalysisSpec, OnFail, OnInconclusive, ShadowSpec, Verdict, merged
from registry.rollout_service.analysis.stats import Window
from registry.rollout_service.analysis.verdict import analyse
from registry.rollout_service.analysis.windows import baselines_of
from registry.rollout_service.bundles import BundleCatalog
from registry.rollout_service.db import AnalysisRecord, Telemetry, transaction
from registry.rollout_service.errors import InvalidRequestError
from registry.rollout_service.records import RolloutView, audit
from registry.rollout_service.targeting import CONTROL, TREATMENT

log = logging.getLogger(__name__)

Tagger = Callable[[str, str, dict[str, str]], None]  # (model, version, tags)
FLEET_TAG_PREFIX = "ota.fleet."
BASELINE_MIN_WINDOWS = 3  # a device's latency baseline is the median of at least this many windows
BASELINE_ROWS_PER_WINDOW = 4  # rows read for the baselines: this many times the windows an arm may hold


def rollout_specs(
    analysis_default: AnalysisSpec, shadow_default: ShadowSpec, analysis: dict[str, Any] | None,
    shadow: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """A rollout's two blocks over the server's defaults; 422 naming the field when one is not valid."""
    out = []
    for name, default, override in (("analysis", analysis_default, analysis), ("shadow", shadow_default, shadow)):
        try:
            out.append(merged(default, override).model_dump(mode="json"))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in (name, *first["loc"]))
            raise InvalidRequestError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
    return out[0], out[1]


@dataclass(frozen=True)
class Judgement:
    """One evaluation: the verdict (canary) or the winner (A/B), with every metric's figures."""

    kind: str  # canary | ab
    verdict: Verdict
    score: float | None
    reason: str
    winner: str | None
    metrics: list[MetricPublic]
    treatment_windows: int
    control_windows: int


def window_of(row: Telemetry) -> Window:
    histograms = row.histograms or {}
    counts = {int(k): int(v) for k, v in (row.class_counts or {}).items()}
    frames = row.frames if row.frames is not None else row.inferences - row.errors
    return Window(
        device_id=row.device_id,
        inferences=row.inferences,
        errors=row.errors,
        nonfinite=row.nonfinite or 0,
        frames=frames if row.histograms is not None else 0,
        latency_p99_ms=row.latency_p99_ms,
        detections=sum(counts.values()),
        class_counts=counts,
        confidence=tuple(histograms.get("confidence", ())),
        latency_hist=tuple(histograms.get("latency_ms", ())),
        detections_hist=tuple(histograms.get("detections", ())),
    )


class FleetAnalysis:
    def __init__(
        self, sessions: sessionmaker[Session], catalog: BundleCatalog, default: AnalysisSpec, tagger: Tagger | None
    ) -> None:
        self._sessions = sessions
        self._catalog = catalog
        self._default = default
        self._tagger = tagger

    def spec_of(self, rollout: RolloutView) -> AnalysisSpec:
        return AnalysisSpec.model_validate(rollout.analysis) if rollout.analysis else self._default

    def applies(self, rollout: RolloutView) -> bool:
        """Canary waves and A/B tests with something to compare against, unless the rollout switched it off. A
        canary wave of 100 % leaves no device on the previous version, so no control: the waves before it judged
        the version, and the device thresholds alone decide that one."""
        if rollout.strategy == "canary" and rollout.percents[rollout.current_wave] >= 100:
            return False
        return (
            rollout.strategy in ("canary", "ab")
            and rollout.control_version is not None
            and self.spec_of(rollout).enabled
        )

    def judge(self, rollout: RolloutView) -> Judgement:
        spec = self.spec_of(rollout)
        since = rollout.created_at if rollout.strategy == "ab" else (rollout.wave_started_at or rollout.created_at)
        with self._sessions() as session:
            treatment = self._windows(session, rollout.id, TREATMENT, since, spec.max_windows)
            control = self._windows(session, rollout.id, CONTROL, since, spec.max_windows)
            baselines = self._baselines(session, rollout, spec) if spec.latency_baseline_s > 0 else None
        names = self._catalog.summary(rollout.model, rollout.version).class_names
        if rollout.strategy == "ab":
            ab = compare_arms(treatment, control, spec, names, baselines)
            verdict = Verdict.inconclusive if ab.reason.startswith("inconclusive") else Verdict.passed
            return Judgement("ab", verdict, None, ab.reason, ab.winner, [metric_public(m) for m in ab.metrics],
                             ab.treatment_windows, ab.control_windows)  # fmt: skip
        result = analyse(treatment, control, spec, names, baselines)
        return Judgement("canary", result.verdict, result.score, result.reason, None,
                         [metric_public(m) for m in result.metrics], result.treatment_windows,
                         result.control_windows)  # fmt: skip

    @staticmethod
    def _windows(session: Session, rollout_id: int, arm: str, since: datetime, limit: int) -> list[Window]:
        rows = session.execute(
            sa.select(Telemetry)
            .where(Telemetry.rollout_id == rollout_id, Telemetry.arm == arm, Telemetry.at >= since)
            .order_by(Telemetry.id.desc())
            .limit(limit)
        ).scalars()
        return [window_of(row) for row in reversed(list(rows))]

    @staticmethod
    def _baselines(session: Session, rollout: RolloutView, spec: AnalysisSpec) -> dict[str, float]:
        """Each device's median p99 on the previous version in ``latency_baseline_s`` before the rollout."""
        begin = rollout.created_at - timedelta(seconds=spec.latency_baseline_s)
        rows = session.execute(
            sa.select(Telemetry.device_id, Telemetry.latency_p99_ms)
            .where(
                Telemetry.model == rollout.model,
                Telemetry.version == rollout.control_version,
                Telemetry.at >= begin,
                Telemetry.at < rollout.created_at,
                Telemetry.inferences > Telemetry.errors,
            )
            .order_by(Telemetry.id.desc())
            .limit(BASELINE_ROWS_PER_WINDOW * spec.max_windows)
        ).all()
        return baselines_of([(device, p99) for device, p99 in rows], BASELINE_MIN_WINDOWS)

    def due(self, rollout: RolloutView, now: datetime) -> bool:
        """Whether the last stored verdict of this wave is older than the spec's interval."""
        last = self.latest(rollout.id)
        if last is None or last.wave != rollout.current_wave:
            return True
        return now - last.at >= timedelta(seconds=self.spec_of(rollout).interval_s)

    def store(self, rollout: RolloutView, judgement: Judgement, action: str, now: datetime) -> None:
        """Keep the verdict; audit and tag it when its verdict, winner or action differs from the last one."""
        last = self.latest(rollout.id)
        changed = last is None or (last.verdict, last.winner, last.action, last.wave) != (
            judgement.verdict.value, judgement.winner, action, rollout.current_wave)  # fmt: skip
        with transaction(self._sessions) as session:
            session.add(AnalysisRecord(
                rollout_id=rollout.id, at=now, wave=rollout.current_wave, kind=judgement.kind,
                verdict=judgement.verdict.value, score=judgement.score, reason=judgement.reason[:4000], action=action,
                winner=judgement.winner, treatment_version=rollout.version, control_version=rollout.control_version,
                treatment_windows=judgement.treatment_windows, control_windows=judgement.control_windows,
                metrics=[m.model_dump(mode="json") for m in judgement.metrics],
            ))  # fmt: skip
            if changed:
                reason = f"wave {rollout.current_wave + 1}: {judgement.reason}"[:4000]
                audit(session, actor="analysis", action="analysis", rollout_id=rollout.id, model=rollout.model,
                      version=rollout.version, reason=reason)  # fmt: skip
        if changed:
            log.info("rollout %d wave %d analysis: %s -> %s", rollout.id, rollout.current_wave + 1, judgement.reason,
                     action)  # fmt: skip
            self._tag(rollout, judgement)

    def _tag(self, rollout: RolloutView, judgement: Judgement) -> None:
        if self._tagger is None:
            return
        tags = {
            "verdict": judgement.verdict.value,
            "score": "" if judgement.score is None else f"{judgement.score:g}",
            "rollout": str(rollout.id),
            "reason": judgement.reason[:4000],
        }
        if judgement.kind == "ab":
            arms = {TREATMENT: rollout.version, CONTROL: rollout.control_version or ""}
            tags["winner"] = arms.get(judgement.winner or "", "none")
        tags |= {f"metric.{m.name}": m.verdict for m in judgement.metrics}
        try:
            self._tagger(rollout.model, rollout.version, {FLEET_TAG_PREFIX + k: v for k, v in tags.items()})
        except Exception as exc:  # the verdict stands and is audited; the tag is a copy for the registry's readers
            log.warning("could not tag version %s of %s with its fleet verdict: %s", rollout.version, rollout.model,
                        exc)  # fmt: skip

    def latest(self, rollout_id: int) -> AnalysisPublic | None:
        history = self.history(rollout_id, limit=1)
        return history[0] if history else None

    def history(self, rollout_id: int, *, limit: int = 50) -> list[AnalysisPublic]:
        with self._sessions() as session:
            rows = session.execute(
                sa.select(AnalysisRecord)
                .where(AnalysisRecord.rollout_id == rollout_id)
                .order_by(AnalysisRecord.id.desc())
                .limit(limit)
            ).scalars()
            return [_public(row) for row in rows]

    def report(self, rollout: RolloutView, *, limit: int = 50) -> AnalysisReport:
        history = self.history(rollout.id, limit=limit)
        return AnalysisReport(rollout_id=rollout.id, strategy=rollout.strategy, spec=self.spec_of(rollout),
                              latest=history[0] if history else None, history=history)  # fmt: skip


def _public(row: AnalysisRecord) -> AnalysisPublic:
    return AnalysisPublic(
        id=row.id, at=row.at, wave=row.wave, kind=row.kind, verdict=row.verdict, score=row.score, reason=row.reason,
        action=row.action, winner=row.winner, treatment_version=row.treatment_version,
        control_version=row.control_version, treatment_windows=row.treatment_windows,
        control_windows=row.control_windows, metrics=[MetricPublic.model_validate(m) for m in row.metrics],
    )  # fmt: skip


def consequence(rollout: RolloutView, judgement: Judgement, spec: AnalysisSpec, planned: str, *, now: datetime) -> str:
    """What the scheduler does, given what the device thresholds alone would do (``planned``).

    Canary: fail -> halt or rollback at once; after the bake, pass lets ``planned`` happen, marginal pauses,
    inconclusive waits until ``inconclusive_timeout_s`` past the bake and then follows ``on_inconclusive``.
    A/B: with ``auto_complete``, a winner ends the test on it (treatment: complete; control: rollback)."""
    if judgement.kind == "ab":
        if rollout.ab and rollout.ab.get("auto_complete") and judgement.winner:
            return "complete" if judgement.winner == TREATMENT else "rollback"
        return "wait"
    if judgement.verdict == Verdict.failed:
        return "rollback" if spec.on_fail == OnFail.rollback else "halt"
    if planned not in ("advance", "complete"):
        return planned  # still baking, or waiting for devices
    if judgement.verdict == Verdict.passed:
        return planned
    if judgement.verdict == Verdict.marginal:
        return "pause"
    bake_end = (rollout.wave_started_at or rollout.created_at) + timedelta(
        seconds=float(rollout.waves[rollout.current_wave]["bake_s"]))  # fmt: skip
    if now - bake_end < timedelta(seconds=spec.inconclusive_timeout_s):
        return "wait"
    return {OnInconclusive.pause: "pause", OnInconclusive.halt: "halt", OnInconclusive.rollback: "rollback",
            OnInconclusive.advance: planned}[spec.on_inconclusive]  # fmt: skip
