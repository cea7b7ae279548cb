"""Verifying a staged offer: every path stays inside staging, every digest matches the manifest the service
vouched for, the signature holds (required when a public key is configured), and this device may run it.
Also the choice of variant: a CUDA one when CUDA works here, else ``cpu-fp32``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.download import staged_path
from edge_agent.errors import VerificationFailed
from edge_agent.protocol import DesiredState
from exporters.bundle import Manifest, read_manifest, sha256_file
from exporters.errors import BundleError
from exporters.fingerprint import Fingerprint, check_compatible, cuda_usable
from exporters.signing import verify_bundle_signature

log = logging.getLogger(__name__)

CUDA_ORDER = ("cuda-fp16", "cuda-fp32")
CPU_VARIANT = "cpu-fp32"


def verify_staged(staging: Path, offer: DesiredState, public_key: Ed25519PublicKey | None) -> Manifest:
    """Check the staged files of ``offer``; ``VerificationFailed`` says which check refused it."""
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


def variant_to_load(
    manifest: Manifest, staged: set[str], offered: str | None, device: Literal["auto", "cuda", "cpu"]
) -> tuple[str, str]:
    """The variant to run here and a note for the report ('' when it is the offered one).

    CUDA variants only when CUDA works on this device (and is not switched off); else ``cpu-fp32``.
    """
    available = [name for name, v in manifest.variants.items() if v.path in staged]
    cuda = device != "cpu" and cuda_usable()
    order = ([offered] if offered in CUDA_ORDER else []) + list(CUDA_ORDER) if cuda else []
    for name in [*order, CPU_VARIANT]:
        if name in available:
            note = ""
            if offered and name != offered:
                why = "CUDA is switched off by settings" if device == "cpu" else "no working CUDA device"
                note = (
                    f"running {name} instead of {offered}: {why}"
                    if not cuda
                    else f"running {name} instead of {offered}"
                )
            return name, note
    raise VerificationFailed(
        f"none of the staged variants ({', '.join(available) or 'none'}) can run here "
        f"({'CUDA works' if cuda else 'no working CUDA'})"
    )


def check_fingerprint(manifest: Manifest, fingerprint: Fingerprint, variant: str) -> None:
    """The compatibility rule of DESIGN.md section 4, as a ``VerificationFailed``."""
    reason = check_compatible(manifest.fingerprint, fingerprint, variant)
    if reason:
        raise VerificationFailed(f"incompatible fingerprint: {reason}")
