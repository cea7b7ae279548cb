"""Windows large enough to be samples: a device's consecutive report windows joined until each holds
``min_window_frames`` inferences.

The per-window tests (Mann-Whitney U on per-window rates and p99s) treat every window as one sample. A device
that reports every few seconds, or sees little traffic, sends windows of one or two frames, whose class rates are
0, 1 or 2 per image: noise that no band absorbs. Joining each device's windows, in the order they arrived, into
blocks of at least ``min_window_frames`` inferences gives samples that mean something whatever the report
interval; windows that already hold that many are kept as they are. A device's last, still incomplete block is
left out until it fills.

Latency is compared on each device's own scale (``on_own_scale``) when every device has a baseline: its median
p99 on the previous version before the rollout began. Devices differ in latency by their hardware and load more
than a model change of 20 % moves it, so a few treatment devices that happen to be slow would otherwise look
like a slower model, and a band wide enough to absorb that would hide the slower model too.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from exporters.telemetry_buckets import CONFIDENCE_BUCKETS
from registry.rollout_service.analysis.stats import Window


def coalesce(windows: Sequence[Window], min_frames: int) -> list[Window]:
    """``windows`` (oldest first) with each device's consecutive windows joined into blocks of at least
    ``min_frames`` inferences, in the order the blocks completed."""
    if min_frames <= 1:
        return list(windows)
    pending: dict[str, tuple[list[Window], int]] = {}  # per device: its open block and the inferences in it
    blocks: list[Window] = []
    for window in windows:
        parts, held = pending.get(window.device_id, ([], 0))
        parts.append(window)
        held += window.inferences
        if held >= min_frames:
            blocks.append(parts[0] if len(parts) == 1 else join(parts))
            parts, held = [], 0
        pending[window.device_id] = (parts, held)
    return blocks


def join(parts: Sequence[Window]) -> Window:
    """One window holding every count of ``parts`` (one device's). Its p99 is the parts' p99s weighted by the
    frames they answered. The histograms and per-frame rates are kept only when every part has them (new form)."""
    answered = np.array([p.inferences - p.errors for p in parts], np.float64)
    p99s = np.array([p.latency_p99_ms for p in parts], np.float64)
    p99 = float(p99s @ answered / answered.sum()) if answered.sum() > 0 else 0.0
    counts: Counter[int] = Counter()
    for part in parts:
        counts.update(part.class_counts)
    new_form = all(len(p.confidence) == CONFIDENCE_BUCKETS for p in parts)
    return Window(
        device_id=parts[0].device_id,
        inferences=sum(p.inferences for p in parts),
        errors=sum(p.errors for p in parts),
        nonfinite=sum(p.nonfinite for p in parts),
        frames=sum(p.frames for p in parts) if new_form else 0,
        latency_p99_ms=p99,
        detections=sum(p.detections for p in parts),
        class_counts=dict(counts),
        confidence=_summed([p.confidence for p in parts]) if new_form else (),
        latency_hist=_summed([p.latency_hist for p in parts]) if new_form else (),
        detections_hist=_summed([p.detections_hist for p in parts]) if new_form else (),
    )


def _summed(histograms: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Bucket-wise sums; () unless every histogram has the same number of buckets."""
    if not histograms or len({len(h) for h in histograms}) != 1 or not histograms[0]:
        return ()
    return tuple(int(v) for v in np.sum(np.array(histograms, np.int64), axis=0))


def on_own_scale(windows: Sequence[Window], baselines: Mapping[str, float]) -> list[Window]:
    """``windows`` with each p99 divided by its device's baseline and multiplied by the median of the baselines
    (milliseconds still, for a typical device of the fleet). Every device of ``windows`` must have a baseline > 0."""
    typical = float(np.median(np.fromiter(baselines.values(), np.float64)))
    return [dataclasses.replace(w, latency_p99_ms=w.latency_p99_ms * typical / baselines[w.device_id]) for w in windows]


def baselines_of(rows: Sequence[tuple[str, float]], min_windows: int) -> dict[str, float]:
    """Each device's median p99 over its (device id, p99) rows, for the devices with at least ``min_windows``."""
    by_device: dict[str, list[float]] = {}
    for device_id, p99 in rows:
        by_device.setdefault(device_id, []).append(p99)
    medians = {device: statistics.median(values) for device, values in by_device.items() if len(values) >= min_windows}
    return {device: float(median) for device, median in medians.items() if median > 0}
