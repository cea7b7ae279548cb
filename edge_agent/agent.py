"""The edge agent: poll for the desired version, install it through the saved state machine, serve detections.

One update thread polls and runs the update steps; HTTP threads (``edge_agent.api``) or in-process callers use
``detect`` at any time; a reporter thread delivers events and telemetry. Each update step is saved before it
runs (``edge_agent.state``) and is safe to run twice, so a kill anywhere resumes or rolls back cleanly.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.client import ServiceClient
from edge_agent.download import Downloader
from edge_agent.errors import AgentError, EnrollmentRefused, ProbationFailed, ServiceAnswerError, UpdateRejected
from edge_agent.protocol import DesiredState
from edge_agent.reporting import Outbox, Reporter, backoff_s, event
from edge_agent.runtime import DetectResult, Inference, InferenceRuntime, LoadedModel, load_model
from edge_agent.settings import AgentSettings
from edge_agent.state import AgentState, Event, State, StateStore
from edge_agent.store import Installed, VersionStore
from edge_agent.telemetry import ProbationWatch, Telemetry
from edge_agent.validation import validate
from edge_agent.verify import CPU_VARIANT, check_fingerprint, variant_to_load, verify_staged
from exporters.bundle import Manifest, read_manifest, safe_join
from exporters.errors import ExportError, one_line
from exporters.fingerprint import collect
from exporters.golden import Golden
from exporters.signing import load_public_key

if TYPE_CHECKING:
    from edge_agent.api import LocalApi

log = logging.getLogger(__name__)

MAX_REJECTED = 32
_BEFORE_SWAP = (State.downloading, State.verifying, State.validating)


class Agent:
    """One device's agent. ``start()`` runs it in background threads; ``stop()`` ends them."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = collect()
        self.public_key = load_public_key(settings.public_key) if settings.public_key else None
        self.states = StateStore(settings.data_dir)
        self.store = VersionStore(settings.data_dir)
        self.telemetry = Telemetry()
        self.runtime = InferenceRuntime(observer=self._observe)
        self.runtime.cpu_fallback = self._cpu_fallback
        self.client = ServiceClient(settings, self.fingerprint)
        self._stop = threading.Event()
        self.reporter = Reporter(
            self.client,
            Outbox(settings.data_dir / "outbox"),
            self.telemetry,
            interval_s=settings.report_interval_s,
            backoff_max_s=settings.backoff_max_s,
        )
        self.downloader = Downloader(
            attempts=settings.download_attempts,
            min_free_bytes=settings.min_free_bytes,
            timeout_s=settings.http_timeout_s,
            stop=self._stop,
        )
        self.state = AgentState()
        self._probation: ProbationWatch | None = None
        self._acknowledged: int | None = None  # the last rollout told that its version already runs here
        self._etag: str | None = None
        self._poll_interval_s = 30.0
        self._poll_failures = 0
        self.last_poll: dict[str, Any] = {"ok": None, "at": None, "error": None}
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self.api: LocalApi | None = None

    # -- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> Agent:
        """Recover the saved state, serve the last known good version, then poll in the background."""
        self.state = self.states.recover()
        self._serve_last_known_good()
        self.reporter.start()
        self._thread.start()
        address = self.settings.listen_address
        if address is not None:
            from edge_agent.api import LocalApi

            self.api = LocalApi(self, *address).start()
        return self

    def stop(self) -> None:
        """Stop polling, finish delivering what can be delivered, close the local API."""
        if self.api is not None:
            self.api.stop()
        self._stop.set()
        self._thread.join(timeout=30)
        self.reporter.stop()
        self.downloader.close()
        self.client.close()

    def request_stop(self) -> None:
        """Ask the agent to stop (safe from a signal handler); ``wait`` returns, then call ``stop``."""
        self._stop.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until stopped (or ``timeout_s``); True when stopped."""
        return self._stop.wait(timeout_s)

    # -- serving ---------------------------------------------------------------------------------------------

    def detect(self, image: bytes | np.ndarray) -> DetectResult:
        """Detections for encoded image bytes or an HWC BGR uint8 array, with the version that answered."""
        if isinstance(image, bytes | bytearray | memoryview):
            return self.runtime.detect_bytes(bytes(image))
        return self.runtime.detect(image)

    def status(self) -> dict[str, Any]:
        serving, standby = self.runtime.serving, self.runtime.standby
        return {
            "device_id": self.settings.device_id,
            "state": self.state.state.value,
            "reason": self.state.reason,
            "serving": _describe(serving),
            "standby": _describe(standby),
            "last_known_good": {"model": self.state.serving_model, "version": self.state.serving_version},
            "target": {"model": self.state.target_model, "version": self.state.target_version}
            if self.state.target_version
            else None,
            "rejected": list(self.state.rejected),
            "installed": [f"{i.model} v{i.version}" for i in self.store.all_installed()],
            "reports_queued": len(self.reporter.outbox),
            "last_poll": dict(self.last_poll),
            "fingerprint": self.fingerprint.summary(),
        }

    def _observe(self, inference: Inference) -> None:
        self.telemetry.observe(inference)
        watch = self._probation
        if watch is not None:
            watch.observe(inference)

    def _serve_last_known_good(self) -> None:
        model, version = self.state.serving_model, self.state.serving_version
        if model is None or version is None:
            log.info("no version installed yet: waiting for the first one")
            return
        try:
            self.runtime.swap(self._load_installed(model, version), keep_standby=False)
        except (AgentError, ExportError, RuntimeError) as exc:
            log.error("cannot load the last known good %s v%s: %s", model, version, one_line(exc))
            self._emit("failed", model, version, None, ok=False, reason=f"cannot load last known good: {one_line(exc)}")

    def _load_installed(self, model: str, version: str) -> LoadedModel:
        directory = self.store.installed_dir(model, version)
        record = self.store.installed(model, version)
        manifest = read_manifest(directory)
        staged = set(manifest.files)
        variant, note = variant_to_load(manifest, staged, record.variant if record else None, self.settings.device)
        if note:
            self._emit(self.state.state.value, model, version, None, reason=f"fallback: {note}")
        return self._load_with_fallback(directory, manifest, variant, model, version)

    def _load_with_fallback(
        self, directory: Path, manifest: Manifest, variant: str, model: str, version: str
    ) -> LoadedModel:
        try:
            return load_model(directory, manifest, variant, model=model, version=version)
        except (ExportError, RuntimeError) as exc:
            if variant == CPU_VARIANT or CPU_VARIANT not in manifest.variants:
                raise
            log.warning("%s failed to load (%s): falling back to %s", variant, one_line(exc), CPU_VARIANT)
            why = f"fallback: {variant} failed to load, serving {CPU_VARIANT}: {one_line(exc, 200)}"
            self._emit(self.state.state.value, model, version, self.state.target_rollout_id, reason=why)
            return load_model(directory, manifest, CPU_VARIANT, model=model, version=version)

    def _cpu_fallback(self, failed: LoadedModel) -> LoadedModel | None:
        """Called by the runtime after a CUDA failure at run time: serve the same version's CPU variant."""
        if CPU_VARIANT not in failed.manifest.variants:
            return None
        try:
            replacement = load_model(
                failed.directory, failed.manifest, CPU_VARIANT, model=failed.model, version=failed.version
            )
        except (ExportError, RuntimeError) as exc:
            log.error("CPU fallback for %s failed too: %s", failed.label, one_line(exc))
            return None
        self._emit(self.state.state.value, failed.model, failed.version, None,
                   reason=f"fallback: {failed.variant} failed at run time, serving {CPU_VARIANT}")  # fmt: skip
        return replacement

    # -- the update thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._resume()
        except Exception:  # keep serving whatever happens to one update
            log.exception("resuming the interrupted update failed")
        while not self._stop.is_set():
            try:
                delay = self._poll_once()
            except Exception:
                log.exception("unexpected error in the update loop; serving continues")
                delay = self.settings.backoff_max_s / 10
            self._stop.wait(delay)

    def _poll_once(self) -> float:
        """Poll once, act on the answer (or resume an unfinished download), and say when to poll next."""
        desired, delay = self._poll()
        if desired is not None:
            self._consider(desired)
        elif self.state.state in _BEFORE_SWAP:  # a download that failed for a retryable reason: try again
            self._continue_update()
        return delay

    def _poll(self) -> tuple[DesiredState | None, float]:
        try:
            desired = self.client.desired(self._etag)
        except ServiceAnswerError as exc:
            self._poll_failures += 1
            self.last_poll = {"ok": False, "at": time.time(), "error": str(exc)}
            retry_max = self.settings.backoff_max_s
            delay = backoff_s(self._poll_failures, self._interval_s(), retry_max)
            level = logging.ERROR if isinstance(exc, EnrollmentRefused) else logging.WARNING
            log.log(level, "poll failed (%s); serving continues, next poll in %.1f s", exc, delay)
            return None, delay
        self._poll_failures = 0
        self.last_poll = {"ok": True, "at": time.time(), "error": None}
        if desired is not None:
            self._etag = desired.etag
            self._poll_interval_s = float(desired.poll_interval_s)
        return desired, self._jittered(self._interval_s())

    def _interval_s(self) -> float:
        return self.settings.poll_interval_s or self._poll_interval_s

    def _jittered(self, interval_s: float) -> float:
        spread = self.settings.poll_jitter * interval_s
        return max(0.05, interval_s + random.uniform(-spread, spread))

    def _consider(self, offer: DesiredState) -> None:
        """Start installing ``offer`` unless it is served already, was refused here, or another update runs."""
        key = offer.key
        st = self.state
        if st.state in _BEFORE_SWAP:
            if key == st.target_key:
                self.store.save_offer(offer)  # fresh URLs (presigned ones expire)
                self._continue_update()
                return
            log.info("%s v%s is no longer wanted (now %s v%s): dropping it", st.target_model, st.target_version,
                     offer.model, offer.version)  # fmt: skip
            self.store.discard_staging(st.target_model or "", st.target_version or "")
            self.state = self.states.advance(st, Event.failed, reason="superseded by a newer desired state")
        if key is None or self.state.state != State.idle:
            return
        serving = self.store.installed(self.state.serving_model or "", self.state.serving_version or "")
        if serving is not None and serving.key == key:
            self._acknowledge(offer)
            return
        if key in self.state.rejected:
            log.info("%s v%s was refused here before: not trying it again", offer.model, offer.version)
            return
        assert offer.model is not None and offer.version is not None
        self.store.save_offer(offer)
        self.state = self.states.advance(
            self.state,
            Event.new_version,
            target_model=offer.model,
            target_version=offer.version,
            target_rollout_id=offer.rollout_id,
            target_key=key,
        )
        self._emit_step()
        self._drill_pause()
        self._continue_update()

    def _acknowledge(self, offer: DesiredState) -> None:
        """Tell a rollout that asks for the version already running here that it runs: without a report, the
        rollout would wait on this device forever (e.g. the A/B arm or the follow-up rollout of a version that
        an earlier rollout installed)."""
        if offer.rollout_id is None or offer.rollout_id == self._acknowledged:
            return
        self._acknowledged = offer.rollout_id
        log.info("rollout %d asks for %s v%s, which runs here already", offer.rollout_id, offer.model, offer.version)
        self._emit(
            State.committed.value, offer.model, offer.version, offer.rollout_id, reason="already serving this version"
        )

    def _resume(self) -> None:
        """Finish what the saved state says was under way when the agent stopped."""
        state = self.state.state
        if state in _BEFORE_SWAP:
            self._continue_update()
        elif state == State.rolling_back:
            self._roll_back(self.state.reason or "the agent restarted during the update")
        elif state == State.committed:
            self._emit_step()  # the event may not have reached the outbox before the stop
            self._settle()

    def _continue_update(self) -> None:
        """Run the saved update from its current step to committed, or refuse / roll it back."""
        st = self.state
        assert st.target_model is not None and st.target_version is not None
        offer = self.store.load_offer(st.target_model, st.target_version)
        if offer is None and st.state in _BEFORE_SWAP:  # not the offer's fault: drop it unjudged, poll again
            log.warning("the staged offer of %s v%s is gone; waiting for the service to offer it again",
                        st.target_model, st.target_version)  # fmt: skip
            self.state = self.states.advance(st, Event.failed, reason="staged offer lost")
            return
        try:
            while self.state.state not in (State.idle, State.committed) and not self._stop.is_set():
                self._step(offer)
        except UpdateRejected as exc:
            self._refuse(exc)
            return
        except AgentError as exc:
            log.warning("%s v%s: %s (will try again)", st.target_model, st.target_version, exc)
            return
        if self.state.state == State.committed:
            self._settle()

    def _step(self, offer: DesiredState | None) -> None:
        st = self.state
        assert st.target_model is not None and st.target_version is not None
        staging = self.store.staging(st.target_model, st.target_version)
        if st.state == State.downloading:
            assert offer is not None
            if not self.store.seed_staging(st.target_model, st.target_version, st.target_key or ""):
                self.downloader.fetch(offer, staging)
            self._advance(Event.done)
        elif st.state == State.verifying:
            assert offer is not None
            manifest = verify_staged(staging, offer, self.public_key)
            variant, _ = variant_to_load(manifest, {f.path for f in offer.files}, offer.variant, self.settings.device)
            check_fingerprint(manifest, self.fingerprint, variant)
            self._advance(Event.done)
        elif st.state == State.validating:
            assert offer is not None
            self._validate_and_install(offer)
        elif st.state == State.swapping:
            self._swap_in()
        elif st.state == State.probation:
            self._watch_probation()
        elif st.state == State.rolling_back:
            self._roll_back(st.reason)

    def _validate_and_install(self, offer: DesiredState) -> None:
        st = self.state
        assert st.target_model is not None and st.target_version is not None
        staging = self.store.staging(st.target_model, st.target_version)
        manifest = read_manifest(staging)
        variant, note = variant_to_load(manifest, {f.path for f in offer.files}, offer.variant, self.settings.device)
        if note:
            self._emit_step(reason=f"fallback: {note}")
        where = self.fingerprint.summary()
        before = self.store.installed(st.target_model, st.target_version)
        if before and before.key == st.target_key and before.variant == variant and before.validated_on == where:
            # The same bundle, variant and device passed here already (an A/B arm or a rollback brings it back):
            # its files were verified again a step ago, and a second run would measure the same thing.
            self.store.install(st.target_model, st.target_version, before)
            p99 = f"p99 {before.p99_ms:.1f} ms" if before.p99_ms is not None else "no p99"
            self._advance(Event.done, reason=f"validated here before ({p99}); not run again")
            return
        result = validate(
            staging,
            variant,
            headroom=self.settings.memory_headroom,
            nice=self.settings.validation_nice,
            timeout_s=self.settings.validation_timeout_s,
            stop=self._stop,
        )
        record = Installed(
            model=st.target_model, version=st.target_version, key=st.target_key or "", variant=variant,
            p99_ms=result.p99_ms, validated_on=where,
        )  # fmt: skip
        self.store.install(st.target_model, st.target_version, record)
        self._advance(Event.done, reason=result.detail)

    def _swap_in(self) -> None:
        st = self.state
        assert st.target_model is not None and st.target_version is not None
        directory = self.store.installed_dir(st.target_model, st.target_version)
        record = self.store.installed(st.target_model, st.target_version)
        if record is None:
            raise UpdateRejected("the validated version is missing from disk")
        manifest = read_manifest(directory)
        try:
            new = self._load_with_fallback(directory, manifest, record.variant, st.target_model, st.target_version)
        except (ExportError, RuntimeError) as exc:
            raise UpdateRejected(f"the validated version failed to load for serving: {one_line(exc)}") from exc
        previous = self.runtime.serving
        budget = manifest.latency_budget_ms
        prev_p99 = None
        if previous is not None:
            prev_record = self.store.installed(previous.model, previous.version)
            prev_p99 = self.telemetry.p99_ms(previous.version) or (prev_record.p99_ms if prev_record else None)
        self._probation = ProbationWatch(
            st.target_version,
            inferences=self.settings.probation_inferences,
            duration_s=self.settings.probation_s,
            min_inferences=self.settings.probation_min_inferences,
            budget_ms=budget,
            previous_p99_ms=prev_p99,
            p99_factor=self.settings.probation_p99_factor,
        )
        self.runtime.swap(new, keep_standby=True)
        self._advance(Event.done)

    def _watch_probation(self) -> None:
        st = self.state
        watch = self._probation
        if watch is None:  # cannot happen after a restart: probation found on disk means rolling back
            raise ProbationFailed("probation state without a running probation")
        serving = self.runtime.serving
        probes = None
        while (verdict := watch.verdict()) is None:
            if self._stop.is_set():
                return
            if watch.needs_probes and serving is not None:
                if probes is None:
                    golden = Golden.load(safe_join(serving.directory, serving.manifest.golden.path))
                    probes = golden.inputs
                index = watch.inferences % len(probes)
                self.runtime.probe(np.ascontiguousarray(probes[index : index + 1]))
            else:
                self._stop.wait(0.05)
        self._probation = None
        if not verdict.passed:
            raise ProbationFailed(verdict.reason)
        self.runtime.drop_standby()
        self._advance(
            Event.done, reason=verdict.reason, serving_model=st.target_model, serving_version=st.target_version
        )

    def _settle(self) -> None:
        st = self.state
        protect = {(st.serving_model or "", st.serving_version or "")}
        self.store.prune(self.settings.keep_versions, protect)
        self.state = self.states.advance(st, Event.settled)

    def _refuse(self, exc: UpdateRejected) -> None:
        """Record why the offer cannot run here; before the swap drop it, after the swap roll back."""
        st = self.state
        rejected = [*st.rejected, st.target_key or ""][-MAX_REJECTED:]
        reason = f"{st.state.value}: {exc}"
        log.warning("refusing %s v%s: %s", st.target_model, st.target_version, reason)
        if st.state in _BEFORE_SWAP:
            self._emit("failed", st.target_model, st.target_version, st.target_rollout_id, ok=False, reason=reason)
            self.store.discard_staging(st.target_model or "", st.target_version or "")
            self.state = self.states.advance(st, Event.failed, reason=reason, rejected=rejected)
            return
        self._probation = None
        self.state = self.states.advance(st, Event.failed, reason=reason, rejected=rejected)
        self._emit_step(ok=False, reason=reason)
        self._drill_pause()
        self._roll_back(reason)

    def _roll_back(self, reason: str) -> None:
        """Serve the last known good version again (the standby when it is still loaded)."""
        st = self.state
        if st.target_key and st.target_key not in st.rejected:
            st = st.model_copy(update={"rejected": [*st.rejected, st.target_key][-MAX_REJECTED:]})
        model, version = st.serving_model, st.serving_version
        standby = self.runtime.standby
        if standby is not None and standby.version == version:
            self.runtime.swap(standby, keep_standby=False)
        elif model is not None and version is not None:
            current = self.runtime.serving
            if current is None or current.version != version:
                self.runtime.swap(self._load_installed(model, version), keep_standby=False)
        else:
            self.runtime.unload()
        self._emit("rolled_back", st.target_model, st.target_version, st.target_rollout_id, ok=False, reason=reason)
        self.state = self.states.advance(st, Event.done, reason=reason)
        log.info("rolled back to %s", f"{model} v{version}" if version else "nothing (no earlier version)")

    # -- state and events ------------------------------------------------------------------------------------

    def _advance(self, on: Event, *, reason: str = "", **changes: object) -> None:
        self.state = self.states.advance(self.state, on, reason=reason, **changes)
        self._emit_step(reason=reason)
        self._drill_pause()

    def _drill_pause(self) -> None:
        pause_s = self.settings.pause_on_enter.get(self.state.state.value)
        if pause_s:
            log.warning("pausing %.1f s in %s (pause_on_enter drill setting)", pause_s, self.state.state.value)
            self._stop.wait(pause_s)

    def _emit_step(self, *, ok: bool = True, reason: str = "") -> None:
        st = self.state
        self._emit(st.state.value, st.target_model, st.target_version, st.target_rollout_id, ok=ok, reason=reason)

    def _emit(
        self, state: str, model: str | None, version: str | None, rollout_id: int | None, *, ok: bool = True,
        reason: str = "",
    ) -> None:  # fmt: skip
        self.reporter.emit(event(state, model=model, version=version, rollout_id=rollout_id, ok=ok, reason=reason))


def _describe(model: LoadedModel | None) -> dict[str, str] | None:
    if model is None:
        return None
    return {"model": model.model, "version": model.version, "variant": model.variant, "device": model.device}
