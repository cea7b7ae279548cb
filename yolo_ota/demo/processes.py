"""Child processes of the demo: started in their own session with a log file, waited for, stopped as a group.

Each child runs in a new session, so a Ctrl-C in the terminal reaches only the demo, which then stops its
children in order; stopping sends SIGTERM to the child's whole process group (MLflow's server forks workers),
then SIGKILL to what is left after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


class DemoError(Exception):
    """The demo could not go on: a process did not start, or the fleet did not do what a step waits for.

    A retry helps only when the cause was load on the machine (a timeout); the message says what was seen.
    """


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def terminate(self) -> None:
        """SIGTERM to the whole process group (MLflow's server forks workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, grace_s: float = 15) -> None:
        """``terminate``, then SIGKILL to whatever is left of the group after ``grace_s``."""
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace_s)
        # workers the leader did not take down with it, or a leader that ignored SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def spawn(name: str, command: list[str], *, url: str, env: dict[str, str], log_path: Path, cwd: Path) -> Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
    return Child(name=name, url=url, process=process, log_path=log_path)


def wait_healthy(child: Child, path: str, timeout_s: float) -> None:
    """Wait until ``GET url+path`` answers 200; ``DemoError`` with the log's tail if the child exits or is slow."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.running:
            raise DemoError(f"{child.name} exited with status {child.process.returncode}:\n{child.log_tail()}")
        try:
            if httpx.get(child.url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise DemoError(f"{child.name} did not answer {path} within {timeout_s:.0f} s (log: {child.log_path})")
