"""``yolo-ota config show``: each effective setting of each command family and where it came from."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from yolo_ota.commands.common import ConfigPath, console, fail, settings_error

if TYPE_CHECKING:
    from yolo_ota.errors import ConfigError
from yolo_ota.config import ConfigFile, LayeredSettings

config_app = typer.Typer(help="Show the settings every command reads (flags, YOLO_OTA_* variables, file).")


class Family(StrEnum):
    export = "export"
    gate = "gate"
    keys = "keys"
    registry = "registry"
    rollout = "rollout"
    server = "server"
    agent = "agent"


def settings_class(family: Family) -> type[LayeredSettings]:
    """The settings class of a command family (the server's and agent's are imported only when asked for)."""
    if family is Family.server:
        from registry.rollout_service.settings import ServiceSettings

        return ServiceSettings
    if family is Family.agent:
        from edge_agent.settings import AgentSettings

        return AgentSettings
    from yolo_ota import settings

    classes: dict[Family, type[LayeredSettings]] = {
        Family.export: settings.ExportSettings,
        Family.gate: settings.GateSettings,
        Family.keys: settings.KeysSettings,
        Family.registry: settings.RegistrySettings,
        Family.rollout: settings.RolloutSettings,
    }
    return classes[family]


def _file_line(config: ConfigFile) -> str:
    from yolo_ota.config import LOCAL_FILE, user_config_file

    if config.path is None:
        return f"no config file (none named; no ./{LOCAL_FILE}, no {user_config_file()})"
    return f"config file {config.path}" + (f" (named by {config.named_by})" if config.named_by else "")


def _problem(settings_cls: type[LayeredSettings], config: ConfigFile) -> str | None:
    """Why these settings would not load as they stand, if they would not."""
    from pydantic import ValidationError

    from yolo_ota.config import build

    try:
        build(settings_cls, config)
    except ValidationError as exc:
        return settings_error(settings_cls, exc)
    return None


def _show_family(family: Family, config_path: Path | None) -> None:
    from yolo_ota.config import read_config
    from yolo_ota.config_report import mlflow_variables, origins

    settings_cls = settings_class(family)
    try:
        config = read_config(config_path, env_names=settings_cls.config_env_names)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    rows = origins(settings_cls, config)
    if family in (Family.registry, Family.server):
        rows += mlflow_variables()
    console.print(Text(f"[{family.value}] {_file_line(config)}", style="bold"), soft_wrap=True)
    table = Table()
    for column in ("setting", "value", "from"):
        table.add_column(column)
    for row in rows:
        table.add_row(Text(row.name), Text(row.value), Text(row.source))
    console.print(table)
    problem = _problem(settings_cls, config)
    if problem:
        console.print(Text(f"  {family.value} would not start as it stands: {problem}"), soft_wrap=True)


@config_app.command("show")
def show(
    family: Annotated[
        list[Family] | None,
        typer.Option("--for", help="Only this command family (repeatable; default: all of them).", show_default=False),
    ] = None,
    config: ConfigPath = None,
) -> None:
    """Print each effective setting with where it came from (env, file, default); secrets are masked."""
    for chosen in family or list(Family):
        _show_family(chosen, config)
