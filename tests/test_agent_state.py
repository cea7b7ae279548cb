"""The agent's saved state machine: the transition table, atomic saves, what a restart does, the loop guard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_agent.errors import StateError
from edge_agent.state import (
    AFTER_CRASH,
    RESTING,
    STATE_FILE,
    STEP_HANDLERS,
    TRANSITIONS,
    AgentState,
    Event,
    State,
    StateStore,
    next_state,
)

HAPPY_PATH = [Event.new_version, Event.done, Event.done, Event.done, Event.done, Event.done, Event.settled]


def test_an_update_walks_the_table_and_is_saved_before_each_step(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = store.load()
    assert state.state == State.idle and not (tmp_path / STATE_FILE).exists()
    seen = [state.state]
    for event in HAPPY_PATH:
        state = store.advance(state.model_copy(update={"target_version": "7"}), event)
        assert store.load() == state  # on disk before the step would run
        seen.append(state.state)
    assert seen == [
        State.idle,
        State.downloading,
        State.verifying,
        State.validating,
        State.swapping,
        State.probation,
        State.committed,
        State.idle,
    ]
    assert state.target_version is None and state.saves == 1  # the count restarted with the settling save


def test_failures_before_the_swap_discard_and_after_it_go_back() -> None:
    for state in (State.downloading, State.verifying, State.validating):
        assert next_state(state, Event.failed) == State.idle
    for state in (State.swapping, State.probation):
        assert next_state(state, Event.failed) == State.rolling_back
    assert next_state(State.rolling_back, Event.failed) == State.rolling_back  # a failed rollback is tried again
    with pytest.raises(StateError, match="no transition from idle on done"):
        next_state(State.idle, Event.done)
    # Every state is reachable and every state has a way out.
    assert {target for target in TRANSITIONS.values()} | {State.idle} == set(State)
    assert {source for source, _ in TRANSITIONS} == set(State)


def test_every_state_under_way_has_a_step_handler() -> None:
    """The step table names one method of the update lifecycle for each state where a step runs, and no more."""
    from edge_agent.updates import Updates

    assert set(STEP_HANDLERS) == set(State) - set(RESTING)
    for state, name in STEP_HANDLERS.items():
        assert callable(getattr(Updates, name, None)), f"{state.value}: Updates has no method {name}"
    assert len(set(STEP_HANDLERS.values())) == len(STEP_HANDLERS), "two states share a handler"


def test_the_state_tables_load_without_torch() -> None:
    code = "import sys, edge_agent.state; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr


@pytest.mark.parametrize("saved", list(State))
def test_every_saved_state_has_a_meaning_after_a_restart(tmp_path: Path, saved: State) -> None:
    store = StateStore(tmp_path)
    store.save(AgentState(state=saved, serving_version="3", target_version="4"))
    resumed = store.recover()
    expected, why = AFTER_CRASH[saved]
    assert resumed.state == expected and why
    assert store.load() == resumed
    assert resumed.serving_version == "3"  # the last known good version is never forgotten
    if saved in (State.swapping, State.probation):
        assert resumed.state == State.rolling_back


def test_a_restart_loop_is_broken_by_the_save_counter(tmp_path: Path) -> None:
    store = StateStore(tmp_path, max_saves=5)
    state = store.advance(AgentState(serving_version="3", target_version="4"), Event.new_version)
    for _ in range(6):  # the agent keeps dying in validation and coming back to it
        state = store.recover()
        state = store.save(state)
    assert store.load().state == State.idle and "restart loop" in store.load().reason
    store.save(AgentState(state=State.probation, serving_version="3", target_version="4", saves=9))
    assert store.recover().state == State.rolling_back


def test_a_kill_during_saves_leaves_a_whole_state(tmp_path: Path) -> None:
    """SIGKILL a process that saves as fast as it can: the file is always one complete state or the other."""
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from edge_agent.state import AgentState, StateStore, State
        store = StateStore(Path({str(tmp_path)!r}))
        i = 0
        while True:
            i += 1
            store.save(AgentState(state=State.downloading if i % 2 else State.verifying, reason="x" * (i % 5000)))
        """
    )
    for attempt in range(5):
        (tmp_path / STATE_FILE).unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.monotonic() + 60
        while not (tmp_path / STATE_FILE).exists() and time.monotonic() < deadline:  # imports done, saving
            time.sleep(0.01)
        time.sleep(0.05 * attempt)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        loaded = StateStore(tmp_path).load()
        assert loaded.state in (State.downloading, State.verifying)
    StateStore(tmp_path).load()
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # a kill's half-written file is swept up


def test_a_damaged_state_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text('{"state": "flying"}')
    with pytest.raises(StateError, match="not a valid agent state"):
        StateStore(tmp_path).load()
