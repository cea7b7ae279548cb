"""Small JSON documents signed with ed25519: what one party vouches for, checked by another that holds its key.

A document travels as two base64 strings: ``document`` (the exact JSON bytes that were signed) and ``signature``
(the 64 raw signature bytes). The reader verifies the signature over those bytes *before* parsing them, then
parses them strictly (a pydantic model with ``extra="forbid"`` and a ``purpose`` literal), so that a document
signed for one purpose can never pass for another. Two kinds exist:

- the rollout service's **desired state** (``exporters.desired_statement``), signed with its online key;
- the ML team's **revocation list** (``exporters.revocations``), signed with the offline release key that signs
  bundles.

Public keys travel as the base64 of their 32 raw bytes (``public_key_text``), as device keys do.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exporters.errors import SignedDocumentError

Document = TypeVar("Document", bound=BaseModel)
MAX_DOCUMENT_BYTES = 1 << 20


class SignedDocument(BaseModel):
    """A document as it travels: the base64 of its exact JSON bytes and of their signature."""

    model_config = ConfigDict(extra="forbid")

    document: str = Field(min_length=1, max_length=(MAX_DOCUMENT_BYTES * 4) // 3 + 4)
    signature: str = Field(min_length=1, max_length=128)


def canonical_json(document: BaseModel) -> bytes:
    """The bytes that are signed: sorted keys, no spaces (the same document always gives the same bytes)."""
    return json.dumps(document.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def sign_document(key: Ed25519PrivateKey, document: BaseModel) -> SignedDocument:
    """``document`` signed with ``key``."""
    raw = canonical_json(document)
    return SignedDocument(document=base64.b64encode(raw).decode(), signature=base64.b64encode(key.sign(raw)).decode())


def open_document(public_key: Ed25519PublicKey, signed: SignedDocument, kind: type[Document]) -> Document:
    """The document, once its signature verifies under ``public_key``; ``SignedDocumentError`` otherwise."""
    raw = _b64(signed.document, "document")
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise SignedDocumentError(f"the signed document has {len(raw)} bytes; at most {MAX_DOCUMENT_BYTES} are read")
    signature = _b64(signed.signature, "signature")
    if len(signature) != 64:
        raise SignedDocumentError(f"signature: {len(signature)} bytes; an ed25519 signature is 64")
    try:
        public_key.verify(signature, raw)
    except InvalidSignature:
        raise SignedDocumentError("the signature does not verify with the key this side holds") from None
    try:
        return kind.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "document"
        raise SignedDocumentError(f"a signed document that is not a {kind.__name__}: {where}: {first['msg']}") from None


def public_key_text(key: Ed25519PublicKey) -> str:
    """The base64 of the 32 raw bytes of ``key``."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """The key of ``public_key_text``'s form; ``SignedDocumentError`` when it is not 32 bytes of base64."""
    raw = _b64(text, "public key")
    if len(raw) != 32:
        raise SignedDocumentError(f"public key: {len(raw)} bytes; an ed25519 public key is 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def _b64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignedDocumentError(f"{field} is not base64") from None
