"""Every command family reads a setting from its flag, then its YOLO_OTA_* variable, then the config file.

The file is ``--config``, else the file a variable names, else ./yolo-ota.toml, else config.toml in the user's
config folder. The MLflow URI falls back to MLFLOW_TRACKING_URI. Checked in-process through the builder every
command uses, and through the real console command where a command shows its choice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import AgentSettingsError
from edge_agent.settings import AgentSettings
from edge_agent.settings import load_settings as load_agent_settings
from registry.rollout_service.settings import ServiceSettings
from registry.rollout_service.settings import load_settings as load_service_settings
from yolo_ota.config import LayeredSettings, build, read_config
from yolo_ota.errors import ConfigError
from yolo_ota.processes import RunningServer, free_port
from yolo_ota.settings import ExportSettings, GateSettings, KeysSettings, RegistrySettings, RolloutSettings


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No setting from this machine: empty working folder, empty user config folder, no YOLO_OTA_/MLflow URI."""
    for key in list(os.environ):
        if key.startswith(("YOLO_OTA_", "MLFLOW_TRACKING_")):
            monkeypatch.delenv(key)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "user-config"))
    return work


AGENT_REQUIRED = {"device_id": "cam-1", "data_dir": "/tmp/agent"}

# family class, field, (file value, env value, flag value), what else the family needs
FAMILIES: list[tuple[type[LayeredSettings], str, tuple[Any, str, Any], dict[str, Any]]] = [
    (ExportSettings, "batch", (2, "3", 4), {}),
    (GateSettings, "device", ("cpu", "cuda", "auto"), {}),
    (KeysSettings, "directory", ("/keys/file", "/keys/env", Path("/keys/flag")), {}),
    (RegistrySettings, "mlflow_uri", ("http://file:5000", "http://env:5000", "http://flag:5000"), {}),
    (RolloutSettings, "server", ("http://file:8700", "http://env:8700", "http://flag:8700"), {}),
    (ServiceSettings, "port", (9001, "9002", 9003), {"dev_mode": True}),
    (AgentSettings, "server", ("http://file:8700", "http://env:8700", "http://flag:8700"), AGENT_REQUIRED),
]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, int) else f'"{value}"'


@pytest.mark.parametrize(
    ("settings_cls", "name", "values", "needs"), FAMILIES, ids=lambda v: getattr(v, "__name__", "")
)
def test_flag_over_environment_over_file(
    settings_cls: type[LayeredSettings],
    name: str,
    values: tuple[Any, str, Any],
    needs: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    in_file, in_env, in_flag = values
    path = tmp_path / "settings.toml"
    table = "\n".join(f"{key} = {_toml(value)}" for key, value in {name: in_file, **needs}.items())
    path.write_text(f"[{settings_cls.config_family}]\n{table}\n")
    config = read_config(path)

    def value(**flags: Any) -> Any:
        return str(getattr(build(settings_cls, config, flags), name))

    assert value() == str(in_file)
    monkeypatch.setenv(settings_cls.env_name(name), in_env)
    assert value() == str(in_env).rstrip("/")
    assert value(**{name: in_flag}) == str(in_flag)
    assert value(**{name: None}) == str(in_env)  # a flag not given is no flag


def test_the_file_is_found_in_its_usual_places(isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user-config" / "yolo-ota" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('[rollout]\nserver = "http://user:8700"\n')
    assert build(RolloutSettings, read_config()).server == "http://user:8700"
    (isolated / "yolo-ota.toml").write_text('[rollout]\nserver = "http://local:8700"\n')
    assert build(RolloutSettings, read_config()).server == "http://local:8700"
    named = tmp_path / "named.toml"
    named.write_text('[rollout]\nserver = "http://named:8700"\n')
    monkeypatch.setenv("YOLO_OTA_CONFIG", str(named))
    assert build(RolloutSettings, read_config()).server == "http://named:8700"
    assert RolloutSettings().server == "http://named:8700"  # built directly, the same file
    with pytest.raises(ConfigError, match="no such file"):
        read_config(tmp_path / "absent.toml")


def test_server_and_agent_files_of_the_older_layout_still_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain keys at the top of the file, as before tables; a table's key wins over a top-level one."""
    service = tmp_path / "service.toml"
    service.write_text("port = 9001\ndev_mode = true\n[server]\nscheduler_interval_s = 2.5\n")
    settings = load_service_settings(service)
    assert (settings.port, settings.scheduler_interval_s) == (9001, 2.5)
    agent = tmp_path / "agent.toml"
    agent.write_text('server = "http://top:8700"\ndevice_id = "cam-1"\ndata_dir = "/tmp/a"\nlabels = {line = "3"}\n')
    monkeypatch.setenv("YOLO_OTA_AGENT_CONFIG", str(agent))
    monkeypatch.setenv("YOLO_OTA_CONFIG", str(service))  # the agent's own variable comes first
    loaded = load_agent_settings()
    assert (loaded.server, loaded.labels) == ("http://top:8700", {"line": "3"})
    agent.write_text(agent.read_text() + '[agent]\nserver = "http://table:8700"\n')
    assert load_agent_settings().server == "http://table:8700"
    assert load_agent_settings(agent, server="http://flag:8700").server == "http://flag:8700"
    with pytest.raises(AgentSettingsError, match="no such file"):
        load_agent_settings(tmp_path / "absent.toml")


def test_mlflow_uri_falls_back_to_mlflow_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://fallback:5000")
    assert build(RegistrySettings, read_config()).mlflow_uri == "http://fallback:5000"
    assert load_service_settings(dev_mode=True).mlflow_uri == "http://fallback:5000"
    path = tmp_path / "c.toml"
    path.write_text('[registry]\nmlflow_uri = "http://file:5000"\n')
    assert build(RegistrySettings, read_config(path)).mlflow_uri == "http://file:5000"


def _error_line(done) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    return lines[0]


def test_rollout_command_calls_the_server_that_wins(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_file, by_env, by_flag = (f"http://127.0.0.1:{free_port()}" for _ in range(3))
    path = tmp_path / "c.toml"
    path.write_text(f'[rollout]\nserver = "{by_file}"\ntoken = "t"\n')
    assert by_file in _error_line(cli("rollout", "list", "--config", str(path)))
    monkeypatch.setenv("YOLO_OTA_SERVER", by_env)
    assert by_env in _error_line(cli("rollout", "list", "--config", str(path)))
    assert by_flag in _error_line(cli("rollout", "list", "--config", str(path), "--server", by_flag))


def test_registry_command_uses_the_uri_that_wins(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_fallback, by_file, by_env, by_flag = (f"http://127.0.0.1:{free_port()}" for _ in range(4))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", by_fallback)
    assert f"MLflow at {by_fallback} is unreachable" in _error_line(cli("versions", "x"))
    path = tmp_path / "c.toml"
    path.write_text(f'[registry]\nmlflow_uri = "{by_file}"\n')
    monkeypatch.setenv("YOLO_OTA_CONFIG", str(path))
    assert f"MLflow at {by_file} is unreachable" in _error_line(cli("promote", "x", "1"))
    monkeypatch.setenv("YOLO_OTA_MLFLOW_URI", by_env)
    assert f"MLflow at {by_env} is unreachable" in _error_line(cli("versions", "x"))
    assert f"MLflow at {by_flag} is unreachable" in _error_line(cli("versions", "x", "--mlflow-uri", by_flag))


def test_promote_and_versions_reach_mlflow_tracking_uri(
    cli, mlflow_server: RunningServer, line_bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry.mlflow_gateway import MlflowGateway

    bundle = line_bundle("pcb-fallback")
    version = MlflowGateway(mlflow_server.url).register_bundle(bundle, "pcb-fallback").version.version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    promoted = cli("promote", "pcb-fallback", version)
    assert promoted.returncode == 0, promoted.stderr
    assert "no MLflow tracking URI" not in promoted.stderr
    assert f"alias production -> version {version}" in promoted.stdout
    listed = cli("versions", "pcb-fallback")
    assert listed.returncode == 0, listed.stderr
    assert "production" in listed.stdout


def test_config_show_names_each_source_and_masks_secrets(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 9001\nwebhook_secret = "file-secret"\n[agent]\nenrollment_token = "enroll-me"\n')
    monkeypatch.setenv("YOLO_OTA_OPERATOR_TOKENS", "ops=op-secret-of-enough-length")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-secret")
    monkeypatch.setenv("YOLO_OTA_MLFLOW_URI", "http://user:uri-secret@mlflow:5000")
    done = cli("config", "show", "--for", "server", "--for", "agent", "--config", str(path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for secret in ("file-secret", "enroll-me", "op-secret", "mlflow-secret", "uri-secret"):
        assert secret not in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 4}
    assert f"[server] config file {path} (named by --config)" in out
    assert "9001" in rows["port"] and "file [server]" in rows["port"]
    assert "env YOLO_OTA_OPERATOR_TOKENS" in rows["operator_tokens"] and "********" in rows["operator_tokens"]
    assert "http://user:********@mlflow:5000" in rows["mlflow_uri"]
    assert "default" in rows["host"] and "127.0.0.1" in rows["host"]
    assert "required, not set" in rows["device_id"]
    assert "MLFLOW_TRACKING_PASSWORD" in rows
