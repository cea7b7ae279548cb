"""A device's own ed25519 key, and the signed statements it enrolls with.

The agent makes its key at first start (``device-key.pem`` in its data dir, PKCS#8, mode 0600) and never sends it;
the service keeps only the public half. Two statements are signed with it, each over a fixed text that names what
it is for, so that a signature made for one can never pass for the other:

- the **proof of possession** at enrollment: ``yolo-ota enroll v1`` + the device id, its public key, the time
  of signing and a random nonce (ed25519 signatures are deterministic: without it, two enrollments in one second
  would be the same statement);
- a **key change**: ``yolo-ota key change v1`` + the device id, the *new* public key and the time, signed with
  the *old* key; with it, a device that replaces its key stays accepted instead of waiting for an operator.

Public keys travel as the base64 of their 32 raw bytes, signatures as the base64 of their 64 raw bytes. The
service refuses a statement signed more than ``MAX_AGE_S`` from its own clock, and one it has seen before.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from exporters.errors import KeyFileError
from exporters.signing import load_or_create_private_key

KEY_FILE = "device-key.pem"
MAX_AGE_S = 300
_ENROLL = "yolo-ota enroll v1"
_KEY_CHANGE = "yolo-ota key change v1"


class IdentityError(ValueError):
    """A public key or signature that is malformed, or a signature that does not verify."""


def _statement(purpose: str, device_id: str, public_key: str, signed_at: int, nonce: str = "") -> bytes:
    return "\n".join((purpose, device_id, public_key, str(signed_at), nonce)).encode()


@dataclass(frozen=True)
class DeviceKey:
    """A device's private key and what it signs."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path) -> DeviceKey:
        """The key in ``data_dir/device-key.pem``, made (mode 0600, written whole or not at all) if absent."""
        try:
            return cls(load_or_create_private_key(data_dir / KEY_FILE))
        except KeyFileError as exc:
            raise IdentityError(str(exc)) from None

    @property
    def public_key(self) -> str:
        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def proof(self, device_id: str, signed_at: int, nonce: str) -> str:
        """The proof of possession for enrolling ``device_id`` with this key."""
        return self._sign(_statement(_ENROLL, device_id, self.public_key, signed_at, nonce))

    def approve_change(self, device_id: str, new_public_key: str, signed_at: int) -> str:
        """This (old) key's consent to ``device_id`` using ``new_public_key`` from now on."""
        return self._sign(_statement(_KEY_CHANGE, device_id, new_public_key, signed_at))

    def _sign(self, message: bytes) -> str:
        return base64.b64encode(self.private.sign(message)).decode()


def enrollment_body(
    key: DeviceKey,
    device_id: str,
    *,
    fingerprint: dict[str, Any],
    labels: dict[str, str] | None = None,
    enrollment_token: str | None = None,
    previous_key: DeviceKey | None = None,
    now_s: float | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /v1/devices/enroll``, signed now (``previous_key``: sign the change of key too)."""
    signed_at = int(now_s if now_s is not None else time.time())
    nonce = secrets.token_urlsafe(16)
    body: dict[str, Any] = {
        "device_id": device_id,
        "labels": dict(labels or {}),
        "fingerprint": fingerprint,
        "public_key": key.public_key,
        "signed_at": signed_at,
        "nonce": nonce,
        "proof": key.proof(device_id, signed_at, nonce),
    }
    if enrollment_token:
        body["enrollment_token"] = enrollment_token
    if previous_key is not None:
        body["key_change_signature"] = previous_key.approve_change(device_id, key.public_key, signed_at)
    return body


def public_key_of(text: str) -> Ed25519PublicKey:
    """The public key of its base64 form; ``IdentityError`` when it is not 32 bytes of base64."""
    raw = _b64(text, "public_key")
    if len(raw) != 32:
        raise IdentityError(f"public_key: {len(raw)} bytes; an ed25519 public key is 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def check_proof(public_key: str, device_id: str, signed_at: int, nonce: str, proof: str) -> None:
    """Raise ``IdentityError`` unless ``proof`` is ``public_key``'s signature of the enrollment statement."""
    _verify(public_key, _statement(_ENROLL, device_id, public_key, signed_at, nonce), proof, "proof")


def check_key_change(old_public_key: str, device_id: str, new_public_key: str, signed_at: int, signature: str) -> None:
    """Raise ``IdentityError`` unless the old key signed the change of ``device_id`` to ``new_public_key``."""
    _verify(
        old_public_key,
        _statement(_KEY_CHANGE, device_id, new_public_key, signed_at),
        signature,
        "key_change_signature",
    )


def _verify(public_key: str, message: bytes, signature: str, field: str) -> None:
    raw = _b64(signature, field)
    if len(raw) != 64:
        raise IdentityError(f"{field}: {len(raw)} bytes; an ed25519 signature is 64")
    try:
        public_key_of(public_key).verify(raw, message)
    except InvalidSignature:
        raise IdentityError(f"{field}: the signature does not verify with the key given") from None


def _b64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(f"{field} is not base64") from None
