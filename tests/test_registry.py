"""Registering bundles in a real MLflow server, listing and promoting versions (the real CLI and the gateway)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from exporters.bundle import MANIFEST_NAME, read_manifest
from exporters.drills import set_latency_budget, set_product_line, set_release
from exporters.export import ExportRequest, export_bundle
from registry.errors import DuplicateBundleError, PromotionRefusedError, RegistryUnavailableError
from registry.mlflow_gateway import MlflowGateway
from yolo_ota.processes import RunningServer, free_port


def _mlflow_client(server: RunningServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def _one_line_error(done) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error:")
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def failed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("failed") / "bundle"
    result = export_bundle(
        ExportRequest(
            model="yolov8n.yaml",
            out_dir=out,
            imgsz=(64, 64),
            variants=("cpu-fp32",),
            latency_budget_ms=0.001,
            name="pcb-failed",
        )
    )
    assert not result.passed
    return out


def test_register_creates_a_tagged_version_from_the_bundle_artifacts(
    mlflow_server: RunningServer, line_bundle, cli, tmp_path: Path
) -> None:
    trained_bundle = line_bundle("pcb-register")
    done = cli("register", str(trained_bundle), "--tracking-uri", mlflow_server.url)  # its own line by default
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"  # the bare version number on stdout
    assert "registered" in done.stderr and "gates pass" in done.stderr

    client = _mlflow_client(mlflow_server)
    mv = client.get_model_version("pcb-register", "1")
    manifest_bytes = (trained_bundle / MANIFEST_NAME).read_bytes()
    manifest = json.loads(manifest_bytes)
    tags = mv.tags
    assert tags["ota.manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert tags["ota.schema"] == "3"
    assert tags["ota.release"] == str(manifest["release"])
    assert tags["ota.format"] == "torchscript"
    assert tags["ota.signed"] == "false"
    assert tags["ota.variants"] == "cpu-fp32"
    assert tags["ota.gates"] == "pass"
    assert tags["ota.gate.raw_parity"] == "pass"
    assert tags["ota.gate.cpu-fp32.detection_parity"] == "pass"
    assert float(tags["ota.gate.cpu-fp32.raw_parity.mse"]) <= 1e-5
    assert tags["ota.fp.torch"] == torch.__version__
    assert tags["ota.fp.python"] == manifest["fingerprint"]["python"]
    assert "Gates of pcb-register" in mv.description and "cpu-fp32" in mv.description
    # MLflow renders a version's description as Markdown: tables in Markdown, not box-drawn text.
    assert "| variant | raw vs |" in mv.description and "┃" not in mv.description and "```" not in mv.description

    # The source is the run's bundle/ artifact folder behind MLflow's artifact proxy, holding every file.
    assert mv.source.startswith("mlflow-artifacts:/") and mv.source.endswith(f"/{mv.run_id}/artifacts/bundle")
    listed = {a.path for a in client.list_artifacts(mv.run_id, "bundle")}
    assert {"bundle/manifest.json", "bundle/golden.npz", "bundle/variants"} <= listed
    run = client.get_run(mv.run_id)
    assert run.data.params["fp.torch"] == torch.__version__
    assert run.data.metrics["gate.cpu-fp32.raw_mse"] <= 1e-5
    assert run.data.metrics["gate.cpu-fp32.det_reference_detections"] > 0
    assert run.info.status == "FINISHED"

    again = cli("register", str(trained_bundle), "--name", "pcb-register", "--tracking-uri", mlflow_server.url)
    assert "already version 1 of pcb-register" in _one_line_error(again)
    assert len(client.search_model_versions("name = 'pcb-register'")) == 1


def test_a_bundle_is_registered_under_its_own_product_line_only(mlflow_server: RunningServer, line_bundle, cli) -> None:
    """The product line is signed into the manifest: a bundle of one line cannot become another line's version."""
    bundle = line_bundle("pcb-line-a")
    done = cli("register", str(bundle), "--name", "pcb-line-b", "--tracking-uri", mlflow_server.url)
    assert "exported for product line 'pcb-line-a'" in _one_line_error(done)
    response = httpx.get(
        f"{mlflow_server.url}/api/2.0/mlflow/model-versions/search", params={"filter": "name='pcb-line-b'"}, timeout=10
    )
    assert response.status_code == 200 and not response.json().get("model_versions"), response.text


def test_a_lines_releases_only_grow(mlflow_server: RunningServer, line_bundle, cli, tmp_path: Path) -> None:
    """A version is never an older release than one registered before it (``--release`` set by hand, an old bundle
    registered again): a device would refuse it as a downgrade anyway."""
    bundle = line_bundle("pcb-releases")
    assert cli("register", str(bundle), "--tracking-uri", mlflow_server.url).returncode == 0
    older = tmp_path / "older"
    shutil.copytree(bundle, older)
    release = read_manifest(bundle).release
    assert release is not None
    set_release(older, release - 1)
    done = cli("register", str(older), "--tracking-uri", mlflow_server.url)
    assert f"older than release {release} (version 1 of pcb-releases)" in _one_line_error(done)
    set_release(older, release)  # the same release again (another export of it) is no downgrade
    set_latency_budget(older, 9_000)  # a distinct manifest: the registry refuses duplicates
    assert cli("register", str(older), "--tracking-uri", mlflow_server.url).returncode == 0


def test_tampered_bundle_is_refused_at_register(mlflow_server: RunningServer, bundle_copy: Path, cli) -> None:
    with (bundle_copy / "golden.npz").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    done = cli("register", str(bundle_copy), "--name", "pcb-tampered", "--tracking-uri", mlflow_server.url)
    assert "golden.npz has sha256" in _one_line_error(done)
    response = httpx.get(
        f"{mlflow_server.url}/api/2.0/mlflow/registered-models/get", params={"name": "pcb-tampered"}, timeout=10
    )
    assert response.status_code == 404  # nothing was created


def test_failed_gates_are_not_promoted_unless_forced(mlflow_server: RunningServer, failed_bundle: Path, cli) -> None:
    url = mlflow_server.url
    registered = cli("register", str(failed_bundle), "--name", "pcb-failed", "--tracking-uri", url)
    assert registered.returncode == 0, registered.stderr
    assert "gates fail" in registered.stderr

    refused = cli("promote", "pcb-failed", "1", "--tracking-uri", url)
    assert "ota.gates=fail; not promoted" in _one_line_error(refused)
    client = _mlflow_client(mlflow_server)
    assert client.get_registered_model("pcb-failed").aliases == {}

    forced = cli("promote", "pcb-failed", "1", "--force", "--tracking-uri", url)
    assert forced.returncode == 0, forced.stderr
    assert "forced" in forced.stdout
    assert client.get_registered_model("pcb-failed").aliases == {"production": "1"}
    assert "despite gates" in client.get_model_version("pcb-failed", "1").tags["ota.forced"]

    listing = cli("versions", "pcb-failed", "--tracking-uri", url)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.strip().startswith("│ 1"))
    assert "production" in row and "fail" in row and "cpu-fp32" in row and "alias production" in row


def test_promote_and_an_alias_set_like_the_ui_are_the_same(
    mlflow_server: RunningServer, line_bundle, failed_bundle: Path, tmp_path: Path
) -> None:
    gateway = MlflowGateway(mlflow_server.url)
    trained_bundle = line_bundle("pcb-alias")
    failed_copy = tmp_path / "failed"
    shutil.copytree(failed_bundle, failed_copy)
    set_product_line(failed_copy, "pcb-alias")
    first = gateway.register_bundle(trained_bundle, "pcb-alias").version.version
    second = gateway.register_bundle(failed_copy, "pcb-alias").version.version
    assert gateway.promote("pcb-alias", first).aliases == ("production",)
    with pytest.raises(PromotionRefusedError):
        gateway.promote("pcb-alias", second)
    # The MLflow UI moves an alias through its ajax endpoint; the registry sees exactly the same state.
    response = httpx.post(
        f"{mlflow_server.url}/ajax-api/2.0/mlflow/registered-models/alias",
        json={"name": "pcb-alias", "alias": "production", "version": second},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert gateway.get_version_by_alias("pcb-alias", "production").version == second
    assert [v.aliases for v in gateway.list_versions("pcb-alias")] == [("production",), ()]
    with pytest.raises(DuplicateBundleError) as raised:
        gateway.register_bundle(trained_bundle, "pcb-alias")
    assert raised.value.version == first


def test_unreachable_mlflow_is_one_error_line(trained_bundle: Path, cli, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (
        ("register", str(trained_bundle), "--tracking-uri", dead),
        ("versions", "x", "--tracking-uri", dead),
        ("promote", "x", "1", "--tracking-uri", dead),
    ):
        line = _one_line_error(cli(*args))
        assert f"MLflow at {dead} is unreachable (connection refused)" in line
    with pytest.raises(RegistryUnavailableError) as raised:
        MlflowGateway(dead, max_retries=0).list_versions("x")
    assert raised.value.retryable


def test_a_tracking_uri_is_required(trained_bundle: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("YOLO_OTA_MLFLOW_URI", raising=False)
    line = _one_line_error(cli("versions", "x"))
    assert "no MLflow tracking URI" in line and "MLFLOW_TRACKING_URI" in line


def test_gate_tables_in_markdown(trained_bundle: Path, failed_bundle: Path) -> None:
    from exporters.bundle import load_verified
    from exporters.report import gate_markdown

    text = gate_markdown(load_verified(trained_bundle).gates.values(), title="Gates of pcb-parts")
    lines = text.splitlines()
    parity = lines.index("#### Gates of pcb-parts: parity")
    header, rule, row = lines[parity + 2 : parity + 5]
    assert header.startswith("| variant | raw vs | raw MSE |") and header.endswith("| result |")
    assert rule.startswith("| :--- | ---: |") and header.count("|") == rule.count("|") == row.count("|")
    assert row.startswith("| cpu-fp32 | eager ") and row.endswith("| pass |")
    assert "#### Gates of pcb-parts: latency" in lines and "[green]" not in text
    failed = gate_markdown(load_verified(failed_bundle).gates.values())
    assert "**FAIL** (" in failed and "latency" in failed


def test_unknown_model_and_version(mlflow_server: RunningServer, cli) -> None:
    assert "not found" in _one_line_error(cli("versions", "no-such-model", "--tracking-uri", mlflow_server.url))
    assert "version 99 of" in _one_line_error(cli("promote", "pcb-register", "99", "--tracking-uri", mlflow_server.url))


def test_no_stray_local_mlflow_store(mlflow_server: RunningServer, trained_bundle: Path, tmp_path: Path) -> None:
    """Talking to the registry leaves no ./mlflow.db or ./mlruns in the working directory."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "yolo-ota"
    done = subprocess.run(
        [str(exe), "versions", "pcb-register", "--tracking-uri", mlflow_server.url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")},
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
