"""The fault-injection helpers of ``fault_bundles``: each faulty bundle still verifies, still claims it passed its
gates at export, and is judged by the on-device gate code exactly as the fault intends."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.bundle import MANIFEST_NAME, SIGNATURE_NAME, Manifest, load_verified, read_manifest
from exporters.drills import (
    load_variant,
    nan_after,
    raise_after,
    replace_variant,
    set_export_torch,
    set_latency_budget,
    shifted,
    sign,
    slowed,
    unsign,
)
from exporters.errors import DeviceError, SignatureError
from exporters.fingerprint import check_compatible, collect
from exporters.gate_report import VariantGates
from exporters.golden import Golden
from exporters.local_gate import gate_bundle
from exporters.signing import SignatureStatus, generate_keypair, load_public_key, verify_bundle_signature
from exporters.yolo import FINGERPRINT_EXTRA_FILE

VARIANT = "variants/cpu-fp32/model.torchscript"


def _gate(bundle: Path) -> VariantGates:
    _manifest, results = gate_bundle(bundle, device="cpu")
    assert len(results) == 1
    return results[0]


def _golden(bundle: Path) -> Golden:
    return Golden.load(bundle / "golden.npz")


def _first_input(bundle: Path) -> torch.Tensor:
    return torch.from_numpy(_golden(bundle).inputs[:1].copy())


def _assert_consistent_and_claims_passed(bundle: Path, exported: Manifest) -> Manifest:
    """The faulty bundle verifies, its manifest bytes are canonical, and it still says it passed at export."""
    manifest = load_verified(bundle)
    assert (bundle / MANIFEST_NAME).read_bytes() == manifest.to_json_bytes()
    assert manifest.gates_passed is True
    assert manifest.gates == exported.gates
    assert not (bundle / SIGNATURE_NAME).exists()  # every change leaves the old signature behind
    return manifest


@pytest.fixture
def signed_copy(bundle_copy: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The bundle copy signed with a fresh key: (bundle, private key, public key)."""
    private, public = generate_keypair(tmp_path / "keys")
    sign(bundle_copy, private)
    return bundle_copy, private, public


def test_unmodified_copy_passes_and_a_reloaded_variant_round_trips(bundle_copy: Path) -> None:
    exported = read_manifest(bundle_copy)
    original = _gate(bundle_copy)
    assert original.passed and original.detection_parity.passed

    # saving the very same model through replace_variant keeps everything a device checks
    replace_variant(bundle_copy, load_variant(bundle_copy))
    _assert_consistent_and_claims_passed(bundle_copy, exported)
    with zipfile.ZipFile(bundle_copy / VARIANT) as archive:
        extras = {name.split("/")[-1] for name in archive.namelist() if "/extra/" in name}
    assert {"config.txt", FINGERPRINT_EXTRA_FILE} <= extras  # Ultralytics' metadata and the fingerprint kept
    again = _gate(bundle_copy)
    assert again.passed
    assert again.raw_parity.mse == original.raw_parity.mse


def test_shifted_boxes_fail_detection_parity(bundle_copy: Path) -> None:
    exported = read_manifest(bundle_copy)
    x = _first_input(bundle_copy)
    inner = load_variant(bundle_copy)
    module = shifted(inner, 8.0)
    with torch.inference_mode():
        delta = module(x) - inner(x)
    assert torch.allclose(delta[:, :2], torch.full_like(delta[:, :2], 8.0))
    assert torch.equal(delta[:, 2:], torch.zeros_like(delta[:, 2:]))

    replace_variant(bundle_copy, module)
    _assert_consistent_and_claims_passed(bundle_copy, exported)
    gates = _gate(bundle_copy)
    assert not gates.passed
    assert not gates.detection_parity.passed
    assert gates.detection_parity.matched_fraction_reference < 0.5


def test_nan_after_passes_the_gates_then_turns_to_nan_on_call_1001(bundle_copy: Path) -> None:
    exported = read_manifest(bundle_copy)
    replace_variant(bundle_copy, nan_after(load_variant(bundle_copy), 1000))
    _assert_consistent_and_claims_passed(bundle_copy, exported)
    assert _gate(bundle_copy).passed  # the gate's own calls (well under 1000) see a healthy model

    # a fresh load counts from 0, whatever the gate run above did to its own instance
    module = load_variant(bundle_copy)
    x = _first_input(bundle_copy)
    with torch.inference_mode():
        for call in range(1, 1001):
            assert torch.isfinite(module(x)).all(), f"NaN already at call {call}"
        assert torch.isnan(module(x)).all()  # call 1001
        assert torch.isnan(module(x)).all()  # and it stays broken
        assert torch.isfinite(load_variant(bundle_copy)(x)).all()  # the counter is per loaded instance


def test_nan_during_the_gate_run_fails_it(bundle_copy: Path) -> None:
    replace_variant(bundle_copy, nan_after(load_variant(bundle_copy), 2))
    gates = _gate(bundle_copy)
    assert not gates.raw_parity.passed  # non-finite outputs
    assert not gates.detection_parity.passed


def test_raise_after_raises_a_runtime_error_on_call_4(bundle_copy: Path) -> None:
    exported = read_manifest(bundle_copy)
    inner = load_variant(bundle_copy)
    x = _first_input(bundle_copy)
    wrapper = raise_after(inner, 3)
    with torch.inference_mode():
        wrapper(x)
        wrapper(x)  # calls made before saving are not saved: the counter is left out of the file
    replace_variant(bundle_copy, wrapper)
    _assert_consistent_and_claims_passed(bundle_copy, exported)
    with torch.inference_mode():
        reference = inner(x)
        module = load_variant(bundle_copy)
        for _call in range(3):
            assert torch.equal(module(x), reference)
        for _call in (4, 5):
            # a genuine RuntimeError, as a real runtime failure would raise (not torch.jit.Error)
            with pytest.raises(RuntimeError, match="injected failure after 3 calls"):
                module(x)
    # the golden data has more than three inputs: the device's gate run itself hits the failure
    assert len(_golden(bundle_copy).inputs) > 3
    with pytest.raises(RuntimeError, match="injected failure after 3 calls"):
        _gate(bundle_copy)


def test_slowed_has_the_same_outputs_and_a_larger_p50(bundle_copy: Path) -> None:
    exported = read_manifest(bundle_copy)
    inner = load_variant(bundle_copy)
    module = slowed(inner, 5)
    x = torch.from_numpy(_golden(bundle_copy).inputs[:2].copy())
    with torch.inference_mode():
        assert torch.equal(module(x), inner(x))

    original = _gate(bundle_copy)
    replace_variant(bundle_copy, module)
    _assert_consistent_and_claims_passed(bundle_copy, exported)
    slow = _gate(bundle_copy)
    assert slow.passed  # no budget recorded at export: only parity is judged, and it is unchanged
    assert slow.raw_parity.mse == original.raw_parity.mse
    p50, slow_p50 = original.latency.stats[0].p50_ms, slow.latency.stats[0].p50_ms
    # five runs per call: 5-8x on an idle machine, but the two gate runs are seconds apart and a busy machine
    # (parallel test sessions) slows either one, so only the direction is asserted
    assert slow_p50 > p50, (p50, slow_p50)


def test_a_tiny_latency_budget_fails_the_latency_gate_only(bundle_copy: Path) -> None:
    exported = read_manifest(bundle_copy)
    set_latency_budget(bundle_copy, 0.001)
    manifest = _assert_consistent_and_claims_passed(bundle_copy, exported)
    assert manifest.latency_budget_ms == 0.001
    gates = _gate(bundle_copy)
    assert gates.failures() == ["latency"]
    assert gates.latency.budget_ms == 0.001

    set_latency_budget(bundle_copy, None)
    assert read_manifest(bundle_copy).latency_budget_ms is None


def test_a_newer_exporting_torch_is_refused(bundle_copy: Path) -> None:
    exported = read_manifest(bundle_copy)
    set_export_torch(bundle_copy, "99.0")
    manifest = _assert_consistent_and_claims_passed(bundle_copy, exported)
    assert manifest.fingerprint.torch == "99.0"
    assert manifest.fingerprint.model_dump(exclude={"torch"}) == exported.fingerprint.model_dump(exclude={"torch"})
    reason = check_compatible(manifest.fingerprint, collect(), "cpu-fp32")
    assert reason is not None and "99.0" in reason
    with pytest.raises(DeviceError, match=r"torch 99\.0"):
        gate_bundle(bundle_copy, device="cpu")


def test_sign_verifies_with_its_own_key_only(signed_copy: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bundle, _private, public = signed_copy
    assert verify_bundle_signature(bundle, load_public_key(public)) is SignatureStatus.VALID
    _other_private, other_public = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="does not match"):
        verify_bundle_signature(bundle, load_public_key(other_public))


def test_unsign_makes_a_key_holder_refuse(signed_copy: tuple[Path, Path, Path]) -> None:
    bundle, _private, public = signed_copy
    unsign(bundle)
    unsign(bundle)  # already unsigned: no error
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bundle_signature(bundle, load_public_key(public))


def test_faults_drop_the_signature_and_signing_again_covers_the_fault(signed_copy: tuple[Path, Path, Path]) -> None:
    bundle, private, public = signed_copy
    set_latency_budget(bundle, 0.001)
    with pytest.raises(SignatureError, match="unsigned"):
        gate_bundle(bundle, device="cpu", public_key=public)

    # a faulty bundle signed by the real key: the signature holds, and only the gates can catch it
    sign(bundle, private)
    _manifest, results = gate_bundle(bundle, device="cpu", public_key=public)
    assert results[0].failures() == ["latency"]
    assert np.isfinite(results[0].latency.stats[0].p99_ms)
