"""The modules a device uses must not pull in Ultralytics (DESIGN.md section 1)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

LIGHT = (
    "exporters.bundle",
    "exporters.errors",
    "exporters.fingerprint",
    "exporters.gates",
    "exporters.golden",
    "exporters.local_gate",
    "exporters.postprocess",
    "exporters.preprocess",
    "exporters.report",
    "exporters.runtime",
    "exporters.signing",
    "yolo_ota.cli",
)


def test_light_modules_do_not_import_ultralytics() -> None:
    code = (
        "import sys\n"
        f"for name in {LIGHT!r}:\n"
        "    __import__(name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ultralytics', 'mlflow', 'cv2'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"light modules imported {done.stdout.strip()}"


def _importers(library: str) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    return sorted(
        str(path.relative_to(root))
        for package in ("exporters", "registry", "edge_agent", "yolo_ota")
        for path in (root / package).rglob("*.py")
        if re.search(rf"^\s*(import|from) {library}\b", path.read_text(), flags=re.MULTILINE)
    )


def test_only_the_yolo_module_imports_ultralytics() -> None:
    assert _importers("ultralytics") == ["exporters/yolo.py"]


def test_only_the_gateway_imports_mlflow() -> None:
    assert _importers("mlflow") == ["registry/mlflow_gateway.py"]


def test_the_agent_imports_neither_mlflow_ultralytics_nor_the_service() -> None:
    """The whole agent (daemon, local API, validation child) loads none of the server side (DESIGN.md section 1)."""
    code = (
        "import sys\n"
        "import edge_agent.agent, edge_agent.api, edge_agent.validation, edge_agent.verify\n"
        "from edge_agent import Agent\n"
        "banned = ('ultralytics', 'mlflow', 'registry', 'fastapi', 'sqlalchemy', 'uvicorn', 'boto3')\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in banned)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the agent imported {done.stdout.strip()}"
    for package in ("mlflow", "ultralytics", "registry"):
        assert not [p for p in _importers(package) if p.startswith("edge_agent/")], package
