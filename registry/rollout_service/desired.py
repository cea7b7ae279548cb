"""Desired state per device, with an ETag, cached so that an unchanged state costs no database or MLflow work.

Every replica caches rollouts, devices and each device's choice against the database's state generation, which
it re-reads at most every ``state_check_interval_s``. Any change that can alter a device's desired state bumps
that generation in the same transaction, so a replica notices within that interval.

Each full answer carries the choice signed with the service's key (``state_signing``) and the latest revocation
list (``revocations``). The ETag is the choice's, plus the signing window and the revocation list's sequence: a
device gets a fresh signature every window, and a new list as soon as there is one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from exporters.bundle import VARIANTS_DIR, Manifest
from exporters.formats import FORMATS_NAME
from registry.rollout_service.bundles import BundleCatalog
from registry.rollout_service.db import Device, Rollout
from registry.rollout_service.errors import NotFoundError
from registry.rollout_service.records import DeviceView, RolloutView, read_generation
from registry.rollout_service.revocations import NONE_YET, CurrentRevocations, RevocationStore
from registry.rollout_service.schemas import UNAPPROVED_STATES, DesiredFile, DesiredState, DeviceStatus
from registry.rollout_service.settings import ServiceSettings
from registry.rollout_service.state_signing import StateOrder, StateSigner
from registry.rollout_service.targeting import CONTROL, cohort_positions, place


@dataclass(frozen=True)
class DesiredChoice:
    rollout_id: int | None
    model: str | None
    version: str | None
    variant: str | None
    manifest_sha256: str | None
    etag: str  # of the choice alone; ``DesiredIndex.etag`` adds the signing window and the revocation list
    generation: int = 0  # the state generation it was made at (signed: devices refuse a lower one)
    downgrade: bool = False  # an operator ordered this version even where the device runs a newer release
    force_gates: bool = False  # an operator forced this version past its failed gates


class DesiredIndex:
    """Answers "what should device X run now?" from caches that follow the state generation."""

    def __init__(
        self, sessions: sessionmaker[Session], catalog: BundleCatalog, settings: ServiceSettings, signer: StateSigner
    ) -> None:
        self._sessions = sessions
        self._catalog = catalog
        self._settings = settings
        self._signer = signer
        self._revocations: CurrentRevocations = NONE_YET
        self._lock = threading.Lock()
        self._generation = -1
        self._checked_at = -1e9
        self._rollouts: list[RolloutView] = []
        self._devices: dict[str, DeviceView] = {}
        self._choices: dict[str, DesiredChoice] = {}
        self._fleet: list[DeviceView] | None = None
        self._cohorts: dict[int, dict[str, float]] = {}  # rollout id -> ranked positions of its cohort
        self._refreshing = threading.Lock()
        self._invalidations = 0

    # -- generation and caches -------------------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> int:
        """Re-read the generation when the last read is older than the check interval; drop stale caches.

        One thread reads at a time; the others go on with the caches they have (a few milliseconds older).
        """
        now = time.monotonic()
        if not force and now - self._checked_at < self._settings.state_check_interval_s:
            return self._generation
        # Until the first read, nobody may go on without it: an empty cache would answer "nothing to run".
        if not self._refreshing.acquire(blocking=force or self._generation < 0):
            return self._generation
        invalidations = self._invalidations
        try:
            with self._sessions() as session:
                generation = read_generation(session)
                rollouts = None
                if generation != self._generation:
                    rows = session.execute(sa.select(Rollout).order_by(Rollout.id.desc())).scalars()
                    rollouts = [RolloutView.of(row) for row in rows]
                    revocations = RevocationStore.read(session)
            with self._lock:
                if rollouts is not None:
                    self._rollouts = rollouts
                    self._revocations = revocations
                    self._devices.clear()
                    self._choices.clear()
                    self._fleet = None
                    self._cohorts.clear()
                    self._generation = generation
                if invalidations == self._invalidations:  # else a change landed meanwhile: read again next time
                    self._checked_at = now
        finally:
            self._refreshing.release()
        return self._generation

    def fleet(self) -> list[DeviceView]:
        """Every enrolled device, parsed once per generation (the scheduler places all of them on every pass)."""
        self.refresh()
        fleet = self._fleet
        if fleet is None:
            with self._sessions() as session:
                accepted = sa.select(Device).where(Device.status == DeviceStatus.accepted).order_by(Device.id)
                fleet = [DeviceView.of(row) for row in session.execute(accepted).scalars()]
            self._fleet = fleet
        return fleet

    def invalidate(self) -> None:
        """Re-read the generation on the next request: this replica just changed something."""
        self._invalidations += 1
        self._checked_at = -1e9

    def rollouts(self) -> list[RolloutView]:
        self.refresh()
        return self._rollouts

    def device(self, device_id: str) -> DeviceView:
        cached = self._devices.get(device_id)
        if cached is not None:
            return cached
        with self._sessions() as session:
            row = session.get(Device, device_id)
            if row is None:
                raise NotFoundError(f"no device {device_id!r}")
            view = DeviceView.of(row)
        self._devices[device_id] = view
        return view

    # -- answers ---------------------------------------------------------------------------------------------

    def cached_choice(self, device_id: str) -> DesiredChoice | None:
        """The cached choice when the generation was checked recently and has not moved; else None (no I/O)."""
        due = time.monotonic() - self._checked_at >= self._settings.state_check_interval_s
        if due and not self._refreshing.locked():  # while another request refreshes, the cache still answers
            return None
        return self._choices.get(device_id)

    def choice(self, device_id: str) -> DesiredChoice:
        """The device's desired (rollout, model, version, variant): the newest rollout with an opinion on it."""
        self.refresh()
        with self._lock:
            generation, rollouts = self._generation, self._rollouts
            cached = self._choices.get(device_id)
        if cached is not None:
            return cached
        device = self.device(device_id)
        preference = self._settings.variant_order
        choice = DesiredChoice(
            None, None, None, None, None, _etag("none", self._settings.poll_interval_s), generation=generation
        )
        for rollout in rollouts:
            if rollout.state in UNAPPROVED_STATES:
                continue
            placement = place(rollout, device, self._catalog.summary, preference, self._cohort(rollout, generation))
            if placement.version is None or placement.variant is None:
                continue
            digest = self._catalog.summary(rollout.model, placement.version).manifest_sha256
            # The control arm (an A/B test's control, the version before a canary, a rollback's target) is the
            # operator's order as much as the new version is; a newer-than-running check must not refuse it.
            downgrade = placement.arm == CONTROL or rollout.allow_downgrade
            # Gates: the rollout's force, or a control version that failed them (an A/B control needs the force at
            # creation; a previous version ran on these devices by the force of the rollout that put it there).
            force = rollout.force_gates or (
                placement.arm == CONTROL and not self._catalog.summary(rollout.model, placement.version).gates_passed
            )
            key = (
                f"{rollout.id}|{rollout.model}|{placement.version}|{placement.variant}|{digest}|"
                f"{int(downgrade)}{int(force)}"
            )
            choice = DesiredChoice(
                rollout.id,
                rollout.model,
                placement.version,
                placement.variant,
                digest,
                _etag(key, self._settings.poll_interval_s),
                generation=generation,
                downgrade=downgrade,
                force_gates=force,
            )
            break
        with self._lock:
            if self._generation == generation:  # else the caches were cleared meanwhile: do not store a stale answer
                self._choices[device_id] = choice
        return choice

    def _cohort(self, rollout: RolloutView, generation: int) -> dict[str, float]:
        cached = self._cohorts.get(rollout.id)
        if cached is not None:
            return cached
        positions = cohort_positions(rollout, self.fleet(), self._catalog.summary, self._settings.variant_order)
        with self._lock:
            if self._generation == generation:
                self._cohorts[rollout.id] = positions
        return positions

    def etag(self, choice: DesiredChoice) -> str:
        """The poll's ETag: the choice's, the signing window's and the revocation list's (no I/O)."""
        return f'{choice.etag[:-1]}-{self._signer.window()}-{self._revocations.revocations.sequence}"'

    def state(self, device_id: str, choice: DesiredChoice) -> DesiredState:
        """The full answer for ``choice``, signed for ``device_id``: file URLs from the registry (cached for the
        bundle TTL), the signed statement and the revocation list."""
        poll = self._settings.poll_interval_s
        etag = self.etag(choice)
        revocations = self._revocations.signed
        if choice.version is None or choice.model is None or choice.variant is None:
            statement = self._signer.sign(device_id, StateOrder(None, None, None, None, None, choice.generation))
            return DesiredState(
                rollout_id=None,
                model=None,
                version=None,
                variant=None,
                files=[],
                manifest_url=None,
                manifest_sha256=None,
                signature_url=None,
                etag=etag,
                poll_interval_s=poll,
                statement=statement,
                revocations=revocations,
                state_key=self._signer.public_key,
            )
        resolved = self._catalog.resolve(choice.model, choice.version)
        files = [
            DesiredFile(path=f.path, url=f.url, sha256=f.sha256, bytes=f.bytes)
            for f in resolved.files
            if _offered(f.path, resolved.manifest, choice.variant)
        ]
        shadow = self._shadow_of(choice.rollout_id)
        order = StateOrder(
            choice.rollout_id, choice.model, choice.version, choice.variant, choice.manifest_sha256,
            choice.generation, downgrade=choice.downgrade, force_gates=choice.force_gates, shadow=shadow,
        )  # fmt: skip
        return DesiredState(
            rollout_id=choice.rollout_id,
            model=choice.model,
            version=choice.version,
            variant=choice.variant,
            files=files,
            manifest_url=resolved.manifest_url,
            manifest_sha256=resolved.manifest_sha256,
            signature_url=resolved.signature_url,
            etag=etag,
            poll_interval_s=poll,
            shadow=shadow,
            statement=self._signer.sign(device_id, order),
            revocations=revocations,
            state_key=self._signer.public_key,
        )

    @property
    def revocations(self) -> CurrentRevocations:
        """The revocation list as of the last generation read."""
        self.refresh()
        return self._revocations

    def _shadow_of(self, rollout_id: int | None) -> dict[str, Any]:
        """The shadow block of the rollout, else the server's default."""
        for rollout in self.rollouts():
            if rollout.id == rollout_id and rollout.shadow:
                return rollout.shadow
        return self._settings.shadow.model_dump()


def _offered(path: str, manifest: Manifest, variant: str) -> bool:
    """Whether a bundle file goes into a device's offer: the golden data, the offered TorchScript variant and
    ``cpu-fp32`` (a device whose GPU fails at load or run time falls back to it), and ``formats.json`` with
    every other format's variant. The device picks among those, before it downloads them, the ones it can run (it
    validates each and serves the fastest that passes): the service does not read ``formats.json``. An agent that
    knows only TorchScript downloads the other formats' files too, verifies their digests and ignores them."""
    torchscript = {v.path for v in manifest.variants.values()}
    if path in torchscript:
        return path in {manifest.variants[n].path for n in (variant, FALLBACK_VARIANT) if n in manifest.variants}
    return path in (manifest.golden.path, FORMATS_NAME) or path.startswith(VARIANTS_DIR)


FALLBACK_VARIANT = "cpu-fp32"


def _etag(key: str, poll_interval_s: int) -> str:
    return '"' + hashlib.sha256(f"{key}|{poll_interval_s}".encode()).hexdigest()[:32] + '"'
