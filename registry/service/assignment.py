"""Who gets what: selector matching, and the stable assignment of devices to canary waves and A/B arms.

Assignment is a hash of (rollout id, device id), so it is the same on every replica and after every restart,
and a device that enrolls late lands where it would have landed had it been there from the start.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

_BUCKETS = 10_000


def bucket(rollout_id: int, device_id: str) -> float:
    """A number in [0, 100) fixed by the rollout and the device, spread evenly over devices."""
    digest = hashlib.sha256(f"{rollout_id}:{device_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") % _BUCKETS) * 100 / _BUCKETS


def wave_of(rollout_id: int, device_id: str, percents: Sequence[float]) -> int:
    """The first wave (index into cumulative ``percents``) that includes this device."""
    position = bucket(rollout_id, device_id)
    for index, percent in enumerate(percents):
        if position < percent:
            return index
    return len(percents) - 1


def in_treatment(rollout_id: int, device_id: str, split: float) -> bool:
    """Whether the device is in the treatment arm of an A/B test sending ``split`` (0..1) to treatment."""
    return bucket(rollout_id, device_id) < split * 100


def matches(selector: Mapping[str, Any], labels: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> bool:
    """Every selector label equals the device's label, and every selector fingerprint field its fingerprint."""
    for key, value in (selector.get("labels") or {}).items():
        if str(labels.get(key)) != str(value):
            return False
    for key, value in (selector.get("fingerprint") or {}).items():
        have = fingerprint.get(key)
        have_text = str(have).lower() if isinstance(have, bool) else "" if have is None else str(have)
        if have_text != str(value):
            return False
    return True


def selector_key(selector: Mapping[str, Any]) -> str:
    """The identity of a device set: equal selectors (whatever their key order) give the same key."""
    canonical = json.dumps(
        {"labels": dict(selector.get("labels") or {}), "fingerprint": dict(selector.get("fingerprint") or {})},
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
