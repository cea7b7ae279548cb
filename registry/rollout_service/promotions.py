"""Promotions: a version promoted in MLflow starts a canary rollout, or is refused and says why.

A person promotes a version two ways in MLflow's UI: by moving the alias ``production`` of its registered model,
or with the *Promote model* button, which copies the version into another registered model (``<line>-prod`` by
default; its copy's source is ``models:/<line>/<version>``). The service learns of either two ways: MLflow's
HMAC-signed webhook (``model_version_alias.created``, ``model_version.created``; checked in ``webhooks.py``) and
a poll as a fallback. They end in ``handle`` and ``handle_copy``, which record what was seen with a
compare-and-set (``AliasState``; a copy under the label ``copy:<target>``), so a promotion seen twice (by both
paths, or by two replicas) acts once; then ``_promote`` checks the gates and starts the rollout, or waits for
approval when the settings ask for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from registry.errors import RegistryError
from registry.mlflow_gateway import MlflowGateway
from registry.rollout_service.bundles import BundleCatalog
from registry.rollout_service.db import AliasState, Promotion, transaction, utcnow
from registry.rollout_service.errors import (
    ConflictError,
    InvalidRequestError,
    RolloutServiceError,
    UpstreamUnavailableError,
)
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
        kind = (payload.get("entity"), payload.get("action"))
        data = payload.get("data") or {}
        if kind == ("model_version", "created"):
            name, version, source = (str(data.get(k, "")) for k in ("name", "version", "source"))
            return self.handle_copy(name, version, source, via="webhook")
        if kind != ("model_version_alias", "created"):
            return "ignored: neither an alias creation nor a new version"
        model, alias, version = (str(data.get(k, "")) for k in ("name", "alias", "version"))
        if not (model and alias and version.isdigit()):
            return "ignored: incomplete alias event"
        return self.handle(model, alias, version, via="webhook")

    def poll(self) -> int:
        """Compare every watched model's alias, and every promotion target's newest copy, with what was seen
        last; returns how many promotions were handled."""
        if self._gateway is None:
            return 0
        try:
            found = self._gateway().aliases(self._settings.watched_models or None)
            newest = self._gateway().newest_versions() if self._settings.copies_promote else {}
        except RegistryError as exc:
            log.warning("alias poll: %s", exc)
            return 0
        outcomes = [
            self.handle(model, self._settings.promotion_alias, aliases[self._settings.promotion_alias], via="poll")
            for model, aliases in sorted(found.items())
            if self._settings.promotion_alias in aliases
        ]
        outcomes += [
            self.handle_copy(target, version, source, via="poll")
            for target, (version, source) in sorted(newest.items())
            if self._settings.promotion_source_of(target) is not None
        ]
        return sum(not outcome.startswith("ignored") for outcome in outcomes)

    def handle(self, model: str, alias: str, version: str, *, via: str) -> str:
        """An alias move: a rollout of ``version`` when ``alias`` is the promotion alias of a watched model."""
        if alias != self._settings.promotion_alias:
            return f"ignored: alias {alias!r} is not {self._settings.promotion_alias!r}"
        watched = self._settings.watched_models
        if watched and model not in watched:
            return f"ignored: model {model!r} is not watched"
        previous = self._claim(model, alias, version)
        if previous is False:
            return f"ignored: {alias} of {model} -> {version} already handled"
        claim = (alias, version, previous)
        return self._promote(model, version, f"alias {alias} moved to version {version}", via=via, claim=claim)

    def handle_copy(self, target: str, target_version: str, source: str, *, via: str) -> str:
        """A version copied into a promotion target (MLflow's "Promote model"): a rollout of its source version."""
        line = self._settings.promotion_source_of(target)
        if line is None:
            return f"ignored: {target!r} is no promotion target"
        if not target_version.isdigit():
            return "ignored: incomplete version event"
        watched = self._settings.watched_models
        if watched and line not in watched:
            return f"ignored: model {line!r} is not watched"
        label = f"copy:{target}"
        previous = self._claim(line, label, target_version)
        if previous is False:
            return f"ignored: version {target_version} of {target} already handled"
        source_model, _, version = source.removeprefix("models:/").partition("/")
        if not source.startswith("models:/") or source_model != line or not version.isdigit():
            what = f"version {target_version} of {target} was promoted"
            why = f"its source {source!r} is not a version of {line}"
            return self._refuse(line, label, target_version, what, why, tag=False)
        what = f"version {version} was promoted into {target} (as its version {target_version})"
        return self._promote(line, version, what, via=via, claim=(label, target_version, previous))

    def _promote(self, model: str, version: str, what: str, *, via: str, claim: tuple[str, str, str | None]) -> str:
        """The rollout of ``version`` that a promotion asks for, or its refusal; ``claim`` is (label, claimed
        version, what it was before), released when MLflow cannot be asked now, so the next poll tries again."""
        label = claim[0]
        try:
            summary = self._catalog.summary(model, version)
        except UpstreamUnavailableError:
            self._release(model, *claim)
            raise
        except RolloutServiceError as exc:
            return self._refuse(model, label, version, what, f"not a usable bundle: {exc}")
        if not summary.gates_passed:
            return self._refuse(model, label, version, what, "its gates did not pass (ota.gates=fail)")
        rolled_out = self._last_rolled_out(model)  # a refused version is not what devices run
        body = RolloutCreate(
            model=model,
            version=version,
            strategy=Strategy.canary,
            supersede=True,
            previous_version=rolled_out if rolled_out != version else None,
            reason=f"{what} (seen by {via})",
        )
        waiting = self._settings.promotion_approval == "required"
        try:
            rollout = self._manager.create(body, actor=ACTOR, waiting=waiting)
        except (ConflictError, InvalidRequestError) as exc:  # an older release, a revoked version
            return self._refuse(model, label, version, what, str(exc))
        self._record(model, label, version, "rollout", rollout.id, body.reason)
        started = "waits for approval since" if waiting else "started"
        self._tag(model, version, f"rollout {rollout.id} ({rollout.strategy}) {started} {utcnow():%Y-%m-%dT%H:%M:%SZ}")
        return f"rollout {rollout.id}" + (" (waiting for approval)" if waiting else "")

    def remember_delivery(self, delivery_id: str) -> None:
        """Record a verified webhook's delivery id; 401 when it was delivered before (a replay)."""
        with transaction(self._sessions) as session:
            remember_once(session, "webhook", delivery_id, WEBHOOK_REPLAY_WINDOW_S * 2, what="this webhook delivery")

    # -- steps -----------------------------------------------------------------------------------------------

    def _claim(self, model: str, alias: str, version: str) -> str | Literal[False] | None:
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

    def _last_rolled_out(self, model: str) -> str | None:
        """The version the last promotion of ``model`` (by either path) rolled out."""
        with self._sessions() as session:
            return session.execute(
                sa.select(Promotion.version)
                .where(Promotion.model == model, Promotion.outcome == "rollout")
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

    def _refuse(self, model: str, label: str, version: str, what: str, why: str, *, tag: bool = True) -> str:
        reason = f"{what}, refused: {why}"
        with transaction(self._sessions) as session:
            audit(session, actor=ACTOR, action="promotion_refused", model=model, version=version, reason=reason)
        self._record(model, label, version, "refused", None, reason)
        if tag:
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
