"""Rollouts: creation, the operator's controls, and the wave scheduler.

Every transition is a compare-and-set on the rollout's ``revision`` column, written with its audit record in one
transaction: when two replicas evaluate the same wave at once, exactly one update matches and the other finds
nothing to do. That is what keeps waves from double-advancing, without any lock held in a process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from registry.rollout_service.analysis.fleet import FleetAnalysis, consequence, rollout_specs
from registry.rollout_service.assignment import selector_key
from registry.rollout_service.bundles import BundleCatalog
from registry.rollout_service.db import Rollout, transaction, utcnow
from registry.rollout_service.errors import ConflictError, InvalidRequestError, NotFoundError
from registry.rollout_service.progress import Decision, RolloutProgress, decide, measure
from registry.rollout_service.records import DeviceView, RolloutView, audit, bump_generation
from registry.rollout_service.revocations import NONE_YET, CurrentRevocations
from registry.rollout_service.schemas import ACTIVE_STATES, RolloutCreate, RolloutState, Strategy, WaveSpec
from registry.rollout_service.settings import ServiceSettings
from registry.rollout_service.supersede import audit_superseded, end_active, one_active

log = logging.getLogger(__name__)

# action -> (states it applies to, state it leads to)
_CONTROLS: dict[str, tuple[frozenset[RolloutState], RolloutState]] = {
    "pause": (frozenset({RolloutState.running}), RolloutState.paused),
    "resume": (frozenset({RolloutState.paused, RolloutState.halted}), RolloutState.running),
    "abort": (ACTIVE_STATES, RolloutState.aborted),
    "rollback": (ACTIVE_STATES | {RolloutState.completed, RolloutState.aborted}, RolloutState.rolled_back),
    "approve": (frozenset({RolloutState.waiting_for_approval}), RolloutState.running),
    "reject": (frozenset({RolloutState.waiting_for_approval}), RolloutState.rejected),
}
CONTROL_ACTIONS = tuple(_CONTROLS)
# scheduler decisions that stop a rollout -> the state they lead to
_STOPS = {"halt": RolloutState.halted, "rollback": RolloutState.rolled_back, "pause": RolloutState.paused}


class RolloutManager:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        catalog: BundleCatalog,
        settings: ServiceSettings,
        fleet: Callable[[], list[DeviceView]],
        on_change: Callable[[], None] = lambda: None,
        analysis: FleetAnalysis | None = None,
        revocations: Callable[[], CurrentRevocations] = lambda: NONE_YET,
    ) -> None:
        self._sessions = sessions
        self._revocations = revocations  # the latest revocation list, cached per state generation
        self._catalog = catalog
        self._settings = settings
        self._fleet = fleet  # every enrolled device, cached per state generation
        self._on_change = on_change  # called after every committed change, so this replica's caches follow at once
        self.analysis = analysis or FleetAnalysis(sessions, catalog, settings.analysis, tagger=None)

    # -- reading ---------------------------------------------------------------------------------------------

    def get(self, rollout_id: int) -> RolloutView:
        with self._sessions() as session:
            row = session.get(Rollout, rollout_id)
            if row is None:
                raise NotFoundError(f"no rollout {rollout_id}")
            return RolloutView.of(row)

    def find(self, *, model: str | None = None, state: str | None = None, limit: int = 100) -> list[RolloutView]:
        query = sa.select(Rollout).order_by(Rollout.id.desc()).limit(limit)
        if model:
            query = query.where(Rollout.model == model)
        if state:
            query = query.where(Rollout.state == state)
        with self._sessions() as session:
            return [RolloutView.of(row) for row in session.execute(query).scalars()]

    def progress(self, session: Session, rollout: RolloutView) -> RolloutProgress:
        return measure(session, rollout, self._fleet(), self._catalog.summary, self._settings.variant_order)

    # -- creating --------------------------------------------------------------------------------------------

    def create(self, body: RolloutCreate, *, actor: str, waiting: bool = False) -> RolloutView:
        """Check the versions in the registry, supersede or refuse an active rollout of the same device set, start.

        ``waiting``: create it ``waiting_for_approval`` instead; it offers nothing and supersedes nothing until an
        operator approves it (``control(..., "approve")``).
        """
        key = selector_key(body.selector.model_dump())
        with self._sessions() as session:
            previous = body.previous_version or self._previous_version(session, body.model, key)
            # what these devices run, or are being moved to, now: the downgrade check compares with all of it
            on_devices = {v for v in (previous, *(r.version for r in self._active(session, body.model, key))) if v}
        self._check_versions(body, previous, on_devices)
        view = one_active(
            lambda: self._insert(body, key, actor=actor, waiting=waiting), what=f"rollout of {body.model}"
        )
        self._on_change()
        log.info(
            "rollout %d created: %s version %s, %s, by %s", view.id, view.model, view.version, view.strategy, actor
        )
        return view

    def _insert(self, body: RolloutCreate, key: str, *, actor: str, waiting: bool) -> RolloutView:
        """One try at ``create``'s transaction: end the active rollouts it reads, then insert the new one."""
        now = utcnow()
        with transaction(self._sessions) as session:
            active = [] if waiting else self._active(session, body.model, key)
            if active and not body.supersede:
                ids = ", ".join(str(r.id) for r in active)
                raise ConflictError(
                    f"rollout {ids} of {body.model} is still {active[0].state} for these devices; "
                    "finish it, or pass supersede=true"
                )
            end_active(session, active, now=now)  # first: the index admits one active rollout per device set
            row = self._new_row(session, body, key, actor=actor, now=now)
            if waiting:
                row.state = RolloutState.waiting_for_approval.value
            session.add(row)
            session.flush()
            audit_superseded(session, active, by=row.id, actor=actor)
            orders = [
                o for o, on in (("downgrade ordered", body.allow_downgrade), ("gates forced", body.force_gates)) if on
            ]
            audit(
                session,
                actor=actor,
                action="created",
                rollout_id=row.id,
                model=row.model,
                version=row.version,
                reason=f"{row.strategy} rollout"
                + (", waiting for approval" if waiting else "")
                + "".join(f", {order} by {actor}" for order in orders)
                + (f": {body.reason}" if body.reason else ""),
            )
            bump_generation(session)
            return RolloutView.of(row)

    def _check_versions(self, body: RolloutCreate, previous_version: str | None, on_devices: set[str]) -> None:
        """Every version the rollout names exists (404 otherwise) and is not revoked (422); the new one and an A/B
        control passed their gates unless forced (422); the new one is no older a release than any version
        ``on_devices`` unless a downgrade is ordered (409). ``previous_version`` ran on these devices already (forced,
        if its gates failed), so a rollback to it needs no new force."""
        new = self._catalog.summary(body.model, body.version)
        if not new.gates_passed and not body.force_gates:
            raise InvalidRequestError(
                f"version {body.version} of {body.model} did not pass its gates; not rolled out "
                "(force_gates=true rolls it out anyway, recorded, and devices run it on that order only)"
            )
        control = body.ab.control_version if body.ab else None
        if control is not None and not self._catalog.summary(body.model, control).gates_passed and not body.force_gates:
            raise InvalidRequestError(
                f"control version {control} of {body.model} did not pass its gates (force_gates=true to order it)"
            )
        for version in [body.version] + [v for v in (control, previous_version) if v]:
            summary = self._catalog.summary(body.model, version)
            revoked = self._revocations().revocations.entry_for(body.model, summary.manifest_sha256)
            if revoked is not None:
                raise InvalidRequestError(
                    f"version {version} of {body.model} is revoked"
                    + (f" ({revoked.reason})" if revoked.reason else "")
                    + "; no rollout may install it"
                )
        if on_devices and not body.allow_downgrade:
            newest = max((self._catalog.summary(body.model, v) for v in on_devices), key=lambda b: b.release_order)
            if new.release_order < newest.release_order:
                raise ConflictError(
                    f"version {body.version} of {body.model} (release {new.release or 'unnumbered'}) is older than "
                    f"version {newest.version} (release {newest.release}), which these devices run: a downgrade; "
                    "pass allow_downgrade=true to order it (devices refuse an older release otherwise)"
                )

    @staticmethod
    def _active(session: Session, model: str, key: str) -> list[Rollout]:
        """The active rollouts of ``model`` for the device set ``key``."""
        query = sa.select(Rollout).where(
            Rollout.model == model,
            Rollout.selector_key == key,
            Rollout.state.in_([s.value for s in ACTIVE_STATES]),
        )
        return list(session.execute(query).scalars().all())

    def _new_row(self, session: Session, body: RolloutCreate, key: str, *, actor: str, now: datetime) -> Rollout:
        """The running rollout ``body`` asks for, at its first wave from ``now``."""
        analysis, shadow = rollout_specs(self._settings.analysis, self._settings.shadow, body.analysis, body.shadow)
        return Rollout(
            model=body.model,
            version=body.version,
            previous_version=body.previous_version or self._previous_version(session, body.model, key),
            allow_downgrade=body.allow_downgrade,
            force_gates=body.force_gates,
            strategy=body.strategy.value,
            state=RolloutState.running.value,
            selector=body.selector.model_dump(),
            selector_key=key,
            waves=[w.model_dump() for w in self._waves(body)],
            ab=body.ab.model_dump() if body.ab else None,
            analysis=analysis,
            shadow=shadow,
            current_wave=0,
            wave_started_at=now,
            revision=0,
            created_by=actor,
            reason=body.reason,
            created_at=now,
            updated_at=now,
        )

    def _waves(self, body: RolloutCreate) -> list[WaveSpec]:
        if body.strategy == Strategy.immediate:
            return [WaveSpec(percent=100, bake_s=0)]
        if body.waves:
            return body.waves
        if body.strategy == Strategy.ab:
            first = self._settings.default_waves[0]
            return [WaveSpec(percent=100, bake_s=0, max_failure_rate=first.max_failure_rate, min_success_rate=0)]
        return list(self._settings.default_waves)

    @staticmethod
    def _previous_version(session: Session, model: str, key: str) -> str | None:
        """The version the last completed rollout of this model left on these devices."""
        return session.execute(
            sa.select(Rollout.version)
            .where(Rollout.model == model, Rollout.selector_key == key, Rollout.state == RolloutState.completed.value)
            .order_by(Rollout.id.desc())
            .limit(1)
        ).scalar()

    # -- operator controls -----------------------------------------------------------------------------------

    def control(self, rollout_id: int, action: str, *, actor: str, reason: str = "") -> RolloutView:
        """pause | resume | abort | rollback, refused with 409 from a state it does not apply to."""
        if action not in _CONTROLS:
            raise NotFoundError(f"no rollout action {action!r}; known: {', '.join(_CONTROLS)}")
        sources, target = _CONTROLS[action]
        current = self.get(rollout_id)
        if RolloutState(current.state) not in sources:
            raise ConflictError(
                f"rollout {rollout_id} is {current.state}; {action} applies to "
                f"{', '.join(sorted(s.value for s in sources))}"
            )
        if action == "rollback" and current.control_version is None:
            raise ConflictError(f"rollout {rollout_id} has no previous version to roll back to")
        if action == "approve":
            return self._approve(current, actor=actor, reason=reason)
        restarted = utcnow() if action == "resume" else None  # a resumed wave bakes again from now
        if not self._transition(current, target, actor=actor, action=action, reason=reason, wave_started_at=restarted):
            raise ConflictError(f"rollout {rollout_id} changed while {action} was being applied; try again")
        return self.get(rollout_id)

    def _approve(self, rollout: RolloutView, *, actor: str, reason: str) -> RolloutView:
        """Start a waiting rollout at its first wave from now, superseding the active ones of its device set."""
        one_active(lambda: self._start_approved(rollout, actor=actor, reason=reason), what=f"rollout {rollout.id}")
        self._on_change()
        log.info("rollout %d approved by %s", rollout.id, actor)
        return self.get(rollout.id)

    def _start_approved(self, rollout: RolloutView, *, actor: str, reason: str) -> None:
        """One try at ``_approve``'s transaction: end the active rollouts of its device set, then start it."""
        now = utcnow()
        with transaction(self._sessions) as session:
            active = self._active(session, rollout.model, rollout.selector_key)
            end_active(session, active, now=now)  # first: the index admits one active rollout per device set
            done = session.execute(
                sa.update(Rollout)
                .where(Rollout.id == rollout.id, Rollout.revision == rollout.revision)
                .values(
                    state=RolloutState.running.value, revision=rollout.revision + 1, updated_at=now, wave_started_at=now
                )
                .execution_options(synchronize_session=False)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise ConflictError(f"rollout {rollout.id} changed while it was being approved; try again")
            audit_superseded(session, active, by=rollout.id, actor=actor)
            audit(
                session, actor=actor, action="approve", rollout_id=rollout.id, model=rollout.model,
                version=rollout.version, reason=reason,
            )  # fmt: skip
            bump_generation(session)

    def _transition(
        self,
        rollout: RolloutView,
        target: RolloutState,
        *,
        actor: str,
        action: str,
        reason: str,
        current_wave: int | None = None,
        wave_started_at: datetime | None = None,
    ) -> bool:
        """Compare-and-set from the revision ``rollout`` was read at; False when another writer got there first."""
        values: dict[str, object] = {"state": target.value, "revision": rollout.revision + 1, "updated_at": utcnow()}
        if current_wave is not None:
            values["current_wave"] = current_wave
        if wave_started_at is not None:
            values["wave_started_at"] = wave_started_at
        with transaction(self._sessions) as session:
            done = session.execute(
                sa.update(Rollout)
                .where(Rollout.id == rollout.id, Rollout.revision == rollout.revision)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                return False
            version = rollout.control_version if target == RolloutState.rolled_back else rollout.version
            audit(
                session,
                actor=actor,
                action=action,
                rollout_id=rollout.id,
                model=rollout.model,
                version=version,
                reason=reason,
            )
            bump_generation(session)
        self._on_change()
        log.info("rollout %d %s -> %s (%s by %s)", rollout.id, rollout.state, target.value, action, actor)
        return True

    # -- scheduler -------------------------------------------------------------------------------------------

    def evaluate_all(self, *, now: datetime | None = None) -> int:
        """One scheduler pass over running rollouts; returns how many transitions this replica made."""
        made = 0
        for rollout in self.find(state=RolloutState.running.value, limit=10_000):
            try:
                made += self.evaluate(rollout, now=now or utcnow())
            except Exception:  # one broken rollout must not stop the others
                log.exception("rollout %d: evaluation failed", rollout.id)
        return made

    def evaluate(self, rollout: RolloutView, *, now: datetime) -> int:
        with self._sessions() as session:
            progress = self.progress(session, rollout)
        decision = decide(rollout, progress, now=now)
        if decision.action != "halt" and self.analysis.applies(rollout):
            decision = self._judged(rollout, decision, now)
        if decision.action == "wait":
            return 0
        if decision.action in _STOPS:
            done = self._transition(
                rollout, _STOPS[decision.action], actor="scheduler", action=decision.action, reason=decision.reason
            )
        elif decision.action == "advance":
            done = self._transition(
                rollout,
                RolloutState.running,
                actor="scheduler",
                action="advance",
                reason=decision.reason,
                current_wave=rollout.current_wave + 1,
                wave_started_at=now,
            )
        else:
            done = self._transition(
                rollout, RolloutState.completed, actor="scheduler", action="complete", reason=decision.reason
            )
        return int(done)

    def _judged(self, rollout: RolloutView, planned: Decision, now: datetime) -> Decision:
        """``planned`` (from the device thresholds) as the fleet analysis lets it happen; evaluated at the spec's
        interval while baking, and always when the wave would move on."""
        if planned.action == "wait" and not self.analysis.due(rollout, now):
            return planned
        judgement = self.analysis.judge(rollout)
        action = consequence(rollout, judgement, self.analysis.spec_of(rollout), planned.action, now=now)
        self.analysis.store(rollout, judgement, action, now)
        if action == planned.action:
            return Decision(action, f"{planned.reason}; analysis {judgement.reason}")
        return Decision(action, f"analysis of wave {rollout.current_wave + 1}: {judgement.reason}")
