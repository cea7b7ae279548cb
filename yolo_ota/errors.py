"""Errors of the command line package (``yolo_ota``). Callers catch by kind; ``retryable`` says whether trying
again can help::

    YoloOtaError               base of everything this package raises itself
    ├── ConfigError            the config file named is missing or not valid TOML          (not retryable)
    ├── ChildError             a child process did not come up healthy (message ends with its log's tail)
    │   ├── ChildExitedError   it exited first: starting it again fails the same way       (not retryable)
    │   └── ChildTimeoutError  it did not answer in time: on a loaded machine a retry may help (retryable)
    └── DemoError              the demo could not go on (a process, or a step the fleet did not take)

The other packages have trees of their own: ``exporters.errors``, ``registry.errors``,
``registry.rollout_service.errors``, ``edge_agent.errors``.
"""

from __future__ import annotations


class YoloOtaError(Exception):
    """Base of the command line package's errors."""

    retryable: bool = False


class ConfigError(YoloOtaError):
    """The config file named is missing or is not valid TOML."""


class ChildError(YoloOtaError):
    """A child process did not come up healthy."""


class ChildExitedError(ChildError):
    """The child exited before it answered its health path."""


class ChildTimeoutError(ChildError):
    """The child was still running but did not answer its health path in time."""

    retryable = True


class DemoError(YoloOtaError):
    """The demo could not go on: a process did not start, or the fleet did not do what a step waits for.

    A retry helps only when the cause was load on the machine (a timeout); the message says what was seen.
    """
