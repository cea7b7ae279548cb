"""Export of real Ultralytics models to bundles: files, digests, gates, Ultralytics compatibility, manifest."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.bundle import MANIFEST_NAME, Manifest, load_verified, sha256_file
from exporters.export import ExportRequest, export_bundle
from exporters.fingerprint import collect
from exporters.formats import all_variants
from exporters.gates import match_count
from exporters.golden import Golden
from exporters.postprocess import Detections, decode
from exporters.preprocess import letterbox, to_input_array
from exporters.runtime import load_torchscript
from exporters.synthetic import make_scene
from exporters.yolo import FINGERPRINT_EXTRA_FILE, sample_images

BUS = next(p for p in sample_images() if p.name == "bus.jpg")


@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml"])
def test_export_from_config_writes_a_complete_verified_bundle(config: str, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = export_bundle(ExportRequest(model=config, out_dir=out, imgsz=(128, 128), variants=("cpu-fp32",)))

    assert result.passed
    manifest = load_verified(out)  # raises on any missing or altered file
    assert set(manifest.files) == {"golden.npz", "variants/cpu-fp32/model.torchscript"}
    for relative, entry in manifest.files.items():
        assert sha256_file(out / relative) == entry.sha256
        assert (out / relative).stat().st_size == entry.bytes
    assert manifest.task == "detect"
    assert manifest.imgsz == (128, 128)
    assert manifest.stride == 32
    assert manifest.source.kind == "config"
    assert manifest.source.model == config
    assert manifest.output.shape == [1, 4 + len(manifest.names), (16 * 16 + 8 * 8 + 4 * 4)]
    gates = manifest.gates["cpu-fp32"]
    assert gates.raw_parity.judged and gates.raw_parity.mse <= 1e-5
    assert gates.detection_parity.passed
    assert gates.latency.stats[0].timer == "perf_counter"
    assert gates.latency.stats[0].p50_ms > 0
    assert gates.memory is None  # CPU variants have no memory sweep

    # The manifest round-trips byte for byte.
    raw = (out / MANIFEST_NAME).read_bytes()
    assert Manifest.model_validate_json(raw).to_json_bytes() == raw

    # Ultralytics itself loads the exported file and predicts with it.
    from ultralytics import YOLO

    results = YOLO(str(out / "variants/cpu-fp32/model.torchscript"), task="detect").predict(
        str(BUS), imgsz=128, verbose=False
    )
    assert results[0].boxes is not None
    assert results[0].orig_shape == (1080, 810)


def test_cpu_only_machine_makes_every_format_it_can_and_skips_cuda_variants_saying_why(tmp_path: Path, cli) -> None:
    """The default formats are those this machine can make and check: here TorchScript, AOTInductor (a C++
    compiler is present) and ONNX (onnx and ONNX Runtime are installed by the export extra)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so nothing is skipped")
    done = cli("export", "yolov8n.yaml", "--imgsz", "64", "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    for fmt in ("", "-aoti", "-onnx"):
        assert f"skipping cuda-fp32{fmt}: no working CUDA device" in done.stderr
        assert f"skipping cuda-fp16{fmt}: no working CUDA device" in done.stderr
    manifest = load_verified(tmp_path / "b")
    assert list(manifest.variants) == ["cpu-fp32"]  # TorchScript, where schema-2 readers look
    assert sorted(all_variants(tmp_path / "b", manifest)) == ["cpu-fp32", "cpu-fp32-aoti", "cpu-fp32-onnx"]
    assert len(manifest.skipped_variants) == 6
    for name in ("cpu-fp32", "cpu-fp32-aoti", "cpu-fp32-onnx"):
        assert name in done.stdout
    assert "pass" in done.stdout


def test_trained_detector_output_depends_on_input_and_golden_has_detections(trained_bundle: Path) -> None:
    manifest = load_verified(trained_bundle)
    golden = Golden.load(trained_bundle / manifest.golden.path)
    outputs = golden.outputs
    names = list(golden.input_names)
    scene_a, scene_b = names.index("scene_000.png"), names.index("scene_001.png")
    mse = float(np.mean((outputs[scene_a].astype(np.float64) - outputs[scene_b]) ** 2))
    assert mse > 1.0, f"outputs of two different scenes are nearly equal (MSE {mse:.3g}): the model ignores its input"
    assert golden.reference_count > 0
    scene_rows = [i for i, n in enumerate(names) if n.startswith("scene_")]
    assert all(len(golden.detections[i]) > 0 for i in scene_rows), "every scene should have reference detections"
    assert manifest.gates["cpu-fp32"].detection_parity.reference_detections == golden.reference_count
    assert manifest.names == {0: "chip", 1: "capacitor", 2: "solder_bridge"}


def test_trained_detector_finds_the_drawn_parts(trained_bundle: Path) -> None:
    """The fixture is a real detector: on fresh scenes it finds most drawn parts with the right class."""
    manifest = load_verified(trained_bundle)
    module = load_torchscript(trained_bundle / manifest.variants["cpu-fp32"].path, "cpu")
    rng = np.random.default_rng(98765)
    found = total = false_positives = 0
    for _ in range(12):
        image, parts = make_scene(rng, size=160)
        boxed, _info = letterbox(image, (160, 160))
        with torch.inference_mode():
            raw = module(torch.from_numpy(to_input_array([boxed])))
        detections = decode(raw, conf=0.25, iou=0.7)[0]
        truth = Detections(
            boxes=np.array([p.box for p in parts], np.float32).reshape(-1, 4),
            scores=np.ones(len(parts), np.float32),
            class_ids=np.array([p.class_id for p in parts], np.int64),
        )
        matched = match_count(truth, detections, iou_min=0.5)
        found += matched
        total += len(parts)
        false_positives += len(detections) - matched
    assert total > 20
    assert found / total >= 0.8, f"found {found} of {total} drawn parts"
    assert false_positives <= total * 0.3, f"{false_positives} false positives for {total} parts"


def test_fingerprint_fields_are_true_for_this_machine(trained_bundle: Path) -> None:
    here = collect()
    assert here.torch == torch.__version__
    assert here.torchvision == metadata.version("torchvision")
    assert here.ultralytics == metadata.version("ultralytics")
    assert here.python == platform.python_version()
    assert here.arch == platform.machine()
    assert here.cuda_runtime == torch.version.cuda
    assert here.tf32_cudnn == torch.backends.cudnn.allow_tf32
    assert here.cudnn_benchmark == torch.backends.cudnn.benchmark
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        assert here.gpu_name == props.name
        assert here.gpu_memory_bytes == props.total_memory
        assert here.gpu_capability == f"{props.major}.{props.minor}"
    else:
        assert here.gpu_name is None and here.gpu_memory_bytes is None and here.driver is None
    if torch.backends.cudnn.is_available():
        assert here.cudnn is not None and here.cudnn.split(".")[0] == str(torch.backends.cudnn.version())[0]

    manifest = load_verified(trained_bundle)
    assert manifest.fingerprint == here
    extra = {FINGERPRINT_EXTRA_FILE: "", "config.txt": ""}
    load_torchscript(trained_bundle / manifest.variants["cpu-fp32"].path, "cpu", extra_files=extra)
    assert json.loads(extra[FINGERPRINT_EXTRA_FILE]) == here.model_dump(mode="json")
    assert json.loads(extra["config.txt"])["names"]["0"] == "chip"  # Ultralytics' own metadata kept


def test_batch_export_traces_with_that_batch(tmp_path: Path) -> None:
    out = tmp_path / "b4"
    result = export_bundle(
        ExportRequest(model="yolov8n.yaml", out_dir=out, imgsz=(64, 96), variants=("cpu-fp32",), batch=3)
    )
    assert result.passed
    assert result.manifest.input.shape == [3, 3, 64, 96]
    assert result.manifest.gates["cpu-fp32"].latency.stats[0].batch == 3
    module = load_torchscript(out / "variants/cpu-fp32/model.torchscript", "cpu")
    with torch.inference_mode():
        assert module(torch.rand(3, 3, 64, 96)).shape[0] == 3


def test_latency_budget_miss_fails_the_gate_but_writes_the_bundle(tmp_path: Path, cli) -> None:
    out = tmp_path / "slow"
    done = cli(
        "export",
        "yolov8n.yaml",
        "--imgsz",
        "64",
        "--variants",
        "cpu-fp32",
        "--latency-budget-ms",
        "0.001",
        "--out",
        str(out),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL (latency)" in done.stdout
    assert "marked failed" in done.stdout
    manifest = load_verified(out)
    assert manifest.gates_passed is False
    assert manifest.gates["cpu-fp32"].latency.passed is False
    assert manifest.gates["cpu-fp32"].raw_parity.passed is True


def test_force_replaces_a_non_empty_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("previous content")
    export_bundle(ExportRequest(model="yolov8n.yaml", out_dir=out, imgsz=(64, 64), variants=("cpu-fp32",), force=True))
    assert not (out / "old.txt").exists()
    assert load_verified(out).name == "yolov8n"
    assert not list(tmp_path.glob(".*partial*")), "the staging folder must not be left behind"


@pytest.mark.cuda
def test_cuda_variants_export_and_pass_their_gates(trained_detector: Path, scene_images: list[Path], tmp_path: Path):
    out = tmp_path / "cuda"
    result = export_bundle(
        ExportRequest(
            model=str(trained_detector),
            out_dir=out,
            imgsz=(160, 160),
            golden_images=tuple(scene_images),
            variants=("cpu-fp32", "cuda-fp32", "cuda-fp16"),
        )
    )
    manifest = result.manifest
    assert set(manifest.variants) == {"cpu-fp32", "cuda-fp32", "cuda-fp16"}
    assert result.passed, {k: (g.failures(), g.raw_parity, g.detection_parity) for k, g in manifest.gates.items()}
    fp16 = manifest.gates["cuda-fp16"]
    assert not fp16.raw_parity.judged and fp16.detection_parity.passed
    assert manifest.golden.reference_devices == ["cpu", "cuda"]
    assert manifest.gates["cuda-fp32"].raw_parity.reference == "cuda"
    assert manifest.gates["cpu-fp32"].raw_parity.reference == "cpu"
    for name in ("cuda-fp32", "cuda-fp16"):
        gates = manifest.gates[name]
        assert gates.latency.stats[0].timer == "cuda-events"
        assert gates.memory is not None
        peaks = [point.peak_bytes for point in gates.memory.points]
        assert len(peaks) >= 2
        assert peaks[0] > 0
        assert peaks == sorted(peaks), f"peak memory should grow with the batch: {peaks}"
    assert manifest.fingerprint.gpu_name == torch.cuda.get_device_name(0)
