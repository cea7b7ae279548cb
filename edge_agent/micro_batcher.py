"""Gather concurrent requests into one batched call: several cameras, one forward pass.

A GPU runs a batch of 4 in little more time than a batch of 1, so when several threads (one per camera, or the
local API's workers) ask for detections at once, answering them together multiplies throughput. The
``MicroBatcher`` owns one worker thread. A caller's ``submit(item)`` queues the item and waits; the worker takes
the queued items (at most ``max_batch``), calls ``run_batch`` once with them, and hands each caller its own
result. An exception from ``run_batch`` is raised in every caller of that batch.

When a batch closes: as soon as it holds as many items as there are *active callers* (threads that submitted
within the last ``active_window_s``), capped at ``max_batch``, or ``max_wait_s`` after the worker became free to
take it, whichever comes first. So a lone camera never waits (one active caller: its batch is full at once), and
four cameras are gathered into batches of four, the worker waiting at most ``max_wait_s`` for the slowest.

``close()`` stops taking items, answers those already queued, and joins the worker; ``submit`` after it raises
``RuntimeError``, like ``concurrent.futures`` executors after ``shutdown``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

DEFAULT_MAX_WAIT_S = 0.0015
DEFAULT_ACTIVE_WINDOW_S = 0.25  # a camera at 4 frames a second or faster counts as one of the concurrent callers


@dataclass(frozen=True)
class BatchStats:
    """What the batcher has done so far: the number of ``run_batch`` calls and of items they answered."""

    batches: int
    items: int

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


@dataclass(eq=False)
class _Request(Generic[In, Out]):
    item: In
    answer: Future[Out] = field(default_factory=Future)


class MicroBatcher(Generic[In, Out]):
    """Answers ``submit(item)`` from concurrent threads with one ``run_batch(items) -> results`` per batch.

    ``run_batch`` gets 1 to ``max_batch`` items and must return one result per item, in order. Thread-safe;
    a context manager that closes on exit.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out]],
        max_batch: int,
        *,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        active_window_s: float = DEFAULT_ACTIVE_WINDOW_S,
        name: str = "micro-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0 or active_window_s < 0:
            raise ValueError(f"waits must be >= 0, got max_wait_s={max_wait_s}, active_window_s={active_window_s}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.active_window_s = active_window_s
        self._queue: deque[_Request[In, Out]] = deque()
        self._last_seen_s: dict[int, float] = {}  # thread ident -> when it last submitted
        self._changed = threading.Condition()
        self._closed = False
        self._batches = 0
        self._items = 0
        self._worker = threading.Thread(target=self._serve, name=name, daemon=True)
        self._worker.start()

    @property
    def stats(self) -> BatchStats:
        with self._changed:
            return BatchStats(batches=self._batches, items=self._items)

    @property
    def pending(self) -> int:
        """Items queued and not yet taken into a batch."""
        with self._changed:
            return len(self._queue)

    def submit(self, item: In) -> Out:
        """The result for ``item``, computed in a batch with whatever else was submitted at the same time."""
        request: _Request[In, Out] = _Request(item)
        with self._changed:
            if self._closed:
                raise RuntimeError("the micro-batcher is closed")
            self._last_seen_s[threading.get_ident()] = time.monotonic()
            self._queue.append(request)
            self._changed.notify_all()
        return request.answer.result()

    def close(self) -> None:
        """Answer what is queued, then stop the worker; idempotent."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> MicroBatcher[In, Out]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _active_callers(self, now: float) -> int:
        horizon = now - self.active_window_s
        for ident in [ident for ident, seen in self._last_seen_s.items() if seen < horizon]:
            del self._last_seen_s[ident]
        return max(len(self._last_seen_s), 1)

    def _next_batch(self) -> list[_Request[In, Out]] | None:
        """The next batch to run, once it is full or its wait is over; None when closed and drained."""
        with self._changed:
            while not self._queue:
                if self._closed:
                    return None
                self._changed.wait()
            # The wait starts when the worker is free, not when the first item arrived: items that queued during
            # the last forward have waited already, but their cameras' peers are just being answered and will
            # submit within microseconds. Counting from arrival would keep cameras out of phase for good.
            deadline_s = time.monotonic() + self.max_wait_s
            while not self._closed:
                now = time.monotonic()
                target = min(self.max_batch, self._active_callers(now))
                remaining_s = deadline_s - now
                if len(self._queue) >= target or remaining_s <= 0:
                    break
                self._changed.wait(remaining_s)
            count = min(self.max_batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            self._batches += 1
            self._items += count
            return batch

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                results = self.run_batch([request.item for request in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except BaseException as exc:  # every caller of the batch gets the error; the worker serves on
                for request in batch:
                    request.answer.set_exception(exc)
                continue
            for request, result in zip(batch, results, strict=True):
                request.answer.set_result(result)
