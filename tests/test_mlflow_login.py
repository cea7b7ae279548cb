"""MLflow behind its own login, as the Compose and Kubernetes files run it, tried as an attacker would.

A real MLflow server started by ``infra/docker/mlflow-login.sh`` (``--app-name basic-auth``), its users made by
``python -m registry.mlflow_login`` as the admin, the real rollout service signed in as its own user, and the
agent's downloader fetching bundle files through MLflow's artifact proxy with the devices' read-only user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from edge_agent.download import Downloader, OriginBasicAuth
from edge_agent.errors import AgentSettingsError, DownloadFailed
from edge_agent.protocol import DesiredFile, DesiredState
from edge_agent.settings import load_settings
from registry.resolver import BundleResolver
from registry.tags import ROLLOUT_TAG
from tests.servers import FAST_SERVICE_SETTINGS, TOKENS
from yolo_ota.processes import RunningServer, clean_env, free_port, launch, started
from yolo_ota.servers import mlflow_env, start_service

ROOT = Path(__file__).resolve().parents[1]
LOGIN_SCRIPT = ROOT / "infra" / "docker" / "mlflow-login.sh"
ADMIN = ("admin", "admin-password-for-tests")
PASSWORDS = {
    "SERVICE": "service-password-for-tests",
    "REGISTRAR": "registrar-password-for-tests",
    "DEVICES": "devices-password-for-tests",
}
SERVICE = ("yolo-ota-service", PASSWORDS["SERVICE"])
REGISTRAR = ("yolo-ota-registrar", PASSWORDS["REGISTRAR"])
DEVICES = ("yolo-ota-devices", PASSWORDS["DEVICES"])
MODEL = "pcb-login"


@dataclass
class LoginStack:
    mlflow: RunningServer
    version: str
    webhook_url: str


def _setup(mlflow_url: str, admin: tuple[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(
        {
            "MLFLOW_TRACKING_URI": mlflow_url,
            "MLFLOW_TRACKING_USERNAME": admin[0],
            "MLFLOW_TRACKING_PASSWORD": admin[1],
            **{f"YOLO_OTA_MLFLOW_{role}_PASSWORD": password for role, password in PASSWORDS.items()},
            **extra,
        }
    )
    command = [sys.executable, "-m", "registry.mlflow_login"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _start_login_mlflow(data_dir: Path) -> RunningServer:
    port = free_port()
    env = mlflow_env(
        extra={
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{data_dir / 'mlflow.db'}",
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-session-signing-key-for-tests",
            "MLFLOW_LOGIN_CONFIG_DIR": str(data_dir),
            "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        }
    )
    command = ["sh", str(LOGIN_SCRIPT), "--serve-artifacts", "--artifacts-destination", str(data_dir / "artifacts")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = launch(
        "MLflow server (login)", command, port=port, health_path="/health", env=env,
        log_path=data_dir / "server.log", cwd=data_dir,
    )  # fmt: skip
    return started(server, 120)


@pytest.fixture(scope="module")
def login_stack(tmp_path_factory: pytest.TempPathFactory, line_bundle) -> Iterator[LoginStack]:
    data_dir = tmp_path_factory.mktemp("mlflow-login")
    mlflow = _start_login_mlflow(data_dir)
    try:
        webhook_url = "http://127.0.0.1:9/v1/hooks/mlflow"
        done = _setup(mlflow.url, ADMIN, YOLO_OTA_WEBHOOK_URL=webhook_url, YOLO_OTA_WEBHOOK_SECRET="s" * 24)
        assert done.returncode == 0, done.stderr
        # `yolo-ota register` as the registrar, through MLflow's own credential variables.
        env = clean_env(
            {"MLFLOW_TRACKING_USERNAME": REGISTRAR[0], "MLFLOW_TRACKING_PASSWORD": REGISTRAR[1], "YOLO_OFFLINE": "true"}
        )
        command = [sys.executable, "-m", "yolo_ota.cli", "register", str(line_bundle(MODEL)), "--name", MODEL]
        command += ["--mlflow-uri", mlflow.url]
        registered = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        yield LoginStack(mlflow, registered.stdout.strip(), webhook_url)
    finally:
        mlflow.stop()


def _alias(url: str, auth: tuple[str, str] | None, version: str, alias: str = "production") -> httpx.Response:
    body = {"name": MODEL, "alias": alias, "version": version}
    return httpx.post(f"{url}/api/2.0/mlflow/registered-models/alias", json=body, auth=auth, timeout=30)


def test_only_a_user_with_edit_moves_an_alias(login_stack: LoginStack) -> None:
    url, version = login_stack.mlflow.url, login_stack.version
    assert httpx.get(f"{url}/api/2.0/mlflow/registered-models/search", timeout=30).status_code == 401
    assert _alias(url, None, version).status_code == 401
    assert _alias(url, ("yolo-ota-devices", "a-guessed-password-123"), version).status_code == 401
    assert _alias(url, DEVICES, version, alias="staging").status_code == 403
    tag = {"name": MODEL, "version": version, "key": "ota.gates_passed", "value": "true"}
    assert httpx.post(f"{url}/api/2.0/mlflow/model-versions/set-tag", json=tag, auth=DEVICES).status_code == 403
    # The devices' user reads: the version, and so its bundle files.
    got = httpx.get(
        f"{url}/api/2.0/mlflow/model-versions/get", params={"name": MODEL, "version": version}, auth=DEVICES
    )
    assert got.status_code == 200 and "staging" not in got.json()["model_version"].get("aliases", [])
    # The webhook is an admin's: the setup registered it, and nobody else can list or change webhooks.
    hooks = httpx.get(f"{url}/api/2.0/mlflow/webhooks", auth=ADMIN, timeout=30)
    assert login_stack.webhook_url in hooks.text
    assert httpx.get(f"{url}/api/2.0/mlflow/webhooks", auth=SERVICE, timeout=30).status_code == 403


def test_the_service_signed_in_as_its_own_user_sees_a_promotion_and_tags_it(
    login_stack: LoginStack, tmp_path: Path
) -> None:
    url, version = login_stack.mlflow.url, login_stack.version
    env = {"MLFLOW_TRACKING_USERNAME": SERVICE[0], "MLFLOW_TRACKING_PASSWORD": SERVICE[1]}
    settings = {**FAST_SERVICE_SETTINGS, "MLFLOW_URI": url, "PROMOTION_APPROVAL": "required", "WATCH_MODELS": MODEL}
    service = start_service(tmp_path, TOKENS, settings, env=env)
    try:
        assert _alias(url, REGISTRAR, version).status_code == 200  # the registrar made the model: MANAGE
        headers = {"Authorization": f"Bearer {TOKENS.operator}"}
        deadline = time.monotonic() + 30
        rollouts: list[dict[str, object]] = []
        while not rollouts and time.monotonic() < deadline:
            rollouts = httpx.get(f"{service.url}/v1/rollouts", headers=headers, timeout=30).json()["rollouts"]
            time.sleep(0.3)
        assert rollouts, service.log_tail(3000)
        assert rollouts[0]["state"] == "waiting_for_approval" and rollouts[0]["version"] == version
        # The service writes the ota.rollout tag on the version with its own user's EDIT grant.
        params = {"name": MODEL, "version": version}
        tagged: set[str] = set()
        while ROLLOUT_TAG not in tagged and time.monotonic() < deadline + 30:
            got = httpx.get(f"{url}/api/2.0/mlflow/model-versions/get", params=params, auth=ADMIN).json()
            tagged = {t["key"] for t in got["model_version"]["tags"]}
            time.sleep(0.3)
        assert ROLLOUT_TAG in tagged, service.log_tail(3000)
    finally:
        service.stop()
        _alias_delete(url, REGISTRAR)


def _alias_delete(url: str, auth: tuple[str, str]) -> None:
    params = {"name": MODEL, "alias": "production"}
    httpx.delete(f"{url}/api/2.0/mlflow/registered-models/alias", params=params, auth=auth, timeout=30)


def _desired(login_stack: LoginStack) -> DesiredState:
    with httpx.Client(auth=SERVICE, timeout=30) as client:
        bundle = BundleResolver(login_stack.mlflow.url, client=client).resolve(MODEL, version=login_stack.version)
    files = [DesiredFile(path=f.path, url=f.url, sha256=f.sha256, bytes=f.bytes) for f in bundle.files[:2]]
    return DesiredState(
        model=MODEL,
        version=login_stack.version,
        files=files,
        manifest_url=bundle.manifest_url,
        manifest_sha256=bundle.manifest_sha256,
        signature_url=bundle.signature_url,
    )


def test_devices_fetch_bundle_files_with_the_read_only_user(login_stack: LoginStack, tmp_path: Path) -> None:
    desired = _desired(login_stack)
    auth = OriginBasicAuth(login_stack.mlflow.url, *DEVICES)
    downloader = Downloader(attempts=1, min_free_bytes=0, timeout_s=30, auth=auth)
    try:
        downloader.fetch(desired, tmp_path / "staged")
    finally:
        downloader.close()
    assert all((tmp_path / "staged" / f.path).stat().st_size == f.bytes for f in desired.files)
    anonymous = Downloader(attempts=1, min_free_bytes=0, timeout_s=30)
    try:
        with pytest.raises(DownloadFailed, match="HTTP 401"):
            anonymous.fetch(desired, tmp_path / "anonymous")
    finally:
        anonymous.close()


def test_the_login_goes_to_the_configured_origin_only() -> None:
    seen: list[tuple[str, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        return httpx.Response(200, content=b"{}")

    auth = OriginBasicAuth("https://mlflow.factory.example", *DEVICES)
    with httpx.Client(transport=httpx.MockTransport(answer), auth=auth) as client:
        client.get("https://mlflow.factory.example/api/2.0/mlflow-artifacts/artifacts/x")
        client.get("https://mlflow.factory.example:443/y")
        client.get("http://mlflow.factory.example/z")  # another scheme: another origin
        client.get("https://bucket.s3.example/key?X-Amz-Signature=abc")  # a presigned URL takes no header
        client.get("https://mlflow.factory.example.evil.example/w")
    sent = [authorization is not None for _, authorization in seen]
    assert sent == [True, True, False, False, False], seen


def test_setup_is_repeatable_and_refuses_bad_input(login_stack: LoginStack) -> None:
    url = login_stack.mlflow.url
    again = _setup(url, ADMIN)
    assert again.returncode == 0, again.stderr
    assert httpx.get(f"{url}/api/2.0/mlflow/registered-models/search", auth=SERVICE).status_code == 200
    wrong = _setup(url, (ADMIN[0], "not-the-admin-password"))
    assert wrong.returncode == 2 and "HTTP 401" in wrong.stderr and "MLFLOW_TRACKING_PASSWORD" in wrong.stderr
    short = _setup(url, ADMIN, YOLO_OTA_MLFLOW_DEVICES_PASSWORD="short")
    assert short.returncode == 2 and "YOLO_OTA_MLFLOW_DEVICES_PASSWORD: at least 16 characters" in short.stderr


def test_agent_login_settings_go_together(tmp_path: Path) -> None:
    base = {"server": "http://127.0.0.1:1", "device_id": "cam-1", "data_dir": tmp_path}
    config = tmp_path / "empty.toml"
    config.write_text("")
    with pytest.raises(AgentSettingsError, match="mlflow_url is needed"):
        load_settings(config, **base, mlflow_username="yolo-ota-devices", mlflow_password="x" * 20)
    with pytest.raises(AgentSettingsError, match="go together"):
        load_settings(config, **base, mlflow_url="http://127.0.0.1:2", mlflow_username="yolo-ota-devices")
    secret = tmp_path / "mlflow-password"
    secret.write_text(PASSWORDS["DEVICES"] + "\n")
    settings = load_settings(
        config,
        **base,
        mlflow_url="http://127.0.0.1:2/",
        mlflow_username="yolo-ota-devices",
        mlflow_password_file=secret,
    )
    assert settings.mlflow_password == PASSWORDS["DEVICES"] and settings.mlflow_url == "http://127.0.0.1:2"
