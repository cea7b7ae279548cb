"""Probation: the watch that judges a version right after it is swapped in, and the wait for its verdict, which
runs golden inputs through the new model when real traffic is too scarce to judge it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from edge_agent.runtime import Inference, InferenceRuntime
from edge_agent.settings import AgentSettings
from edge_agent.telemetry import percentile_ms
from exporters.bundle import safe_join
from exporters.golden import Golden

IDLE_WAIT_S = 0.05  # between two looks at the verdict while traffic does the judging


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


class ProbationWatch:
    """Judges the version swapped in: N inferences or T seconds, whichever comes first, with at least a minimum
    number of inferences (the agent probes with golden inputs when traffic is scarce).

    Fails at once on an error or a NaN/inf output, and at the end when p99 exceeds
    ``max(budget, factor x previous p99)``.
    """

    def __init__(
        self,
        version: str,
        *,
        inferences: int,
        duration_s: float,
        min_inferences: int,
        budget_ms: float | None,
        previous_p99_ms: float | None,
        p99_factor: float,
    ) -> None:
        self.version = version
        self._target = inferences
        self._min = min(min_inferences, inferences)
        self._deadline = time.monotonic() + duration_s
        limits = [x for x in (budget_ms, p99_factor * previous_p99_ms if previous_p99_ms else None) if x]
        self.limit_ms = max(limits) if limits else math.inf
        self._lock = threading.Lock()
        self.inferences = 0
        self.errors: list[str] = []
        self._latencies_ms: list[float] = []

    def observe(self, inference: Inference) -> None:
        if inference.model.version != self.version:
            return
        with self._lock:
            self.inferences += 1
            if inference.error is not None:
                self.errors.append(inference.error)
            else:
                self._latencies_ms.append(inference.latency_ms)

    @property
    def needs_probes(self) -> bool:
        return time.monotonic() >= self._deadline and self.inferences < self._min

    def verdict(self) -> Verdict | None:
        """None while undecided; else whether the version passed, and why."""
        with self._lock:
            if self.errors:
                return Verdict(False, f"{len(self.errors)} failed inference(s) in probation: {self.errors[0][:200]}")
            done = self.inferences >= self._target or (
                time.monotonic() >= self._deadline and self.inferences >= self._min
            )
            if not done:
                return None
            p99 = percentile_ms(self._latencies_ms, 99)
        if p99 > self.limit_ms:
            return Verdict(False, f"p99 {p99:.1f} ms over {self.inferences} inferences exceeds {self.limit_ms:.1f} ms")
        return Verdict(True, f"{self.inferences} inferences, no error, p99 {p99:.1f} ms (limit {self.limit_ms:.1f} ms)")


class Probation:
    """The probation under way (at most one), fed every inference the runtime makes."""

    def __init__(self, runtime: InferenceRuntime, settings: AgentSettings, stop: threading.Event) -> None:
        self._runtime = runtime
        self._settings = settings
        self._stop = stop
        self._watch: ProbationWatch | None = None

    @property
    def active(self) -> bool:
        return self._watch is not None

    def begin(self, version: str, *, budget_ms: float | None, previous_p99_ms: float | None) -> None:
        """Start judging ``version`` with the probation settings (call before it is swapped in)."""
        s = self._settings
        self._watch = ProbationWatch(
            version,
            inferences=s.probation_inferences,
            duration_s=s.probation_s,
            min_inferences=s.probation_min_inferences,
            budget_ms=budget_ms,
            previous_p99_ms=previous_p99_ms,
            p99_factor=s.probation_p99_factor,
        )

    def end(self) -> None:
        self._watch = None

    def observe(self, inference: Inference) -> None:
        watch = self._watch
        if watch is not None:
            watch.observe(inference)

    def wait_verdict(self) -> Verdict | None:
        """Block until the watch decides (probing when traffic is scarce); None when the agent stops first."""
        watch = self._watch
        assert watch is not None, "no probation under way"
        serving = self._runtime.serving
        probes = None
        while (verdict := watch.verdict()) is None:
            if self._stop.is_set():
                return None
            if watch.needs_probes and serving is not None:
                if probes is None:
                    probes = Golden.load(safe_join(serving.directory, serving.manifest.golden.path)).inputs
                index = watch.inferences % len(probes)
                self._runtime.probe(np.ascontiguousarray(probes[index : index + 1]))
            else:
                self._stop.wait(IDLE_WAIT_S)
        self._watch = None
        return verdict
