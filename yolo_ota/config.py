"""One way to read settings for every command: flags, then ``YOLO_OTA_*`` variables, then one TOML file.

The file is the first of: the ``--config PATH`` of the command, the file a ``*_CONFIG`` variable names
(``YOLO_OTA_CONFIG``; the agent looks at ``YOLO_OTA_AGENT_CONFIG`` first), ``./yolo-ota.toml``, and
``config.toml`` in the user's config folder (``click.get_app_dir("yolo-ota")``). Each command family reads its own
table of it (``[export]``, ``[gate]``, ``[keys]``, ``[registry]``, ``[rollout]``, ``[server]``, ``[agent]``); the
service and the agent also read keys at the top of the file, the layout their files had before tables.
docs/configuration.md describes the layout.

A settings class of a family derives from ``LayeredSettings`` and is built once, by the command (``build``),
never at import time. This module imports only the standard library, click and pydantic-settings, so the agent
and the rollout service can use it without pulling in anything heavy.

Errors: ``ConfigError`` (not retryable: the file or the path must be fixed); a settings module may ask for its
own error class instead (``read_config(error=...)``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource

from yolo_ota.errors import ConfigError

CONFIG_FILE_ENV = "YOLO_OTA_CONFIG"
LOCAL_FILE = "yolo-ota.toml"
USER_FILE = "config.toml"
MLFLOW_URI_FALLBACK_ENV = "MLFLOW_TRACKING_URI"
FAMILIES = ("export", "gate", "keys", "registry", "rollout", "server", "agent")

Settings = TypeVar("Settings", bound="LayeredSettings")


def user_config_file() -> Path:
    """``config.toml`` in the user's config folder (``~/.config/yolo-ota`` on Linux)."""
    import click

    return Path(click.get_app_dir("yolo-ota")) / USER_FILE


@dataclass(frozen=True)
class ConfigFile:
    """The config file a command reads (``path`` None: none was named or found) and its parsed contents."""

    path: Path | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    named_by: str = ""  # "--config", a variable's name, or "" when found in its usual place

    def section(self, family: str, *, top_level: bool = False) -> dict[str, Any]:
        """The ``[family]`` table; with ``top_level``, over the plain keys at the top of the file."""
        values: dict[str, Any] = {}
        if top_level:
            values = {k: v for k, v in self.data.items() if not (k in FAMILIES and isinstance(v, dict))}
        table = self.data.get(family)
        if isinstance(table, dict):
            values.update(table)
        return values

    def where(self, family: str, key: str) -> str:
        """Where ``key`` of ``family`` comes from in this file, for ``config show`` (which names the file above)."""
        table = self.data.get(family)
        inside = isinstance(table, dict) and key in table
        return f"file [{family}]" if inside else "file (top level)"


def find_config(explicit: Path | None = None, env_names: tuple[str, ...] = (CONFIG_FILE_ENV,)) -> tuple[Path, str]:
    """The path of the config file to read and what named it; the path may not exist (checked by the reader)."""
    if explicit is not None:
        return explicit, "--config"
    for name in env_names:
        if os.environ.get(name):
            return Path(os.environ[name]), name
    local = Path(LOCAL_FILE)
    return (local if local.is_file() else user_config_file()), ""


def read_config(
    explicit: Path | None = None,
    *,
    env_names: tuple[str, ...] = (CONFIG_FILE_ENV,),
    error: type[Exception] = ConfigError,
) -> ConfigFile:
    """Find and parse the config file; a file that was named but is absent or broken raises ``error``."""
    path, named_by = find_config(explicit, env_names)
    if not path.is_file():
        if named_by:
            raise error(f"{named_by} {path}: no such file")
        return ConfigFile()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise error(f"config file {path}: {exc}") from None
    return ConfigFile(path=path, data=data, named_by=named_by)


# The file a command chose, handed to the file source while that command builds its settings (see ``build``).
_chosen: ContextVar[ConfigFile | None] = ContextVar("yolo_ota_config_file", default=None)


class ConfigFileSource(PydanticBaseSettingsSource):
    """The settings class's table of the config file: the one ``build`` was given, else the one found."""

    def __init__(self, settings_cls: type[LayeredSettings]) -> None:
        super().__init__(settings_cls)
        config = _chosen.get()
        if config is None:
            config = read_config(env_names=settings_cls.config_env_names)
        self.values = config.section(settings_cls.config_family, top_level=settings_cls.config_top_level)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k in self.settings_cls.model_fields}


class MlflowUriFallback(PydanticBaseSettingsSource):
    """``MLFLOW_TRACKING_URI``, the variable MLflow users already have, as the last word on ``mlflow_uri``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return os.environ.get(MLFLOW_URI_FALLBACK_ENV) or None, field_name, False

    def __call__(self) -> dict[str, Any]:
        value = os.environ.get(MLFLOW_URI_FALLBACK_ENV)
        return {"mlflow_uri": value} if value and "mlflow_uri" in self.settings_cls.model_fields else {}


class LayeredSettings(BaseSettings):
    """Settings of one command family: init values (the flags), the environment, the file, then defaults."""

    config_family: ClassVar[str] = ""
    config_env_names: ClassVar[tuple[str, ...]] = (CONFIG_FILE_ENV,)
    config_top_level: ClassVar[bool] = False  # also read plain keys at the top of the file (older layout)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, ConfigFileSource(cls), MlflowUriFallback(settings_cls)

    @classmethod
    def env_name(cls, field_name: str) -> str:
        """The environment variable of a field."""
        return f"{cls.model_config.get('env_prefix', '')}{field_name}".upper()


@contextmanager
def _using(config: ConfigFile) -> Iterator[None]:
    token = _chosen.set(config)
    try:
        yield
    finally:
        _chosen.reset(token)


def build(settings_cls: type[Settings], config: ConfigFile, flags: Mapping[str, Any] | None = None) -> Settings:
    """``settings_cls`` from ``flags`` (None means not given), the environment, and ``config``'s table.

    Validation errors are pydantic's ``ValidationError``; each settings module words them for its users.
    """
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    with _using(config):
        return settings_cls(**given)


def environment_values(settings_cls: type[LayeredSettings]) -> dict[str, Any]:
    """The values the environment gives ``settings_cls`` (decoded as pydantic-settings decodes them)."""
    return EnvSettingsSource(settings_cls)()
