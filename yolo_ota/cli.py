"""The ``yolo-ota`` command.

Each sub-command imports what it needs when it runs, so ``yolo-ota --help`` is quick and a device without
Ultralytics can still use the commands that do not export. Errors of the project's own kinds are printed as one
line on stderr with exit status 2; a failed gate exits with status 1.

Every command reads its settings from flags, then ``YOLO_OTA_*`` variables, then one config file
(``yolo_ota.config``, docs/configuration.md). The commands live in ``yolo_ota.commands``, one module per family.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from yolo_ota.access_cli import devices_app, enrollment_app, tokens_app
from yolo_ota.commands import bundle, demo, registry, server
from yolo_ota.commands.common import fail
from yolo_ota.commands.config import config_app
from yolo_ota.extras import missing_extra_message
from yolo_ota.revoke_cli import revoke
from yolo_ota.rollout_cli import rollout_app

app = typer.Typer(
    name="yolo-ota",
    help="Model registry and over-the-air deployment for YOLO detectors on factory GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (
    bundle.export,
    bundle.gate,
    bundle.inspect,
    registry.register,
    registry.versions,
    registry.promote,
    server.server,
    server.agent,
    demo.demo,
    revoke,
):
    app.command()(command)
app.add_typer(bundle.keys_app, name="keys")
app.add_typer(rollout_app, name="rollout")
app.add_typer(config_app, name="config")
app.add_typer(devices_app, name="devices")
app.add_typer(tokens_app, name="tokens")
app.add_typer(enrollment_app, name="enrollment-tokens")


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Ultralytics reads these when first imported; nothing here may reach the network.
    os.environ.setdefault("YOLO_OFFLINE", "true")


def main() -> None:
    """Console entry point. A command run without the extra it needs says which extra to install."""
    try:
        app()
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        raise SystemExit(fail(message).exit_code) from None


if __name__ == "__main__":
    main()
