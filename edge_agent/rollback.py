"""Going back to the last known good version, retried with exponential backoff until it serves again.

A rollback fails when the last known good version cannot be loaded (a file removed or damaged, memory short).
Each failed attempt is saved as the transition (rolling_back, failed) -> rolling_back, logged and reported to the
rollout service, and tried again after a wait that doubles up to ``backoff_max_s`` (with jitter), without a
restart. Meanwhile the local API keeps answering with whatever is loaded (or 503 when nothing is). Stopping the
agent ends the retries; the saved rolling_back state resumes the rollback at the next start.
"""

from __future__ import annotations

import logging
import threading

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from edge_agent.errors import AgentError
from edge_agent.journal import Journal
from edge_agent.loading import ModelLoader
from edge_agent.runtime import InferenceRuntime
from edge_agent.state import Event, State
from exporters.errors import ExportError, one_line

log = logging.getLogger(__name__)

# What loading an installed version can raise: our errors, the bundle's, a missing or unreadable file, torch.
ROLLBACK_ERRORS = (AgentError, ExportError, OSError, RuntimeError, ValueError)
FIRST_WAIT_S = 1.0


class Rollback:
    """Serves the last known good version again; ``failed_attempts`` and ``last_error`` describe a retry."""

    def __init__(
        self,
        journal: Journal,
        runtime: InferenceRuntime,
        loader: ModelLoader,
        *,
        backoff_max_s: float,
        stop: threading.Event,
    ) -> None:
        self._journal = journal
        self._runtime = runtime
        self._loader = loader
        self._backoff_max_s = backoff_max_s
        self._stop = stop
        self.failed_attempts = 0
        self.last_error: str | None = None

    def run(self, reason: str, rejected: list[str]) -> None:
        """Roll back (for ``reason``, saving ``rejected``), trying again after each failure until it works or
        the agent stops."""
        first_wait_s = min(FIRST_WAIT_S, self._backoff_max_s)
        retrying = Retrying(
            retry=retry_if_exception_type(ROLLBACK_ERRORS),
            wait=wait_exponential_jitter(initial=first_wait_s, max=self._backoff_max_s, jitter=first_wait_s),
            stop=lambda _attempt: self._stop.is_set(),
            sleep=self._wait,
            before_sleep=lambda attempt: self._failed(attempt, reason, rejected),
            retry_error_callback=lambda _attempt: None,  # stopped: the saved state resumes it at the next start
        )
        retrying(self._attempt, reason, rejected)

    def _wait(self, seconds: float) -> None:
        self._stop.wait(seconds)  # a stop ends the wait at once

    def retrying(self) -> dict[str, object] | None:
        """How a rollback that keeps failing stands (for ``/v1/status``), or None."""
        if not self.failed_attempts:
            return None
        return {"step": State.rolling_back.value, "failed_attempts": self.failed_attempts, "error": self.last_error}

    def _attempt(self, reason: str, rejected: list[str]) -> None:
        if self._stop.is_set():  # stopped while waiting to try again
            return
        st = self._journal.state
        model, version = st.serving_model, st.serving_version
        standby = self._runtime.standby
        if standby is not None and standby.version == version:
            self._runtime.swap(standby, keep_standby=False)
        elif model is not None and version is not None:
            current = self._runtime.serving
            if current is None or current.version != version:
                self._runtime.swap(self._loader.load_installed(model, version), keep_standby=False)
        else:
            self._runtime.unload()
        self._journal.emit("rolled_back", st.target_model, st.target_version, st.target_rollout_id, ok=False,
                           reason=reason)  # fmt: skip
        self._journal.transition(Event.done, reason=reason, rejected=rejected)
        after = f" after {self.failed_attempts} failed attempt(s)" if self.failed_attempts else ""
        log.info("rolled back to %s%s", f"{model} v{version}" if version else "nothing (no earlier version)", after)
        self.failed_attempts, self.last_error = 0, None

    def _failed(self, attempt: RetryCallState, reason: str, rejected: list[str]) -> None:
        """Save, log and report a failed attempt, before the wait for the next one."""
        error = attempt.outcome.exception() if attempt.outcome is not None else None
        wait_s = attempt.next_action.sleep if attempt.next_action is not None else 0.0
        self.failed_attempts = attempt.attempt_number
        self.last_error = one_line(error) if error is not None else "unknown error"
        st = self._journal.transition(Event.failed, reason=reason, rejected=rejected)
        what = f"{st.serving_model} v{st.serving_version}"
        log.error("rollback to %s failed (attempt %d): %s; next try in %.1f s", what, self.failed_attempts,
                  self.last_error, wait_s)  # fmt: skip
        why = f"rollback attempt {self.failed_attempts} failed: {self.last_error}; next try in {wait_s:.1f} s"
        self._journal.emit(State.rolling_back.value, st.target_model, st.target_version, st.target_rollout_id,
                           ok=False, reason=why)  # fmt: skip
