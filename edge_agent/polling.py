"""Polling the rollout service for the desired state: conditional requests (ETag), the poll period the service
asks for (or the one set here), jitter so that a fleet does not poll in step, and exponential backoff while the
service does not answer. Every answer goes through ``edge_agent.trust`` (signed by the pinned key, this device's,
fresh) before it is acted on; a refused one is a failed poll. The serving model is never affected by a failed poll.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from pydantic import ValidationError

from edge_agent.bounds import check_desired, clamp_poll_interval_s
from edge_agent.client import ServiceClient
from edge_agent.errors import EnrollmentPending, EnrollmentRefused, ServiceAnswerError
from edge_agent.protocol import DesiredState
from edge_agent.reporting import backoff_s
from edge_agent.settings import AgentSettings
from edge_agent.trust import Trust
from exporters.errors import one_line

log = logging.getLogger(__name__)

MIN_DELAY_S = 0.05
DEFAULT_POLL_INTERVAL_S = 30.0  # until the service says otherwise


class Poller:
    """One poll at a time; ``last_poll`` says how the latest one went (for ``/v1/status``)."""

    def __init__(self, client: ServiceClient, settings: AgentSettings, trust: Trust) -> None:
        self._client = client
        self._settings = settings
        self._trust = trust
        self._etag: str | None = None
        self._poll_interval_s = DEFAULT_POLL_INTERVAL_S
        self._failures = 0
        self.last_poll: dict[str, Any] = {"ok": None, "at": None, "error": None}

    def poll(self) -> tuple[DesiredState | None, float]:
        """The desired state (None when unchanged or unreachable) and the seconds to wait before the next poll."""
        try:
            desired = self._bounded_desired()
            if desired is not None:
                desired = self._trust.accept(desired)  # DesiredStateRefused: a failed poll; what serves stays
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
            s = self._settings
            self._poll_interval_s = clamp_poll_interval_s(desired.poll_interval_s, s.min_poll_interval_s,
                                                          s.max_poll_interval_s)  # fmt: skip
        return desired, self._jittered(self.interval_s)

    def _bounded_desired(self) -> DesiredState | None:
        """``client.desired``, with an answer beyond the agent's bounds (``edge_agent.bounds``, the protocol's
        fields) as a ``ServiceAnswerError``: a failed poll, not an update."""
        try:
            desired = self._client.desired(self._etag)
        except ValidationError as exc:
            raise ServiceAnswerError(f"the service's answer is out of bounds: {one_line(exc)}") from None
        if desired is not None:
            check_desired(desired)
        return desired

    @property
    def interval_s(self) -> float:
        """The poll period: the setting when there is one, else what the service asked for."""
        return self._settings.poll_interval_s or self._poll_interval_s

    def _jittered(self, interval_s: float) -> float:
        spread = self._settings.poll_jitter * interval_s
        return max(MIN_DELAY_S, interval_s + random.uniform(-spread, spread))
