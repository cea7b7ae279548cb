"""Telemetry windows of a rollout's arms, as devices reported them: what the dashboard's per-arm charts plot.

Each device report carries one window of counts and the latency percentiles measured in it (``devices.py``
stores it with the rollout and arm it belonged to). ``progress.arm_telemetry`` sums them per arm; this module
hands back the windows themselves, newest first and bounded, so a chart can show their spread.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from registry.rollout_service.db import Telemetry
from registry.rollout_service.records import RolloutView
from registry.rollout_service.schemas import ArmWindowsPublic, RolloutTelemetryPublic, TelemetryWindowPublic
from registry.rollout_service.targeting import CONTROL, TREATMENT


def recent_windows(session: Session, rollout: RolloutView, *, limit: int) -> RolloutTelemetryPublic:
    """The newest ``limit`` windows of each arm; the control arm only when the rollout has a control version."""
    arms = [
        _arm_windows(session, rollout.id, arm, version, limit)
        for arm, version in ((TREATMENT, rollout.version), (CONTROL, rollout.control_version))
        if version is not None
    ]
    return RolloutTelemetryPublic(rollout_id=rollout.id, arms=arms)


def _arm_windows(session: Session, rollout_id: int, arm: str, version: str, limit: int) -> ArmWindowsPublic:
    of_arm = (Telemetry.rollout_id == rollout_id, Telemetry.arm == arm)
    total = session.execute(sa.select(sa.func.count()).select_from(Telemetry).where(*of_arm)).scalar_one()
    rows = session.execute(sa.select(Telemetry).where(*of_arm).order_by(Telemetry.id.desc()).limit(limit)).scalars()
    windows = [
        TelemetryWindowPublic(
            at=row.at,
            device_id=row.device_id,
            version=row.version,
            inferences=row.inferences,
            errors=row.errors,
            p50_ms=row.latency_p50_ms,
            p99_ms=row.latency_p99_ms,
            detections_per_image=row.detections_per_image,
            mean_confidence=row.mean_confidence,
        )
        for row in rows
    ]
    return ArmWindowsPublic(arm=arm, version=version, windows_total=total, windows=windows)
