"""Whether a verified bundle may be installed here on the orders the device holds (DESIGN.md section 9).

By the time these run, every file matches the manifest, the manifest matches the digest the signed desired state
names, and the release key's signature over the manifest holds (``edge_agent.verify``). What is left is whether
this device should take *this* signed bundle:

- its product line (the manifest's ``name``, signed) is the model the desired state names;
- it is not on the revocation list the device holds;
- its gates passed, or the desired state carries an operator's recorded force;
- it is not an older release of the line than the one serving here, unless the desired state says an operator
  ordered the downgrade (a rollback, an A/B control arm, a rollout with ``allow_downgrade``).
"""

from __future__ import annotations

from edge_agent.errors import ReleaseRefused
from edge_agent.protocol import DesiredState
from exporters.bundle import Manifest


def check_release(
    manifest: Manifest,
    offer: DesiredState,
    *,
    serving: Manifest | None,
    revoked_reason: str | None,
) -> None:
    """``ReleaseRefused`` naming the first rule ``manifest`` breaks (module docstring); ``revoked_reason`` is the
    reason of the held revocation list's entry for this bundle, None when it is not revoked."""
    if manifest.name != offer.model:
        raise ReleaseRefused(
            f"the bundle was signed for product line {manifest.name!r}, and is offered as {offer.model!r}"
        )
    if revoked_reason is not None:
        why = f": {revoked_reason}" if revoked_reason else ""
        raise ReleaseRefused(f"{offer.model} v{offer.version} is on the revocation list{why}")
    if not manifest.gates_passed and not offer.force_gates:
        raise ReleaseRefused("its gates failed at export, and no operator's force is signed into the desired state")
    if serving is not None and serving.name == manifest.name and not offer.downgrade:
        offered, running = manifest.release or 0, serving.release or 0
        if offered < running:
            raise ReleaseRefused(
                f"release {manifest.release or 'unnumbered'} is older than release {serving.release} serving here, "
                "and the desired state carries no operator's order to downgrade"
            )
