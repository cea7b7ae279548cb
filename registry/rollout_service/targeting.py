"""Where one device stands in one rollout: targeted or not, compatible or skipped, which arm, which version.

Pure functions of the rollout, the device and the bundles' summaries; the desired-state path and the wave
scheduler both use them, so what a device is sent and what the scheduler counts cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from registry.rollout_service.assignment import bucket, in_treatment, matches, ranked_positions, wave_of
from registry.rollout_service.bundles import BundleSummary, variant_to_offer
from registry.rollout_service.records import DeviceView, RolloutView
from registry.rollout_service.schemas import RolloutState, Strategy

TREATMENT = "treatment"
CONTROL = "control"

SummaryOf = Callable[[str, str], BundleSummary]


@dataclass(frozen=True)
class Placement:
    targeted: bool  # the selector matches the device
    compatible: bool = False  # it can run the rollout's new version (else it is skipped and counted)
    skip_reason: str | None = None
    wave: int = 0
    arm: str | None = None  # treatment (the new version) or control (the previous or control version)
    version: str | None = None  # what this rollout wants the device to run; None: no opinion
    variant: str | None = None


NOT_TARGETED = Placement(targeted=False)


def cohort_positions(
    rollout: RolloutView, fleet: Iterable[DeviceView], summary_of: SummaryOf, preference: list[str]
) -> dict[str, float]:
    """Ranked positions of the rollout's cohort: the targeted devices, able to run its version, that were
    enrolled when it was created. Empty for an immediate rollout, which places nobody."""
    if rollout.strategy not in (Strategy.canary, Strategy.ab):
        return {}
    summary = summary_of(rollout.model, rollout.version)
    members = [
        device.id
        for device in fleet
        if device.enrolled_at <= rollout.created_at
        and matches(rollout.selector, device.labels, device.fingerprint_fields)
        and variant_to_offer(summary, device.fingerprint, preference, forced=rollout.force_gates).variant is not None
    ]
    return ranked_positions(rollout.id, members)


def place(
    rollout: RolloutView,
    device: DeviceView,
    summary_of: SummaryOf,
    preference: list[str],
    positions: Mapping[str, float],
) -> Placement:
    """The device's placement in ``rollout``; ``positions`` are the rollout's ``cohort_positions``."""
    if not matches(rollout.selector, device.labels, device.fingerprint_fields):
        return NOT_TARGETED
    forced = rollout.force_gates
    new = variant_to_offer(summary_of(rollout.model, rollout.version), device.fingerprint, preference, forced=forced)
    if new.variant is None:
        return Placement(targeted=True, compatible=False, skip_reason=new.reason)
    wave = 0
    position = positions.get(device.id)
    if position is None:  # enrolled after the rollout was created
        position = bucket(rollout.id, device.id)
    if rollout.strategy == Strategy.ab:
        # a completed test ended on its treatment (the winner, with auto_complete): every device takes it
        treated = rollout.state == RolloutState.completed or in_treatment(position, float((rollout.ab or {})["split"]))
    elif rollout.strategy == Strategy.canary:
        wave = wave_of(position, rollout.percents)
        treated = wave <= rollout.current_wave
    else:
        treated = True
    if rollout.state == RolloutState.rolled_back:
        treated = False
    if treated:
        return Placement(True, True, None, wave, TREATMENT, rollout.version, new.variant)
    control = rollout.control_version
    if control is None:
        return Placement(True, True, None, wave, CONTROL, None, None)
    # The control version ran on these devices already (by a force, if its gates failed): offer it as it ran.
    old = variant_to_offer(summary_of(rollout.model, control), device.fingerprint, preference, forced=True)
    return Placement(True, True, None, wave, CONTROL, control if old.variant else None, old.variant)
