"""The update lifecycle: take an offer, run its saved steps to committed, or refuse it and go back.

Each saved state's step is the method that ``edge_agent.state.STEP_HANDLERS`` names; ``continue_update`` looks
the method up in that table after every transition, so the order of the steps is the transition table's and
nothing else. Every step may run twice (the state is saved before it runs): it checks what is done already.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.download import Downloader
from edge_agent.errors import (
    AgentError,
    DiskSpaceError,
    ProbationFailed,
    ShadowFailed,
    UpdateRejected,
    ValidationFailed,
)
from edge_agent.journal import Journal
from edge_agent.loading import ModelLoader
from edge_agent.probation import Probation
from edge_agent.protocol import DesiredState, ShadowReport
from edge_agent.release_checks import check_release
from edge_agent.rollback import Rollback
from edge_agent.runtime import InferenceRuntime
from edge_agent.settings import AgentSettings
from edge_agent.shadow import skipped
from edge_agent.shadow_run import shadow_validate
from edge_agent.state import BEFORE_SWAP, RESTING, STEP_HANDLERS, Event, State
from edge_agent.store import Installed, VersionStore
from edge_agent.telemetry import Telemetry
from edge_agent.trust import Trust
from edge_agent.validation import validate
from edge_agent.variant_choice import Candidates, VariantResult, choose
from edge_agent.verify import check_runnable, files_to_fetch, verify_staged
from exporters.bundle import read_manifest
from exporters.errors import ExportError, one_line
from exporters.fingerprint import Fingerprint

log = logging.getLogger(__name__)

MAX_REJECTED = 32
Step = Callable[[DesiredState | None], None]


class Updates:
    """Runs updates on the update thread; the steps are the methods named in ``STEP_HANDLERS``."""

    def __init__(
        self, *, settings: AgentSettings, journal: Journal, store: VersionStore, runtime: InferenceRuntime,
        loader: ModelLoader, probation: Probation, telemetry: Telemetry, downloader: Downloader,
        fingerprint: Fingerprint, public_key: Ed25519PublicKey | None, trust: Trust, stop: threading.Event,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.journal = journal
        self.store = store
        self.runtime = runtime
        self.probation = probation
        self.telemetry = telemetry
        self.downloader = downloader
        self.fingerprint = fingerprint
        self.public_key = public_key
        self.trust = trust
        self._loader = loader
        self._stop = stop
        self.rollback = Rollback(journal, runtime, loader, backoff_max_s=settings.backoff_max_s, stop=stop)
        self._acknowledged: int | None = None  # the last rollout told that its version already runs here
        self.last_shadow: dict[str, object] | None = None  # the latest shadow result, for /v1/status

    # -- taking an offer -------------------------------------------------------------------------------------

    def consider(self, offer: DesiredState) -> None:
        """Start installing ``offer`` unless it is served already, was refused here, or another update runs."""
        key = offer.key
        st = self.journal.state
        if st.state in BEFORE_SWAP:
            if key == st.target_key:
                self.store.save_offer(offer)  # fresh URLs (presigned ones expire)
                self.continue_update()
                return
            log.info("%s v%s is no longer wanted (now %s v%s): dropping it", st.target_model, st.target_version,
                     offer.model, offer.version)  # fmt: skip
            self.store.discard_staging(st.target_model or "", st.target_version or "")
            st = self.journal.transition(Event.failed, reason="superseded by a newer desired state")
        if key is None or st.state != State.idle:
            return
        serving = self.store.installed(st.serving_model or "", st.serving_version or "")
        if serving is not None and serving.key == key:
            self._acknowledge(offer)
            return
        if key in st.rejected:
            log.info("%s v%s was refused here before: not trying it again", offer.model, offer.version)
            return
        assert offer.model is not None and offer.version is not None
        self.store.save_offer(offer)
        self.journal.advance(
            Event.new_version,
            target_model=offer.model,
            target_version=offer.version,
            target_rollout_id=offer.rollout_id,
            target_key=key,
        )
        self.continue_update()

    def _acknowledge(self, offer: DesiredState) -> None:
        """Tell a rollout that asks for the version already running here that it runs: without a report, the
        rollout would wait on this device forever (e.g. the A/B arm or the follow-up rollout of a version that
        an earlier rollout installed)."""
        if offer.rollout_id is None or offer.rollout_id == self._acknowledged:
            return
        self._acknowledged = offer.rollout_id
        log.info("rollout %d asks for %s v%s, which runs here already", offer.rollout_id, offer.model, offer.version)
        self.journal.emit(
            State.committed.value, offer.model, offer.version, offer.rollout_id, reason="already serving this version"
        )

    # -- running the steps -----------------------------------------------------------------------------------

    def resume(self) -> None:
        """Finish what the saved state says was under way when the agent stopped."""
        state = self.journal.state.state
        if state == State.committed:
            self.journal.emit_step()  # the event may not have reached the outbox before the stop
            self.settle()
        elif state in STEP_HANDLERS:
            self.continue_update()

    def continue_update(self) -> None:
        """Run the saved update from its current step to committed, or refuse / roll it back."""
        st = self.journal.state
        offer = None
        if st.target_model is not None and st.target_version is not None:
            offer = self.store.load_offer(st.target_model, st.target_version)
        if offer is None and st.state in BEFORE_SWAP:  # not the offer's fault: drop it unjudged, poll again
            log.warning("the staged offer of %s v%s is gone; waiting for the service to offer it again",
                        st.target_model, st.target_version)  # fmt: skip
            self.journal.transition(Event.failed, reason="staged offer lost")
            return
        while self.journal.state.state not in RESTING and not self._stop.is_set():
            try:
                self.step(self.journal.state.state)(offer)
            except UpdateRejected as exc:
                self.refuse(exc)
            except DiskSpaceError as exc:
                self.give_up(exc)
            except AgentError as exc:
                log.warning("%s v%s: %s (will try again)", st.target_model, st.target_version, exc)
                return
        if self.journal.state.state == State.committed:
            self.settle()

    def step(self, state: State) -> Step:
        """The method that runs ``state``'s step, by ``STEP_HANDLERS``."""
        step: Step = getattr(self, STEP_HANDLERS[state])
        return step

    # -- the steps (one per saved state; each safe to run twice) ---------------------------------------------

    def download(self, offer: DesiredState | None) -> None:
        st = self.journal.state
        assert offer is not None and st.target_model is not None and st.target_version is not None
        if not self.store.seed_staging(st.target_model, st.target_version, st.target_key or ""):
            self.downloader.fetch(
                offer,
                self.store.staging(st.target_model, st.target_version),
                select=lambda staging: self._files_to_fetch(staging, offer)[0],
            )
        self.journal.advance(Event.done)

    def _files_to_fetch(self, staging: Path, offer: DesiredState) -> tuple[set[str], Candidates]:
        return files_to_fetch(staging, offer, self.fingerprint, self.settings.device)

    def verify(self, offer: DesiredState | None) -> None:
        st = self.journal.state
        assert offer is not None and st.target_model is not None and st.target_version is not None
        staging = self.store.staging(st.target_model, st.target_version)
        fetched, found = self._files_to_fetch(staging, offer)
        manifest = verify_staged(staging, offer, self.public_key, fetched)
        serving = self.runtime.serving
        revoked = self.trust.revoked(offer.model or "", offer.manifest_sha256 or "")
        check_release(
            manifest, offer, serving=read_manifest(serving.directory) if serving is not None else None,
            revoked_reason=revoked.reason if revoked is not None else None,
        )  # fmt: skip
        check_runnable(found)
        self.journal.advance(Event.done)

    def validate(self, offer: DesiredState | None) -> None:
        st = self.journal.state
        assert offer is not None and st.target_model is not None and st.target_version is not None
        staging = self.store.staging(st.target_model, st.target_version)
        where = self.fingerprint.summary()
        before = self.store.installed(st.target_model, st.target_version)
        if before and before.key == st.target_key and before.validated_on == where:
            # The same bundle passed here already on this device (an A/B arm or a rollback brings it back): its
            # files were verified again a step ago, and a second run would measure the same thing. The shadow
            # comparison runs again (it is against whatever serves now) unless this version has served these
            # frames here and passed its probation: then the line's own traffic has judged it already, and a
            # rollback to it must not wait on a comparison with the version being left.
            if before.committed_here:
                self._shadow_done(*skipped("this version served here and passed its probation before"))
            else:
                self.shadow(offer, staging, before.variant)
            self.store.install(st.target_model, st.target_version, before)
            p99 = f"p99 {before.p99_ms:.1f} ms" if before.p99_ms is not None else "no p99"
            self.journal.advance(Event.done, reason=f"validated here before ({p99}); not run again")
            return
        _, found = self._files_to_fetch(staging, offer)
        s = self.settings
        results = validate(staging, [v.name for v in found.runnable], headroom=s.memory_headroom,
                           nice=s.validation_nice, timeout_s=s.validation_timeout_s, stop=self._stop)  # fmt: skip
        choice = choose([VariantResult(variant=r.variant, passed=r.passed, p50_ms=r.p50_ms, p99_ms=r.p99_ms,
                                       detail=r.detail) for r in results], found.refused)  # fmt: skip
        if choice is None:
            failures = "; ".join(f"{r.variant}: {r.detail}" for r in results)
            raise ValidationFailed(f"no variant passed validation on this device: {failures}")
        chosen = next(r for r in results if r.variant == choice.chosen)
        log.info("%s v%s: %s", st.target_model, st.target_version, choice.summary())
        self.shadow(offer, staging, choice.chosen)
        record = Installed(
            model=st.target_model, version=st.target_version, key=st.target_key or "", variant=choice.chosen,
            p99_ms=chosen.p99_ms, validated_on=where, variant_choice=choice,
        )  # fmt: skip
        self.store.install(st.target_model, st.target_version, record)
        self.journal.advance(Event.done, reason=f"{chosen.detail}; {choice.summary()}")

    def shadow(self, offer: DesiredState, staging: Path, variant: str) -> None:
        """Part of the validating step, after the gates: compare the candidate with the serving model on live
        frames (``edge_agent.shadow_run``), report a ``shadow`` event, and ``ShadowFailed`` when it fails."""
        s = self.settings
        config = offer.shadow_config
        limit_s = (
            config.time_limit_s if s.shadow_time_limit_s is None else min(config.time_limit_s, s.shadow_time_limit_s)
        )
        report, reason = shadow_validate(
            staging, variant, serving=self.runtime.serving, frames=self.runtime.frames, config=config,
            work_dir=s.data_dir / "shadow", nice=s.validation_nice, timeout_s=s.validation_timeout_s,
            time_limit_s=limit_s, stop=self._stop,
        )  # fmt: skip
        self._shadow_done(report, reason)

    def _shadow_done(self, report: ShadowReport, reason: str) -> None:
        """Report a shadow result (``shadow`` event, ``/v1/status``); ``ShadowFailed`` when it failed."""
        st = self.journal.state
        log.info("%s v%s: %s", st.target_model, st.target_version, reason)
        self.last_shadow = {"model": st.target_model, "version": st.target_version, "ok": report.passed,
                            "reason": reason, **report.model_dump(mode="json")}  # fmt: skip
        self.journal.emit("shadow", st.target_model, st.target_version, st.target_rollout_id, ok=report.passed,
                          reason=reason, shadow=report)  # fmt: skip
        if not report.passed:
            raise ShadowFailed(reason)

    def swap_in(self, _offer: DesiredState | None) -> None:
        st = self.journal.state
        assert st.target_model is not None and st.target_version is not None
        directory = self.store.installed_dir(st.target_model, st.target_version)
        record = self.store.installed(st.target_model, st.target_version)
        if record is None:
            raise UpdateRejected("the validated version is missing from disk")
        manifest = read_manifest(directory)
        try:
            new = self._loader.load_with_fallback(
                directory, manifest, record.variant, st.target_model, st.target_version
            )
        except (ExportError, RuntimeError) as exc:
            raise UpdateRejected(f"the validated version failed to load for serving: {one_line(exc)}") from exc
        self.probation.begin(
            st.target_version, budget_ms=manifest.latency_budget_ms, previous_p99_ms=self._serving_p99_ms()
        )
        self.runtime.swap(new, keep_standby=True)
        self.journal.advance(Event.done)

    def _serving_p99_ms(self) -> float | None:
        """The p99 of the version serving now: measured here since the start, else as it validated."""
        previous = self.runtime.serving
        if previous is None:
            return None
        record = self.store.installed(previous.model, previous.version)
        return self.telemetry.p99_ms(previous.version) or (record.p99_ms if record else None)

    def watch_probation(self, _offer: DesiredState | None) -> None:
        st = self.journal.state
        if not self.probation.active:  # cannot happen after a restart: probation found on disk means rolling back
            raise ProbationFailed("probation state without a running probation")
        verdict = self.probation.wait_verdict()
        if verdict is None:  # stopping: the saved probation rolls back at the next start
            return
        if not verdict.passed:
            raise ProbationFailed(verdict.reason)
        self.runtime.drop_standby()
        self.store.mark_committed(st.target_model or "", st.target_version or "")
        self.journal.advance(
            Event.done, reason=verdict.reason, serving_model=st.target_model, serving_version=st.target_version
        )

    def roll_back(self, _offer: DesiredState | None) -> None:
        """Serve the last known good version again, retried with backoff until it loads (``Rollback``)."""
        st = self.journal.state
        rejected = st.rejected
        if st.target_key and st.target_key not in rejected:
            rejected = [*rejected, st.target_key][-MAX_REJECTED:]
        self.rollback.run(st.reason or "the agent restarted during the update", rejected)

    # -- ending an update ------------------------------------------------------------------------------------

    def settle(self) -> None:
        """Prune old versions (never the last known good) and wait for the next offer."""
        st = self.journal.state
        self.store.prune(self.settings.keep_versions, {(st.serving_model or "", st.serving_version or "")})
        self.journal.transition(Event.settled)

    def give_up(self, exc: DiskSpaceError) -> None:
        """Drop an offer that this device's disk cannot hold: report it failed (the rollout counts the device instead
        of waiting on it) and serve on, but do not remember it as refused, so that offered again once space is
        freed (a restart, a new rollout) it is tried again. Only before the swap: nothing runs the new version."""
        st = self.journal.state
        reason = f"{st.state.value}: {exc}"
        log.warning("giving up %s v%s: %s", st.target_model, st.target_version, reason)
        self.journal.emit("failed", st.target_model, st.target_version, st.target_rollout_id, ok=False,
                          reason=reason)  # fmt: skip
        self.store.discard_staging(st.target_model or "", st.target_version or "")
        self.journal.transition(Event.failed, reason=reason)

    def refuse(self, exc: UpdateRejected) -> None:
        """Record why the offer cannot run here; before the swap drop it, after the swap go to rolling_back."""
        st = self.journal.state
        rejected = [*st.rejected, st.target_key or ""][-MAX_REJECTED:]
        reason = f"{st.state.value}: {exc}"
        log.warning("refusing %s v%s: %s", st.target_model, st.target_version, reason)
        if st.state in BEFORE_SWAP:
            self.journal.emit("failed", st.target_model, st.target_version, st.target_rollout_id, ok=False,
                              reason=reason)  # fmt: skip
            self.store.discard_staging(st.target_model or "", st.target_version or "")
            self.journal.transition(Event.failed, reason=reason, rejected=rejected)
            return
        self.probation.end()
        self.journal.transition(Event.failed, reason=reason, rejected=rejected)
        self.journal.emit_step(ok=False, reason=reason)
        self.journal.drill_pause()
