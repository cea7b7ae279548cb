"""Progress of one rollout: who is targeted, skipped, in which wave and arm, who succeeded or failed, and the
telemetry per arm; and ``decide``, the scheduler's reading of it (before the fleet analysis has its say).
Read-only; ``GET /v1/rollouts/{id}`` shows it.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from registry.rollout_service.db import DeviceOutcome, Telemetry
from registry.rollout_service.records import DeviceView, RolloutView
from registry.rollout_service.schemas import ArmTelemetry, Strategy, WaveProgress
from registry.rollout_service.targeting import CONTROL, TREATMENT, SummaryOf, cohort_positions, place


@dataclass
class WaveCount:
    devices: int = 0
    succeeded: int = 0
    failed: int = 0


@dataclass
class RolloutProgress:
    targeted: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    waves: list[WaveCount] = field(default_factory=list)  # devices *first included* in each wave
    arms: dict[str, WaveCount] = field(default_factory=dict)

    def included(self, wave: int) -> WaveCount:
        """Devices in waves 0..``wave`` together: the population a wave's thresholds are judged on."""
        total = WaveCount()
        for count in self.waves[: wave + 1]:
            total.devices += count.devices
            total.succeeded += count.succeeded
            total.failed += count.failed
        return total


def measure(
    session: Session,
    rollout: RolloutView,
    devices: Iterable[DeviceView],
    summary_of: SummaryOf,
    preference: list[str],
) -> RolloutProgress:
    """Place every enrolled device and count outcomes for the rollout's new version (and control, for A/B)."""
    outcomes = {
        row.device_id: row
        for row in session.execute(sa.select(DeviceOutcome).where(DeviceOutcome.rollout_id == rollout.id)).scalars()
    }
    progress = RolloutProgress(
        waves=[WaveCount() for _ in rollout.waves], arms={TREATMENT: WaveCount(), CONTROL: WaveCount()}
    )
    devices = list(devices)
    positions = cohort_positions(rollout, devices, summary_of, preference)
    for device in devices:
        placement = place(rollout, device, summary_of, preference, positions)
        if not placement.targeted:
            continue
        progress.targeted += 1
        if not placement.compatible:
            progress.skipped[_short(placement.skip_reason or "incompatible")] += 1
            continue
        arm_version = (
            rollout.version if placement.arm == TREATMENT or rollout.strategy != "ab" else rollout.control_version
        )
        outcome = outcomes.get(device.id)
        succeeded = outcome is not None and outcome.version == arm_version and outcome.outcome == "succeeded"
        failed = outcome is not None and outcome.version == arm_version and outcome.outcome == "failed"
        arm = progress.arms[placement.arm or CONTROL]
        arm.devices += 1
        arm.succeeded += succeeded
        arm.failed += failed
        wave = progress.waves[min(placement.wave, len(progress.waves) - 1)]
        wave.devices += 1
        if rollout.version == (outcome.version if outcome else None):
            wave.succeeded += succeeded
            wave.failed += failed
    return progress


def _short(reason: str) -> str:
    return reason if len(reason) <= 200 else reason[:197] + "..."


# What the current wave is doing when the rollout is not running.
_CURRENT_WAVE_STATE = {"paused": "paused", "aborted": "stopped", "rolled_back": "rolled_back", "pending": "waiting"}


def wave_progress(rollout: RolloutView, progress: RolloutProgress, halted_wave: int | None) -> list[WaveProgress]:
    rows: list[WaveProgress] = []
    for index, spec in enumerate(rollout.waves):
        included = progress.included(index)
        if index < rollout.current_wave or (index == rollout.current_wave and rollout.state == "completed"):
            state = "passed"
        elif index == rollout.current_wave:
            state = _CURRENT_WAVE_STATE.get(rollout.state, "baking")
            if halted_wave == index:
                state = "halted"
        else:
            state = "waiting"
        started: datetime | None = rollout.wave_started_at if index == rollout.current_wave else None
        rows.append(
            WaveProgress(
                index=index,
                percent=float(spec["percent"]),
                bake_s=float(spec["bake_s"]),
                max_failure_rate=float(spec["max_failure_rate"]),
                min_success_rate=float(spec["min_success_rate"]),
                state=state,
                started_at=started,
                devices=included.devices,
                succeeded=included.succeeded,
                failed=included.failed,
                pending=included.devices - included.succeeded - included.failed,
            )
        )
    return rows


def arm_telemetry(session: Session, rollout: RolloutView, progress: RolloutProgress) -> list[ArmTelemetry]:
    """Sum of counts and the median of devices' reported percentiles, per arm (each report is one window)."""
    arms: list[ArmTelemetry] = []
    for arm, version in ((TREATMENT, rollout.version), (CONTROL, rollout.control_version)):
        rows = list(
            session.execute(
                sa.select(Telemetry).where(Telemetry.rollout_id == rollout.id, Telemetry.arm == arm)
            ).scalars()
        )
        count = progress.arms.get(arm, WaveCount())
        inferences = sum(r.inferences for r in rows)
        errors = sum(r.errors for r in rows)
        weights = [max(r.inferences, 1) for r in rows]
        arms.append(
            ArmTelemetry(
                arm=arm,
                version=version,
                devices=count.devices,
                succeeded=count.succeeded,
                failed=count.failed,
                reports=len(rows),
                inferences=inferences,
                errors=errors,
                error_rate=errors / inferences if inferences else None,
                latency_p50_ms=statistics.median(r.latency_p50_ms for r in rows) if rows else None,
                latency_p99_ms=_quantile([r.latency_p99_ms for r in rows], 0.99) if rows else None,
                detections_per_image=_weighted([r.detections_per_image for r in rows], weights),
                mean_confidence=_weighted([r.mean_confidence for r in rows], weights),
            )
        )
    return arms


def _weighted(values: list[float], weights: list[int]) -> float | None:
    if not values:
        return None
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass(frozen=True)
class Decision:
    """What the scheduler wants to do with one running rollout."""

    action: str  # halt | advance | complete | wait
    reason: str


def decide(rollout: RolloutView, progress: RolloutProgress, *, now: datetime) -> Decision:
    """Halt past the failure threshold; after the bake time, advance (or complete) at the success threshold."""
    index = rollout.current_wave
    spec = rollout.waves[index]
    if rollout.strategy == Strategy.ab:
        treatment = progress.arms.get("treatment")
        if treatment and treatment.devices and treatment.failed / treatment.devices > spec["max_failure_rate"]:
            return Decision(
                "halt",
                f"treatment arm: {treatment.failed} of {treatment.devices} devices failed "
                f"({treatment.failed / treatment.devices:.0%} > {spec['max_failure_rate']:.0%})",
            )
        return Decision("wait", "A/B tests run until an operator ends them")
    included = progress.included(index)
    if included.devices:
        failure_rate = included.failed / included.devices
        if failure_rate > spec["max_failure_rate"]:
            return Decision(
                "halt",
                f"wave {index + 1}: {included.failed} of {included.devices} devices failed "
                f"({failure_rate:.0%} > {spec['max_failure_rate']:.0%})",
            )
    started = rollout.wave_started_at or rollout.created_at
    if now - started < timedelta(seconds=float(spec["bake_s"])):
        return Decision("wait", "baking")
    success_rate = included.succeeded / included.devices if included.devices else 1.0
    if success_rate < spec["min_success_rate"]:
        return Decision("wait", f"wave {index + 1}: {included.succeeded} of {included.devices} succeeded so far")
    summary = f"wave {index + 1}: {included.succeeded} of {included.devices} devices succeeded"
    if index + 1 < len(rollout.waves):
        return Decision("advance", f"{summary}; on to wave {index + 2} ({rollout.waves[index + 1]['percent']:g}%)")
    return Decision("complete", summary)
