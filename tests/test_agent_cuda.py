"""On a GPU: the agent's serving path over a CUDA variant, and its fallback to the CPU variant when the CUDA one
fails at run time (the loader, the journal and the runtime are the agent's own; only the service link is left
out: the events are collected where the reporter would queue them)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from edge_agent.journal import Journal
from edge_agent.loading import ModelLoader
from edge_agent.reporting import ReportEvent
from edge_agent.runtime import InferenceRuntime
from edge_agent.state import StateStore
from edge_agent.store import Installed, VersionStore
from exporters.drills import load_variant, raise_after, replace_variant
from exporters.export import ExportRequest, export_bundle

pytestmark = pytest.mark.cuda
SIZE = 160


class Collected:
    """Where the reporter would queue events: kept in a list."""

    def __init__(self) -> None:
        self.events: list[ReportEvent] = []

    def emit(self, event: ReportEvent) -> None:
        self.events.append(event)


@pytest.fixture(scope="module")
def cuda_bundle(trained_detector: Path, scene_images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cuda") / "bundle"
    result = export_bundle(
        ExportRequest(model=str(trained_detector), out_dir=out, imgsz=(SIZE, SIZE), variants=("cuda-fp32", "cpu-fp32"),
                      golden_images=tuple(scene_images))
    )  # fmt: skip
    assert result.passed, result.manifest.gates
    return out


def test_a_cuda_variant_that_fails_at_run_time_falls_back_to_the_cpu_variant(
    cuda_bundle: Path, tmp_path: Path, bus_jpg: bytes
) -> None:
    store = VersionStore(tmp_path)
    installed = store.installed_dir("m", "1")
    shutil.copytree(cuda_bundle, installed)
    # Three warm-up detections at load, one served request, then every call raises.
    replace_variant(installed, raise_after(load_variant(installed, "cuda-fp32"), 4), variant="cuda-fp32")
    store.install("m", "1", Installed(model="m", version="1", key="m:1:x", variant="cuda-fp32"))
    collected = Collected()
    journal = Journal(StateStore(tmp_path), collected, pause_on_enter={}, stop=threading.Event())  # type: ignore[arg-type]
    loader = ModelLoader(store, journal, "auto")
    runtime = InferenceRuntime()
    runtime.fallback = loader.run_time_fallback
    runtime.swap(loader.load_installed("m", "1"), keep_standby=False)
    first = runtime.detect_bytes(bus_jpg)
    assert (first.variant, first.device) == ("cuda-fp32", "cuda:0")
    second = runtime.detect_bytes(bus_jpg)  # the CUDA variant raises: answered by cpu-fp32, no error to the client
    assert (second.variant, second.device) == ("cpu-fp32", "cpu")
    assert runtime.serving is not None and runtime.serving.variant == "cpu-fp32"
    assert [e.reason for e in collected.events] == ["fallback: cuda-fp32 failed at run time, serving cpu-fp32"]
    assert len(second.detections) == len(first.detections) > 0
