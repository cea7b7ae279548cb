"""``yolo-ota server`` (the rollout service) and ``yolo-ota agent`` (the edge agent): the two long-running commands.

Settings: ``[server]`` with ``YOLO_OTA_*`` (``registry.rollout_service.settings``) and ``[agent]`` with
``YOLO_OTA_AGENT_*`` (``edge_agent.settings``); both also read plain keys at the top of the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from yolo_ota.commands.common import ConfigPath, err_console, fail

if TYPE_CHECKING:
    from edge_agent import Agent, AgentSettings


def server(
    host: Annotated[str | None, typer.Option(help="Address to listen on (YOLO_OTA_HOST; default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (YOLO_OTA_PORT; default 8700).")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (YOLO_OTA_DATABASE_URL; default SQLite in the data dir).")
    ] = None,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            "--mlflow-uri", "--tracking-uri", help="MLflow tracking server (YOLO_OTA_MLFLOW_URI, MLFLOW_TRACKING_URI)."
        ),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the embedded SQLite database lives.")] = None,
    config: ConfigPath = None,
    dev: Annotated[bool, typer.Option("--dev", help="Dev mode: accept well-known tokens when none are set.")] = False,
) -> None:
    """Run the rollout service (REST API, wave scheduler, MLflow alias watcher) under uvicorn."""
    import uvicorn

    from registry.rollout_service.app import create_app
    from registry.rollout_service.errors import RolloutServiceError
    from registry.rollout_service.settings import load_settings

    try:
        settings = load_settings(
            config,
            host=host,
            port=port,
            database_url=database_url,
            mlflow_uri=mlflow_uri,
            data_dir=data_dir,
            dev_mode=True if dev else None,
        )
        application = create_app(settings)
    except RolloutServiceError as exc:
        raise fail(str(exc)) from None
    logging.getLogger("registry").setLevel(logging.INFO)
    err_console.print(f"rollout service on http://{settings.host}:{settings.port} (OpenAPI at /docs)")
    uvicorn.run(application, host=settings.host, port=settings.port, log_level="warning", access_log=False)


def _labels(label: list[str] | None) -> dict[str, str] | None:
    if not label:
        return None
    pairs = [item.partition("=") for item in label]
    if any(not key or not sep for key, sep, _ in pairs):
        raise fail(f"--label takes KEY=VALUE, got {', '.join(label)}")
    return {key: value for key, _, value in pairs}


# The agent's options, one alias each, so that the command reads as the list of what it takes.
AgentServer = Annotated[str | None, typer.Option("--server", help="Rollout service URL (YOLO_OTA_AGENT_SERVER).")]
DeviceIdOption = Annotated[str | None, typer.Option(help="This device's id (YOLO_OTA_AGENT_DEVICE_ID).")]
EnrollmentToken = Annotated[
    str | None, typer.Option(help="Token to enroll a new id with; `ps` shows a flag: prefer the file or the variable.")
]
EnrollmentTokenFile = Annotated[
    Path | None, typer.Option(help="File holding the enrollment token (YOLO_OTA_AGENT_ENROLLMENT_TOKEN[_FILE]).")
]
AgentDataDir = Annotated[
    Path | None, typer.Option(help="Device token, saved state, versions on disk (YOLO_OTA_AGENT_DATA_DIR).")
]
PublicKey = Annotated[
    Path | None,
    typer.Option(help="Release public key (PEM): refuse unsigned or badly signed bundles and revocation lists."),
]
AllowUnsigned = Annotated[
    bool, typer.Option("--allow-unsigned", help="Run without a release public key (said at every start and in status).")
]
DevMode = Annotated[bool, typer.Option("--dev", help="Trial mode: no release public key needed (said so).")]
ServiceKey = Annotated[
    str | None, typer.Option(help="The service's desired-state key (base64) to pin; default: the one enrollment names.")
]
Listen = Annotated[str | None, typer.Option(help="HOST:PORT of the local API, or 'off' (default 127.0.0.1:8710).")]
ApiToken = Annotated[
    str | None, typer.Option(help="Bearer token the local API requires on every route but /healthz; `ps` shows a flag.")
]
ApiTokenFile = Annotated[
    Path | None, typer.Option(help="File holding the local API's token (YOLO_OTA_AGENT_API_TOKEN[_FILE]).")
]
Labels = Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE label for targeting (repeatable).")]
DeviceKind = Annotated[str | None, typer.Option(help="auto, cuda or cpu (default auto).")]


def agent(
    server: AgentServer = None,
    device_id: DeviceIdOption = None,
    enrollment_token: EnrollmentToken = None,
    enrollment_token_file: EnrollmentTokenFile = None,
    data_dir: AgentDataDir = None,
    public_key: PublicKey = None,
    allow_unsigned: AllowUnsigned = False,
    dev: DevMode = False,
    service_key: ServiceKey = None,
    listen: Listen = None,
    api_token: ApiToken = None,
    api_token_file: ApiTokenFile = None,
    label: Labels = None,
    device: DeviceKind = None,
    config: ConfigPath = None,
) -> None:
    """Run the edge agent: poll for the desired version, verify, validate, hot-swap, serve the local API.

    Its config file is --config, else YOLO_OTA_AGENT_CONFIG, else the one every command reads.
    """
    from edge_agent import Agent, AgentError, load_settings
    from exporters.errors import ExportError

    flags = {
        "server": server, "device_id": device_id, "enrollment_token": enrollment_token,
        "enrollment_token_file": enrollment_token_file, "data_dir": data_dir, "public_key": public_key,
        "allow_unsigned": True if allow_unsigned else None, "dev": True if dev else None, "service_key": service_key,
        "listen": listen, "api_token": api_token, "api_token_file": api_token_file, "labels": _labels(label),
        "device": device,
    }  # fmt: skip
    try:
        settings = load_settings(config, **flags)
        running = Agent(settings).start()
    except (AgentError, ExportError) as exc:
        raise fail(str(exc)) from None
    _serve_until_stopped(running, settings)


def _serve_until_stopped(running: Agent, settings: AgentSettings) -> None:
    import signal

    logging.getLogger("edge_agent").setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, lambda *_: running.request_stop())
    signal.signal(signal.SIGINT, lambda *_: running.request_stop())
    where = f" (local API on http://{settings.listen})" if settings.listen else ""
    err_console.print(f"agent {settings.device_id} polling {settings.server}{where}")
    running.wait()
    running.stop()
