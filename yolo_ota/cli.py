"""The ``yolo-ota`` command.

Each sub-command imports what it needs when it runs, so ``yolo-ota --help`` is quick and a device without
Ultralytics can still use the commands that do not export. Errors of the project's own kinds are printed as one
line on stderr with exit status 2; a failed gate exits with status 1.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from yolo_ota.rollout_cli import rollout_app

if TYPE_CHECKING:
    from registry.mlflow_gateway import MlflowGateway

app = typer.Typer(
    name="yolo-ota",
    help="Model registry and over-the-air deployment for YOLO detectors on factory GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Manage the ed25519 keys that sign bundles.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(rollout_app, name="rollout")
# Piped output (CI logs, files) gets room for the gate tables instead of rich's 80-column default.
console = Console(highlight=False, width=None if os.isatty(1) else 120)
err_console = Console(stderr=True, highlight=False, width=None if os.isatty(2) else 120)

EXIT_GATE_FAILED = 1
EXIT_USAGE = 2


def _parse_imgsz(value: str) -> tuple[int, int]:
    parts = value.replace("x", ",").split(",")
    try:
        sides = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an image size: give 640 or 480,640 (height,width)") from None
    if len(sides) == 1:
        return sides[0], sides[0]
    if len(sides) == 2:
        return sides[0], sides[1]
    raise typer.BadParameter(f"{value!r} is not an image size: give 640 or 480,640 (height,width)")


def _fail(message: str) -> typer.Exit:
    # One unwrapped line, and the message printed as text: paths and shapes may contain rich markup brackets.
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    return typer.Exit(EXIT_USAGE)


def _print_tables(tables: list[Table]) -> None:
    for table in tables:
        console.print(table)


def _progress(message: str) -> None:
    err_console.print(Text.assemble(("• ", "dim"), message), soft_wrap=True)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Ultralytics reads these when first imported; nothing here may reach the network.
    os.environ.setdefault("YOLO_OFFLINE", "true")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Ultralytics weights (.pt) or model config (yolov8n.yaml, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write.")],
    imgsz: Annotated[str, typer.Option(help="Input size: 640, or height,width.")] = "640",
    variants: Annotated[str, typer.Option(help="Comma-separated variants to make.")] = "cpu-fp32,cuda-fp32,cuda-fp16",
    batch: Annotated[int, typer.Option(help="Batch size the variants are traced with.")] = 1,
    latency_budget_ms: Annotated[
        float | None, typer.Option(help="p99 latency budget per forward pass; the latency gate fails above it.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name in the manifest (default: MODEL's stem).")] = None,
    golden_images: Annotated[
        list[Path] | None,
        typer.Option("--golden-image", help="Extra image for the golden data (repeatable): use your own scenes."),
    ] = None,
    noise_inputs: Annotated[int, typer.Option(help="Seeded noise inputs added to the golden data.")] = 2,
    force: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    signing_key: Annotated[
        Path | None, typer.Option(help="ed25519 private key (PEM) to sign the manifest with (writes manifest.sig).")
    ] = None,
) -> None:
    """Export MODEL to a TorchScript bundle per variant, gate every variant, and write the manifest."""
    from exporters.errors import ExportError
    from exporters.export import ExportRequest, export_bundle
    from exporters.report import gate_tables, memory_table

    request = ExportRequest(
        model=model,
        out_dir=out,
        imgsz=_parse_imgsz(imgsz),
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        batch=batch,
        latency_budget_ms=latency_budget_ms,
        name=name,
        force=force,
        golden_images=tuple(golden_images or ()),
        noise_inputs=noise_inputs,
        signing_key=signing_key,
    )
    try:
        result = export_bundle(request, progress=_progress)
    except ExportError as exc:
        raise _fail(str(exc)) from None
    results = list(result.manifest.gates.values())
    _print_tables(gate_tables(results, title=f"Gates of {result.manifest.name} on this machine"))
    memory = memory_table(results)
    if memory is not None:
        console.print(memory)
    for skipped, reason in result.manifest.skipped_variants.items():
        console.print(f"skipped {skipped}: {reason}")
    verdict = "passed" if result.passed else "FAILED (bundle written, marked failed)"
    signed = "signed" if result.signed else "unsigned"
    console.print(f"bundle {result.bundle_dir} ({signed}): gates {verdict}")
    if not result.passed:
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
def gate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    device: Annotated[
        str, typer.Option(help="cpu, cuda, or auto (the CUDA variants when CUDA works here and the bundle has them).")
    ] = "auto",
    variant: Annotated[list[str] | None, typer.Option("--variant", help="Gate only this variant (repeatable).")] = None,
    latency_budget_ms: Annotated[
        float | None, typer.Option(help="Budget to judge by (default: the one recorded at export).")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option(help="ed25519 public key (PEM): refuse a bundle that is unsigned or badly signed.")
    ] = None,
) -> None:
    """Re-run a bundle's gates on this machine against its golden data (what a device does before a swap)."""
    from exporters.errors import ExportError
    from exporters.local_gate import gate_bundle
    from exporters.report import gate_tables, memory_table

    if device not in ("cpu", "cuda", "auto"):
        raise _fail(f"--device must be cpu, cuda or auto, got {device!r}")
    try:
        manifest, results = gate_bundle(
            bundle,
            device="cuda" if device == "cuda" else "cpu" if device == "cpu" else "auto",
            variants=list(variant or []) or None,
            latency_budget_ms=latency_budget_ms,
            public_key=public_key,
            progress=_progress,
        )
    except ExportError as exc:
        raise _fail(str(exc)) from None
    _print_tables(gate_tables(results, title=f"Gates of {manifest.name} re-run on this machine"))
    memory = memory_table(results)
    if memory is not None:
        console.print(memory)
    passed = all(r.passed for r in results)
    console.print(f"gates {'passed' if passed else 'FAILED'}")
    if not passed:
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the verified manifest as JSON.")] = False,
    public_key: Annotated[
        Path | None, typer.Option(help="ed25519 public key (PEM): check the signature, refuse an unsigned bundle.")
    ] = None,
) -> None:
    """Verify a bundle's files (and signature, with --public-key) and print its manifest as tables."""
    from exporters.bundle import load_verified
    from exporters.errors import ExportError
    from exporters.report import files_table, gate_tables, manifest_table
    from exporters.signing import load_public_key, verify_bundle_signature

    try:
        manifest = load_verified(bundle)
        status = verify_bundle_signature(bundle, load_public_key(public_key) if public_key else None)
    except ExportError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        console.print_json(manifest.to_json_bytes().decode())
        return
    console.print(manifest_table(manifest))
    _print_tables(gate_tables(manifest.gates.values(), title="Gates recorded at export"))
    console.print(files_table(manifest))
    console.print(f"all files verified against the manifest; signature: {status.value}")


TrackingUri = Annotated[
    str,
    typer.Option(
        "--tracking-uri",
        envvar="YOLO_OTA_MLFLOW_URI",
        help="MLflow tracking server URL (or YOLO_OTA_MLFLOW_URI).",
        show_default=False,
    ),
]


def _gateway(tracking_uri: str) -> MlflowGateway:
    from registry.mlflow_gateway import MlflowGateway

    gateway = MlflowGateway(tracking_uri)
    # After MLflow's import, which sets its own level: the command prints its own result, and an unreachable
    # server is reported once, as the error line, not as one warning per retry.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    return gateway


@app.command()
def register(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory to register.")],
    name: Annotated[str, typer.Option("--name", help="Registered model name (one per product line).")],
    tracking_uri: TrackingUri = "",
    experiment: Annotated[str, typer.Option(help="MLflow experiment for the bundle's run.")] = "yolo-ota",
    signing_key: Annotated[
        Path | None, typer.Option(help="Sign the manifest (writes manifest.sig into BUNDLE) before registering.")
    ] = None,
) -> None:
    """Verify BUNDLE and register it in MLflow as a new version of NAME; prints the version number on stdout."""
    from exporters.errors import ExportError
    from registry.errors import RegistryError

    try:
        if signing_key is not None:
            from exporters.bundle import load_verified
            from exporters.signing import load_private_key, sign_bundle

            load_verified(bundle)
            sign_bundle(bundle, load_private_key(signing_key))
        registration = _gateway(tracking_uri).register_bundle(bundle, name, experiment=experiment)
    except (ExportError, RegistryError) as exc:
        raise _fail(str(exc)) from None
    version = registration.version
    # The human line goes to stderr, the bare version number to stdout: VERSION=$(yolo-ota register ...).
    err_console.print(
        f"registered {bundle} as {name} version {version.version} (gates {version.gates}, "
        f"signed {version.tags.get('ota.signed', 'false')}, run {registration.run_id})",
        soft_wrap=True,
        markup=False,
    )
    console.print(version.version, markup=False)


@app.command()
def versions(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    tracking_uri: TrackingUri = "",
) -> None:
    """List the versions of NAME with aliases, gates, variants and fingerprint summary."""
    from registry.errors import RegistryError

    try:
        found = _gateway(tracking_uri).list_versions(name)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
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


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to promote.")],
    alias: Annotated[str, typer.Option(help="Alias to set.")] = "production",
    force: Annotated[
        bool, typer.Option(help="Promote even though the gates did not pass (recorded as ota.forced).")
    ] = False,
    tracking_uri: TrackingUri = "",
) -> None:
    """Point ALIAS (production) of NAME at VERSION; refuses a version whose gates did not pass."""
    from registry.errors import RegistryError

    try:
        info = _gateway(tracking_uri).promote(name, version, alias=alias, force=force)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    forced = " (forced past failed gates)" if force and info.gates != "pass" else ""
    console.print(f"{name}: alias {alias} -> version {info.version}{forced}")


@app.command()
def server(
    host: Annotated[str | None, typer.Option(help="Address to listen on [env YOLO_OTA_HOST; 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env YOLO_OTA_PORT; 8700].")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL [env YOLO_OTA_DATABASE_URL; SQLite in the data dir].")
    ] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking server [env YOLO_OTA_MLFLOW_URI].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the embedded SQLite database lives.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file of settings, below flags and YOLO_OTA_* variables.")
    ] = None,
    dev: Annotated[bool, typer.Option("--dev", help="Dev mode: accept well-known tokens when none are set.")] = False,
) -> None:
    """Run the rollout service (REST API, wave scheduler, MLflow alias watcher) under uvicorn."""
    import uvicorn

    from registry.rollout_service.app import create_app
    from registry.rollout_service.errors import RolloutServiceError
    from registry.rollout_service.settings import CONFIG_FILE_ENV, load_settings

    if config is not None:
        os.environ[CONFIG_FILE_ENV] = str(config)
    try:
        settings = load_settings(
            host=host,
            port=port,
            database_url=database_url,
            mlflow_uri=mlflow_uri,
            data_dir=data_dir,
            dev_mode=True if dev else None,
        )
        application = create_app(settings)
    except RolloutServiceError as exc:
        raise _fail(str(exc)) from None
    logging.getLogger("registry").setLevel(logging.INFO)
    err_console.print(f"rollout service on http://{settings.host}:{settings.port} (OpenAPI at /docs)")
    uvicorn.run(application, host=settings.host, port=settings.port, log_level="warning", access_log=False)


@app.command()
def agent(
    server: Annotated[str | None, typer.Option(help="Rollout service URL [env YOLO_OTA_AGENT_SERVER].")] = None,
    device_id: Annotated[str | None, typer.Option(help="This device's id [env YOLO_OTA_AGENT_DEVICE_ID].")] = None,
    enrollment_token: Annotated[
        str | None, typer.Option(help="Token to enroll once with [env YOLO_OTA_AGENT_ENROLLMENT_TOKEN].")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Device token, saved state, versions on disk [env YOLO_OTA_AGENT_DATA_DIR].")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option(help="ed25519 public key (PEM): refuse unsigned or badly signed bundles.")
    ] = None,
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT of the local API, or 'off' [default 127.0.0.1:8710].")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE label for targeting (repeatable).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cuda or cpu [default auto].")] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file of settings, below flags and YOLO_OTA_AGENT_* variables.")
    ] = None,
) -> None:
    """Run the edge agent: poll for the desired version, verify, validate, hot-swap, serve the local API."""
    import signal

    from edge_agent import Agent, AgentError, load_settings
    from exporters.errors import ExportError

    labels = None
    if label:
        pairs = [item.partition("=") for item in label]
        if any(not key or not sep for key, sep, _ in pairs):
            raise _fail(f"--label takes KEY=VALUE, got {', '.join(label)}")
        labels = {key: value for key, _, value in pairs}
    try:
        settings = load_settings(
            config,
            server=server,
            device_id=device_id,
            enrollment_token=enrollment_token,
            data_dir=data_dir,
            public_key=public_key,
            listen=listen,
            labels=labels,
            device=device,
        )
        running = Agent(settings).start()
    except (AgentError, ExportError) as exc:
        raise _fail(str(exc)) from None
    logging.getLogger("edge_agent").setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, lambda *_: running.request_stop())
    signal.signal(signal.SIGINT, lambda *_: running.request_stop())
    where = f" (local API on http://{settings.listen})" if settings.listen else ""
    err_console.print(f"agent {settings.device_id} polling {settings.server}{where}")
    running.wait()
    running.stop()


@app.command()
def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="An empty folder to keep logs, databases and bundles in; default: a temporary one, removed."),
    ] = None,
    devices: Annotated[int, typer.Option(min=2, max=16, help="Agent processes in the fleet.")] = 4,
    imgsz: Annotated[int, typer.Option(min=64, max=1280, help="Input size of the exported models.")] = 160,
    model_v1: Annotated[str, typer.Option(help="YOLO config or weights of v1.")] = "yolov8n.yaml",
    model_v2: Annotated[
        str, typer.Option(help="YOLO config or weights of v2 (v3 is v2 with a fault).")
    ] = "yolo11n.yaml",
    keep_running: Annotated[
        bool, typer.Option(help="Leave the stack up after the story, until Ctrl-C, to explore it.")
    ] = False,
) -> None:
    """Run the whole loop on this machine: MLflow, the rollout service and a fleet of agents; v1 to all, v2 by
    canary, an A/B test, and a v3 that fails on the devices and is rolled back. Exit 1 if a claim did not hold."""
    import signal

    from exporters.errors import ExportError
    from registry.errors import RegistryError
    from yolo_ota.demo.processes import DemoError
    from yolo_ota.demo.story import Demo, DemoOptions

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the same clean stop as Ctrl-C

    signal.signal(signal.SIGTERM, interrupt)
    options = DemoOptions(
        data_dir=data_dir, devices=devices, imgsz=imgsz, model_v1=model_v1, model_v2=model_v2, keep_running=keep_running
    )
    try:
        code = Demo(options, console).run()
    except (DemoError, ExportError, RegistryError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        err_console.print("stopped; every process of the demo has ended")
        raise typer.Exit(130) from None
    raise typer.Exit(code)


@keys_app.command("generate")
def keys_generate(
    directory: Annotated[Path, typer.Argument(help="Folder for signing-key.pem (mode 0600) and public-key.pem.")],
    force: Annotated[bool, typer.Option(help="Overwrite keys already in DIRECTORY.")] = False,
) -> None:
    """Make a new ed25519 key pair for signing bundles."""
    from exporters.errors import ExportError
    from exporters.signing import generate_keypair

    try:
        private_path, public_path = generate_keypair(directory, overwrite=force)
    except ExportError as exc:
        raise _fail(str(exc)) from None
    console.print(f"signing key: {private_path} (keep it secret)\npublic key:  {public_path} (give it to devices)")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
