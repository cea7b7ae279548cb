"""The agent's Prometheus metrics, read from its live parts at each scrape and written by ``prometheus_client``
(which escapes label values: model names and versions come from offers and installed records).

Each agent has its own ``CollectorRegistry``, so two agents in one process (tests, a gateway running several)
never share or clash on metrics.

    yolo_ota_agent_inferences_total{version}            detect requests and probes run
    yolo_ota_agent_errors_total{version}                failed inferences
    yolo_ota_agent_latency_ms{version,quantile}         recent latency, p50 and p99
    yolo_ota_agent_serving{model,version,variant,device} 1 for the version serving now
    yolo_ota_agent_reports_queued                       events waiting for the rollout service
    yolo_ota_agent_state{state}                         1 for the update state the agent is in
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.state import State

if TYPE_CHECKING:  # only types: the metrics module loads without torch
    from edge_agent.reporting import Outbox
    from edge_agent.runtime import InferenceRuntime
    from edge_agent.telemetry import Telemetry

__all__ = ["CONTENT_TYPE_LATEST", "AgentCollector", "agent_registry", "exposition"]


class AgentCollector(Collector):
    """Builds the agent's metric families from telemetry, the runtime, the outbox and the current state."""

    def __init__(
        self, telemetry: Telemetry, runtime: InferenceRuntime, outbox: Outbox, state: Callable[[], State]
    ) -> None:
        self._telemetry = telemetry
        self._runtime = runtime
        self._outbox = outbox
        self._state = state

    def collect(self) -> Iterator[Metric]:
        yield from self._per_version()
        serving = GaugeMetricFamily(
            "yolo_ota_agent_serving", "The version serving now (1).", labels=["model", "version", "variant", "device"]
        )
        model = self._runtime.serving
        if model is not None:
            serving.add_metric([model.model, model.version, model.variant, model.device], 1)
        yield serving
        yield GaugeMetricFamily(
            "yolo_ota_agent_reports_queued", "Events waiting for the rollout service.", value=len(self._outbox)
        )
        state = GaugeMetricFamily("yolo_ota_agent_state", "The update state (1 for the current one).", labels=["state"])
        state.add_metric([self._state().value], 1)
        yield state

    def _per_version(self) -> Iterator[Metric]:
        totals = self._telemetry.totals()
        inferences = CounterMetricFamily(
            "yolo_ota_agent_inferences_total", "Detect requests and probes run, per version.", labels=["version"]
        )
        errors = CounterMetricFamily(
            "yolo_ota_agent_errors_total", "Failed inferences, per version.", labels=["version"]
        )
        latency = GaugeMetricFamily(
            "yolo_ota_agent_latency_ms", "Recent detect latency, per version.", labels=["version", "quantile"]
        )
        for version, t in totals.items():
            inferences.add_metric([version], t.inferences)
            errors.add_metric([version], t.errors)
            latency.add_metric([version, "0.5"], t.latency_ms.p50)
            latency.add_metric([version, "0.99"], t.latency_ms.p99)
        yield from (inferences, errors, latency)


def agent_registry(collector: Collector) -> CollectorRegistry:
    """A registry of one agent's own (not the process-wide default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format (served with ``CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)
