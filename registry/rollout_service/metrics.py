"""Prometheus metrics of one service instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from registry.rollout_service.db import Device, Rollout
from registry.rollout_service.schemas import RolloutState


class _StateCollector(Collector):
    """Devices and rollouts by state, read from the database at scrape time (shared by every replica)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._sessions() as session:
            devices = session.execute(sa.select(sa.func.count()).select_from(Device)).scalar_one()
            by_state = dict(
                session.execute(sa.select(Rollout.state, sa.func.count()).group_by(Rollout.state)).tuples().all()
            )
        yield GaugeMetricFamily("yolo_ota_devices", "Enrolled devices", value=devices)
        rollouts = GaugeMetricFamily("yolo_ota_rollouts", "Rollouts by state", labels=["state"])
        for state in RolloutState:
            rollouts.add_metric([state.value], by_state.get(state.value, 0))
        yield rollouts


class ServiceMetrics:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.desired_polls = Counter(
            "yolo_ota_desired_polls", "Desired-state polls by answer", ["status"], registry=self.registry
        )
        # Bound once: the poll path should not look labels up on every request.
        self.polls_304 = self.desired_polls.labels("304")
        self.polls_200 = self.desired_polls.labels("200")
        self.reports = Counter("yolo_ota_device_reports", "Device reports accepted", registry=self.registry)
        self.report_events = Counter(
            "yolo_ota_device_events", "Device events received", ["state", "ok"], registry=self.registry
        )
        self.webhooks = Counter(
            "yolo_ota_webhooks", "MLflow webhook deliveries by result", ["result"], registry=self.registry
        )
        self.errors = Counter(
            "yolo_ota_request_errors", "Requests answered with an error", ["status"], registry=self.registry
        )
        self.registry.register(_StateCollector(sessions))

    def render(self) -> bytes:
        return generate_latest(self.registry)
