"""Deployment files are valid for the tools that read them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[1] / "infra"


def test_systemd_unit_is_valid(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = (INFRA / "systemd" / "yolo-ota-agent.service").read_text()
    assert "ExecStart=/opt/yolo-ota/bin/yolo-ota agent" in unit and "User=yolo-ota" in unit
    # The unit names the install location of a device; point it at an executable that exists on this machine.
    copy = tmp_path / "yolo-ota-agent.service"
    copy.write_text(unit.replace("/opt/yolo-ota/bin/yolo-ota", shutil.which("true") or "/bin/true"))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stderr + done.stdout).splitlines() if str(copy) in line or "Unknown" in line]
    assert done.returncode == 0 and not problems, done.stderr
