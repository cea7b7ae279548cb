"""Shared fixtures: an offline Ultralytics environment, and a small detector that really detects.

The trained detector is the demo's (about two minutes of training on two cores), cached under ``.cache/fixtures``
in the checkout, keyed by its training recipe and the library versions, so later test runs and the demo test reuse
it. ``YOLO_OTA_FIXTURE_CACHE`` moves that cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Ultralytics reads these on first import: set them before any test module imports it.
_CONFIG_DIR = tempfile.mkdtemp(prefix="yolo-ota-test-ultralytics-")
os.environ["YOLO_OFFLINE"] = "true"
os.environ["YOLO_CONFIG_DIR"] = _CONFIG_DIR
# The demo's detector cache (``yolo_ota.demo.detectors.cache_root``) for this session and the demos it starts: kept
# in the checkout, not in the user's cache.
REPO = Path(__file__).resolve().parents[1]
os.environ["XDG_CACHE_HOME"] = str(Path(os.environ.get("YOLO_OTA_FIXTURE_CACHE", REPO / ".cache" / "fixtures")))

import torch  # noqa: E402
from fleet import Fleet  # noqa: E402
from servers import mlflow_client, start_mlflow, start_rollout_service  # noqa: E402

from yolo_ota.processes import RunningServer  # noqa: E402
from yolo_ota.scratch_postgres import create_postgres_database, drop_postgres_database, postgres_reachable  # noqa: E402

pytest_plugins = ["agent_stack"]

SCENE_SIZE = 160


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_CONFIG_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a working CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained_detector() -> Path:
    """Weights of a YOLOv8n trained on synthetic PCB scenes (classes chip, capacitor, solder_bridge): the demo's v2.

    The demo's own training and cache (``yolo_ota.demo.detectors``), moved under the fixture cache by
    ``XDG_CACHE_HOME``: the test session trains at most once, and the demo it starts finds the weights there.
    """
    from yolo_ota.demo.detectors import trained_weights

    weights, _ = trained_weights(lambda line: print(line, flush=True))
    return weights["v2"]


@pytest.fixture(scope="session")
def scene_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four synthetic scenes (not in the training set) to use as golden images."""
    from exporters.synthetic import write_scenes

    return write_scenes(tmp_path_factory.mktemp("scenes"), count=4, size=SCENE_SIZE, seed=1234)


@pytest.fixture(scope="session")
def trained_bundle(trained_detector: Path, scene_images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cpu-fp32 bundle of the trained detector at 160 px with the scenes in its golden data (read-only use)."""
    from exporters.export import ExportRequest, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "trained"
    result = export_bundle(
        ExportRequest(
            model=str(trained_detector),
            out_dir=out,
            imgsz=(SCENE_SIZE, SCENE_SIZE),
            variants=("cpu-fp32",),
            name="pcb-parts",
            golden_images=tuple(scene_images),
        )
    )
    assert result.passed, result.manifest.gates
    return out


@pytest.fixture(scope="session")
def formats_bundle(trained_detector: Path, scene_images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained detector at 160 px as cpu-fp32 in every format: TorchScript, AOTInductor and ONNX (read-only
    use). Exported after ``trained_bundle``'s fixtures, so its release is the newer."""
    from exporters.export import ExportRequest, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "formats"
    result = export_bundle(
        ExportRequest(
            model=str(trained_detector),
            out_dir=out,
            imgsz=(SCENE_SIZE, SCENE_SIZE),
            variants=("cpu-fp32",),
            formats=("torchscript", "aoti", "onnx"),
            name="pcb-parts",
            golden_images=tuple(scene_images),
        )
    )
    assert result.passed, result.manifest.gates
    return out


@pytest.fixture(scope="session")
def line_bundle(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The trained bundle as exported for product line ``name`` (a copy whose manifest names that line, which is
    what it may be registered as), made once per name (read-only use)."""
    from exporters.drills import set_product_line

    made: dict[str, Path] = {}

    def for_line(name: str) -> Path:
        if name not in made:
            target = tmp_path_factory.mktemp("lines") / "bundle"
            shutil.copytree(trained_bundle, target)
            set_product_line(target, name)
            made[name] = target
        return made[name]

    return for_line


@pytest.fixture
def bundle_copy(trained_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the trained bundle that a test may alter."""
    target = tmp_path / "bundle"
    shutil.copytree(trained_bundle, target)
    return target


def run_cli(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real ``yolo-ota`` console command in a subprocess (its environment is this test session's)."""
    exe = Path(sys.executable).parent / "yolo-ota"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "yolo_ota.cli"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "COLUMNS": "160"}
    )


CliRun = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli() -> CliRun:
    """The real console command, run in a subprocess."""
    return run_cli


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A real MLflow tracking server: SQLite backend, artifacts served (proxied) from a local folder."""
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for one rollout-service test: SQLite in tmp_path, or PostgreSQL when reachable."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rollouts.db'}"
        return
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    name = "yolo_ota_" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    url = create_postgres_database(name)
    yield url
    drop_postgres_database(name)


@pytest.fixture(scope="session")
def fleet_model(mlflow_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Registered model ``pcb-line`` in the session's MLflow: versions 1 and 2 pass their gates, 3 fails them, 4
    passes them; each a newer release than the one before.

    Small random-weight YOLOv8n bundles at 64 px (cpu-fp32): what the rollout service reads of them is the same.
    """
    from exporters.export import ExportRequest, export_bundle
    from registry.mlflow_gateway import MlflowGateway

    gateway = MlflowGateway(mlflow_server.url)
    versions: dict[str, str] = {"model": "pcb-line"}
    exports = (("good", None), ("better", None), ("failed", 0.001), ("newest", None))
    for release, (key, budget_ms) in enumerate(exports, start=1):
        out = tmp_path_factory.mktemp("fleet") / key
        result = export_bundle(
            ExportRequest(
                model="yolov8n.yaml",
                out_dir=out,
                imgsz=(64, 64),
                variants=("cpu-fp32",),
                name="pcb-line",
                release=release,
                latency_budget_ms=budget_ms,
            )
        )
        assert result.passed == (budget_ms is None)
        versions[key] = gateway.register_bundle(out, "pcb-line").version.version
    return versions


@pytest.fixture(scope="module")
def module_service(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> Iterator[RunningServer]:
    """One rollout service for a test module: SQLite, the session's MLflow, alias polling as good as off."""
    server = start_rollout_service(
        tmp_path_factory.mktemp("service"), mlflow_url=mlflow_server.url, settings={"ALIAS_POLL_INTERVAL_S": "3600"}
    )
    yield server
    server.stop()


@pytest.fixture
def approval_fleet(tmp_path: Path, mlflow_server: RunningServer, fleet_model: dict[str, str]) -> Iterator[Fleet]:
    """A service that makes promotions wait for approval and polls MLflow's aliases every second, with its fleet
    client; the model has no production alias before or after."""
    client = mlflow_client(mlflow_server)

    def clear() -> None:
        if "production" in (client.get_registered_model(fleet_model["model"]).aliases or {}):
            client.delete_registered_model_alias(fleet_model["model"], "production")

    clear()
    server = start_rollout_service(
        tmp_path / "svc", mlflow_url=mlflow_server.url, settings={"PROMOTION_APPROVAL": "required"}
    )
    sim = Fleet(server.url)
    yield sim
    sim.close()
    server.stop()
    clear()
