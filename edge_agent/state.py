"""The agent's update state machine and its saved state (DESIGN.md section 7).

The next state is saved *before* its step runs, so a restart always knows where it stopped, and every step must
be safe to run twice. ``TRANSITIONS`` is the whole table of (state, event) -> next state; ``AFTER_CRASH`` says
what a saved state means when the agent starts and finds it; ``STEP_HANDLERS`` names the method of
``edge_agent.updates.Updates`` that runs each state's step. Adding a state is one row in each table and one
method. State values are written to disk: never rename them.

Saving is atomic (write a temporary file, fsync it, rename over the old one, fsync the folder), so a kill at any
instant leaves either the old state or the new one. A save counter per update breaks loops: an update that keeps
coming back to the same step after restarts is given up and rolled back.
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import StateError
from exporters.files import atomic_write, leftover_temporaries

log = logging.getLogger(__name__)

STATE_FILE = "agent-state.json"
MAX_SAVES_PER_UPDATE = 64  # a normal update saves about 8 times; far more means a restart loop


class State(StrEnum):
    idle = "idle"
    downloading = "downloading"
    verifying = "verifying"
    validating = "validating"
    swapping = "swapping"
    probation = "probation"
    committed = "committed"
    rolling_back = "rolling_back"


class Event(StrEnum):
    new_version = "new_version"  # the service wants a version this device does not run
    done = "done"  # the step finished well
    failed = "failed"  # the step found the update unusable (digest, signature, parity, latency, probation)
    settled = "settled"  # committed or rolled back: back to waiting


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.idle, Event.new_version): State.downloading,
    (State.downloading, Event.done): State.verifying,
    (State.verifying, Event.done): State.validating,
    (State.validating, Event.done): State.swapping,
    (State.swapping, Event.done): State.probation,
    (State.probation, Event.done): State.committed,
    (State.committed, Event.settled): State.idle,
    (State.rolling_back, Event.done): State.idle,
    # Before the swap nothing runs the new version: a failure only discards it. From the swap on, go back.
    (State.downloading, Event.failed): State.idle,
    (State.verifying, Event.failed): State.idle,
    (State.validating, Event.failed): State.idle,
    (State.swapping, Event.failed): State.rolling_back,
    (State.probation, Event.failed): State.rolling_back,
    # A rollback attempt that failed (the last known good version did not load) is saved and tried again.
    (State.rolling_back, Event.failed): State.rolling_back,
    # A newer version may arrive while waiting to settle; a committed one is kept as the last known good.
    (State.committed, Event.new_version): State.downloading,
}

# What a state found on disk at start means: the state to resume in, and why.
AFTER_CRASH: dict[State, tuple[State, str]] = {
    State.idle: (State.idle, "nothing was under way"),
    State.downloading: (State.downloading, "resume the download (finished files are kept, digests rechecked)"),
    State.verifying: (State.verifying, "verify again: verification reads only the staged files"),
    State.validating: (State.validating, "validate again from the start: the serving model was never touched"),
    State.swapping: (State.rolling_back, "the swap may be half done: go back to the last known good version"),
    State.probation: (State.rolling_back, "probation was cut short: the new version did not prove itself"),
    State.committed: (State.committed, "the new version is the last known good one: serve it"),
    State.rolling_back: (State.rolling_back, "finish going back to the last known good version"),
}

# The step each saved state runs, by the name of its ``edge_agent.updates.Updates`` method (kept as names so that
# this module stays light: no torch). idle and committed run no step: an update is not under way, or it is done.
STEP_HANDLERS: dict[State, str] = {
    State.downloading: "download",
    State.verifying: "verify",
    State.validating: "validate",
    State.swapping: "swap_in",
    State.probation: "watch_probation",
    State.rolling_back: "roll_back",
}
RESTING = (State.idle, State.committed)  # states where no step runs
BEFORE_SWAP = (State.downloading, State.verifying, State.validating)  # nothing runs the new version yet


_CLEARED_TARGET = {
    "target_model": None,
    "target_version": None,
    "target_rollout_id": None,
    "target_key": None,
    "saves": 0,
}


class AgentState(BaseModel):
    """What the agent saves before each step."""

    model_config = ConfigDict(extra="forbid")

    state: State = State.idle
    serving_model: str | None = None
    serving_version: str | None = None  # the last known good version, served now
    target_model: str | None = None
    target_version: str | None = None  # the version being installed, if any
    target_rollout_id: int | None = None
    target_key: str | None = None  # model:version:manifest sha256 of the offer being installed
    reason: str = ""
    rejected: list[str] = Field(default_factory=list)  # offer keys refused here: never tried again
    saves: int = Field(default=0, ge=0)  # saves since the current update began: the loop guard


def next_state(state: State, event: Event) -> State:
    """The table's answer, or ``StateError`` for a pair it does not have."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise StateError(f"no transition from {state.value} on {event.value}") from None


class StateStore:
    """The saved state in ``data_dir``, written atomically."""

    def __init__(self, data_dir: Path, *, max_saves: int = MAX_SAVES_PER_UPDATE) -> None:
        self.path = data_dir / STATE_FILE
        self.max_saves = max_saves

    def load(self) -> AgentState:
        """The saved state, or a fresh idle one when there is none yet. Sweeps up files a kill left half written."""
        for leftover in leftover_temporaries(self.path):
            leftover.unlink(missing_ok=True)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState()
        try:
            return AgentState.model_validate_json(raw)
        except ValidationError as exc:
            raise StateError(f"{self.path} is not a valid agent state: {exc.errors()[0]['msg']}") from None

    def save(self, state: AgentState) -> AgentState:
        """Write ``state`` (with its save counter advanced) so that a kill leaves the old or the new file."""
        saved = state.model_copy(update={"saves": state.saves + 1})
        atomic_write(self.path, json.dumps(saved.model_dump(mode="json"), indent=2))
        return saved

    def advance(self, state: AgentState, event: Event, *, reason: str = "", **changes: object) -> AgentState:
        """Save the state that ``event`` leads to (with ``changes`` to other fields), before its step runs."""
        target = next_state(state.state, event)
        saves = 0 if event == Event.new_version else state.saves  # a new update starts its own count
        updated = state.model_copy(update={**changes, "state": target, "reason": reason, "saves": saves})
        if target == State.idle:
            updated = updated.model_copy(update=_CLEARED_TARGET)
        saved = self.save(updated)
        log.info(
            "state %s -> %s on %s (serving %s, target %s)%s",
            state.state.value,
            target.value,
            event.value,
            saved.serving_version,
            saved.target_version,
            f": {reason}" if reason else "",
        )
        return saved

    def recover(self) -> AgentState:
        """The state to resume in after a start, by ``AFTER_CRASH``; a looping update is rolled back instead."""
        found = self.load()
        resume, why = AFTER_CRASH[found.state]
        looping = found.saves >= self.max_saves and found.state not in (State.idle, State.committed)
        if looping:
            resume = State.rolling_back if found.state in (State.swapping, State.probation) else State.idle
            why = f"{found.saves} saves in one update: a restart loop; the update is given up"
        elif resume == found.state:
            log.info("resuming in %s: %s", found.state.value, why)
            return found
        log.warning("found %s after a restart; now %s: %s", found.state.value, resume.value, why)
        recovered = found.model_copy(update={"state": resume, "reason": why})
        if resume == State.idle:
            recovered = recovered.model_copy(update=_CLEARED_TARGET)
        return self.save(recovered)
