"""The edge agent: poll for the desired version, install it through the saved state machine, serve detections.

This module puts the parts together; each lives in its own module::

    polling.Poller        the desired-state poll: ETag, the service's period, jitter, backoff
    updates.Updates       the update lifecycle: one method per saved state (``state.STEP_HANDLERS``)
    rollback.Rollback     going back to the last known good version, retried with backoff
    probation.Probation   the watch over a version just swapped in
    loading.ModelLoader   installed versions loaded for serving, with the CPU fallbacks
    journal.Journal       the current saved state, its transitions and their events
    reporting.Reporter    events and telemetry delivered to the service
    metrics               ``/metrics``; api.LocalApi: the local HTTP API

One update thread polls and runs the update steps; HTTP threads (``edge_agent.api``) or in-process callers use
``detect`` at any time; a reporter thread delivers events and telemetry. Each update step is saved before it
runs (``edge_agent.state``) and is safe to run twice, so a kill anywhere resumes or rolls back cleanly.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.client import ServiceClient
from edge_agent.download import Downloader, OriginBasicAuth
from edge_agent.errors import AgentError, AgentSettingsError
from edge_agent.frames import FrameRing
from edge_agent.journal import Journal
from edge_agent.loading import ModelLoader
from edge_agent.metrics import AgentCollector, agent_registry
from edge_agent.polling import Poller
from edge_agent.probation import Probation
from edge_agent.reporting import Outbox, Reporter
from edge_agent.runtime import DetectResult, Inference, InferenceRuntime, LoadedModel, ServingOptions
from edge_agent.settings import AgentSettings
from edge_agent.state import BEFORE_SWAP, AgentState, StateStore
from edge_agent.store import VersionStore
from edge_agent.telemetry import Telemetry
from edge_agent.trust import Trust
from edge_agent.updates import Updates
from exporters.errors import ExportError, one_line
from exporters.fingerprint import collect
from exporters.signing import load_public_key

if TYPE_CHECKING:
    from edge_agent.api import LocalApi

log = logging.getLogger(__name__)


class Agent:
    """One device's agent. ``start()`` runs it in background threads; ``stop()`` ends them."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = collect()
        self.store = VersionStore(settings.data_dir)
        self.telemetry = Telemetry()
        frames = FrameRing(capacity=settings.shadow_ring_frames, max_bytes=settings.shadow_ring_bytes,
                           every=settings.shadow_sample_every)  # fmt: skip
        self.runtime = InferenceRuntime(observer=self._observe, frames=frames,
                                        max_image_pixels=settings.max_image_pixels)  # fmt: skip
        release_key = load_public_key(settings.public_key) if settings.public_key else None
        self.unsigned_note = _unsigned_note(settings)
        self.trust = Trust(settings.data_dir, settings.device_id, release_key=release_key,
                           service_key=settings.service_key)  # fmt: skip
        self.client = ServiceClient(settings, self.fingerprint, self.trust)
        self._stop = threading.Event()
        self.reporter = Reporter(
            self.client,
            Outbox(settings.data_dir / "outbox"),
            self.telemetry,
            interval_s=settings.report_interval_s,
            backoff_max_s=settings.backoff_max_s,
        )
        self.journal = Journal(
            StateStore(settings.data_dir), self.reporter, pause_on_enter=settings.pause_on_enter, stop=self._stop
        )
        serving = ServingOptions(device_pipeline=settings.device_pipeline, cuda_graph=settings.cuda_graphs)
        self.loader = ModelLoader(self.store, self.journal, settings.device, serving)
        self.runtime.fallback = self.loader.run_time_fallback
        self.probation = Probation(self.runtime, settings, self._stop)
        self.downloader = Downloader(
            attempts=settings.download_attempts,
            min_free_bytes=settings.min_free_bytes,
            timeout_s=settings.http_timeout_s,
            stop=self._stop,
            auth=_mlflow_login(settings),
            max_bundle_bytes=settings.max_bundle_bytes,
            max_bundle_files=settings.max_bundle_files,
        )
        self.updates = Updates(
            settings=settings,
            journal=self.journal,
            store=self.store,
            runtime=self.runtime,
            loader=self.loader,
            probation=self.probation,
            telemetry=self.telemetry,
            downloader=self.downloader,
            fingerprint=self.fingerprint,
            public_key=release_key,
            trust=self.trust,
            stop=self._stop,
        )
        self.poller = Poller(self.client, settings, self.trust)
        self._stale_reported = False
        self.metrics = agent_registry(
            AgentCollector(self.telemetry, self.runtime, self.reporter.outbox, lambda: self.journal.state.state)
        )
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self.api: LocalApi | None = None

    @property
    def state(self) -> AgentState:
        """The saved state the agent is in now."""
        return self.journal.state

    # -- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> Agent:
        """Recover the saved state, serve the last known good version, then poll in the background."""
        if self.unsigned_note:
            log.warning("%s", self.unsigned_note)
        self.journal.recover()
        self._serve_last_known_good()
        self.reporter.start()
        self._thread.start()
        address = self.settings.listen_address
        if address is not None:
            from edge_agent.api import LocalApi

            self.api = LocalApi(self, *address, self.settings).start()
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
        """What ``GET /v1/status`` answers."""
        st = self.journal.state
        return {
            "device_id": self.settings.device_id,
            "state": st.state.value,
            "reason": st.reason,
            "serving": _describe(self.runtime.serving),
            "variant_choice": self._variant_choice(),
            "standby": _describe(self.runtime.standby),
            "last_known_good": {"model": st.serving_model, "version": st.serving_version},
            "target": {"model": st.target_model, "version": st.target_version} if st.target_version else None,
            "retrying": self.updates.rollback.retrying(),
            "rejected": list(st.rejected),
            "shadow": self.updates.last_shadow,
            "installed": [f"{i.model} v{i.version}" for i in self.store.all_installed()],
            "reports_queued": len(self.reporter.outbox),
            "last_poll": dict(self.poller.last_poll),
            "fingerprint": self.fingerprint.summary(),
            "release_signatures": self.unsigned_note or "required (release public key configured)",
            "trust": self.trust.status(),
        }

    def _variant_choice(self) -> dict[str, Any] | None:
        """Why the serving version runs the variant it runs, as its validation here decided."""
        serving = self.runtime.serving
        record = self.store.installed(serving.model, serving.version) if serving is not None else None
        if record is None or record.variant_choice is None:
            return None
        return {**record.variant_choice.model_dump(mode="json"), "summary": record.variant_choice.summary()}

    def _observe(self, inference: Inference) -> None:
        self.telemetry.observe(inference)
        self.probation.observe(inference)

    def _serve_last_known_good(self) -> None:
        st = self.journal.state
        model, version = st.serving_model, st.serving_version
        if model is None or version is None:
            log.info("no version installed yet: waiting for the first one")
            return
        try:
            self.runtime.swap(self.loader.load_installed(model, version), keep_standby=False)
        except (AgentError, ExportError, RuntimeError) as exc:
            log.error("cannot load the last known good %s v%s: %s", model, version, one_line(exc))
            self.journal.emit("failed", model, version, None, ok=False,
                              reason=f"cannot load last known good: {one_line(exc)}")  # fmt: skip

    # -- the update thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.updates.resume()
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
        desired, delay = self.poller.poll()
        self._report_freshness()
        if desired is not None:
            self.updates.consider(desired)
        elif self.journal.state.state in BEFORE_SWAP:  # a download that failed for a retryable reason: retry
            self.updates.continue_update()
        return delay

    def _report_freshness(self) -> None:
        """A ``stale`` event once the latest signed desired state has expired, and the state again once a fresh
        one arrives (the service shows the device's latest event as its state)."""
        stale = self.trust.stale()
        if stale and not self._stale_reported:
            log.error("%s", stale)
            st = self.journal.state
            self.journal.emit("stale", st.serving_model, st.serving_version, None, ok=False, reason=stale)
        elif not stale and self._stale_reported:
            log.info("a fresh signed desired state arrived: no longer stale")
            st = self.journal.state
            self.journal.emit(st.state.value, st.serving_model, st.serving_version, None,
                              reason="a fresh signed desired state arrived")  # fmt: skip
        self._stale_reported = stale is not None


def _unsigned_note(settings: AgentSettings) -> str:
    """'' with a release key; else what runs unchecked and why it may, or ``AgentSettingsError`` when it may not."""
    if settings.public_key is not None:
        return ""
    if not (settings.allow_unsigned or settings.dev):
        raise AgentSettingsError(
            "no release public key (--public-key): every bundle would install unchecked; give the key the bundles "
            "are signed with, or --allow-unsigned to run without one"
        )
    why = "--dev" if settings.dev else "--allow-unsigned"
    return f"UNSIGNED ({why}): bundle signatures and revocation lists are not checked; any bundle named to it runs"


def _mlflow_login(settings: AgentSettings) -> OriginBasicAuth | None:
    """The MLflow login for downloads through its artifact proxy, sent to ``mlflow_url``'s origin only."""
    if not (settings.mlflow_url and settings.mlflow_username and settings.mlflow_password):
        return None
    return OriginBasicAuth(settings.mlflow_url, settings.mlflow_username, settings.mlflow_password)


def _describe(model: LoadedModel | None) -> dict[str, str] | None:
    if model is None:
        return None
    return {"model": model.model, "version": model.version, "variant": model.variant, "device": model.device}
