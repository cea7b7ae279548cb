"""A small ring of recent request images with the serving model's detections on them, for shadow validation.

Every ``every``-th answered ``POST /v1/detect`` leaves its encoded bytes (as received: nothing is copied or
re-encoded) and the detections it was answered with here. Adding one is an append under a lock, so requests pay
nothing measurable; the ring holds at most ``capacity`` frames and ``max_bytes`` of images, whatever the traffic.
Shadow validation drains it by sequence number (``after``) while it collects its sample.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from exporters.postprocess import Detections


@dataclass(frozen=True, eq=False)
class Frame:
    """One sampled request: the image bytes and what the serving version answered."""

    seq: int
    version: str
    data: bytes
    detections: Detections  # in the image's own pixels


class FrameRing:
    """The newest sampled frames; thread-safe."""

    def __init__(self, *, capacity: int, max_bytes: int, every: int = 1) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.every = max(1, every)
        self._frames: deque[Frame] = deque()
        self._bytes = 0
        self._offered = 0
        self._seq = 0
        self._lock = threading.Lock()

    def offer(self, data: bytes, version: str, detections: Detections) -> None:
        """Keep this request's frame if it is the ``every``-th one (images over ``max_bytes`` are never kept)."""
        if self.capacity <= 0 or len(data) > self.max_bytes:
            return
        with self._lock:
            self._offered += 1
            if self._offered % self.every:
                return
            self._seq += 1
            self._frames.append(Frame(self._seq, version, data, detections))
            self._bytes += len(data)
            while len(self._frames) > self.capacity or self._bytes > self.max_bytes:
                self._bytes -= len(self._frames.popleft().data)

    def after(self, seq: int, version: str) -> list[Frame]:
        """The kept frames newer than ``seq`` that ``version`` answered, oldest first."""
        with self._lock:
            return [f for f in self._frames if f.seq > seq and f.version == version]

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)
