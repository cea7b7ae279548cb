"""Errors raised while making or checking a bundle.

Callers catch by kind; every error says whether trying again can help (``retryable``)::

    ExportError                  base of everything this package raises
    ├── ModelError               MODEL missing, unreadable, or not a model Ultralytics can build
    │   └── UnsupportedTaskError a task other than detect
    ├── ExportArgumentError      a bad option: image size not a multiple of the stride, unknown variant, ...
    ├── OutputDirError           the output directory exists and is not empty (and --force was not given)
    ├── BundleError              a bundle that cannot be trusted or read
    │   ├── BundleIntegrityError a listed file is missing, or its size or sha256 differs from the manifest
    │   ├── UnsafePathError      a manifest path that leaves the bundle directory
    │   ├── ManifestError        manifest.json missing or not valid
    │   └── SignatureError       manifest.sig missing where required, malformed, or not matching the key
    ├── KeyFileError             a key file missing, unreadable, of the wrong kind, or about to be overwritten
    ├── SignedDocumentError      a signed desired state or revocation list that is malformed or does not verify
    └── DeviceError              the asked-for device is not usable here (e.g. --device cuda without CUDA)
"""

from __future__ import annotations

import re


class ExportError(Exception):
    """Base of the exporter's errors. ``retryable`` tells whether the same call may succeed later."""

    retryable: bool = False


class ModelError(ExportError):
    """The model file or config cannot be loaded."""


class UnsupportedTaskError(ModelError):
    """The model is not a detection model."""


class ExportArgumentError(ExportError):
    """An option has a value that cannot work."""


class OutputDirError(ExportError):
    """The output directory is not empty."""


class BundleError(ExportError):
    """A bundle is not readable or not trustworthy."""


class BundleIntegrityError(BundleError):
    """A file listed in the manifest is missing or differs from its recorded digest."""


class UnsafePathError(BundleError):
    """A path in the manifest points outside the bundle directory."""


class ManifestError(BundleError):
    """``manifest.json`` is missing or does not validate."""


class SignatureError(BundleError):
    """The manifest's signature is missing where required, malformed, or does not verify."""


class KeyFileError(ExportError):
    """A signing or public key file cannot be used."""


class SignedDocumentError(ExportError):
    """A signed document (desired state, revocation list) is malformed, or its signature does not verify."""


class DeviceError(ExportError):
    """The requested device cannot be used on this machine."""


def flatten(text: str, max_chars: int = 300) -> str:
    """Any message as one line of at most ``max_chars`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= max_chars else flat[: max_chars - 3] + "..."


def one_line(exc: BaseException, max_chars: int = 300) -> str:
    """A foreign exception's message as one short line (Ultralytics' messages span lines and carry emoji)."""
    text = re.sub(r"^(ERROR|WARNING)\W*", "", " ".join(str(exc).split()))
    return flatten(text or type(exc).__name__, max_chars)
