"""Where one device stands in one rollout: targeted or not, compatible or skipped, which arm, which version.

Pure functions of the rollout, the device and the bundles' summaries; the desired-state path and the wave
scheduler both use them, so what a device is sent and what the scheduler counts cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from registry.service.assignment import in_treatment, matches, wave_of
from registry.service.bundles import BundleSummary, choose_variant
from registry.service.records import DeviceView, RolloutView
from registry.service.schemas import RolloutState, Strategy

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


def place(rollout: RolloutView, device: DeviceView, summary_of: SummaryOf, preference: list[str]) -> Placement:
    """The device's placement in ``rollout``."""
    if not matches(rollout.selector, device.labels, device.fingerprint_fields):
        return NOT_TARGETED
    new = choose_variant(summary_of(rollout.model, rollout.version), device.fingerprint, preference)
    if new.variant is None:
        return Placement(targeted=True, compatible=False, skip_reason=new.reason)
    wave = 0
    if rollout.strategy == Strategy.ab:
        treated = in_treatment(rollout.id, device.id, float((rollout.ab or {})["split"]))
    elif rollout.strategy == Strategy.canary:
        wave = wave_of(rollout.id, device.id, rollout.percents)
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
    old = choose_variant(summary_of(rollout.model, control), device.fingerprint, preference)
    return Placement(True, True, None, wave, CONTROL, control if old.variant else None, old.variant)
