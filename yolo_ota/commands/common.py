"""What every command shares: the consoles, the one-line error, progress lines, and building settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from yolo_ota.config import LayeredSettings, build, read_config
from yolo_ota.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import ValidationError
    from rich.table import Table

# Piped output (CI logs, files) gets room for the gate tables instead of rich's 80-column default.
console = Console(highlight=False, width=None if os.isatty(1) else 120)
err_console = Console(stderr=True, highlight=False, width=None if os.isatty(2) else 120)

EXIT_GATE_FAILED = 1
EXIT_USAGE = 2

Settings = TypeVar("Settings", bound=LayeredSettings)

ConfigPath = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML settings file, below flags and YOLO_OTA_* variables (else YOLO_OTA_CONFIG, ./yolo-ota.toml, "
        "or config.toml in the user's config folder; see docs/configuration.md).",
        show_default=False,
    ),
]


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; raise the returned exit (status 2)."""
    # One unwrapped line, and the message printed as text: paths and shapes may contain rich markup brackets.
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    return typer.Exit(EXIT_USAGE)


def print_tables(tables: list[Table]) -> None:
    for table in tables:
        console.print(table)


def progress(message: str) -> None:
    err_console.print(Text.assemble(("• ", "dim"), message), soft_wrap=True)


def load(settings_cls: type[Settings], config_path: Path | None, **flags: Any) -> Settings:
    """``settings_cls`` from the command's flags (None: not given), the environment and the config file."""
    from pydantic import ValidationError

    try:
        return build(settings_cls, read_config(config_path), flags)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except ValidationError as exc:
        raise fail(settings_error(settings_cls, exc)) from None


def settings_error(settings_cls: type[LayeredSettings], exc: ValidationError) -> str:
    """The first validation error, naming the flag, the variable and the file key that could have set it."""
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else "settings"
    message = str(first["msg"]).removeprefix("Value error, ")
    if name not in settings_cls.model_fields:
        return message
    where = f"--{name.replace('_', '-')}, {settings_cls.env_name(name)} or [{settings_cls.config_family}] {name}"
    return f"{name} ({where}): {message}"
