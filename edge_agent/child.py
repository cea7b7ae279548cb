"""The agent's child processes (validation, shadow validation): started, watched for the agent's stop and a
deadline, killed when either comes first.

A child lowers its own CPU priority (``os.nice``, its ``--nice`` flag), so that the model serving requests keeps
the processor, and a model that crashes the interpreter takes only the child with it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from edge_agent.errors import AgentError, ValidationInterrupted

POLL_S = 0.2


def run_child(
    module: str,
    args: list[str],
    *,
    log_path: Path,
    timeout_s: float,
    stop: threading.Event | None,
    on_timeout: type[AgentError],
    what: str,
) -> int:
    """Run ``python -m module args`` with its output in ``log_path``; its exit status.

    ``stop`` set while it runs kills it and raises the retryable ``ValidationInterrupted`` (the saved state
    still says validating, so the next start runs the step again); past ``timeout_s`` it is killed and
    ``on_timeout`` is raised.
    """
    deadline = time.monotonic() + timeout_s
    with log_path.open("wb") as output:
        child = subprocess.Popen([sys.executable, "-m", module, *args], stdout=output, stderr=subprocess.STDOUT)
        try:
            while child.poll() is None:
                if stop is not None and stop.wait(POLL_S):
                    raise ValidationInterrupted("the agent is stopping")
                if time.monotonic() > deadline:
                    raise on_timeout(f"{what} took longer than {timeout_s:.0f} s")
                if stop is None:
                    time.sleep(POLL_S)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    return child.returncode


def log_tail(log_path: Path, lines: int = 3) -> str:
    """The last ``lines`` lines of a child's output, on one line."""
    try:
        return " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
