"""A simulated fleet for the rollout-service tests: devices that enroll, poll and report over the real REST API."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from servers import ENROLLMENT_TOKEN, OPERATOR_TOKEN

from exporters.device_identity import DeviceKey, enrollment_body
from exporters.fingerprint import collect


def device_fingerprint(**changes: Any) -> dict[str, Any]:
    """This machine's fingerprint as a device would send it, with ``changes`` applied."""
    return {**collect().model_dump(mode="json"), **changes}


@dataclass
class SimDevice:
    device_id: str
    token: str
    etag: str | None = None
    desired: dict[str, Any] = field(default_factory=dict)
    reported: tuple[int | None, str | None] = (None, None)  # (rollout, version) whose outcome was reported


class Fleet:
    """Operator and device calls against one running rollout service."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)
        self.devices: dict[str, SimDevice] = {}
        self.keys: dict[str, DeviceKey] = {}  # each simulated device keeps its key across enrollments
        self._operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}

    def close(self) -> None:
        self.http.close()

    # -- operator --------------------------------------------------------------------------------------------

    def op(self, method: str, path: str, *, expect: int = 200, **kwargs: Any) -> Any:
        answer = self.http.request(method, path, headers=self._operator, **kwargs)
        assert answer.status_code == expect, f"{method} {path}: {answer.status_code} {answer.text}"
        return answer.json() if answer.content else None

    def create_rollout(self, **body: Any) -> dict[str, Any]:
        return self.op("POST", "/v1/rollouts", json=body, expect=201)

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        return self.op("GET", f"/v1/rollouts/{rollout_id}")

    def audit(self, rollout_id: int | None = None) -> list[dict[str, Any]]:
        params = {"rollout_id": rollout_id} if rollout_id else {}
        return list(reversed(self.op("GET", "/v1/audit", params={**params, "limit": 10000})["entries"]))

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float = 30) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def wait_state(self, rollout_id: int, state: str, timeout_s: float = 30) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            rollout = self.rollout(rollout_id)
            return rollout if rollout["state"] == state else None

        return self.wait_for(f"rollout {rollout_id} to be {state}", reached, timeout_s)

    # -- devices ---------------------------------------------------------------------------------------------

    def enroll(self, device_id: str, labels: dict[str, str] | None = None, **fingerprint: Any) -> SimDevice:
        key = self.keys.setdefault(device_id, DeviceKey.generate())
        body = enrollment_body(
            key, device_id, fingerprint=device_fingerprint(**fingerprint), labels=labels,
            enrollment_token=ENROLLMENT_TOKEN,
        )  # fmt: skip
        answer = self.http.post("/v1/devices/enroll", json=body)
        assert answer.status_code == 200, answer.text
        device = SimDevice(device_id, answer.json()["device_token"])
        self.devices[device_id] = device
        return device

    def enroll_many(self, count: int, prefix: str, labels: dict[str, str] | None = None) -> list[SimDevice]:
        return [self.enroll(f"{prefix}-{index:04d}", labels) for index in range(count)]

    def poll(self, device: SimDevice, *, conditional: bool = True) -> int:
        """One desired-state poll as an agent makes it; returns the status and keeps what came back."""
        headers = {"Authorization": f"Bearer {device.token}"}
        if conditional and device.etag:
            headers["If-None-Match"] = device.etag
        answer = self.http.get(f"/v1/devices/{device.device_id}/desired", headers=headers)
        assert answer.status_code in (200, 304), answer.text
        if answer.status_code == 200:
            device.desired = answer.json()
            device.etag = answer.headers["ETag"]
            assert device.etag == device.desired["etag"]
        return answer.status_code

    def desired_version(self, device: SimDevice) -> str | None:
        self.poll(device, conditional=False)
        version = device.desired["version"]
        return str(version) if version is not None else None

    def report(self, device: SimDevice, events: list[dict[str, Any]] | None = None, **telemetry: Any) -> None:
        body: dict[str, Any] = {"events": events or []}
        if telemetry:
            body["telemetry"] = telemetry
        answer = self.http.post(
            f"/v1/devices/{device.device_id}/reports", json=body, headers={"Authorization": f"Bearer {device.token}"}
        )
        assert answer.status_code == 200, answer.text

    def commit(self, device: SimDevice, version: str, *, ok: bool = True, reason: str = "") -> None:
        """Report the end of an update: committed, or rolled back after a failed validation."""
        state = "committed" if ok else "rolled_back"
        self.report(device, [{"state": state, "version": version, "ok": ok, "reason": reason}])

    def follow(self, devices: list[SimDevice], *, fail: frozenset[str] = frozenset()) -> dict[str, str | None]:
        """Every device polls, and reports the outcome of installing what it was sent (failing those in ``fail``)."""
        seen: dict[str, str | None] = {}
        for device in devices:
            self.poll(device)
            version = device.desired.get("version")
            seen[device.device_id] = version
            key = (device.desired.get("rollout_id"), version)
            if version is not None and device.reported != key:
                failed = device.device_id in fail
                self.commit(device, version, ok=not failed, reason="parity failed on golden data" if failed else "")
                device.reported = key
        return seen
