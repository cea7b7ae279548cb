"""The update's journal: the saved state the agent is in now, the transitions saved before each step, and the
events that tell the rollout service about them.

Shared by the parts of the agent (``edge_agent.updates``, ``edge_agent.loading``, the local API's status), so that
every one of them reads and reports the same state.
"""

from __future__ import annotations

import logging
import threading

from edge_agent.protocol import ShadowReport
from edge_agent.reporting import Reporter, event
from edge_agent.state import AgentState, Event, StateStore

log = logging.getLogger(__name__)


class Journal:
    """The current ``AgentState``; ``transition`` saves the next one, ``advance`` also reports it."""

    def __init__(
        self, states: StateStore, reporter: Reporter, *, pause_on_enter: dict[str, float], stop: threading.Event
    ) -> None:
        self.states = states
        self.state = AgentState()
        self._reporter = reporter
        self._pause_on_enter = pause_on_enter
        self._stop = stop

    def recover(self) -> AgentState:
        """Load the saved state as ``AFTER_CRASH`` says to resume it."""
        self.state = self.states.recover()
        return self.state

    def transition(self, on: Event, *, reason: str = "", **changes: object) -> AgentState:
        """Save the state that ``on`` leads to, before its step runs (``StateStore.advance``)."""
        self.state = self.states.advance(self.state, on, reason=reason, **changes)
        return self.state

    def advance(self, on: Event, *, reason: str = "", **changes: object) -> None:
        """Save the next state, report it, and hold there when a drill asks to."""
        self.transition(on, reason=reason, **changes)
        self.emit_step(reason=reason)
        self.drill_pause()

    def drill_pause(self) -> None:
        """Wait ``pause_on_enter[state]`` seconds after a state is saved (crash drills and demos)."""
        pause_s = self._pause_on_enter.get(self.state.state.value)
        if pause_s:
            log.warning("pausing %.1f s in %s (pause_on_enter drill setting)", pause_s, self.state.state.value)
            self._stop.wait(pause_s)

    def emit_step(self, *, ok: bool = True, reason: str = "") -> None:
        """Report the current state of the update under way."""
        st = self.state
        self.emit(st.state.value, st.target_model, st.target_version, st.target_rollout_id, ok=ok, reason=reason)

    def emit(
        self, state: str, model: str | None, version: str | None, rollout_id: int | None, *, ok: bool = True,
        reason: str = "", shadow: ShadowReport | None = None,
    ) -> None:  # fmt: skip
        """Queue an event for the rollout service (delivered by the reporter thread)."""
        self._reporter.emit(
            event(state, model=model, version=version, rollout_id=rollout_id, ok=ok, reason=reason, shadow=shadow)
        )
