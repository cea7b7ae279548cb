"""ed25519 signatures over a bundle's ``manifest.json``.

``manifest.sig`` holds the 64 raw signature bytes over the exact bytes of ``manifest.json``. Since the manifest
lists the sha256 of every other file, a valid signature vouches for the whole bundle once ``verify_files`` has
passed. ``verify_bundle_signature`` is the one check that ``yolo-ota gate``/``inspect`` and the edge agent use.

Keys are PEM files: ``signing-key.pem`` (PKCS#8, unencrypted, mode 0600; keep it on the exporting machine or in a
secret store) and ``public-key.pem`` (SubjectPublicKeyInfo; ship it to devices).
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from exporters.bundle import MANIFEST_NAME, SIGNATURE_NAME
from exporters.errors import KeyFileError, SignatureError

PRIVATE_KEY_NAME = "signing-key.pem"
PUBLIC_KEY_NAME = "public-key.pem"
SIGNATURE_BYTES = 64


class SignatureStatus(StrEnum):
    """Outcome of a signature check that did not fail."""

    VALID = "valid"
    UNSIGNED = "unsigned"
    NOT_CHECKED = "not checked (no public key given)"


def generate_keypair(directory: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new ed25519 key pair into ``directory``; return (private key path, public key path)."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    existing = [p for p in (private_path, public_path) if p.exists()]
    if existing and not overwrite:
        raise KeyFileError(f"{existing[0]} already exists; refusing to overwrite a key (use --force)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The ed25519 key in ``path`` (PEM), made if absent: mode 0600, written whole or not at all (a key that two
    processes make at once ends as one of the two, never as a mix)."""
    if path.is_file():
        return load_private_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(partial, path)  # fails if another process made the key meanwhile: then that one is the key
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)
    return load_private_key(path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM ed25519 private key; ``KeyFileError`` when missing or of another kind."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM ed25519 public key; ``KeyFileError`` when missing or of another kind."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an ed25519 public key")
    return key


def sign_bundle(bundle_dir: Path, private_key: Ed25519PrivateKey) -> Path:
    """Sign ``manifest.json`` as it is on disk and write ``manifest.sig``."""
    signature = private_key.sign((bundle_dir / MANIFEST_NAME).read_bytes())
    path = bundle_dir / SIGNATURE_NAME
    path.write_bytes(signature)
    return path


def verify_bundle_signature(
    bundle_dir: Path, public_key: Ed25519PublicKey | None, *, require_signature: bool | None = None
) -> SignatureStatus:
    """Check ``manifest.sig`` against ``manifest.json``.

    With a public key, an unsigned bundle is refused (``require_signature`` defaults to True then) and a
    signature that does not verify raises ``SignatureError``. Without one, only the signature's presence is
    reported.
    """
    require = public_key is not None if require_signature is None else require_signature
    signature_path = bundle_dir / SIGNATURE_NAME
    if not signature_path.is_file():
        if require:
            raise SignatureError(f"{bundle_dir} is unsigned (no {SIGNATURE_NAME}) and a signature is required")
        return SignatureStatus.UNSIGNED
    if public_key is None:
        return SignatureStatus.NOT_CHECKED
    signature = signature_path.read_bytes()
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"{SIGNATURE_NAME} has {len(signature)} bytes, an ed25519 signature has 64")
    try:
        public_key.verify(signature, (bundle_dir / MANIFEST_NAME).read_bytes())
    except InvalidSignature:
        raise SignatureError(
            f"{SIGNATURE_NAME} does not match {MANIFEST_NAME} under this public key: altered or signed by another key"
        ) from None
    return SignatureStatus.VALID
