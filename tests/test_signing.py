"""Signed bundles: keys, signature at export, and the one verification function devices will use."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from exporters.bundle import MANIFEST_NAME, SIGNATURE_NAME
from exporters.errors import KeyFileError, SignatureError
from exporters.export import ExportRequest, export_bundle
from exporters.signing import (
    SignatureStatus,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_bundle,
    verify_bundle_signature,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def signed_bundle(bundle_copy: Path, keys: tuple[Path, Path]) -> Path:
    sign_bundle(bundle_copy, load_private_key(keys[0]))
    return bundle_copy


def test_generated_keys_are_ed25519_and_the_private_one_is_private(keys: tuple[Path, Path]) -> None:
    private_path, public_path = keys
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    assert b"PRIVATE KEY" in private_path.read_bytes()
    assert b"PUBLIC KEY" in public_path.read_bytes()
    load_private_key(private_path)
    load_public_key(public_path)


def test_generate_refuses_to_overwrite(keys: tuple[Path, Path]) -> None:
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(keys[0].parent)


def test_valid_signature(signed_bundle: Path, keys: tuple[Path, Path]) -> None:
    assert (signed_bundle / SIGNATURE_NAME).stat().st_size == 64
    assert verify_bundle_signature(signed_bundle, load_public_key(keys[1])) is SignatureStatus.VALID
    assert verify_bundle_signature(signed_bundle, None) is SignatureStatus.NOT_CHECKED


def test_edited_manifest_breaks_the_signature(signed_bundle: Path, keys: tuple[Path, Path]) -> None:
    path = signed_bundle / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["names"]["2"] = "harmless_scratch"  # relabel the defect class: digests still match
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(SignatureError, match="does not match"):
        verify_bundle_signature(signed_bundle, load_public_key(keys[1]))


def test_another_key_is_refused(signed_bundle: Path, tmp_path: Path) -> None:
    _, other_public = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="signed by another key"):
        verify_bundle_signature(signed_bundle, load_public_key(other_public))


def test_truncated_signature_is_refused(signed_bundle: Path, keys: tuple[Path, Path]) -> None:
    sig = signed_bundle / SIGNATURE_NAME
    sig.write_bytes(sig.read_bytes()[:40])
    with pytest.raises(SignatureError, match="40 bytes"):
        verify_bundle_signature(signed_bundle, load_public_key(keys[1]))


def test_unsigned_bundle_is_refused_when_a_key_is_configured(bundle_copy: Path, keys: tuple[Path, Path]) -> None:
    assert verify_bundle_signature(bundle_copy, None) is SignatureStatus.UNSIGNED
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bundle_signature(bundle_copy, load_public_key(keys[1]))


def test_wrong_key_kind_is_a_key_error(keys: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        load_private_key(keys[1])  # a public key where the private one belongs
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path / "missing.pem")


def test_export_signs_and_cli_checks(tmp_path: Path, keys: tuple[Path, Path], cli) -> None:
    out = tmp_path / "signed"
    result = export_bundle(
        ExportRequest(model="yolov8n.yaml", out_dir=out, imgsz=(64, 64), variants=("cpu-fp32",), signing_key=keys[0])
    )
    assert result.signed
    assert verify_bundle_signature(out, load_public_key(keys[1])) is SignatureStatus.VALID

    done = cli("inspect", str(out), "--public-key", str(keys[1]))
    assert done.returncode == 0, done.stderr
    assert "signature: valid" in done.stdout
    done = cli("gate", str(out), "--public-key", str(keys[1]))
    assert done.returncode == 0, done.stderr

    unsigned = tmp_path / "unsigned"
    shutil.copytree(out, unsigned)
    (unsigned / SIGNATURE_NAME).unlink()
    for command in ("inspect", "gate"):
        done = cli(command, str(unsigned), "--public-key", str(keys[1]))
        assert done.returncode == 2
        assert "unsigned" in done.stderr
        assert "Traceback" not in done.stderr


def test_keys_generate_command(tmp_path: Path, cli) -> None:
    done = cli("keys", "generate", str(tmp_path / "k"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k" / "signing-key.pem").is_file()
    again = cli("keys", "generate", str(tmp_path / "k"))
    assert again.returncode == 2
    assert "already exists" in again.stderr


def test_export_with_a_missing_key_fails_before_any_work(tmp_path: Path, cli) -> None:
    done = cli("export", "yolov8n.yaml", "--out", str(tmp_path / "b"), "--signing-key", str(tmp_path / "nope.pem"))
    assert done.returncode == 2
    assert "cannot read signing key" in done.stderr
    assert not (tmp_path / "b").exists()
