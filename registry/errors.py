"""Errors of the registry package. Callers catch by kind; ``retryable`` says whether trying again can help::

RegistryError                 base of everything this package raises
├── RegistryUnavailableError  the MLflow server did not answer (retryable)
├── RegistryNotFoundError     no such registered model, version or alias
├── DuplicateBundleError      the same manifest is already registered (names the version holding it)
├── ProductLineMismatchError  a bundle exported for one product line, registered or found under another
├── ReleaseOrderError         a bundle of an older release than a version of its line registered before
├── PromotionRefusedError     the version's gates did not pass and --force was not given
├── RegistryRequestError      MLflow refused the request for another reason
└── ManifestMismatchError     a version's manifest.json differs from its digest tag, or is invalid or unsafe
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of the registry's errors."""

    retryable: bool = False


class RegistryUnavailableError(RegistryError):
    """The tracking server cannot be reached or answered with a server error."""

    retryable = True


class RegistryNotFoundError(RegistryError):
    """A registered model, version or alias does not exist."""


class DuplicateBundleError(RegistryError):
    """A version with the same manifest digest exists already."""

    def __init__(self, message: str, version: str) -> None:
        super().__init__(message)
        self.version = version


class ProductLineMismatchError(RegistryError):
    """A bundle's signed product line (its manifest's ``name``) is not the registered model it is put under."""


class ReleaseOrderError(RegistryError):
    """A bundle whose release number is below one already registered for its line: releases only grow."""


class PromotionRefusedError(RegistryError):
    """Promotion of a version whose gates did not pass, without force."""


class RegistryRequestError(RegistryError):
    """MLflow refused the request (bad name, permissions, ...)."""


class ManifestMismatchError(RegistryError):
    """A version's manifest.json differs from its ``ota.manifest_sha256`` tag, or is not a valid, safe manifest.

    The stored bundle cannot be trusted; trying again does not help.
    """
