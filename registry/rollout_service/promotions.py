"""Promotions: the alias ``production`` moving in MLflow starts a canary rollout, or is refused and says why.

The service learns of a move two ways: MLflow's ``model_version_alias.created`` webhook (HMAC-signed, checked
in ``webhooks.py``) and a poll of the registered models' aliases as a fallback. Both end in ``handle``, which
moves the recorded alias with a compare-and-set, so a move seen twice (by both paths, or by two replicas) acts
once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from registry.errors import RegistryError
from registry.mlflow_gateway import MlflowGateway
from registry.rollout_service.bundles import BundleCatalog
from registry.rollout_service.db import AliasState, Promotion, transaction, utcnow
from registry.rollout_service.errors import RolloutServiceError, UpstreamUnavailableError
from registry.rollout_service.records import audit, remember_once
from registry.rollout_service.rollouts import RolloutManager
from registry.rollout_service.schemas import RolloutCreate, Strategy
from registry.rollout_service.settings import ServiceSettings
from registry.rollout_service.webhooks import WEBHOOK_REPLAY_WINDOW_S
from registry.tags import ROLLOUT_TAG

log = logging.getLogger(__name__)

ACTOR = "mlflow-alias"


class PromotionWatcher:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        catalog: BundleCatalog,
        manager: RolloutManager,
        gateway: Callable[[], MlflowGateway] | None,
        settings: ServiceSettings,
    ) -> None:
        self._sessions = sessions
        self._catalog = catalog
        self._manager = manager
        self._gateway = gateway
        self._settings = settings

    def on_webhook(self, payload: dict[str, Any]) -> str:
        """Act on one verified webhook payload; returns what was done, for the answer."""
        if (payload.get("entity"), payload.get("action")) != ("model_version_alias", "created"):
            return "ignored: not an alias creation"
        data = payload.get("data") or {}
        model, alias, version = (str(data.get(k, "")) for k in ("name", "alias", "version"))
        if not (model and alias and version.isdigit()):
            return "ignored: incomplete alias event"
        return self.handle(model, alias, version, via="webhook")

    def poll(self) -> int:
        """Compare every watched model's alias with what was seen last; returns how many moves were handled."""
        if self._gateway is None:
            return 0
        try:
            found = self._gateway().aliases(self._settings.watched_models or None)
        except RegistryError as exc:
            log.warning("alias poll: %s", exc)
            return 0
        moves = 0
        for model, aliases in sorted(found.items()):
            version = aliases.get(self._settings.promotion_alias)
            if version is not None and not self.handle(
                model, self._settings.promotion_alias, version, via="poll"
            ).startswith("ignored"):
                moves += 1
        return moves

    def handle(self, model: str, alias: str, version: str, *, via: str) -> str:
        if alias != self._settings.promotion_alias:
            return f"ignored: alias {alias!r} is not {self._settings.promotion_alias!r}"
        watched = self._settings.watched_models
        if watched and model not in watched:
            return f"ignored: model {model!r} is not watched"
        previous = self._claim(model, alias, version)
        if previous is False:
            return f"ignored: {alias} of {model} -> {version} already handled"
        try:
            summary = self._catalog.summary(model, version)
        except UpstreamUnavailableError:
            self._release(model, alias, version, previous)  # try again on the next poll
            raise
        except RolloutServiceError as exc:
            return self._refuse(model, alias, version, f"not a usable bundle: {exc}")
        if not summary.gates_passed:
            return self._refuse(model, alias, version, "its gates did not pass (ota.gates=fail)")
        rolled_out = self._last_rolled_out(model, alias)  # a refused version is not what devices run
        body = RolloutCreate(
            model=model,
            version=version,
            strategy=Strategy.canary,
            supersede=True,
            previous_version=rolled_out if rolled_out != version else None,
            reason=f"alias {alias} moved to version {version} (seen by {via})",
        )
        waiting = self._settings.promotion_approval == "required"
        rollout = self._manager.create(body, actor=ACTOR, waiting=waiting)
        self._record(model, alias, version, "rollout", rollout.id, body.reason)
        started = "waits for approval since" if waiting else "started"
        self._tag(model, version, f"rollout {rollout.id} ({rollout.strategy}) {started} {utcnow():%Y-%m-%dT%H:%M:%SZ}")
        return f"rollout {rollout.id}" + (" (waiting for approval)" if waiting else "")

    def remember_delivery(self, delivery_id: str) -> None:
        """Record a verified webhook's delivery id; 401 when it was delivered before (a replay)."""
        with transaction(self._sessions) as session:
            remember_once(session, "webhook", delivery_id, WEBHOOK_REPLAY_WINDOW_S * 2, what="this webhook delivery")

    # -- steps -----------------------------------------------------------------------------------------------

    def _claim(self, model: str, alias: str, version: str) -> str | bool | None:
        """Move the recorded alias to ``version``; the old version (None if new), or False if already there."""
        with self._sessions() as session:
            row = session.get(AliasState, (model, alias))
            old = row.version if row is not None else None
        if old == version:
            return False
        try:
            with transaction(self._sessions) as session:
                if old is None:
                    session.add(AliasState(model=model, alias=alias, version=version, updated_at=utcnow()))
                    session.flush()
                else:
                    done = session.execute(
                        sa.update(AliasState)
                        .where(AliasState.model == model, AliasState.alias == alias, AliasState.version == old)
                        .values(version=version, updated_at=utcnow())
                    )
                    if done.rowcount != 1:  # type: ignore[attr-defined]
                        return False
        except IntegrityError:
            return False  # another replica inserted it first
        log.info("alias %s of %s: %s -> %s", alias, model, old, version)
        return old

    def _last_rolled_out(self, model: str, alias: str) -> str | None:
        with self._sessions() as session:
            return session.execute(
                sa.select(Promotion.version)
                .where(Promotion.model == model, Promotion.alias == alias, Promotion.outcome == "rollout")
                .order_by(Promotion.id.desc())
                .limit(1)
            ).scalar()

    def _release(self, model: str, alias: str, version: str, previous: str | bool | None) -> None:
        with transaction(self._sessions) as session:
            if previous is None:
                session.execute(
                    sa.delete(AliasState).where(
                        AliasState.model == model, AliasState.alias == alias, AliasState.version == version
                    )
                )
            elif isinstance(previous, str):
                session.execute(
                    sa.update(AliasState)
                    .where(AliasState.model == model, AliasState.alias == alias, AliasState.version == version)
                    .values(version=previous)
                )

    def _refuse(self, model: str, alias: str, version: str, why: str) -> str:
        reason = f"alias {alias} moved to version {version}, refused: {why}"
        with transaction(self._sessions) as session:
            audit(session, actor=ACTOR, action="promotion_refused", model=model, version=version, reason=reason)
        self._record(model, alias, version, "refused", None, reason)
        self._tag(model, version, f"refused {utcnow():%Y-%m-%dT%H:%M:%SZ}: {why}")
        log.warning("promotion of %s version %s refused: %s", model, version, why)
        return f"refused: {why}"

    def _record(self, model: str, alias: str, version: str, outcome: str, rollout_id: int | None, reason: str) -> None:
        with transaction(self._sessions) as session:
            session.add(
                Promotion(
                    model=model,
                    alias=alias,
                    version=version,
                    outcome=outcome,
                    rollout_id=rollout_id,
                    reason=reason,
                    at=utcnow(),
                )
            )

    def _tag(self, model: str, version: str, value: str) -> None:
        if self._gateway is None:
            return
        try:
            self._gateway().set_version_tag(model, version, ROLLOUT_TAG, value)
        except RegistryError as exc:  # the decision stands and is in the audit log; the tag is a courtesy copy
            log.warning("could not tag version %s of %s: %s", version, model, exc)
