"""Who gets what: selector matching, and the stable assignment of devices to canary waves and A/B arms.

Assignment starts from a hash of (rollout id, device id), so it is the same on every replica and after every
restart. The devices a rollout finds enrolled when it is created (its cohort) are ranked by that hash and spread
evenly over [0, 100), so that a 25 % wave of four devices holds exactly one of them rather than, by the luck of
the hash, none or three. A device that enrolls later has no rank and stands at its plain hash position.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_BUCKETS = 10_000


def bucket(rollout_id: int, device_id: str) -> float:
    """A number in [0, 100) fixed by the rollout and the device, spread evenly over devices."""
    digest = hashlib.sha256(f"{rollout_id}:{device_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") % _BUCKETS) * 100 / _BUCKETS


def ranked_positions(rollout_id: int, device_ids: Iterable[str]) -> dict[str, float]:
    """Positions in [0, 100) by rank of hash: the k-th of n devices stands at 100·k/n.

    A cumulative share of p % then includes exactly ceil(p·n/100) of the n devices, however few they are.
    """
    ordered = sorted(set(device_ids), key=lambda device_id: (bucket(rollout_id, device_id), device_id))
    return {device_id: 100 * rank / len(ordered) for rank, device_id in enumerate(ordered)}


def wave_of(position: float, percents: Sequence[float]) -> int:
    """The first wave (index into cumulative ``percents``) that includes a device at ``position``."""
    for index, percent in enumerate(percents):
        if position < percent:
            return index
    return len(percents) - 1


def in_treatment(position: float, split: float) -> bool:
    """Whether a device at ``position`` is in the treatment arm of an A/B test sending ``split`` (0..1) to it."""
    return position < split * 100


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
