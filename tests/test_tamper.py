"""Altered bundles: a re-hashed but different model fails the parity gates; an edited file fails the digests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from exporters.bundle import MANIFEST_NAME, file_entry, load_verified
from exporters.errors import BundleIntegrityError, UnsafePathError
from exporters.export import ExportRequest, export_bundle
from exporters.gates import run_gates
from exporters.golden import Golden
from exporters.local_gate import gate_bundle
from exporters.runtime import load_torchscript, quiet_torchscript

VARIANT = "variants/cpu-fp32/model.torchscript"


def _rehash(bundle: Path, relative: str) -> None:
    """Update the manifest's digest of one file, as a careless pipeline or an attacker without keys would."""
    path = bundle / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"][relative] = file_entry(bundle / relative).model_dump()
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def test_untouched_bundle_passes_gate_again(trained_bundle: Path, cli) -> None:
    done = cli("gate", str(trained_bundle))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gates passed" in done.stdout
    _manifest, results = gate_bundle(trained_bundle, device="cpu")
    assert results[0].raw_parity.mse <= 1e-5
    assert results[0].detection_parity.matched_fraction_reference == 1.0


def test_perturbed_weights_fail_parity_even_with_valid_digests(bundle_copy: Path, cli) -> None:
    extra = {"config.txt": ""}
    module = load_torchscript(bundle_copy / VARIANT, "cpu", extra_files=extra)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std().nan_to_num(0) * 0.05)
    with quiet_torchscript():
        torch.jit.save(module, str(bundle_copy / VARIANT), _extra_files=extra)
    _rehash(bundle_copy, VARIANT)
    load_verified(bundle_copy)  # digests are consistent again: only the gates can catch this

    done = cli("gate", str(bundle_copy))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout
    _manifest, results = gate_bundle(bundle_copy, device="cpu")
    assert not results[0].passed
    assert "raw_parity" in results[0].failures()
    assert "detection_parity" in results[0].failures()
    assert results[0].raw_parity.mse > 1e-3


def test_another_models_file_swapped_in_fails_parity(bundle_copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    export_bundle(
        ExportRequest(model="yolov8n.yaml", out_dir=other, imgsz=(160, 160), variants=("cpu-fp32",), noise_inputs=0)
    )
    shutil.copyfile(other / VARIANT, bundle_copy / VARIANT)
    _rehash(bundle_copy, VARIANT)
    _manifest, results = gate_bundle(bundle_copy, device="cpu")
    gates = results[0]
    assert not gates.passed
    assert {"raw_parity", "detection_parity"} <= set(gates.failures())
    assert gates.detection_parity.matched_fraction_reference < 0.5


def test_edited_model_file_fails_the_digest_check(bundle_copy: Path, cli) -> None:
    with (bundle_copy / VARIANT).open("r+b") as handle:
        handle.seek(2000)
        byte = handle.read(1)
        handle.seek(2000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleIntegrityError, match="altered"):
        load_verified(bundle_copy)
    for command in ("gate", "inspect"):
        done = cli(command, str(bundle_copy))
        assert done.returncode == 2
        assert "model.torchscript has sha256" in done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_edited_manifest_digest_fails(bundle_copy: Path, cli) -> None:
    path = bundle_copy / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"]["golden.npz"]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    done = cli("inspect", str(bundle_copy))
    assert done.returncode == 2
    assert "golden.npz has sha256" in done.stderr


def test_missing_file_is_reported(bundle_copy: Path, cli) -> None:
    (bundle_copy / "golden.npz").unlink()
    done = cli("gate", str(bundle_copy))
    assert done.returncode == 2
    assert "golden.npz is listed in the manifest but missing" in done.stderr


def test_appended_bytes_change_the_size(bundle_copy: Path) -> None:
    with (bundle_copy / "golden.npz").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleIntegrityError, match="bytes"):
        load_verified(bundle_copy)


@pytest.mark.parametrize("bad_path", ["../outside.bin", "/etc/passwd", "variants/../../x", "C:/x", ""])
def test_paths_leaving_the_bundle_are_refused(bundle_copy: Path, bad_path: str) -> None:
    path = bundle_copy / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"][bad_path] = {"sha256": "0" * 64, "bytes": 1}
    path.write_text(json.dumps(manifest))
    with pytest.raises(UnsafePathError):
        load_verified(bundle_copy)


def test_unlisted_files_are_ignored(bundle_copy: Path) -> None:
    (bundle_copy / "notes.txt").write_text("not part of the bundle")
    assert load_verified(bundle_copy).name == "pcb-parts"


def test_half_precision_is_judged_by_detection_parity(trained_bundle: Path) -> None:
    """fp16 drifts past the fp32 raw limit by nature; the gate reports that drift and judges the boxes instead.

    Ultralytics only exports fp16 on a GPU, so the cpu-fp32 file is cast to half here to exercise that path.
    """
    manifest = load_verified(trained_bundle)
    golden = Golden.load(trained_bundle / manifest.golden.path)
    module = load_torchscript(trained_bundle / VARIANT, "cpu").half()
    gates = run_gates(
        module,
        golden,
        variant="half-on-cpu",
        device="cpu",
        dtype=torch.float16,
        batch=1,
        thresholds=manifest.thresholds.model_copy(update={"timed_iters": 3, "warmup_iters": 1}),
        latency_budget_ms=None,
        measured_on="test",
    )
    assert gates.dtype == "float16"
    assert not gates.raw_parity.judged
    assert gates.raw_parity.mse > manifest.thresholds.raw_mse_max  # would fail an fp32 variant
    assert gates.detection_parity.reference_detections > 0
    assert gates.detection_parity.passed, gates.detection_parity
    assert gates.passed
