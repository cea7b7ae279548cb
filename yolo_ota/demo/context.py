"""What every step of the demo's story works with: the narrator, the operator's REST client, the fleet watch,
the demo's version numbers, and the results that end in the summary (``summary.json``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from yolo_ota.demo.fleetview import FleetWatch, Json, Operator
from yolo_ota.demo.narration import Narrator

# States after which a device is settled on what it serves (no update under way).
SETTLED = ("committed", "rolled_back", "failed")
STOP_ACTIONS = ("halt", "rollback", "abort")


@dataclass
class StoryContext:
    narrator: Narrator
    operator: Operator
    watch: FleetWatch
    model: str
    step_timeout_s: float
    versions: dict[str, str] = field(default_factory=dict)  # v1 .. v4 -> MLflow version number
    results: dict[str, Json] = field(default_factory=dict)  # step -> what it found (summary.json)

    def say(self, message: str) -> None:
        self.narrator.say(message)

    def claim(self, text: str, held: bool, detail: str = "") -> bool:
        return self.narrator.claim(text, held, detail)

    def all_on(self, label: str, *, completed: bool) -> Callable[[dict[str, Json], Json | None], bool]:
        """Every device committed on ``label`` (and, with ``completed``, the watched rollout completed)."""
        version = self.versions[label]

        def check(devices: dict[str, Json], rollout: Json | None) -> bool:
            on = all(d["current_version"] == version and d["state"] == "committed" for d in devices.values())
            return on and (not completed or (rollout is not None and rollout["state"] == "completed"))

        return check

    def check_converged(self, rollout_id: int, label: str) -> bool:
        devices = self.operator.devices()
        on = sorted(d for d, x in devices.items() if x["current_version"] == self.versions[label])
        rollout = self.operator.rollout(rollout_id)
        return self.claim(
            f"the fleet converged on {label}",
            len(on) == len(devices) and rollout["state"] == "completed",
            f"{len(on)}/{len(devices)} devices, rollout {rollout_id} {rollout['state']}",
        )

    def seconds_to_stop(self, rollout_id: int) -> float | None:
        """From the rollout's creation to its first halt/rollback/abort, by the service's own audit times."""
        entries = sorted(self.operator.audit(rollout_id), key=lambda e: e["id"])
        created = next((e["at"] for e in entries if e["action"] == "created"), None)
        stopped = next((e["at"] for e in entries if e["action"] in STOP_ACTIONS), None)
        if created is None or stopped is None:
            return None
        return (datetime.fromisoformat(stopped) - datetime.fromisoformat(created)).total_seconds()
