"""The demo's error. Its processes are started and stopped by the project's launcher (``yolo_ota.processes``,
``yolo_ota.servers``); a child that does not come up is reported as a ``DemoError`` naming it."""

from __future__ import annotations


class DemoError(Exception):
    """The demo could not go on: a process did not start, or the fleet did not do what a step waits for.

    A retry helps only when the cause was load on the machine (a timeout); the message says what was seen.
    """
