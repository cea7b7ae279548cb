"""What operators read: rollouts with their progress, their telemetry windows, the audit log and promotions.

Read-only, each in one session, answered as the REST schemas (``RolloutDetail``, ``AuditList``, ...), so a route
only picks the method. Writes live with the managers (``rollouts``, ``devices``, ``promotions``).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from registry.rollout_service.analysis.public import AnalysisReport
from registry.rollout_service.db import AuditRecord, Promotion
from registry.rollout_service.progress import arm_telemetry, wave_progress
from registry.rollout_service.records import RolloutView
from registry.rollout_service.rollouts import RolloutManager
from registry.rollout_service.schemas import (
    AuditEntry,
    AuditList,
    PromotionList,
    PromotionPublic,
    RolloutDetail,
    RolloutList,
    RolloutPublic,
    RolloutState,
    RolloutTelemetryPublic,
)
from registry.rollout_service.telemetry import recent_windows


def rollout_public(rollout: RolloutView) -> RolloutPublic:
    return RolloutPublic.model_validate(
        {name: getattr(rollout, name) for name in RolloutPublic.model_fields}, from_attributes=False
    )


class Queries:
    """The reads behind the operators' ``GET`` routes."""

    def __init__(self, sessions: sessionmaker[Session], rollouts: RolloutManager) -> None:
        self._sessions = sessions
        self._rollouts = rollouts

    # -- rollouts --------------------------------------------------------------------------------------------

    def rollouts(self, *, model: str | None = None, state: RolloutState | None = None, limit: int = 100) -> RolloutList:
        found = self._rollouts.find(model=model, state=state.value if state else None, limit=limit)
        return RolloutList(rollouts=[rollout_public(r) for r in found])

    def rollout(self, rollout_id: int) -> RolloutDetail:
        return self.detail(self._rollouts.get(rollout_id))

    def detail(self, rollout: RolloutView) -> RolloutDetail:
        """``rollout`` with who is targeted and skipped, per-wave progress and per-arm telemetry."""
        with self._sessions() as session:
            progress = self._rollouts.progress(session, rollout)
            arms = arm_telemetry(session, rollout, progress)
        halted = rollout.current_wave if rollout.state == RolloutState.halted else None
        return RolloutDetail(
            **rollout_public(rollout).model_dump(),
            targeted=progress.targeted,
            skipped_incompatible=sum(progress.skipped.values()),
            incompatible_reasons=dict(progress.skipped),
            wave_progress=wave_progress(rollout, progress, halted),
            arms=arms if rollout.strategy == "ab" or rollout.control_version else arms[:1],
            analysis=self._rollouts.analysis.latest(rollout.id),
        )

    def analysis(self, rollout_id: int, *, limit: int) -> AnalysisReport:
        """The fleet analysis of a rollout: its spec and stored verdicts, newest first."""
        return self._rollouts.analysis.report(self._rollouts.get(rollout_id), limit=limit)

    def telemetry(self, rollout_id: int, *, limit: int) -> RolloutTelemetryPublic:
        """The newest ``limit`` telemetry windows of each of the rollout's arms."""
        rollout = self._rollouts.get(rollout_id)
        with self._sessions() as session:
            return recent_windows(session, rollout, limit=limit)

    # -- audit log and promotions ----------------------------------------------------------------------------

    def audit(self, *, rollout_id: int | None = None, limit: int = 200) -> AuditList:
        """The newest ``limit`` audit entries, of one rollout when ``rollout_id`` is given."""
        query = sa.select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
        if rollout_id is not None:
            query = query.where(AuditRecord.rollout_id == rollout_id)
        with self._sessions() as session:
            rows = session.execute(query).scalars().all()
            return AuditList(entries=[AuditEntry.model_validate(r, from_attributes=True) for r in rows])

    def promotions(self, *, limit: int = 100) -> PromotionList:
        """The newest ``limit`` alias moves seen, with what was done about each."""
        with self._sessions() as session:
            rows = session.execute(sa.select(Promotion).order_by(Promotion.id.desc()).limit(limit)).scalars().all()
            return PromotionList(promotions=[PromotionPublic.model_validate(r, from_attributes=True) for r in rows])
