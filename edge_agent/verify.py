"""Verifying a staged offer: every path stays inside staging, every digest matches the manifest the service
vouched for, the signature holds (required when a public key is configured), and this device may run it.
Also which offered files to fetch at all: the variants this device can run (``edge_agent.variant_choice``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.download import staged_path
from edge_agent.errors import VerificationFailed
from edge_agent.protocol import DesiredState
from edge_agent.variant_choice import Candidates, DeviceSetting, candidates
from exporters.bundle import Manifest, read_manifest, sha256_file
from exporters.errors import BundleError
from exporters.fingerprint import Fingerprint
from exporters.formats import FORMATS_NAME, all_variants
from exporters.signing import verify_bundle_signature

log = logging.getLogger(__name__)


def verify_staged(
    staging: Path, offer: DesiredState, public_key: Ed25519PublicKey | None, fetched: set[str] | None = None
) -> Manifest:
    """Check the staged files of ``offer`` (those in ``fetched``; default: every offered file);
    ``VerificationFailed`` says which check refused it."""
    try:
        manifest = read_manifest(staging)
    except BundleError as exc:
        raise VerificationFailed(str(exc)) from None
    for relative in manifest.files:
        staged_path(staging, relative)  # a manifest entry that leaves the folder refuses the whole bundle
    for offered in offer.files:
        entry = manifest.files.get(offered.path)
        if entry is None:
            raise VerificationFailed(f"{offered.path} is offered but not listed in the manifest")
        if (entry.sha256, entry.bytes) != (offered.sha256, offered.bytes):
            raise VerificationFailed(f"{offered.path}: the offer's digest differs from the manifest's")
        if fetched is not None and offered.path not in fetched:
            continue  # not downloaded: a variant this device does not run
        actual = sha256_file(staged_path(staging, offered.path))
        if actual != entry.sha256:
            raise VerificationFailed(
                f"{offered.path} has sha256 {actual[:12]}..., the manifest says {entry.sha256[:12]}..."
            )
    if manifest.golden.path not in {f.path for f in offer.files}:
        raise VerificationFailed(f"the offer lacks the golden data {manifest.golden.path}: cannot validate here")
    try:
        status = verify_bundle_signature(staging, public_key)
    except BundleError as exc:
        raise VerificationFailed(str(exc)) from None
    log.info("%s v%s: %d files verified, signature %s", offer.model, offer.version, len(offer.files), status.value)
    return manifest


def files_to_fetch(
    staging: Path, offer: DesiredState, fingerprint: Fingerprint, device: DeviceSetting
) -> tuple[set[str], Candidates]:
    """The offered files this device needs, once ``manifest.json`` (and ``formats.json``, if the bundle has one) are
    staged: everything but the variant files it cannot or need not run. ``formats.json`` is checked against the
    manifest first, so that a forged one cannot steer the choice."""
    try:
        manifest = read_manifest(staging)
    except BundleError as exc:
        raise VerificationFailed(str(exc)) from None
    entry = manifest.files.get(FORMATS_NAME)
    if entry is not None:
        path = staged_path(staging, FORMATS_NAME)
        if not path.is_file() or sha256_file(path) != entry.sha256:
            raise VerificationFailed(f"{FORMATS_NAME} is missing or differs from the manifest's digest")
    offered = {f.path for f in offer.files}
    try:
        found = candidates(staging, manifest, fingerprint, device, offered)
    except BundleError as exc:
        raise VerificationFailed(str(exc)) from None
    variant_files = {v.path for v in all_variants(staging, manifest).values()}
    return {p for p in offered if p not in variant_files or p in found.wanted_paths}, found


def check_runnable(found: Candidates) -> None:
    """``VerificationFailed`` when no variant of the bundle can run on this device."""
    if not found.runnable:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(found.refused.items())) or "it has no variants"
        raise VerificationFailed(f"incompatible fingerprint: no variant can run here ({reasons})")
