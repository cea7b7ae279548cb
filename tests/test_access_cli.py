"""``yolo-ota devices``, ``yolo-ota tokens`` and ``yolo-ota enrollment-tokens`` against the live service."""

from __future__ import annotations

import httpx
from servers import ENROLLMENT_TOKEN, OPERATOR_TOKEN

from exporters.device_identity import DeviceKey, enrollment_body
from exporters.fingerprint import collect
from yolo_ota.processes import RunningServer


def _ok(done) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def _enroll(service: RunningServer, key: DeviceKey, device_id: str, token: str | None = ENROLLMENT_TOKEN):
    body = enrollment_body(key, device_id, fingerprint=collect().model_dump(mode="json"), enrollment_token=token)
    return httpx.post(service.url + "/v1/devices/enroll", json=body, timeout=30)


def test_an_admin_makes_lists_and_revokes_tokens_from_the_command_line(cli, module_service: RunningServer) -> None:
    def run(*args: str, token: str = OPERATOR_TOKEN):
        return cli(*args, "--server", module_service.url, "--token", token)

    made = run("tokens", "create", "cli-viewer", "--scope", "read")
    viewer = _ok(made).strip()
    assert len(viewer) >= 40 and "shown this once" in made.stderr
    listed = _ok(run("tokens", "list"))
    assert "cli-viewer" in listed and "read" in listed and viewer not in listed
    _ok(run("rollout", "list", token=viewer))  # reading works with the new token ...
    refused = run("tokens", "create", "cli-mine", "--scope", "admin", token=viewer)  # ... making tokens does not
    assert refused.returncode == 2 and "HTTP 403" in refused.stderr, refused.stderr
    assert "revoked 1 operator token" in _ok(run("tokens", "revoke", "cli-viewer"))
    after = run("rollout", "list", token=viewer)
    assert after.returncode == 2 and "HTTP 401" in after.stderr and "revoked" in after.stderr, after.stderr

    enrolling = _ok(run("enrollment-tokens", "create", "cli-line4", "--auto-accept", "cli4-*")).strip()
    assert _enroll(module_service, DeviceKey.generate(), "cli4-cam", enrolling).status_code == 200
    assert "cli-line4" in _ok(run("enrollment-tokens", "list"))
    _ok(run("enrollment-tokens", "revoke", "cli-line4"))
    assert _enroll(module_service, DeviceKey.generate(), "cli4-cam2", enrolling).status_code == 401


def test_an_admin_sees_and_decides_what_waits(cli, module_service: RunningServer) -> None:
    def run(*args: str):
        return cli(*args, "--server", module_service.url, "--token", OPERATOR_TOKEN)

    real = DeviceKey.generate()
    assert _enroll(module_service, real, "cli-victim").status_code == 200
    assert _enroll(module_service, DeviceKey.generate(), "cli-victim").status_code == 202  # another key asks
    waiting = _ok(run("devices", "list", "--waiting"))
    assert "cli-victim" in waiting and "accepted" in waiting
    assert "the device keeps its own" in _ok(run("devices", "reject", "cli-victim"))
    assert "cli-victim" not in _ok(run("devices", "list", "--waiting"))
    assert "decommissioned" in _ok(run("devices", "decommission", "cli-victim"))
    assert '"status": "decommissioned"' in _ok(run("devices", "show", "cli-victim"))
    assert _enroll(module_service, real, "cli-victim").status_code == 403
