"""Variants in every format: export, gate and install for two model families, detection parity across formats on
the trained detector, tampering caught, compatibility refused before download, and bundles that old agents (and
old bundles that new agents) still install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.runtime import load_model
from edge_agent.validation import validate
from exporters.bundle import load_verified, read_manifest
from exporters.drills import replace_variant_file, set_variant_compatibility
from exporters.errors import BundleIntegrityError, ManifestError
from exporters.export import ExportRequest, export_bundle
from exporters.fingerprint import collect
from exporters.formats import FORMATS_NAME, FormatVariant, all_gates, all_variants, read_index, why_incompatible
from exporters.gates import detection_parity, run_batched
from exporters.golden import Golden
from exporters.postprocess import decode
from exporters.preprocess import decode_image_bytes
from exporters.runners import load_runner

REPO = Path(__file__).resolve().parents[1]
# The last commit before formats.json: what an agent that knows only TorchScript runs.
TORCHSCRIPT_ONLY_COMMIT = "64fbc4a"
ALL_CPU = ["cpu-fp32", "cpu-fp32-aoti", "cpu-fp32-onnx"]


@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml"])
def test_every_format_exports_gates_and_installs(config: str, tmp_path: Path, bus_jpg: bytes) -> None:
    result = export_bundle(
        ExportRequest(model=config, out_dir=tmp_path / "b", imgsz=(64, 64), variants=("cpu-fp32",),
                      formats=("torchscript", "aoti", "onnx"), noise_inputs=1)
    )  # fmt: skip
    bundle = result.bundle_dir
    manifest = load_verified(bundle)
    assert result.passed and manifest.schema_version == 3
    every = all_variants(bundle, manifest)
    assert sorted(every) == ALL_CPU
    assert {v.format for v in every.values()} == {"torchscript", "aoti", "onnx"}
    index = read_index(bundle, manifest)
    assert index.variants["cpu-fp32-aoti"].compatibility.torch == torch.__version__
    assert index.variants["cpu-fp32-onnx"].compatibility.opset is not None
    assert all(g.passed and g.raw_parity.mse <= 1e-5 for g in all_gates(bundle, manifest).values())
    # Installed as an agent installs: every variant validated in the child process, loaded, and serving.
    results = validate(bundle, ALL_CPU, headroom=0.0, nice=0, timeout_s=300)
    assert [(r.variant, r.passed) for r in results] == [(name, True) for name in ALL_CPU], results
    image = decode_image_bytes(bus_jpg)
    for name in ALL_CPU:
        loaded = load_model(bundle, manifest, name, model="m", version="1")
        assert loaded.variant == name and loaded.detect(image).boxes.shape[1] == 4


def _raw_outputs(bundle: Path, variant: FormatVariant, golden: Golden) -> np.ndarray:
    runner = load_runner(bundle / variant.path, variant)
    return run_batched(runner, golden.inputs, device="cpu", dtype=torch.float32, batch=variant.batch)


def test_the_trained_detectors_detections_match_across_formats(formats_bundle: Path) -> None:
    """Each format's detections on the golden scenes against the TorchScript variant's (not only against the eager
    model, as the gates did at export)."""
    manifest = load_verified(formats_bundle)
    golden = Golden.load(formats_bundle / manifest.golden.path)
    thresholds = manifest.thresholds
    every = all_variants(formats_bundle, manifest)
    outputs = _raw_outputs(formats_bundle, every["cpu-fp32"], golden)
    torchscript = tuple(decode(outputs, conf=thresholds.conf, iou=thresholds.nms_iou, max_det=thresholds.max_det))
    assert sum(len(d) for d in torchscript) == golden.reference_count > 0
    for name in ("cpu-fp32-aoti", "cpu-fp32-onnx"):
        parity = detection_parity(_raw_outputs(formats_bundle, every[name], golden), torchscript, thresholds)
        assert parity.passed and parity.matched == parity.reference_detections == golden.reference_count, parity
        gates = all_gates(formats_bundle, manifest)[name]
        assert gates.detection_parity.reference_detections == golden.reference_count and gates.passed


@pytest.mark.parametrize("variant", ["cpu-fp32-aoti", "cpu-fp32-onnx"])
def test_tampering_with_an_aoti_or_onnx_file_is_caught(formats_bundle: Path, tmp_path: Path, variant: str) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(formats_bundle, bundle)
    path = bundle / all_variants(bundle, read_manifest(bundle))[variant].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=rf"variants/{variant}/.* altered"):
        load_verified(bundle)


def test_a_forged_formats_json_is_caught(formats_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(formats_bundle, bundle)
    forged = (bundle / FORMATS_NAME).read_text().replace('"runtime": "onnxruntime"', '"runtime": "torch"')
    (bundle / FORMATS_NAME).write_text(forged)
    with pytest.raises(BundleIntegrityError, match=r"formats\.json has "):
        load_verified(bundle)
    set_variant_compatibility(bundle, "cpu-fp32-onnx", runtime="onnxruntime")  # re-digested: consistent again
    manifest = load_verified(bundle)
    del manifest.files["variants/cpu-fp32-onnx/model.onnx"]
    with pytest.raises(ManifestError, match="not listed in the manifest"):
        all_variants(bundle, manifest)


def test_compatibility_is_judged_before_download(formats_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(formats_bundle, bundle)
    manifest = read_manifest(bundle)
    here = collect()
    every = all_variants(bundle, manifest)
    assert all(why_incompatible(v, manifest.fingerprint, here, onnxruntime_version="1") is None for v in every.values())
    aoti, onnx = every["cpu-fp32-aoti"], every["cpu-fp32-onnx"]
    other_torch = aoti.model_copy(update={"compatibility": aoti.compatibility.model_copy(update={"torch": "2.0.0"})})
    assert "compiled for torch 2.0.0" in str(why_incompatible(other_torch, manifest.fingerprint, here))
    other_arch = aoti.model_copy(update={"compatibility": aoti.compatibility.model_copy(update={"arch": "aarch64"})})
    assert "aarch64" in str(why_incompatible(other_arch, manifest.fingerprint, here))
    cuda = aoti.model_copy(update={"name": "cuda-fp16-aoti", "device": "cuda"})
    assert "needs a working CUDA device" in str(why_incompatible(cuda, manifest.fingerprint, here))
    assert "needs ONNX Runtime" in str(why_incompatible(onnx, manifest.fingerprint, here, onnxruntime_version=None))
    cuda_onnx = onnx.model_copy(update={"name": "cuda-fp32-onnx", "device": "cuda"})
    refused = why_incompatible(cuda_onnx, manifest.fingerprint, here, onnxruntime_version="1",
                               onnx_providers=("CPUExecutionProvider",))  # fmt: skip
    assert "CUDA provider" in str(refused)


def test_a_variant_file_that_does_not_load_fails_validation_and_another_is_chosen(
    formats_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(formats_bundle, bundle)
    replace_variant_file(bundle, "cpu-fp32-aoti", b"not a package")
    load_verified(bundle)  # it verifies: the digest is the manifest's
    results = {r.variant: r for r in validate(bundle, ALL_CPU, headroom=0.0, nice=0, timeout_s=300)}
    assert not results["cpu-fp32-aoti"].passed and results["cpu-fp32-aoti"].failures == ["load"]
    assert "cannot load AOTInductor package" in results["cpu-fp32-aoti"].detail
    assert results["cpu-fp32"].passed and results["cpu-fp32-onnx"].passed


def _old_code(tmp_path: Path) -> Path:
    """The tree of ``TORCHSCRIPT_ONLY_COMMIT`` (its exporters and agent know only TorchScript, schema 2)."""
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{TORCHSCRIPT_ONLY_COMMIT}^{{commit}}"],
                           capture_output=True)  # fmt: skip
    if found.returncode != 0:
        pytest.skip(f"commit {TORCHSCRIPT_ONLY_COMMIT} is not in this clone (a shallow clone): cannot run old code")
    root = tmp_path / "old"
    root.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", TORCHSCRIPT_ONLY_COMMIT, "exporters", "edge_agent"],
                             capture_output=True, check=True)  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def _run_old(root: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=root)  # fmt: skip


def test_an_agent_that_knows_only_torchscript_installs_a_new_bundle(formats_bundle: Path, tmp_path: Path) -> None:
    """The agent of the last commit before formats parses the new manifest, verifies every listed file (the
    other formats' too, by digest) and validates the TorchScript variant, in its own validation child."""
    root = _old_code(tmp_path)
    bundle = tmp_path / "b"
    shutil.copytree(formats_bundle, bundle)
    code = f"""
import exporters.bundle, edge_agent.validation as v
from pathlib import Path
bundle = Path({str(bundle)!r})
assert exporters.bundle.__file__.startswith({str(root)!r}), exporters.bundle.__file__
m = exporters.bundle.load_verified(bundle)
print("variants", sorted(m.variants))
r = v.validate(bundle, "cpu-fp32", headroom=0.0, nice=0, timeout_s=300)
print("validated", r.variant, r.passed)
"""
    done = _run_old(root, code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "variants ['cpu-fp32']" in done.stdout and "validated cpu-fp32 True" in done.stdout


def test_a_bundle_made_before_formats_installs_on_a_new_agent(tmp_path: Path) -> None:
    root = _old_code(tmp_path)
    bundle = tmp_path / "old-bundle"
    code = f"""
from pathlib import Path
from exporters.export import ExportRequest, export_bundle
r = export_bundle(ExportRequest(model="yolov8n.yaml", out_dir=Path({str(bundle)!r}), imgsz=(64, 64),
                                variants=("cpu-fp32",), noise_inputs=1))
print("schema", r.manifest.schema_version, r.passed)
"""
    done = _run_old(root, code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "schema 2 True" in done.stdout
    manifest = load_verified(bundle)
    assert sorted(all_variants(bundle, manifest)) == ["cpu-fp32"] and FORMATS_NAME not in manifest.files
    results = validate(bundle, ["cpu-fp32"], headroom=0.0, nice=0, timeout_s=300)
    assert results[0].passed, results[0].detail
    loaded = load_model(bundle, manifest, "cpu-fp32", model="m", version="1")
    assert np.isfinite(loaded.forward(np.zeros((1, 3, 64, 64), dtype=np.float32))).all()


def test_the_registry_tags_record_every_variants_format_and_compatibility(formats_bundle: Path) -> None:
    from registry.tags import version_tags

    manifest = load_verified(formats_bundle)
    manifest_bytes = (formats_bundle / "manifest.json").read_bytes()
    tags = version_tags(manifest, manifest_bytes, signed=False, index=read_index(formats_bundle, manifest))
    assert tags["ota.schema"] == "3" and tags["ota.format"] == "aoti,onnx,torchscript"
    assert tags["ota.variants"] == ",".join(ALL_CPU)
    assert tags["ota.variant.cpu-fp32-aoti.format"] == "aoti"
    assert f"torch={torch.__version__}" in tags["ota.variant.cpu-fp32-aoti.compat"]
    assert tags["ota.variant.cpu-fp32-onnx.compat"].startswith("runtime=onnxruntime;opset=")
    assert tags["ota.variant.cpu-fp32.compat"] == "runtime=torch"
    for name in ALL_CPU:
        assert tags[f"ota.gate.{name}"] == "pass" and float(tags[f"ota.gate.{name}.latency.p50_ms"]) > 0


def test_a_device_checks_formats_json_before_it_chooses_what_to_fetch(formats_bundle: Path, tmp_path: Path) -> None:
    from edge_agent.errors import VerificationFailed
    from edge_agent.protocol import DesiredState
    from edge_agent.verify import files_to_fetch

    staging = tmp_path / "staging"
    shutil.copytree(formats_bundle, staging)
    manifest = read_manifest(staging)
    offer = DesiredState.model_validate(
        {"model": "m", "version": "1", "variant": "cpu-fp32", "etag": '"x"', "manifest_url": "http://h/manifest.json",
         "manifest_sha256": "0" * 64,
         "files": [{"path": p, "url": f"http://h/{p}", "sha256": e.sha256, "bytes": e.bytes}
                   for p, e in manifest.files.items()]}
    )  # fmt: skip
    wanted, found = files_to_fetch(staging, offer, collect(), "auto")
    assert wanted == set(manifest.files)
    assert [v.name for v in found.runnable] == ["cpu-fp32-aoti", "cpu-fp32", "cpu-fp32-onnx"]
    # A formats.json that says every variant needs a GPU would make the device fetch nothing: it is refused.
    forged = (staging / FORMATS_NAME).read_text().replace('"device": "cpu"', '"device": "cuda"')
    (staging / FORMATS_NAME).write_text(forged)
    with pytest.raises(VerificationFailed, match=r"formats\.json is missing or differs from the manifest's digest"):
        files_to_fetch(staging, offer, collect(), "auto")
