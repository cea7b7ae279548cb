"""Traffic for the fleet: one thread per device posting images of the line (held-out synthetic scenes) to its
local ``/v1/detect``.

It stands in for the cameras on the line: probation needs inferences to judge, A/B arms need telemetry, and the
counts show whether any request failed while versions were swapped under it.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Mapping

import httpx


class Traffic:
    def __init__(self, devices: Mapping[str, str], images: list[bytes], *, interval_s: float = 0.25) -> None:
        """``devices``: device id -> the agent's local API URL."""
        if not images:
            raise ValueError("traffic needs at least one image")
        self._devices = dict(devices)
        self._images = images
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.answered: Counter[str] = Counter()  # device -> requests answered 200
        self.failed: Counter[str] = Counter()  # device -> requests answered otherwise, or not at all
        self.versions: dict[str, Counter[str]] = {d: Counter() for d in self._devices}  # which version answered
        self.last_error: dict[str, str] = {}

    def start(self) -> None:
        for device_id, url in self._devices.items():
            thread = threading.Thread(target=self._run, args=(device_id, url), name=f"traffic-{device_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return sum(self.answered.values()), sum(self.failed.values())

    def _run(self, device_id: str, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for image in itertools.cycle(self._images):
                if self._stop.wait(self._interval_s):
                    return
                try:
                    response = client.post("/v1/detect", content=image)
                except httpx.TransportError as exc:
                    self._count(device_id, None, f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code == 200:
                    self._count(device_id, str(response.json().get("version")), None)
                elif response.status_code == 503 and not self.answered[device_id]:
                    continue  # no model yet: the agent says so until its first version is validated
                else:
                    self._count(device_id, None, f"HTTP {response.status_code}: {response.text[:200]}")

    def _count(self, device_id: str, version: str | None, error: str | None) -> None:
        with self._lock:
            if error is None:
                self.answered[device_id] += 1
                self.versions[device_id][version or "?"] += 1
            else:
                self.failed[device_id] += 1
                self.last_error[device_id] = error
