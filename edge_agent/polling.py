"""Polling the rollout service for the desired state: conditional requests (ETag), the poll period the service
asks for (or the one set here), jitter so that a fleet does not poll in step, and exponential backoff while the
service does not answer. The serving model is never affected by a failed poll.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from edge_agent.client import ServiceClient
from edge_agent.errors import EnrollmentPending, EnrollmentRefused, ServiceAnswerError
from edge_agent.protocol import DesiredState
from edge_agent.reporting import backoff_s
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)

MIN_DELAY_S = 0.05
DEFAULT_POLL_INTERVAL_S = 30.0  # until the service says otherwise


class Poller:
    """One poll at a time; ``last_poll`` says how the latest one went (for ``/v1/status``)."""

    def __init__(self, client: ServiceClient, settings: AgentSettings) -> None:
        self._client = client
        self._settings = settings
        self._etag: str | None = None
        self._poll_interval_s = DEFAULT_POLL_INTERVAL_S
        self._failures = 0
        self.last_poll: dict[str, Any] = {"ok": None, "at": None, "error": None}

    def poll(self) -> tuple[DesiredState | None, float]:
        """The desired state (None when unchanged or unreachable) and the seconds to wait before the next poll."""
        try:
            desired = self._client.desired(self._etag)
        except EnrollmentPending as exc:
            self.last_poll = {"ok": False, "at": time.time(), "error": str(exc)}
            delay = self._jittered(self.interval_s)
            log.warning("%s; asking again in %.1f s", exc, delay)
            return None, delay
        except ServiceAnswerError as exc:
            self._failures += 1
            self.last_poll = {"ok": False, "at": time.time(), "error": str(exc)}
            delay = backoff_s(self._failures, self.interval_s, self._settings.backoff_max_s)
            level = logging.ERROR if isinstance(exc, EnrollmentRefused) else logging.WARNING
            log.log(level, "poll failed (%s); serving continues, next poll in %.1f s", exc, delay)
            return None, delay
        self._failures = 0
        self.last_poll = {"ok": True, "at": time.time(), "error": None}
        if desired is not None:
            self._etag = desired.etag
            self._poll_interval_s = float(desired.poll_interval_s)
        return desired, self._jittered(self.interval_s)

    @property
    def interval_s(self) -> float:
        """The poll period: the setting when there is one, else what the service asked for."""
        return self._settings.poll_interval_s or self._poll_interval_s

    def _jittered(self, interval_s: float) -> float:
        spread = self._settings.poll_jitter * interval_s
        return max(MIN_DELAY_S, interval_s + random.uniform(-spread, spread))
