"""``yolo-ota export``, ``gate``, ``inspect`` and ``keys``: making, checking and signing bundles on this machine.

Settings: ``[export]`` (``YOLO_OTA_EXPORT_*``), ``[gate]`` (``YOLO_OTA_GATE_*``, also read by ``inspect``) and
``[keys]`` (``YOLO_OTA_KEYS_*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from yolo_ota.commands.common import EXIT_GATE_FAILED, ConfigPath, console, fail, load, print_tables, progress
from yolo_ota.settings import ExportSettings, GateSettings, KeysSettings

if TYPE_CHECKING:
    from exporters.export import ExportResult
    from exporters.formats import Format

keys_app = typer.Typer(help="Manage the ed25519 keys that sign bundles.", no_args_is_help=True)

_IMGSZ_HELP = "give 640 or 480,640 (height,width)"


def parse_imgsz(value: str) -> tuple[int, int]:
    """``640`` or ``480,640`` (also ``480x640``) as (height, width)."""
    parts = value.replace("x", ",").split(",")
    try:
        sides = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise fail(f"{value!r} is not an image size: {_IMGSZ_HELP}") from None
    if len(sides) == 1:
        return sides[0], sides[0]
    if len(sides) == 2:
        return sides[0], sides[1]
    raise fail(f"{value!r} is not an image size: {_IMGSZ_HELP}")


ProductLine = Annotated[
    str | None,
    typer.Option(help="Product line: the registered model it is for, signed with it (default: MODEL's stem)."),
]
Formats = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated formats: torchscript, aoti (AOTInductor), onnx "
        "(default: every one this machine can make and check)."
    ),
]
Release = Annotated[
    int | None,
    typer.Option(
        min=1, help="Release number, higher than every earlier export of the line (default: UTC YYYYMMDDHHMMSS)."
    ),
]


def export(
    model: Annotated[str, typer.Argument(help="Ultralytics weights (.pt) or model config (yolov8n.yaml, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write.")],
    imgsz: Annotated[str | None, typer.Option(help="Input size: 640, or height,width (default 640).")] = None,
    variants: Annotated[
        str | None, typer.Option(help="Comma-separated variants to make (default cpu-fp32,cuda-fp32,cuda-fp16).")
    ] = None,
    formats: Formats = None,
    batch: Annotated[int | None, typer.Option(help="Batch size the variants are traced with (default 1).")] = None,
    latency_budget_ms: Annotated[
        float | None, typer.Option(help="p99 latency budget per forward pass; the latency gate fails above it.")
    ] = None,
    name: ProductLine = None,
    release: Release = None,
    golden_images: Annotated[
        list[Path] | None,
        typer.Option("--golden-image", help="Extra image for the golden data (repeatable): use your own scenes."),
    ] = None,
    noise_inputs: Annotated[
        int | None, typer.Option(help="Seeded noise inputs added to the golden data (default 2).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    signing_key: Annotated[
        Path | None, typer.Option(help="ed25519 private key (PEM) to sign the manifest with (writes manifest.sig).")
    ] = None,
    config: ConfigPath = None,
) -> None:
    """Export MODEL per variant and format, gate every variant, and write the manifest."""
    from exporters.errors import ExportError
    from exporters.export import ExportRequest, export_bundle

    settings = load(
        ExportSettings, config, imgsz=imgsz, variants=variants, formats=formats, batch=batch,
        latency_budget_ms=latency_budget_ms, noise_inputs=noise_inputs, signing_key=signing_key,
    )  # fmt: skip
    request = ExportRequest(
        model=model,
        out_dir=out,
        imgsz=parse_imgsz(settings.imgsz),
        variants=tuple(v.strip() for v in settings.variants.split(",") if v.strip()),
        formats=_formats(settings.formats),
        batch=settings.batch,
        latency_budget_ms=settings.latency_budget_ms,
        name=name,
        release=release,
        force=force,
        golden_images=tuple(golden_images or ()),
        noise_inputs=settings.noise_inputs,
        signing_key=settings.signing_key,
    )
    try:
        result = export_bundle(request, progress=progress)
    except ExportError as exc:
        raise fail(str(exc)) from None
    _print_export(result)
    if not result.passed:
        raise typer.Exit(EXIT_GATE_FAILED)


def _formats(asked: str | None) -> tuple[Format, ...]:
    """The formats asked for, else every one this machine can make and check."""
    from exporters.fingerprint import cuda_usable
    from exporters.variant_export import formats_available, parse_formats

    try:
        return parse_formats(asked) if asked else formats_available(cuda=cuda_usable())
    except ValueError as exc:
        raise fail(str(exc)) from None


def _print_export(result: ExportResult) -> None:
    from exporters.formats import all_gates
    from exporters.report import gate_tables, memory_table

    results = list(all_gates(result.bundle_dir, result.manifest).values())
    print_tables(gate_tables(results, title=f"Gates of {result.manifest.name} on this machine"))
    memory = memory_table(results)
    if memory is not None:
        console.print(memory)
    for skipped, reason in result.manifest.skipped_variants.items():
        console.print(f"skipped {skipped}: {reason}")
    verdict = "passed" if result.passed else "FAILED (bundle written, marked failed)"
    signed = "signed" if result.signed else "unsigned"
    console.print(f"bundle {result.bundle_dir} ({signed}): gates {verdict}")


def gate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    device: Annotated[
        str | None,
        typer.Option(help="cpu, cuda, or auto: the CUDA variants when CUDA works here and the bundle has them."),
    ] = None,
    variant: Annotated[list[str] | None, typer.Option("--variant", help="Gate only this variant (repeatable).")] = None,
    latency_budget_ms: Annotated[
        float | None, typer.Option(help="Budget to judge by (default: the one recorded at export).")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option(help="ed25519 public key (PEM): refuse a bundle that is unsigned or badly signed.")
    ] = None,
    config: ConfigPath = None,
) -> None:
    """Re-run a bundle's gates on this machine against its golden data (what a device does before a swap)."""
    from exporters.errors import ExportError
    from exporters.local_gate import gate_bundle
    from exporters.report import gate_tables, memory_table

    if device is not None and device not in ("cpu", "cuda", "auto"):
        raise fail(f"--device must be cpu, cuda or auto, got {device!r}")
    settings = load(GateSettings, config, device=device, latency_budget_ms=latency_budget_ms, public_key=public_key)
    try:
        manifest, results = gate_bundle(
            bundle,
            device=settings.device,
            variants=list(variant or []) or None,
            latency_budget_ms=settings.latency_budget_ms,
            public_key=settings.public_key,
            progress=progress,
        )
    except ExportError as exc:
        raise fail(str(exc)) from None
    print_tables(gate_tables(results, title=f"Gates of {manifest.name} re-run on this machine"))
    memory = memory_table(results)
    if memory is not None:
        console.print(memory)
    passed = all(r.passed for r in results)
    console.print(f"gates {'passed' if passed else 'FAILED'}")
    if not passed:
        raise typer.Exit(EXIT_GATE_FAILED)


def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the verified manifest as JSON.")] = False,
    public_key: Annotated[
        Path | None, typer.Option(help="ed25519 public key (PEM): check the signature, refuse an unsigned bundle.")
    ] = None,
    config: ConfigPath = None,
) -> None:
    """Verify a bundle's files (and signature, with a public key) and print its manifest as tables."""
    from exporters.bundle import load_verified
    from exporters.errors import ExportError
    from exporters.formats import all_gates, all_variants
    from exporters.report import files_table, gate_tables, manifest_table
    from exporters.signing import load_public_key, verify_bundle_signature

    key_path = load(GateSettings, config, public_key=public_key).public_key
    try:
        manifest = load_verified(bundle)
        status = verify_bundle_signature(bundle, load_public_key(key_path) if key_path else None)
    except ExportError as exc:
        raise fail(str(exc)) from None
    if as_json:
        console.print_json(manifest.to_json_bytes().decode())
        return
    console.print(manifest_table(manifest, all_variants(bundle, manifest)))
    print_tables(gate_tables(all_gates(bundle, manifest).values(), title="Gates recorded at export"))
    console.print(files_table(manifest))
    console.print(f"all files verified against the manifest; signature: {status.value}")


@keys_app.command("generate")
def keys_generate(
    directory: Annotated[
        Path | None,
        typer.Argument(help="Folder for signing-key.pem (mode 0600) and public-key.pem (default: [keys] directory)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite keys already in DIRECTORY.")] = False,
    config: ConfigPath = None,
) -> None:
    """Make a new ed25519 key pair for signing bundles."""
    from exporters.errors import ExportError
    from exporters.signing import generate_keypair

    folder = load(KeysSettings, config, directory=directory).directory
    if folder is None:
        raise fail("no folder for the keys: give DIRECTORY, YOLO_OTA_KEYS_DIRECTORY or [keys] directory")
    try:
        private_path, public_path = generate_keypair(folder, overwrite=force)
    except ExportError as exc:
        raise fail(str(exc)) from None
    console.print(f"signing key: {private_path} (keep it secret)\npublic key:  {public_path} (give it to devices)")
