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


def _loaded_in_fresh_interpreter(modules: tuple[str, ...], banned: tuple[str, ...]) -> str:
    """Import ``modules`` in a new interpreter; the banned top-level packages that ended up loaded."""
    code = (
        "import sys\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {banned!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_light_modules_do_not_import_ultralytics() -> None:
    heavy = _loaded_in_fresh_interpreter(LIGHT, ("ultralytics", "mlflow", "cv2"))
    assert heavy == "", f"light modules imported {heavy}"


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
    agent = ("edge_agent.agent", "edge_agent.api", "edge_agent.validation", "edge_agent.verify")
    banned = ("ultralytics", "mlflow", "registry", "fastapi", "sqlalchemy", "uvicorn", "boto3")
    loaded = _loaded_in_fresh_interpreter(agent, banned)
    assert loaded == "", f"the agent imported {loaded}"
    for package in ("mlflow", "ultralytics", "registry"):
        assert not [p for p in _importers(package) if p.startswith("edge_agent/")], package
