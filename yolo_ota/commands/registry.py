"""``yolo-ota register``, ``versions`` and ``promote``: the MLflow model registry.

Settings: ``[registry]`` and ``YOLO_OTA_MLFLOW_URI``, ``YOLO_OTA_EXPERIMENT``, ``YOLO_OTA_PROMOTION_ALIAS``; the
MLflow URI falls back to ``MLFLOW_TRACKING_URI``. MLflow's credential variables (``MLFLOW_TRACKING_USERNAME``,
``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_INSECURE_TLS``, ...) are left to MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from yolo_ota.commands.common import ConfigPath, console, err_console, fail, load
from yolo_ota.settings import RegistrySettings

if TYPE_CHECKING:
    from registry.mlflow_gateway import MlflowGateway

MlflowUri = Annotated[
    str | None,
    typer.Option(
        "--mlflow-uri",
        "--tracking-uri",
        help="MLflow tracking server URL (else YOLO_OTA_MLFLOW_URI, [registry] mlflow_uri, MLFLOW_TRACKING_URI).",
        show_default=False,
    ),
]


def mlflow_gateway(settings: RegistrySettings) -> MlflowGateway:
    from registry.mlflow_gateway import MlflowGateway

    gateway = MlflowGateway(settings.mlflow_uri or "")
    # After MLflow's import, which sets its own level: the command prints its own result, and an unreachable
    # server is reported once, as the error line, not as one warning per retry.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    return gateway


def register(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory to register.")],
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help="Registered model: the bundle's product line (default: the name it was exported with)."
        ),
    ] = None,
    mlflow_uri: MlflowUri = None,
    experiment: Annotated[
        str | None, typer.Option(help="MLflow experiment for the bundle's run (default yolo-ota).")
    ] = None,
    signing_key: Annotated[
        Path | None, typer.Option(help="Sign the manifest (writes manifest.sig into BUNDLE) before registering.")
    ] = None,
    config: ConfigPath = None,
) -> None:
    """Verify BUNDLE and register it in MLflow as a new version of NAME; prints the version number on stdout."""
    from exporters.errors import ExportError
    from registry.errors import RegistryError

    settings = load(RegistrySettings, config, mlflow_uri=mlflow_uri, experiment=experiment)
    try:
        if signing_key is not None:
            from exporters.bundle import load_verified
            from exporters.signing import load_private_key, sign_bundle

            load_verified(bundle)
            sign_bundle(bundle, load_private_key(signing_key))
        if name is None:
            from exporters.bundle import read_manifest

            name = read_manifest(bundle).name
        registration = mlflow_gateway(settings).register_bundle(bundle, name, experiment=settings.experiment)
    except (ExportError, RegistryError) as exc:
        raise fail(str(exc)) from None
    version = registration.version
    # The human line goes to stderr, the bare version number to stdout: VERSION=$(yolo-ota register ...).
    err_console.print(
        f"registered {bundle} as {name} version {version.version} (gates {version.gates}, "
        f"signed {version.tags.get('ota.signed', 'false')}, run {registration.run_id})",
        soft_wrap=True,
        markup=False,
    )
    console.print(version.version, markup=False)


def versions(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    mlflow_uri: MlflowUri = None,
    config: ConfigPath = None,
) -> None:
    """List the versions of NAME with aliases, gates, variants and fingerprint summary."""
    from registry.errors import RegistryError

    settings = load(RegistrySettings, config, mlflow_uri=mlflow_uri)
    try:
        found = mlflow_gateway(settings).list_versions(name)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"Versions of {name}", title_justify="left")
    for column in ("version", "aliases", "gates", "signed", "variants", "exported on", "forced"):
        table.add_column(column)
    for v in found:
        tags = v.tags
        gpu = tags.get("ota.fp.gpu_name") or "no GPU"
        exported_on = f"torch {tags.get('ota.fp.torch', '?')}, CUDA {tags.get('ota.fp.cuda_runtime') or '-'}, {gpu}"
        table.add_row(
            v.version,
            ", ".join(v.aliases) or "-",
            v.gates,
            tags.get("ota.signed", "-"),
            tags.get("ota.variants", "-"),
            exported_on,
            tags.get("ota.forced", "-"),
        )
    console.print(table)


def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to promote.")],
    alias: Annotated[str | None, typer.Option(help="Alias to set (default: the promotion alias, production).")] = None,
    force: Annotated[
        bool, typer.Option(help="Promote even though the gates did not pass (recorded as ota.forced).")
    ] = False,
    mlflow_uri: MlflowUri = None,
    config: ConfigPath = None,
) -> None:
    """Point ALIAS (production) of NAME at VERSION; refuses a version whose gates did not pass."""
    from registry.errors import RegistryError

    settings = load(RegistrySettings, config, mlflow_uri=mlflow_uri, promotion_alias=alias)
    chosen = settings.promotion_alias
    try:
        info = mlflow_gateway(settings).promote(name, version, alias=chosen, force=force)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    forced = " (forced past failed gates)" if force and info.gates != "pass" else ""
    console.print(f"{name}: alias {chosen} -> version {info.version}{forced}")
