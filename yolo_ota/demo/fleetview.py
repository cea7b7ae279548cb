"""The demo's view of the fleet, through the rollout service's REST API with an operator token.

``FleetWatch.until`` polls devices and one rollout twice a second, prints every change it sees (a device's state
or version, a rollout's wave or state) and returns when a condition holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from yolo_ota.errors import DemoError

Json = dict[str, Any]


class Operator:
    """A small REST client for the operator's side of the rollout service."""

    def __init__(self, url: str, token: str) -> None:
        self._client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def close(self) -> None:
        self._client.close()

    def get(self, path: str, **params: Any) -> Any:
        return self._checked(self._client.get(path, params=params))

    def post(self, path: str, body: Json) -> Any:
        return self._checked(self._client.post(path, json=body))

    @staticmethod
    def _checked(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise DemoError(
                f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text}"
            )
        return response.json()

    def devices(self) -> dict[str, Json]:
        return {d["device_id"]: d for d in self.get("/v1/devices")["devices"]}

    def device(self, device_id: str) -> Json:
        return dict(self.get(f"/v1/devices/{device_id}"))

    def rollouts(self, model: str) -> list[Json]:
        return list(self.get("/v1/rollouts", model=model)["rollouts"])

    def rollout(self, rollout_id: int) -> Json:
        return dict(self.get(f"/v1/rollouts/{rollout_id}"))

    def audit(self, rollout_id: int) -> list[Json]:
        return list(self.get("/v1/audit", rollout_id=rollout_id)["entries"])

    def analysis(self, rollout_id: int) -> Json:
        """``GET /v1/rollouts/{id}/analysis``: the spec, the latest verdict and the history, newest first."""
        return dict(self.get(f"/v1/rollouts/{rollout_id}/analysis"))


def wave_text(rollout: Json) -> str:
    """``wave 2/3 (50 %): 2 devices, 1 ok, 0 failed`` for the rollout's current wave."""
    waves = rollout["wave_progress"]
    current = waves[min(rollout["current_wave"], len(waves) - 1)]
    return (
        f"wave {current['index'] + 1}/{len(waves)} ({current['percent']:g} %): {current['state']}, "
        f"{current['devices']} device(s) so far, {current['succeeded']} ok, {current['failed']} failed"
    )


class FleetWatch:
    def __init__(self, operator: Operator, say: Callable[[str], None], check_alive: Callable[[], None]) -> None:
        self.operator = operator
        self._say = say
        self._check_alive = check_alive
        self._seen_devices: dict[str, tuple[Any, ...]] = {}
        self._seen_rollouts: dict[int, tuple[Any, ...]] = {}
        # Every version each device was seen serving (committed or on probation), from the first poll on.
        self.served: dict[str, set[str]] = {}

    def until(
        self,
        what: str,
        done: Callable[[dict[str, Json], Json | None], bool],
        *,
        rollout_id: int | None = None,
        timeout_s: float,
    ) -> tuple[dict[str, Json], Json | None]:
        """Poll until ``done(devices, rollout)``; ``DemoError`` after ``timeout_s`` with what was last seen."""
        deadline = time.monotonic() + timeout_s
        devices: dict[str, Json] = {}
        rollout: Json | None = None
        while True:
            self._check_alive()
            devices = self.operator.devices()
            rollout = self.operator.rollout(rollout_id) if rollout_id is not None else None
            self._report(devices, rollout)
            if done(devices, rollout):
                return devices, rollout
            if time.monotonic() > deadline:
                states = ", ".join(f"{d}: v{x['current_version']} {x['state']}" for d, x in sorted(devices.items()))
                raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what} ({states})")
            time.sleep(0.5)

    def _why_failed(self, device_id: str) -> str:
        """``: <reason>`` of the device's latest failed event, so that a failure is explained where it shows."""
        failed = [e for e in self.operator.device(device_id)["last_events"] if not e["ok"]]
        return f": {max(failed, key=lambda e: e['at'])['reason']}" if failed else ""

    def _report(self, devices: dict[str, Json], rollout: Json | None) -> None:
        for device_id, device in sorted(devices.items()):
            if device["current_version"]:
                self.served.setdefault(device_id, set()).add(str(device["current_version"]))
            key = (device["state"], device["current_version"])
            if self._seen_devices.get(device_id) != key:
                self._seen_devices[device_id] = key
                version = f"v{device['current_version']}" if device["current_version"] else "nothing yet"
                self._say(f"  {device_id:<10} {device['state'] or 'enrolled':<12} serving {version}"
                          f"{self._why_failed(device_id) if device['state'] == 'failed' else ''}")  # fmt: skip
        if rollout is not None:
            key = (rollout["state"], rollout["current_wave"], *(
                (w["devices"], w["succeeded"], w["failed"]) for w in rollout["wave_progress"]
            ))  # fmt: skip
            if self._seen_rollouts.get(rollout["id"]) != key:
                self._seen_rollouts[rollout["id"]] = key
                self._say(f"  rollout {rollout['id']} ({rollout['strategy']} v{rollout['version']}): "
                          f"{rollout['state']}; {wave_text(rollout)}")  # fmt: skip
