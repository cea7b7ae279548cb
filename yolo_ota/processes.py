"""Servers as child processes on loopback: started in their own session with a log file, waited for on an HTTP
health path, stopped as a process group.

Each child runs in a new session, so a Ctrl-C in the terminal reaches only the parent, which then stops its
children in order; stopping sends SIGTERM to the child's whole process group (MLflow's server forks workers),
then SIGKILL to what is left after a grace period. A child that does not come up raises ``ChildError``
(``yolo_ota.errors``): ``ChildExitedError`` or ``ChildTimeoutError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import httpx

from yolo_ota.errors import ChildError, ChildExitedError, ChildTimeoutError

# Console scripts of this project's environment, and the module each runs when the script is not installed.
_MODULES = {"mlflow": "mlflow", "yolo-ota": "yolo_ota.cli"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def console_command(tool: str) -> list[str]:
    """``mlflow`` or ``yolo-ota`` of this interpreter's environment, or ``python -m`` its module without the script."""
    exe = Path(sys.executable).parent / tool
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", _MODULES[tool]]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any ``YOLO_OTA_*`` setting, then ``extra``: a child reads only its own."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("YOLO_OTA_")}
    env.update(extra or {})
    return env


@dataclass
class RunningServer:
    """A child process that serves HTTP at ``url``; healthy once ``GET url + health_path`` answers 200."""

    name: str
    url: str
    health_path: str
    process: subprocess.Popen[bytes]
    log_path: Path
    command: list[str]
    env: dict[str, str]
    cwd: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def terminate(self) -> None:
        """SIGTERM to the whole process group, without waiting (to stop several children side by side)."""
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

    def kill(self) -> None:
        """SIGKILL to the whole group at once: no clean-up of any kind, as a power cut would do."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def relaunch(self, env: dict[str, str] | None = None) -> Self:
        """The same command again in a new process (same port, folder and log, appended), optionally another env.

        Only after this one has ended: both would want the same port.
        """
        env = dict(self.env if env is None else env)
        process = _popen(self.command, env, self.log_path, self.cwd)
        return dataclasses.replace(self, process=process, env=env)


def _popen(command: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip


def launch(
    name: str, command: list[str], *, port: int, health_path: str, env: dict[str, str], log_path: Path, cwd: Path
) -> RunningServer:
    """Start ``command`` in its own session (output appended to ``log_path``) without waiting for it."""
    cwd.mkdir(parents=True, exist_ok=True)
    process = _popen(command, env, log_path, cwd)
    return RunningServer(
        name=name, url=f"http://127.0.0.1:{port}", health_path=health_path, process=process, log_path=log_path,
        command=command, env=env, cwd=cwd,
    )  # fmt: skip


def wait_healthy(server: RunningServer, timeout_s: float) -> None:
    """Wait until ``server`` answers its health path with 200; ``ChildError`` if it exits first or is slow."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.running:
            raise ChildExitedError(
                f"{server.name} exited with status {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            if httpx.get(server.url + server.health_path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise ChildTimeoutError(
        f"{server.name} at {server.url} did not answer {server.health_path} within {timeout_s:.0f} s "
        f"(log: {server.log_path}):\n{server.log_tail()}"
    )


Server = TypeVar("Server", bound=RunningServer)


def started(server: Server, timeout_s: float) -> Server:
    """``server`` once healthy; on a ``ChildError`` it is stopped before the error goes on."""
    try:
        wait_healthy(server, timeout_s)
    except ChildError:
        server.stop()
        raise
    return server
