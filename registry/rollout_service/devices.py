"""Devices: enrollment, their reports (events and telemetry), and what operators see of them."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from datetime import datetime
from typing import cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from exporters.fingerprint import Fingerprint
from registry.rollout_service.bundles import BundleCatalog, variant_to_offer
from registry.rollout_service.db import Device, DeviceEvent, DeviceOutcome, KeyRequest, Telemetry, transaction, utcnow
from registry.rollout_service.desired import DesiredIndex
from registry.rollout_service.errors import (
    InvalidRequestError,
    NotAuthenticatedError,
    NotFoundError,
    RolloutServiceError,
)
from registry.rollout_service.records import RolloutView
from registry.rollout_service.report_schemas import DeviceEventIn, DeviceReport, EventState, TelemetryIn
from registry.rollout_service.schemas import (
    Compatibility,
    DeviceDetail,
    DeviceEventPublic,
    DevicePublic,
    DeviceStatus,
)
from registry.rollout_service.settings import ServiceSettings
from registry.rollout_service.targeting import CONTROL, TREATMENT

log = logging.getLogger(__name__)

_FAILED_STATES = frozenset({EventState.rolling_back, EventState.rolled_back, EventState.failed})
_LAST_EVENTS = 20


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class DeviceRegistry:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        catalog: BundleCatalog,
        desired: DesiredIndex,
        settings: ServiceSettings,
    ) -> None:
        self._sessions = sessions
        self._catalog = catalog
        self._desired = desired
        self._settings = settings
        self._tokens: dict[str, str] = {}  # device id -> sha256 of its token, as last read
        self._tokens_generation = -1  # the state generation the cached tokens were read at
        self._seen: dict[str, datetime] = {}  # heartbeats not yet written
        self._seen_lock = threading.Lock()

    # -- tokens --------------------------------------------------------------------------------------------

    def changed(self) -> None:
        """A device's standing or token changed here: drop the cached tokens, re-read the fleet on next use."""
        self._tokens = {}
        self._desired.invalidate()

    def _cached(self, device_id: str) -> str | None:
        """The cached token digest of ``device_id``, if the cache still belongs to the current state generation."""
        generation = self._desired.refresh()
        if generation != self._tokens_generation:
            self._tokens, self._tokens_generation = {}, generation
        return self._tokens.get(device_id)

    def authenticate(self, device_id: str, token: str) -> None:
        """Raise unless ``token`` is ``device_id``'s current token. A hit in the cache costs no database read."""
        digest = token_digest(token)
        known = self._cached(device_id)
        if known is not None and hmac.compare_digest(known, digest):
            return
        with self._sessions() as session:
            stored = session.execute(
                sa.select(Device.token_sha256).where(Device.id == device_id, Device.status == DeviceStatus.accepted)
            ).scalar()
        if stored is None or not hmac.compare_digest(stored, digest):
            raise NotAuthenticatedError("wrong device token")
        self._tokens[device_id] = stored

    def is_cached_token(self, device_id: str, token: str) -> bool:
        """True when ``token`` is the token this replica last saw for ``device_id`` (no database read)."""
        known = self._cached(device_id)
        return known is not None and hmac.compare_digest(known, token_digest(token))

    def device_of_token(self, token: str) -> str | None:
        digest = token_digest(token)
        for device_id, known in list(self._tokens.items()):
            if hmac.compare_digest(known, digest):
                return device_id
        with self._sessions() as session:
            return session.execute(
                sa.select(Device.id).where(Device.token_sha256 == digest, Device.status == DeviceStatus.accepted)
            ).scalar()

    # -- heartbeats ------------------------------------------------------------------------------------------

    def seen(self, device_id: str) -> None:
        with self._seen_lock:
            self._seen[device_id] = utcnow()

    def flush_heartbeats(self) -> int:
        """Write the pending last-seen times in one statement; a poll itself never writes."""
        with self._seen_lock:
            pending, self._seen = self._seen, {}
        if not pending:
            return 0
        table = cast(sa.Table, Device.__table__)
        statement = (
            sa.update(table).where(table.c.id == sa.bindparam("device_id")).values(last_seen_at=sa.bindparam("at"))
        )
        with transaction(self._sessions) as session:  # Core executemany: one statement for every pending device
            session.connection().execute(statement, [{"device_id": k, "at": v} for k, v in pending.items()])

        return len(pending)

    # -- reports ---------------------------------------------------------------------------------------------

    def report(self, device_id: str, body: DeviceReport) -> None:
        """Store the events and telemetry; events on a rollout's versions become that device's outcome in it."""
        now = utcnow()
        choice = self._desired.choice(device_id)
        rollouts = {r.id: r for r in self._desired.rollouts()}
        with transaction(self._sessions) as session:
            device = session.get(Device, device_id)
            if device is None:
                raise NotFoundError(f"no device {device_id!r}")
            device.last_seen_at = now
            for event in body.events:
                # an event without a rollout id belongs to the rollout the device follows now
                rollout = rollouts.get(event.rollout_id or choice.rollout_id or 0)
                self._store_event(session, device, event, rollout, now)
            if body.telemetry is not None:
                rollout = rollouts.get(choice.rollout_id or 0)
                self._check_classes(body.telemetry, rollout)
                session.add(_telemetry_row(device_id, body.telemetry, rollout, now))

    def _check_classes(self, telemetry: TelemetryIn, rollout: RolloutView | None) -> None:
        """Every class index of the window is a class of its model version (422 naming the first that is not)."""
        model = telemetry.model or (rollout.model if rollout else None)
        if not telemetry.class_counts or model is None:
            return
        try:
            names = self._catalog.summary(model, telemetry.version).class_names
        except RolloutServiceError:  # a version the registry does not know: nothing to check it against
            return
        unknown = sorted(k for k in telemetry.class_counts if k >= len(names)) if names else []
        if unknown:
            raise InvalidRequestError(
                f"telemetry.class_counts.{unknown[0]}: version {telemetry.version} of {model} has "
                f"{len(names)} classes (0 to {len(names) - 1})"
            )

    def _store_event(
        self, session: Session, device: Device, event: DeviceEventIn, rollout: RolloutView | None, now: datetime
    ) -> None:
        """One event: its row, the device's state and version, and its outcome in ``rollout`` when it is one."""
        at = event.at or now
        session.add(
            DeviceEvent(
                device_id=device.id,
                rollout_id=rollout.id if rollout else None,
                model=event.model or (rollout.model if rollout else None),
                version=event.version,
                state=event.state.value,
                ok=event.ok,
                reason=event.reason,
                at=at,
                received_at=now,
                details=event.shadow.model_dump(mode="json") if event.shadow else None,
            )
        )
        device.state = event.state.value
        if event.state == EventState.committed and event.ok and event.version:
            device.current_version = event.version
            device.model = event.model or (rollout.model if rollout else device.model)
        if rollout is not None and event.version in (rollout.version, rollout.control_version):
            self._record_outcome(session, rollout, device.id, event.state, event.ok, event.version, event.reason, at)

    @staticmethod
    def _record_outcome(
        session: Session,
        rollout: RolloutView,
        device_id: str,
        state: EventState,
        ok: bool,
        version: str | None,
        reason: str,
        at: datetime,
    ) -> None:
        if state == EventState.committed and ok:
            outcome = "succeeded"
        elif not ok or state in _FAILED_STATES:
            outcome = "failed"
        else:
            return  # an intermediate step: no verdict yet
        session.merge(
            DeviceOutcome(
                rollout_id=rollout.id, device_id=device_id, version=version or "", outcome=outcome, reason=reason, at=at
            )
        )
        log.info(
            "device %s: rollout %d version %s %s%s",
            device_id,
            rollout.id,
            version,
            outcome,
            f" ({reason})" if reason else "",
        )

    # -- reading ---------------------------------------------------------------------------------------------

    def list(
        self,
        *,
        label: dict[str, str] | None = None,
        status: DeviceStatus | None = None,
        waiting: bool = False,
        limit: int = 1000,
        offset: int = 0,
    ) -> tuple[list[DevicePublic], int]:
        """Devices in id order; ``waiting``: only those with a decision for an operator (a new id, another key)."""
        query = sa.select(Device).order_by(Device.id)
        if status is not None:
            query = query.where(Device.status == status.value)
        with self._sessions() as session:
            requests = dict(session.execute(sa.select(KeyRequest.device_id, KeyRequest.requested_at)).tuples().all())
            rows = [r for r in session.execute(query).scalars() if _has_labels(r, label or {})]
            if waiting:
                rows = [r for r in rows if r.status == DeviceStatus.pending or r.id in requests]
            page = rows[offset : offset + limit]
            return [self._public(r, requests.get(r.id)) for r in page], len(rows)

    def detail(self, device_id: str, *, model: str | None = None, version: str | None = None) -> DeviceDetail:
        with self._sessions() as session:
            row = session.get(Device, device_id)
            if row is None:
                raise NotFoundError(f"no device {device_id!r}")
            events = (
                session.execute(
                    sa.select(DeviceEvent)
                    .where(DeviceEvent.device_id == device_id)
                    .order_by(DeviceEvent.id.desc())
                    .limit(_LAST_EVENTS)
                )
                .scalars()
                .all()
            )
            public = self._public(
                row,
                session.execute(sa.select(KeyRequest.requested_at).where(KeyRequest.device_id == device_id)).scalar(),
            )
            fingerprint = Fingerprint.model_validate(row.fingerprint)
        compatibility = None
        if model and version:
            choice = variant_to_offer(self._catalog.summary(model, version), fingerprint, self._settings.variant_order)
            compatibility = Compatibility(
                model=model,
                version=version,
                compatible=choice.variant is not None,
                variant=choice.variant,
                reason=choice.reason,
            )
        desired = self._desired.choice(device_id)
        return DeviceDetail(
            **public.model_dump(),
            last_events=[
                DeviceEventPublic(
                    state=e.state,
                    model=e.model,
                    version=e.version,
                    rollout_id=e.rollout_id,
                    ok=e.ok,
                    reason=e.reason,
                    at=e.at,
                    shadow=e.details,
                )
                for e in events
            ],
            desired_version=desired.version,
            desired_rollout_id=desired.rollout_id,
            compatibility=compatibility,
        )

    def _public(self, row: Device, key_requested_at: datetime | None = None) -> DevicePublic:
        pending = self._seen.get(row.id)
        last_seen = max(filter(None, (row.last_seen_at, pending)), default=None)
        return DevicePublic(
            device_id=row.id,
            labels=row.labels,
            fingerprint=row.fingerprint,
            enrolled_at=row.enrolled_at,
            last_seen_at=last_seen,
            model=row.model,
            current_version=row.current_version,
            state=row.state,
            status=DeviceStatus(row.status),
            public_key=row.public_key,
            key_change_requested_at=key_requested_at,
        )


def _telemetry_row(device_id: str, t: TelemetryIn, rollout: RolloutView | None, now: datetime) -> Telemetry:
    """One telemetry window, filed under the arm of ``rollout`` whose version it measured (none: no arm)."""
    arm = None
    if rollout is not None:
        arm = TREATMENT if t.version == rollout.version else CONTROL if t.version == rollout.control_version else None
    return Telemetry(
        rollout_id=rollout.id if rollout and arm else None,
        arm=arm,
        device_id=device_id,
        model=t.model or (rollout.model if rollout else None),
        version=t.version,
        inferences=t.inferences,
        errors=t.errors,
        latency_p50_ms=t.latency_ms.p50,
        latency_p99_ms=t.latency_ms.p99,
        detections_per_image=t.detections_per_image,
        mean_confidence=t.mean_confidence,
        frames=t.frames,
        empty_frames=t.empty_frames,
        nonfinite=t.nonfinite,
        histograms=t.histograms.model_dump() if t.histograms else None,
        class_counts={str(k): v for k, v in t.class_counts.items()} if t.class_counts is not None else None,
        at=now,
    )


def _has_labels(row: Device, wanted: dict[str, str]) -> bool:
    return all(str(row.labels.get(k)) == v for k, v in wanted.items())
