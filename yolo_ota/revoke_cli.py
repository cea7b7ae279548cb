"""``yolo-ota revoke MODEL VERSION``: put a registered version on the signed revocation list.

Run where the release key is (it signs bundles; ``exporters.revocations`` says why the same key signs the list):
reads the version's manifest digest and release from MLflow, takes the service's latest list (checked against
the key, so nothing but this key's lists is ever extended), adds the version, raises the sequence, signs, and hands
the new list to the rollout service (``PUT /v1/revocations``, the ``operate`` scope). From then on the service
refuses rollouts of that version and every device that polls gets the list and refuses to install it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from yolo_ota.commands.common import ConfigPath, console, err_console, fail, load
from yolo_ota.commands.registry import MlflowUri
from yolo_ota.rollout_cli import AsJson, Server, Token, call_service, service_target
from yolo_ota.settings import ExportSettings, RegistrySettings


def revoke(
    model: Annotated[str, typer.Argument(help="Registered model (product line).")],
    version: Annotated[str, typer.Argument(help="The version no device may install any more.")],
    reason: Annotated[str, typer.Option(help="Why, for operators and device logs.")] = "",
    signing_key: Annotated[
        Path | None, typer.Option(help="The release key (PEM) that signs bundles; it signs the list too.")
    ] = None,
    mlflow_uri: MlflowUri = None,
    server: Server = None,
    token: Token = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """Revoke VERSION of MODEL: sign a new revocation list with the release key and give it to the service."""
    from exporters.errors import ExportError
    from exporters.revocations import RevocationList, RevokedRelease, empty_list
    from exporters.signed_documents import SignedDocument, open_document, sign_document
    from exporters.signing import load_private_key
    from registry import tags as ota
    from registry.errors import RegistryError
    from yolo_ota.commands.registry import mlflow_gateway

    key_path = load(ExportSettings, config, signing_key=signing_key).signing_key
    if key_path is None:
        raise fail("--signing-key is needed: the revocation list is signed with the release key")
    target = service_target(server, token, config)
    try:
        key = load_private_key(key_path)
        info = mlflow_gateway(load(RegistrySettings, config, mlflow_uri=mlflow_uri)).get_version(model, version)
        digest = info.tags.get(ota.MANIFEST_DIGEST_TAG)
        if not digest:
            raise fail(f"version {version} of {model} has no {ota.MANIFEST_DIGEST_TAG} tag: not a yolo-ota bundle")
        release = info.tags.get(ota.RELEASE_TAG) or None
        latest = call_service(target, "GET", "/v1/revocations")
        current = (
            open_document(key.public_key(), SignedDocument.model_validate(latest["signed"]), RevocationList)
            if latest.get("signed")
            else empty_list()
        )
    except (ExportError, RegistryError) as exc:
        raise fail(str(exc)) from None
    entry = RevokedRelease(
        model=model, version=version, release=int(release) if release else None, manifest_sha256=digest,
        reason=reason, revoked_at=int(time.time()),
    )  # fmt: skip
    following = current.with_entry(entry, issued_at=int(time.time()))
    answer = call_service(target, "PUT", "/v1/revocations", body=sign_document(key, following).model_dump())
    if as_json:
        console.print_json(data=answer)
        return
    err_console.print(
        f"{model} version {version} revoked (revocation list {answer['sequence']}, {len(answer['revoked'])} "
        "version(s) in all): the service refuses its rollouts, devices refuse to install it",
        soft_wrap=True,
        markup=False,
    )
