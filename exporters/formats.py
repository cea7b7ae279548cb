"""Model formats and the variants they make: names, files, compatibility, and ``formats.json``.

A variant is a device, a precision and a format. TorchScript variants keep their old names (``cpu-fp32``,
``cuda-fp16``) and stay in ``manifest.json``'s ``variants``, exactly as schema 2 wrote them, so that an agent
that knows only TorchScript still installs a new bundle. Every other format's variants (``cpu-fp32-aoti``,
``cuda-fp16-aoti``, ``cpu-fp32-onnx``, ...) are listed in ``formats.json``, a bundle file that ``manifest.json``
lists with its digest like any other (so the release signature covers it), together with their gates and what a
device needs to run them:

- ``aoti``: a ``torch.export`` + AOTInductor package (``.pt2``) of compiled kernels: no compiler on the device,
  but only for the exact torch version that compiled it, on the same OS and CPU architecture, and for CUDA the
  same GPU architecture;
- ``onnx``: Ultralytics' ONNX export, run by ONNX Runtime: any device with an ONNX Runtime that reads its opset
  (and the CUDA execution provider for a ``cuda-*`` variant); no torch needed.

Light module: pydantic only. ``exporters.runners`` loads each format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exporters.bundle import VARIANT_NAMES, VARIANTS_DIR, Manifest, Variant, safe_join
from exporters.errors import ExportArgumentError, ManifestError
from exporters.files import atomic_write
from exporters.fingerprint import Fingerprint, check_compatible
from exporters.gate_report import VariantGates

Format = Literal["torchscript", "aoti", "onnx"]
FORMATS: tuple[Format, ...] = ("torchscript", "aoti", "onnx")
FORMATS_NAME = "formats.json"
FORMATS_SCHEMA = 1

FILE_NAMES: dict[Format, str] = {"torchscript": "model.torchscript", "aoti": "model.pt2", "onnx": "model.onnx"}
# Fastest first when nothing was measured yet on a device: compiled kernels, then the JIT, then ONNX Runtime.
FORMAT_PREFERENCE: dict[Format, int] = {"aoti": 0, "torchscript": 1, "onnx": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Compatibility(_Strict):
    """What a device needs to load a variant, recorded at export."""

    runtime: Literal["torch", "onnxruntime"]
    torch: str | None = Field(default=None, description="aoti: the exact torch version that compiled it")
    os: str | None = Field(default=None, description="aoti: the OS its kernels were compiled for")
    arch: str | None = Field(default=None, description="aoti: the CPU architecture its kernels were compiled for")
    gpu_capability: str | None = Field(default=None, description="aoti cuda: the GPU architecture, e.g. 9.0")
    opset: int | None = Field(default=None, description="onnx: the ONNX opset of the file")
    onnxruntime: str | None = Field(default=None, description="onnx: the ONNX Runtime version it was gated with")
    providers: list[str] = Field(default_factory=list, description="onnx: execution providers it was gated with")


class FormatVariant(_Strict):
    """One variant in any format (TorchScript ones are read from ``manifest.variants``)."""

    name: str
    path: str
    device: Literal["cpu", "cuda"]
    dtype: Literal["float32", "float16"]
    batch: int
    format: Format
    compatibility: Compatibility


class FormatIndex(_Strict):
    """``formats.json``: the variants in formats other than TorchScript, and their gates."""

    schema_version: int = FORMATS_SCHEMA
    variants: dict[str, FormatVariant] = Field(default_factory=dict)
    gates: dict[str, VariantGates] = Field(default_factory=dict)

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def variant_name(base: str, fmt: Format) -> str:
    """``cpu-fp32`` + ``onnx`` -> ``cpu-fp32-onnx``; TorchScript keeps the bare name."""
    return base if fmt == "torchscript" else f"{base}-{fmt}"


def split_variant(name: str) -> tuple[str, Format]:
    """``cuda-fp16-aoti`` -> (``cuda-fp16``, ``aoti``); ``ExportArgumentError`` for a name that is not a variant."""
    for fmt in FORMATS:
        if fmt != "torchscript" and name.endswith(f"-{fmt}"):
            base = name[: -len(fmt) - 1]
            break
    else:
        base, fmt = name, "torchscript"
    if base not in VARIANT_NAMES:
        raise ExportArgumentError(f"unknown variant {name!r}; variants are {', '.join(VARIANT_NAMES)} [-aoti|-onnx]")
    return base, fmt


def variant_file(name: str) -> str:
    """Relative path of a variant's model file inside a bundle."""
    return f"{VARIANTS_DIR}{name}/{FILE_NAMES[split_variant(name)[1]]}"


def torchscript_compatibility() -> Compatibility:
    return Compatibility(runtime="torch")


def as_format_variant(variant: Variant) -> FormatVariant:
    """A manifest (TorchScript) variant in the common form."""
    return FormatVariant(
        name=variant.name,
        path=variant.path,
        device=variant.device,
        dtype=variant.dtype,
        batch=variant.batch,
        format="torchscript",
        compatibility=torchscript_compatibility(),
    )


def read_index(bundle_dir: Path, manifest: Manifest) -> FormatIndex:
    """The bundle's ``formats.json`` (an empty index for a bundle without one). Its digest is checked with every
    other listed file by ``exporters.bundle.verify_files``; this only parses it."""
    if FORMATS_NAME not in manifest.files:
        return FormatIndex()
    path = safe_join(bundle_dir, FORMATS_NAME)
    try:
        index = FormatIndex.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise ManifestError(f"{path} is not a valid {FORMATS_NAME}: {exc}") from None
    for name, variant in index.variants.items():
        if variant.path not in manifest.files:
            raise ManifestError(f"{FORMATS_NAME}: variant {name} file {variant.path} is not listed in the manifest")
    return index


def write_index(bundle_dir: Path, index: FormatIndex) -> Path:
    return atomic_write(bundle_dir / FORMATS_NAME, index.to_json_bytes())


def all_variants(bundle_dir: Path, manifest: Manifest) -> dict[str, FormatVariant]:
    """Every variant of a bundle, TorchScript and the other formats, by name."""
    found = {name: as_format_variant(v) for name, v in manifest.variants.items()}
    found.update(read_index(bundle_dir, manifest).variants)
    return found


def all_gates(bundle_dir: Path, manifest: Manifest) -> dict[str, VariantGates]:
    """Every variant's export gates, TorchScript and the other formats."""
    return {**manifest.gates, **read_index(bundle_dir, manifest).gates}


def _base_version(version: str) -> str:
    """``2.15.0+cu132`` -> ``2.15.0``: the CUDA and CPU builds of one torch release load the same packages."""
    return version.split("+", 1)[0]


def why_incompatible(
    variant: FormatVariant,
    exported_on: Fingerprint,
    device: Fingerprint,
    *,
    onnxruntime_version: str | None = None,
    onnx_providers: tuple[str, ...] = (),
) -> str | None:
    """None when this device may load ``variant``, else why not (said before anything is downloaded).

    TorchScript: the rule of DESIGN.md section 4. AOTInductor: the exact torch release, OS and architecture that
    compiled it, and for CUDA the same GPU architecture. ONNX: an ONNX Runtime here, with the CUDA provider for a
    ``cuda-*`` variant.
    """
    compat = variant.compatibility
    if variant.format == "onnx":
        if onnxruntime_version is None:
            return f"{variant.name} needs ONNX Runtime, which this device does not have"
        if variant.device == "cuda" and "CUDAExecutionProvider" not in onnx_providers:
            return f"{variant.name} needs ONNX Runtime's CUDA provider (this device has {', '.join(onnx_providers)})"
        return None
    if variant.format == "aoti":
        if compat.torch is None or _base_version(compat.torch) != _base_version(device.torch):
            return f"{variant.name} was compiled for torch {compat.torch}, this device runs torch {device.torch}"
        if (compat.os, compat.arch) != (device.os, device.arch):
            return (
                f"{variant.name} was compiled for {compat.os}/{compat.arch}, this device is {device.os}/{device.arch}"
            )
        if variant.device == "cuda":
            if device.gpu_name is None:
                return f"variant {variant.name} needs a working CUDA device and this device has none"
            if compat.gpu_capability != device.gpu_capability:
                return (
                    f"{variant.name} was compiled for GPU architecture sm {compat.gpu_capability}, "
                    f"this device's GPU is sm {device.gpu_capability}"
                )
        return None
    return check_compatible(exported_on, device, variant.name)
