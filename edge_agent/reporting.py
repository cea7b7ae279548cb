"""Reports to the rollout service: state events queued on disk until delivered, telemetry windows sent with them.

Every event is written to ``outbox/`` (fsync'd) before any attempt to send it, so events survive a dead service
and a killed agent; they leave the outbox only once the service has accepted them, oldest first.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.client import ServiceClient
from edge_agent.errors import AgentError
from edge_agent.protocol import Report, ReportEvent, ReportTelemetry, ShadowReport
from edge_agent.telemetry import Telemetry
from exporters.files import atomic_write

log = logging.getLogger(__name__)

BATCH_EVENTS = 200
MAX_QUEUED_EVENTS = 10_000  # beyond this the oldest are dropped, with a warning: a device offline for months
MAX_QUEUED_TELEMETRY = 256  # telemetry windows kept in memory while the service is unreachable


class Outbox:
    """Events waiting for delivery, one small file each, named so that sorting gives the order they happened."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._seq = 0
        self._lock = threading.Lock()

    def put(self, event: ReportEvent) -> None:
        with self._lock:
            self._seq += 1
            name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.json"
        atomic_write(self.directory / name, event.model_dump_json())
        self._trim()

    def pending(self, limit: int = BATCH_EVENTS) -> list[tuple[Path, ReportEvent]]:
        found = []
        for path in sorted(self.directory.glob("[0-9]*.json"))[:limit]:
            try:
                found.append((path, ReportEvent.model_validate_json(path.read_bytes())))
            except (OSError, ValueError):
                log.warning("dropping unreadable queued event %s", path.name)
                path.unlink(missing_ok=True)
        return found

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("[0-9]*.json")) if self.directory.is_dir() else 0

    def _trim(self) -> None:
        queued = sorted(self.directory.glob("[0-9]*.json"))
        for path in queued[: max(0, len(queued) - MAX_QUEUED_EVENTS)]:
            log.warning("outbox full: dropping the oldest queued event %s", path.name)
            path.unlink(missing_ok=True)


def event(state: str, *, model: str | None, version: str | None, rollout_id: int | None, ok: bool = True,
          reason: str = "", shadow: ShadowReport | None = None) -> ReportEvent:  # fmt: skip
    return ReportEvent(
        state=state, model=model, version=version, rollout_id=rollout_id, ok=ok, reason=reason[:1000],
        at=datetime.now(UTC), shadow=shadow,
    )  # fmt: skip


class Reporter:
    """Delivers the outbox and telemetry: at once after an event, every ``interval_s`` otherwise, with
    exponential backoff and jitter while the service is unreachable."""

    def __init__(
        self, client: ServiceClient, outbox: Outbox, telemetry: Telemetry, *, interval_s: float, backoff_max_s: float
    ) -> None:
        self._client = client
        self.outbox = outbox
        self._telemetry = telemetry
        self._interval_s = interval_s
        self._backoff_max_s = backoff_max_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reporter", daemon=True)
        self.delivered_events = 0
        self.failures_in_row = 0
        self._unsent_telemetry: list[ReportTelemetry] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, flush: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if flush:
            try:
                self.flush()
            except AgentError as exc:
                log.info("%d events stay queued for the next start: %s", len(self.outbox), exc)

    def emit(self, item: ReportEvent) -> None:
        """Queue an event on disk and wake the sender."""
        self.outbox.put(item)
        self._wake.set()

    def flush(self) -> None:
        """Send everything queued plus the telemetry windows; raises when the service did not take it (what was
        not delivered stays queued, unchanged, for the next try)."""
        self._unsent_telemetry = (self._unsent_telemetry + self._telemetry.take())[-MAX_QUEUED_TELEMETRY:]
        while True:
            batch = self.outbox.pending()
            extra = self._unsent_telemetry[0] if self._unsent_telemetry else None
            if not batch and extra is None:
                return
            self._client.report(Report(events=[e for _, e in batch], telemetry=extra))
            for path, _ in batch:
                path.unlink(missing_ok=True)
            if extra is not None:
                self._unsent_telemetry.pop(0)
            self.delivered_events += len(batch)

    def _loop(self) -> None:
        delay = self._interval_s
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.flush()
            except AgentError as exc:
                self.failures_in_row += 1
                delay = backoff_s(self.failures_in_row, self._interval_s, self._backoff_max_s)
                log.warning(
                    "reports not delivered (%s); %d events queued, next try in %.1f s", exc, len(self.outbox), delay
                )
                continue
            if self.failures_in_row:
                log.info("reports delivered again after %d failed tries", self.failures_in_row)
            self.failures_in_row = 0
            delay = self._interval_s


def backoff_s(failures: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with full jitter: uniform in [base/2, min(max, base * 2**failures)]."""
    ceiling = min(max_s, base_s * 2 ** min(failures, 20))
    return random.uniform(min(base_s / 2, ceiling), ceiling)
