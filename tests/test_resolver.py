"""The light resolver against real MLflow servers on loopback: local artifacts, S3 (moto) behind the proxy and
direct with presigned URLs, PostgreSQL when reachable, and servers that are down or failing."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import start_mlflow

from exporters.bundle import MANIFEST_NAME, SIGNATURE_NAME, load_verified, read_manifest, write_manifest
from exporters.signing import (
    SignatureStatus,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_bundle,
    verify_bundle_signature,
)
from registry.errors import (
    ManifestMismatchError,
    RegistryNotFoundError,
    RegistryRequestError,
    RegistryUnavailableError,
)
from registry.mlflow_gateway import MlflowGateway, Registration
from registry.resolver import BundleResolver, ResolvedBundle
from registry.s3 import s3_presigner
from registry.tags import MANIFEST_DIGEST_TAG, SIGNED_TAG
from yolo_ota.processes import RunningServer, free_port

PCB = "resolver-pcb"
BUCKET = "yolo-ota-resolver"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
PG_ADMIN = "host=127.0.0.1 port=5432 dbname=test user=postgres"


# -- helpers ---------------------------------------------------------------------------------------------------


def rest(server: RunningServer, path: str, body: dict[str, Any], *, prefix: str = "/api/2.0/mlflow") -> Any:
    """POST to MLflow's REST API the way a non-Python client (or the MLflow UI, with prefix /ajax-api) does."""
    response = httpx.post(f"{server.url}{prefix}{path}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def create_version(server: RunningServer, model: str, source: str, run_id: str | None, tags: dict[str, str]) -> str:
    """Register a version over REST, as a non-Python client would (the gateway refuses duplicates; this does not)."""
    body: dict[str, Any] = {"name": model, "source": source, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
    if run_id is not None:
        body["run_id"] = run_id
    return str(rest(server, "/model-versions/create", body)["model_version"]["version"])


def download(resolved: ResolvedBundle, dest: Path) -> Path:
    """Fetch the manifest, the signature (if any) and every file with plain httpx; check each against the
    manifest; return the folder, which then holds a bundle."""
    dest.mkdir(parents=True)
    with httpx.Client(timeout=60) as client:
        manifest = client.get(resolved.manifest_url)
        assert manifest.status_code == 200, manifest.text
        assert manifest.content == resolved.manifest_bytes
        (dest / MANIFEST_NAME).write_bytes(manifest.content)
        if resolved.signature_url is not None:
            signature = client.get(resolved.signature_url)
            assert signature.status_code == 200, signature.text
            (dest / SIGNATURE_NAME).write_bytes(signature.content)
        for file in resolved.files:
            response = client.get(file.url)
            assert response.status_code == 200, f"{file.path}: {response.status_code} {response.text[:200]}"
            assert len(response.content) == file.bytes, file.path
            assert hashlib.sha256(response.content).hexdigest() == file.sha256, file.path
            target = dest / file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(response.content)
    return dest


def assert_complete(resolved: ResolvedBundle, bundle: Path) -> None:
    """The resolved bundle is the registered one: same manifest bytes, one URL per listed file."""
    local_bytes = (bundle / MANIFEST_NAME).read_bytes()
    assert resolved.manifest_bytes == local_bytes
    assert resolved.manifest_sha256 == hashlib.sha256(local_bytes).hexdigest() == resolved.tags[MANIFEST_DIGEST_TAG]
    assert resolved.manifest == read_manifest(bundle)
    assert sorted(f.path for f in resolved.files) == sorted(resolved.manifest.files)
    assert any(f.path.endswith(".torchscript") for f in resolved.files)


def distinct_copy(bundle: Path, dest: Path, created_at: str) -> Path:
    """A copy of ``bundle`` with a different manifest (hence a different identity), files unchanged."""
    shutil.copytree(bundle, dest)
    (dest / SIGNATURE_NAME).unlink(missing_ok=True)
    write_manifest(dest, read_manifest(dest).model_copy(update={"created_at": created_at}))
    return dest


# -- the session's MLflow server (SQLite, local artifacts behind the proxy) -----------------------------------


@pytest.fixture(scope="module")
def gateway(mlflow_server: RunningServer) -> MlflowGateway:
    return MlflowGateway(mlflow_server.url, max_retries=0)


@pytest.fixture(scope="module")
def pcb_bundle(line_bundle) -> Path:
    """The trained bundle, exported for product line ``resolver-pcb``."""
    return line_bundle(PCB)


@pytest.fixture(scope="module")
def pcb(gateway: MlflowGateway, pcb_bundle: Path) -> Registration:
    """Version 1 of ``resolver-pcb``, registered by the gateway and promoted to ``production``."""
    registration = gateway.register_bundle(pcb_bundle, PCB)
    gateway.promote(PCB, registration.version.version)
    return registration


@pytest.fixture(scope="module")
def pcb_runs_version(mlflow_server: RunningServer, pcb: Registration) -> str:
    """Version 2 of ``resolver-pcb``: the same bundle, registered over REST with a ``runs:/`` source."""
    return create_version(mlflow_server, PCB, f"runs:/{pcb.run_id}/bundle", pcb.run_id, pcb.version.tags)


def test_resolves_the_production_alias_and_every_file_downloads(
    mlflow_server: RunningServer, pcb: Registration, pcb_bundle: Path, tmp_path: Path
) -> None:
    with BundleResolver(mlflow_server.url) as resolver:
        resolved = resolver.resolve(PCB, alias="production")
    assert (resolved.model, resolved.version) == (PCB, pcb.version.version)
    assert resolved.source == pcb.version.source
    assert resolved.source.startswith("mlflow-artifacts:/")
    assert resolved.signature_url is None and resolved.tags[SIGNED_TAG] == "false"
    assert all(f.url.startswith(f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts/") for f in resolved.files)
    assert_complete(resolved, pcb_bundle)
    load_verified(download(resolved, tmp_path / "fetched"))


def test_resolves_by_version(mlflow_server: RunningServer, pcb: Registration, pcb_bundle: Path) -> None:
    with BundleResolver(mlflow_server.url) as resolver:
        by_version = resolver.resolve(PCB, version=pcb.version.version)
        by_alias = resolver.resolve(PCB, alias="production")
    assert by_version == by_alias
    assert_complete(by_version, pcb_bundle)


def test_unknown_alias_version_and_model_are_not_found(mlflow_server: RunningServer, pcb: Registration) -> None:
    with BundleResolver(mlflow_server.url) as resolver:
        with pytest.raises(RegistryNotFoundError, match="alias 'nightly'"):
            resolver.resolve(PCB, alias="nightly")
        with pytest.raises(RegistryNotFoundError, match="version 99"):
            resolver.resolve(PCB, version="99")
        with pytest.raises(RegistryNotFoundError):
            resolver.resolve("resolver-no-such-model", alias="production")
        with pytest.raises(RegistryRequestError, match="exactly one"):
            resolver.resolve(PCB, alias="production", version="1")


def test_runs_source_resolves_through_the_run(
    mlflow_server: RunningServer, pcb: Registration, pcb_runs_version: str, pcb_bundle: Path, tmp_path: Path
) -> None:
    with BundleResolver(mlflow_server.url) as resolver:
        resolved = resolver.resolve(PCB, version=pcb_runs_version)
    assert resolved.source == f"runs:/{pcb.run_id}/bundle"  # MLflow keeps the runs:/ URI as given
    assert_complete(resolved, pcb_bundle)
    load_verified(download(resolved, tmp_path / "fetched"))


def test_copied_version_resolves_through_its_models_source(
    mlflow_server: RunningServer, pcb: Registration, pcb_bundle: Path
) -> None:
    """``MlflowClient.copy_model_version`` (staging model -> production model) writes ``models:/<name>/<version>``."""
    model = "resolver-pcb-copy"
    rest(mlflow_server, "/registered-models/create", {"name": model})
    source = f"models:/{PCB}/{pcb.version.version}"
    version = create_version(mlflow_server, model, source, None, pcb.version.tags)
    with BundleResolver(mlflow_server.url) as resolver:
        resolved = resolver.resolve(model, version=version)
        assert resolved.source == source
        assert_complete(resolved, pcb_bundle)
        by_alias = resolver.artifact_url(f"models:/{PCB}@production", MANIFEST_NAME)
    assert by_alias == resolved.manifest_url


def test_alias_moved_through_the_ui_endpoint_is_seen(
    mlflow_server: RunningServer, pcb: Registration, pcb_runs_version: str
) -> None:
    def set_alias_like_the_ui(version: str) -> None:
        body = {"name": PCB, "alias": "production", "version": version}
        rest(mlflow_server, "/registered-models/alias", body, prefix="/ajax-api/2.0/mlflow")

    with BundleResolver(mlflow_server.url) as resolver:
        try:
            set_alias_like_the_ui(pcb_runs_version)
            assert resolver.resolve(PCB, alias="production").version == pcb_runs_version
            set_alias_like_the_ui(pcb.version.version)
            assert resolver.resolve(PCB, alias="production").version == pcb.version.version
        finally:
            set_alias_like_the_ui(pcb.version.version)


def test_manifest_not_matching_its_digest_tag_is_refused(mlflow_server: RunningServer, pcb: Registration) -> None:
    model = "resolver-tampered"
    rest(mlflow_server, "/registered-models/create", {"name": model})
    tags = {**pcb.version.tags, MANIFEST_DIGEST_TAG: "0" * 64}
    version = create_version(mlflow_server, model, pcb.version.source, pcb.run_id, tags)
    with BundleResolver(mlflow_server.url) as resolver, pytest.raises(ManifestMismatchError, match="altered"):
        resolver.resolve(model, version=version)


def test_manifest_listing_a_path_outside_the_bundle_is_refused(
    mlflow_server: RunningServer, trained_bundle: Path
) -> None:
    """A hand-made version whose manifest (matching its digest tag) lists ``../../outside.bin``."""
    model = "resolver-escape"
    manifest = json.loads((trained_bundle / MANIFEST_NAME).read_bytes())
    manifest["files"]["../../outside.bin"] = {"sha256": "0" * 64, "bytes": 1}
    manifest_bytes = json.dumps(manifest).encode()
    experiment_id = rest(mlflow_server, "/experiments/create", {"name": model})["experiment_id"]
    run = rest(mlflow_server, "/runs/create", {"experiment_id": experiment_id})["run"]["info"]
    source = f"{run['artifact_uri']}/bundle"
    proxy_path = source.removeprefix("mlflow-artifacts:").lstrip("/")
    upload = httpx.put(
        f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts/{proxy_path}/{MANIFEST_NAME}", content=manifest_bytes
    )
    assert upload.status_code == 200, upload.text
    rest(mlflow_server, "/registered-models/create", {"name": model})
    tags = {MANIFEST_DIGEST_TAG: hashlib.sha256(manifest_bytes).hexdigest(), SIGNED_TAG: "false"}
    version = create_version(mlflow_server, model, source, run["run_id"], tags)
    with BundleResolver(mlflow_server.url) as resolver, pytest.raises(ManifestMismatchError, match="leaves the bundle"):
        resolver.resolve(model, version=version)


def test_signed_bundle_signature_downloads_and_verifies(
    gateway: MlflowGateway, mlflow_server: RunningServer, line_bundle, tmp_path: Path
) -> None:
    model = "resolver-signed"
    bundle = distinct_copy(line_bundle(model), tmp_path / "bundle", created_at="2001-01-01T00:00:00+00:00")
    private_path, public_path = generate_keypair(tmp_path / "keys")
    sign_bundle(bundle, load_private_key(private_path))
    version = gateway.register_bundle(bundle, model).version.version
    with BundleResolver(mlflow_server.url) as resolver:
        resolved = resolver.resolve(model, version=version)
    assert resolved.signed and resolved.signature_url is not None
    assert resolved.signature_url.endswith(f"/bundle/{SIGNATURE_NAME}")
    assert_complete(resolved, bundle)
    fetched = download(resolved, tmp_path / "fetched")
    assert (fetched / SIGNATURE_NAME).read_bytes() == (bundle / SIGNATURE_NAME).read_bytes()
    assert verify_bundle_signature(fetched, load_public_key(public_path)) is SignatureStatus.VALID
    load_verified(fetched)


# -- URLs, without a server ------------------------------------------------------------------------------------


def test_artifact_urls_quote_each_segment_and_refuse_what_devices_cannot_fetch() -> None:
    with BundleResolver("http://127.0.0.1:1/") as resolver:
        url = resolver.artifact_url("mlflow-artifacts:/1/run id/artifacts/bundle", "variants/a#b?/model 1.pt")
        assert url == (
            "http://127.0.0.1:1/api/2.0/mlflow-artifacts/artifacts/1/run%20id/artifacts/bundle/variants/a%23b%3F/model%201.pt"
        )
        with_host = resolver.artifact_url("mlflow-artifacts://mlflow.internal:5000/2/r/artifacts/bundle", "x")
        assert with_host == "http://127.0.0.1:1/api/2.0/mlflow-artifacts/artifacts/2/r/artifacts/bundle/x"
        for unsafe in ("../escape", "/etc/passwd", "a/../../b", "c:\\x", ""):
            with pytest.raises(RegistryRequestError, match="not a plain relative path"):
                resolver.artifact_url("mlflow-artifacts:/1/r/artifacts/bundle", unsafe)
        with pytest.raises(RegistryRequestError, match="presigner"):
            resolver.artifact_url("s3://bucket/key", "manifest.json")
        with pytest.raises(RegistryRequestError, match="cannot be fetched"):
            resolver.artifact_url("file:///srv/mlflow/1/r/artifacts/bundle", "manifest.json")
    with pytest.raises(RegistryRequestError, match="not an http"):
        BundleResolver("127.0.0.1:5000")


def test_resolver_imports_neither_mlflow_nor_boto3() -> None:
    """Devices import the resolver; the registry's heavy dependencies must stay out of it."""
    code = "import sys, registry.resolver; print(sorted({'mlflow', 'boto3', 'botocore'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_presigner_refuses_what_is_not_an_s3_object() -> None:
    presign = s3_presigner(endpoint_url="http://127.0.0.1:1")
    for uri in ("mlflow-artifacts:/1/x", "s3://bucket", "s3:///key"):
        with pytest.raises(RegistryRequestError, match="not an s3://"):
            presign(uri)


# -- servers that are down or failing ---------------------------------------------------------------------------


def test_unreachable_mlflow_fails_fast() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with BundleResolver(url, max_retries=0, timeout_s=5) as resolver, pytest.raises(RegistryUnavailableError) as err:
        resolver.resolve(PCB, alias="production")
    assert time.monotonic() - started < 3
    assert err.value.retryable
    assert url in str(err.value) and "\n" not in str(err.value)


class _Failing(http.server.BaseHTTPRequestHandler):
    """Answers every request with 503, as MLflow behind a restarting load balancer would."""

    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        body = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "upstream restarting"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_server_errors_are_retried_a_bounded_number_of_times() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with BundleResolver(url, max_retries=2) as resolver, pytest.raises(RegistryUnavailableError) as err:
            resolver.resolve(PCB, version="1")
    finally:
        server.shutdown()
        server.server_close()
    assert _Failing.requests == 3
    assert "after 3 tries" in str(err.value) and "upstream restarting" in str(err.value)


# -- S3 (moto on loopback) --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """A standalone moto S3 server with one bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", **_boto_credentials())
        s3.create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"]}


def _bucket_keys(moto_url: str, prefix: str) -> set[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", **_boto_credentials())
    found = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"] for item in found.get("Contents", [])}


@pytest.fixture(scope="module")
def proxied_s3_mlflow(moto_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """MLflow serving artifacts that it keeps in S3: only the server holds S3 credentials."""
    env = {"MLFLOW_S3_ENDPOINT_URL": moto_url, **S3_ENV}
    server = start_mlflow(
        tmp_path_factory.mktemp("mlflow-s3-proxied"), artifacts_destination=f"s3://{BUCKET}/mlflow", env=env
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def direct_s3_mlflow(moto_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """MLflow that does not serve artifacts: clients write to and read from S3 themselves."""
    server = start_mlflow(
        tmp_path_factory.mktemp("mlflow-s3-direct"),
        serve_artifacts=False,
        default_artifact_root=f"s3://{BUCKET}/direct",
        env={"MLFLOW_S3_ENDPOINT_URL": moto_url, **S3_ENV},
    )
    yield server
    server.stop()


@pytest.mark.slow  # its own MLflow server (S3 or PostgreSQL backend)
def test_s3_behind_the_proxy(
    proxied_s3_mlflow: RunningServer,
    moto_url: str,
    line_bundle,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("MLFLOW_S3_ENDPOINT_URL", *S3_ENV):  # the client uploads through the proxy: no S3 access here
        monkeypatch.delenv(name, raising=False)
    model = "resolver-s3-proxied"
    trained_bundle = line_bundle(model)
    registration = MlflowGateway(proxied_s3_mlflow.url, max_retries=0).register_bundle(trained_bundle, model)
    assert registration.version.source.startswith("mlflow-artifacts:/")
    with BundleResolver(proxied_s3_mlflow.url) as resolver:
        resolved = resolver.resolve(model, version=registration.version.version)
    assert_complete(resolved, trained_bundle)
    load_verified(download(resolved, tmp_path / "fetched"))
    keys = _bucket_keys(moto_url, "mlflow/")
    for path in [MANIFEST_NAME, *resolved.manifest.files]:
        assert any(key.endswith(f"/{registration.run_id}/artifacts/bundle/{path}") for key in keys), path


@pytest.mark.slow  # its own MLflow server (S3 or PostgreSQL backend)
def test_s3_direct_with_presigned_urls(
    direct_s3_mlflow: RunningServer,
    moto_url: str,
    line_bundle,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_url)  # the MLflow client uploads to S3 itself
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    model = "resolver-s3-direct"
    trained_bundle = line_bundle(model)
    registration = MlflowGateway(direct_s3_mlflow.url, max_retries=0).register_bundle(trained_bundle, model)
    source = registration.version.source
    assert source.startswith(f"s3://{BUCKET}/direct/") and source.endswith(f"/{registration.run_id}/artifacts/bundle")
    assert f"{source.removeprefix(f's3://{BUCKET}/')}/{MANIFEST_NAME}" in _bucket_keys(moto_url, "direct/")

    with BundleResolver(direct_s3_mlflow.url, presign=s3_presigner(endpoint_url=moto_url, expires_s=300)) as resolver:
        resolved = resolver.resolve(model, version=registration.version.version)
    assert all(f.url.startswith(f"{moto_url}/{BUCKET}/direct/") and "X-Amz-Signature=" in f.url for f in resolved.files)
    assert_complete(resolved, trained_bundle)
    load_verified(download(resolved, tmp_path / "fetched"))

    with BundleResolver(direct_s3_mlflow.url) as resolver, pytest.raises(RegistryRequestError, match="presigner"):
        resolver.resolve(model, version=registration.version.version)


# -- PostgreSQL backend ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """MLflow on a fresh PostgreSQL database (dropped afterwards); skipped when PostgreSQL is not reachable."""
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN, connect_timeout=2, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth) is not reachable: {exc}")
    database = f"yolo_ota_mlflow_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{database}"')
        try:
            server = start_mlflow(
                tmp_path_factory.mktemp("mlflow-postgres"),
                backend_uri=f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
            )
            try:
                yield server
            finally:
                server.stop()
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.mark.slow  # its own MLflow server (S3 or PostgreSQL backend)
def test_postgres_backend(postgres_mlflow: RunningServer, line_bundle, tmp_path: Path) -> None:
    model = "resolver-postgres"
    trained_bundle = line_bundle(model)
    gateway = MlflowGateway(postgres_mlflow.url, max_retries=0)
    registration = gateway.register_bundle(trained_bundle, model)
    gateway.promote(model, registration.version.version)
    with BundleResolver(postgres_mlflow.url) as resolver:
        resolved = resolver.resolve(model, alias="production")
    assert resolved.version == registration.version.version
    assert_complete(resolved, trained_bundle)
    load_verified(download(resolved, tmp_path / "fetched"))
