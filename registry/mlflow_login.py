"""MLflow's own login (``mlflow server --app-name basic-auth``) set up for yolo-ota: one user per role, and the webhook.

Run once by an MLflow admin (the Compose file's ``mlflow-setup`` service, the Kubernetes ``mlflow-setup`` Job), and
safe to run again: a user that exists gets the password it is given now.

- ``yolo-ota-service`` (the rollout service): reads versions, aliases and bundles, and writes the ``ota.*`` tags it
  keeps on versions, so it holds EDIT on every registered model. It is not an admin.
- ``yolo-ota-registrar`` (``yolo-ota register``): creates its experiment, runs and registered models, and is
  MANAGE on what it creates, as MLflow makes every creator.
- ``yolo-ota-devices`` (edge agents): MLflow's default permission, READ, for bundle files through the artifact
  proxy; it can move no alias and change no version of a model someone else created.

Webhooks are an admin's business in MLflow, so this registers the rollout service's webhook too, and the service
itself does not (it is given no ``public_url``).

Variables: ``MLFLOW_TRACKING_URI`` and the admin's ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``;
``YOLO_OTA_MLFLOW_<ROLE>_PASSWORD`` (or ``..._PASSWORD_FILE``) for ``SERVICE``, ``REGISTRAR`` and ``DEVICES`` (a
role with neither is skipped); ``YOLO_OTA_WEBHOOK_URL`` and ``YOLO_OTA_WEBHOOK_SECRET`` for the webhook.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from registry.errors import RegistryError, RegistryRequestError
from registry.resolver import mlflow_http_options

log = logging.getLogger(__name__)

MIN_PASSWORD_CHARS = 16
WEBHOOK_URL_ENV = "YOLO_OTA_WEBHOOK_URL"
WEBHOOK_SECRET_ENV = "YOLO_OTA_WEBHOOK_SECRET"


@dataclass(frozen=True)
class Role:
    username: str
    grants: tuple[tuple[str, str, str], ...]  # (resource_type, resource_id, permission)


ROLES: dict[str, Role] = {
    "SERVICE": Role("yolo-ota-service", (("registered_model", "*", "EDIT"),)),
    "REGISTRAR": Role("yolo-ota-registrar", ()),
    "DEVICES": Role("yolo-ota-devices", ()),
}


def _password_env(role: str) -> str:
    return f"YOLO_OTA_MLFLOW_{role}_PASSWORD"


VARIABLES = (
    WEBHOOK_URL_ENV,
    WEBHOOK_SECRET_ENV,
    *(f"{_password_env(role)}{suffix}" for role in ROLES for suffix in ("", "_FILE")),
)
"""The ``YOLO_OTA_*`` variables read here."""


def role_password(env: Mapping[str, str], role: str) -> str | None:
    """``YOLO_OTA_MLFLOW_<role>_PASSWORD``, else the file ``..._PASSWORD_FILE`` names; refused when short."""
    name = _password_env(role)
    password = env.get(name) or None
    if password is None and env.get(f"{name}_FILE"):
        path = Path(env[f"{name}_FILE"])
        try:
            password = path.read_text().strip() or None
        except OSError as exc:
            raise RegistryRequestError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    if password is not None and len(password) < MIN_PASSWORD_CHARS:
        raise RegistryRequestError(f"{name}: at least {MIN_PASSWORD_CHARS} characters, got {len(password)}")
    return password


class MlflowLogin:
    """The users and grants of MLflow's basic-auth app, over its REST API, as an admin."""

    def __init__(self, mlflow_url: str, *, client: httpx.Client | None = None) -> None:
        self.url = mlflow_url.rstrip("/")
        self._http = client or httpx.Client(timeout=30, **mlflow_http_options())

    def close(self) -> None:
        self._http.close()

    def ensure_user(self, role: Role, password: str) -> None:
        """Create ``role``'s user, or give it ``password`` when it exists; then its grants."""
        found = self._http.get(f"{self.url}/api/2.0/mlflow/users/get", params={"username": role.username})
        if found.status_code == 200:
            body = {"username": role.username, "password": password}
            self._check(self._http.patch(f"{self.url}/api/2.0/mlflow/users/update-password", json=body), "password")
            log.info("MLflow user %s: password set", role.username)
        else:
            self._check(found, f"looking up user {role.username}", allow=(404,))
            self._post("/api/2.0/mlflow/users/create", {"username": role.username, "password": password})
            log.info("MLflow user %s created", role.username)
        for resource_type, resource_id, permission in role.grants:
            body = {
                "username": role.username,
                "resource_type": resource_type,
                "resource_id": resource_id,
                "permission": permission,
            }
            response = self._http.post(f"{self.url}/api/3.0/mlflow/users/permissions/grant", json=body)
            if response.status_code == 400 and "RESOURCE_ALREADY_EXISTS" in response.text:
                continue  # granted by an earlier run
            self._check(response, f"granting {permission} on {resource_type} {resource_id} to {role.username}")
            log.info("MLflow user %s: %s on %s %s", role.username, permission, resource_type, resource_id)

    def _post(self, path: str, body: dict[str, str]) -> None:
        self._check(self._http.post(f"{self.url}{path}", json=body), path)

    @staticmethod
    def _check(response: httpx.Response, what: str, allow: tuple[int, ...] = ()) -> None:
        if response.status_code < 300 or response.status_code in allow:
            return
        detail = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        hint = (
            " (the admin's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
            if response.status_code in (401, 403)
            else ""
        )
        raise RegistryRequestError(f"MLflow answered {what} with HTTP {response.status_code}{hint}: {detail}")


def set_up(env: Mapping[str, str]) -> list[str]:
    """Users, grants and the webhook from ``env``; returns what was set up."""
    url = env.get("MLFLOW_TRACKING_URI")
    if not url:
        raise RegistryRequestError("MLFLOW_TRACKING_URI: required (the MLflow server to set up)")
    done: list[str] = []
    login = MlflowLogin(url)
    try:
        for key, role in ROLES.items():
            password = role_password(env, key)
            if password is not None:
                login.ensure_user(role, password)
                done.append(f"user {role.username}")
    finally:
        login.close()
    if env.get(WEBHOOK_URL_ENV):
        done.append(_register_webhook(url, env))
    return done


def _register_webhook(mlflow_url: str, env: Mapping[str, str]) -> str:
    from registry.mlflow_gateway import MlflowGateway
    from registry.rollout_service.webhooks import WEBHOOK_EVENTS, WEBHOOK_NAME

    secret = env.get(WEBHOOK_SECRET_ENV)
    if not secret:
        raise RegistryRequestError(f"{WEBHOOK_SECRET_ENV}: required with {WEBHOOK_URL_ENV}")
    hook = MlflowGateway(mlflow_url, max_retries=1, timeout_s=10).ensure_webhook(
        WEBHOOK_NAME, env[WEBHOOK_URL_ENV], secret, WEBHOOK_EVENTS
    )
    return f"webhook {WEBHOOK_NAME} ({hook})"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        done = set_up(os.environ)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("MLflow login set up: " + (", ".join(done) or "nothing to do"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
