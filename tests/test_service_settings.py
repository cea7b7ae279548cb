"""Settings of the rollout service: no default secret outside dev mode; flags over environment over file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from registry.rollout_service.errors import ServiceSettingsError
from registry.rollout_service.settings import DEV_OPERATOR_TOKEN, load_settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("YOLO_OTA_"):
            monkeypatch.delenv(key)


def test_no_default_secrets_outside_dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ServiceSettingsError, match="no YOLO_OTA_OPERATOR_TOKENS set"):
        load_settings()
    monkeypatch.setenv("YOLO_OTA_OPERATOR_TOKENS", "a=" + "1" * 16)
    monkeypatch.setenv("YOLO_OTA_PUBLIC_URL", "http://svc:8700")
    with pytest.raises(ServiceSettingsError, match="YOLO_OTA_WEBHOOK_SECRET"):
        load_settings()
    monkeypatch.setenv("YOLO_OTA_WEBHOOK_SECRET", "s")
    assert [(e.name, e.token) for e in load_settings().operator_seeds] == [("a", "1" * 16)]


def test_dev_mode_uses_well_known_tokens_only_where_none_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(dev_mode=True)
    assert [e.token for e in settings.operator_seeds] == [DEV_OPERATOR_TOKEN]
    assert settings.webhook_key is not None
    monkeypatch.setenv("YOLO_OTA_OPERATOR_TOKENS", "mine-is-long-enough")
    assert [e.token for e in load_settings(dev_mode=True).operator_seeds] == ["mine-is-long-enough"]


def test_flags_over_environment_over_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "service.toml"
    config.write_text(
        'operator_tokens = "from-the-config-file"\nport = 9001\nscheduler_interval_s = 2.5\n'
        "default_waves = [{percent = 20, bake_s = 60}, {percent = 100}]\n"
    )
    monkeypatch.setenv("YOLO_OTA_CONFIG", str(config))
    settings = load_settings()
    assert (settings.port, settings.scheduler_interval_s) == (9001, 2.5)
    assert [e.token for e in settings.operator_seeds] == ["from-the-config-file"]
    assert [w.percent for w in settings.default_waves] == [20, 100]
    monkeypatch.setenv("YOLO_OTA_PORT", "9002")
    assert load_settings().port == 9002
    assert load_settings(port=9003).port == 9003
    assert load_settings().database.startswith("sqlite:///")


def test_invalid_settings_are_one_readable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YOLO_OTA_DEV_MODE", "true")
    monkeypatch.setenv("YOLO_OTA_DEFAULT_WAVES", '[{"percent": 50}, {"percent": 30}]')
    with pytest.raises(ServiceSettingsError, match=r"default_waves: .*increase strictly"):
        load_settings()
    monkeypatch.delenv("YOLO_OTA_DEFAULT_WAVES")
    monkeypatch.setenv("YOLO_OTA_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ServiceSettingsError, match="no such file"):
        load_settings()


def test_server_command_refuses_to_start_without_secrets(cli, tmp_path: Path) -> None:
    done = cli("server", "--data-dir", str(tmp_path), "--port", "1")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "YOLO_OTA_OPERATOR_TOKENS" in lines[0]


def test_migrations_build_exactly_the_tables_the_code_declares(tmp_path: Path) -> None:
    """Alembic's head revision and the ORM models agree: autogenerate finds nothing to change."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from registry.rollout_service.db import Base, make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'schema.db'}")
    migrate(engine)
    migrate(engine)  # a second start finds the schema current
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []


@pytest.mark.parametrize(
    ("entries", "said"),
    [
        ("Zm9vYmFyYmF6cXV4cXV1eA==", "the token is 1 characters"),  # bare padded base64: split at its first '='
        ("ops=short", "the token is 5 characters"),
        ("ops:root=" + "x" * 20, "scope 'root' is not one of read, operate, admin"),
        ("a=" + "x" * 20 + ",a=" + "y" * 20, "two entries have the same name a"),
        ("a=" + "x" * 20 + ",b=" + "x" * 20, "two entries have the same token"),
    ],
    ids=["padded base64", "short", "unknown scope", "same name", "same token"],
)
def test_an_operator_token_that_cannot_be_read_one_way_is_refused_at_start(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: str, said: str
) -> None:
    monkeypatch.setenv("YOLO_OTA_OPERATOR_TOKENS", entries)
    with pytest.raises(ServiceSettingsError, match=re.escape(said)):
        load_settings()
    done = cli("server", "--data-dir", str(tmp_path), "--port", "1")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and said in lines[0], done.stderr
    assert "x" * 20 not in lines[0] and "Zm9vYmFy" not in lines[0]  # the error shows no token


def test_secrets_can_come_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "operator-tokens"
    secret.write_text("ops:operate=" + "s" * 24 + "\n")
    monkeypatch.setenv("YOLO_OTA_OPERATOR_TOKENS_FILE", str(secret))
    (seed,) = load_settings().operator_seeds
    assert (seed.name, seed.scope, seed.token) == ("ops", "operate", "s" * 24)
    monkeypatch.setenv("YOLO_OTA_OPERATOR_TOKENS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ServiceSettingsError, match="operator_tokens_file: cannot read"):
        load_settings()


def test_a_token_the_setting_no_longer_lists_stops_working_after_a_restart(tmp_path: Path) -> None:
    from registry.rollout_service.errors import NotAuthenticatedError
    from registry.rollout_service.service import build_service
    from registry.rollout_service.settings import ServiceSettings
    from registry.rollout_service.token_entries import Scope

    kept, dropped = "k" * 24, "d" * 24
    first = build_service(ServiceSettings(data_dir=tmp_path, operator_tokens=f"kept={kept},dropped:read={dropped}"))
    assert first.operators.authenticate(dropped).scope == Scope.read
    made = first.operators.create("made-by-api", Scope.operate, actor="operator:kept")
    first.engine.dispose()

    restarted = build_service(ServiceSettings(data_dir=tmp_path, operator_tokens=f"kept={kept}"))
    try:
        assert restarted.operators.authenticate(kept).name == "kept"
        with pytest.raises(NotAuthenticatedError, match="revoked"):
            restarted.operators.authenticate(dropped)
        assert restarted.operators.authenticate(made).name == "made-by-api"  # the setting touches no API token
    finally:
        restarted.engine.dispose()
