"""The agent's checks of what the service says (``edge_agent.trust``) and of what a signed bundle is for
(``edge_agent.release_checks``), with real keys and real signed documents.

The same checks run in real agent processes in ``tests/test_signed_orders.py``; the two cases here that the real
service never produces (it refuses them before any device sees them: another line's bundle, a failed-gate bundle
without force) are the agent's own last line, so they are tried here directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import AgentSettingsError, DesiredStateRefused, ReleaseRefused
from edge_agent.protocol import DesiredState
from edge_agent.release_checks import check_release
from edge_agent.trust import Trust
from exporters.bundle import read_manifest
from exporters.desired_statement import DesiredStatement
from exporters.revocations import RevocationList, RevokedRelease
from exporters.signed_documents import public_key_text, sign_document

DEVICE = "cam-1"
DIGEST = "a" * 64


def _answer(key: Ed25519PrivateKey, *, revocations: RevocationList | None = None, **fields: object) -> DesiredState:
    now = int(time.time())
    statement = DesiredStatement.model_validate(
        {"device_id": DEVICE, "model": "pcb", "version": "7", "variant": "cpu-fp32", "manifest_sha256": DIGEST,
         "rollout_id": 3, "generation": 10, "issued_at": now, "expires_at": now + 60, **fields}
    )  # fmt: skip
    signed_list = sign_document(key, revocations) if revocations is not None else None
    return DesiredState(
        model="pcb", version="7", statement=sign_document(key, statement), revocations=signed_list, etag='"e"'
    )


@pytest.fixture
def service_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def trust(tmp_path: Path, service_key: Ed25519PrivateKey) -> Trust:
    held = Trust(tmp_path, DEVICE, release_key=None, service_key=None)
    held.pin(public_key_text(service_key.public_key()))
    return held


def test_the_statement_decides_and_the_orders_come_from_it_alone(trust: Trust, service_key: Ed25519PrivateKey) -> None:
    answer = _answer(service_key, version="8", downgrade=True, shadow={"min_matched": 0.9})
    forged = answer.model_copy(update={"version": "9", "force_gates": True})
    taken = trust.accept(forged)
    assert (taken.version, taken.downgrade, taken.force_gates) == ("8", True, False)
    assert taken.shadow is not None and taken.shadow.min_matched == 0.9


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"device_id": "cam-2"}, "for device 'cam-2'"),
        ({"generation": 9}, "older than generation 10"),
        ({"issued_at": 0, "expires_at": 60}, "expired"),
        ({"issued_at": int(time.time()) + 3600, "expires_at": int(time.time()) + 7200}, "check the clock"),
    ],
)
def test_answers_the_agent_must_not_act_on(
    trust: Trust, service_key: Ed25519PrivateKey, fields: dict[str, object], fragment: str
) -> None:
    trust.accept(_answer(service_key))  # generation 10 accepted
    with pytest.raises(DesiredStateRefused, match=fragment):
        trust.accept(_answer(service_key, **fields))
    assert fragment in str(trust.status()["last_refused_answer"])


def test_a_statement_signed_by_another_key_or_none_at_all_is_refused(trust: Trust) -> None:
    with pytest.raises(DesiredStateRefused, match="not signed by the pinned service key"):
        trust.accept(_answer(Ed25519PrivateKey.generate()))
    with pytest.raises(DesiredStateRefused, match="no signed statement"):
        trust.accept(DesiredState(model="pcb", version="7", etag='"e"'))


def test_the_pinned_key_and_the_generation_survive_a_restart(
    tmp_path: Path, trust: Trust, service_key: Ed25519PrivateKey
) -> None:
    trust.accept(_answer(service_key, generation=42))
    again = Trust(tmp_path, DEVICE, release_key=None, service_key=None)
    with pytest.raises(DesiredStateRefused, match="older than generation 42"):
        again.accept(_answer(service_key, generation=41))
    with pytest.raises(DesiredStateRefused, match="another state key"):
        again.pin(public_key_text(Ed25519PrivateKey.generate().public_key()))
    with pytest.raises(AgentSettingsError, match="differs from the key pinned"):
        Trust(
            tmp_path, DEVICE, release_key=None, service_key=public_key_text(Ed25519PrivateKey.generate().public_key())
        )


def test_stale_once_the_latest_statement_expires(trust: Trust, service_key: Ed25519PrivateKey) -> None:
    trust.accept(_answer(service_key))
    assert trust.stale() is None
    assert "withheld, replayed" in str(trust.stale(time.time() + 61))


def test_revocation_lists_count_only_under_the_release_key_and_never_go_back(
    tmp_path: Path, service_key: Ed25519PrivateKey
) -> None:
    release = Ed25519PrivateKey.generate()
    trust = Trust(tmp_path, DEVICE, release_key=release.public_key(), service_key=None)
    trust.pin(public_key_text(service_key.public_key()))
    entry = RevokedRelease(model="pcb", version="7", release=5, manifest_sha256=DIGEST, reason="bad", revoked_at=1)
    listed = RevocationList(sequence=2, issued_at=1, revoked=(entry,))
    forged = _answer(service_key, revocations=listed)  # signed by the service's key: not the release key's list
    trust.accept(forged)
    assert trust.revoked("pcb", DIGEST) is None
    signed = forged.model_copy(update={"revocations": sign_document(release, listed)})
    trust.accept(signed)
    assert trust.revoked("pcb", DIGEST) == entry
    older = signed.model_copy(update={"revocations": sign_document(release, RevocationList(sequence=1, issued_at=1))})
    trust.accept(older)
    assert trust.revoked("pcb", DIGEST) == entry


def test_release_checks(trained_bundle: Path) -> None:
    manifest = read_manifest(trained_bundle)
    offer = DesiredState(model=manifest.name, version="7")
    check_release(manifest, offer, serving=manifest, revoked_reason=None)  # the same release again: fine
    with pytest.raises(ReleaseRefused, match="signed for product line 'pcb-parts', and is offered as 'other'"):
        check_release(manifest, offer.model_copy(update={"model": "other"}), serving=None, revoked_reason=None)
    with pytest.raises(ReleaseRefused, match="revocation list: misses bridges"):
        check_release(manifest, offer, serving=None, revoked_reason="misses bridges")
    failed = manifest.model_copy(update={"gates_passed": False})
    with pytest.raises(ReleaseRefused, match="no operator's force"):
        check_release(failed, offer, serving=None, revoked_reason=None)
    check_release(failed, offer.model_copy(update={"force_gates": True}), serving=None, revoked_reason=None)
    assert manifest.release is not None
    newer = manifest.model_copy(update={"release": manifest.release + 1})
    with pytest.raises(ReleaseRefused, match="no operator's order to downgrade"):
        check_release(manifest, offer, serving=newer, revoked_reason=None)
    check_release(manifest, offer.model_copy(update={"downgrade": True}), serving=newer, revoked_reason=None)
