"""Making one variant's file in its format, and saying what a device needs to run it.

One table, by format: what makes the file (Ultralytics' exporters for TorchScript and ONNX, ours for
AOTInductor), what this machine lacks to make and check it, and the compatibility record that goes into
``formats.json``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from exporters import aoti, yolo
from exporters.fingerprint import Fingerprint
from exporters.formats import FORMATS, Compatibility, Format, FormatVariant, torchscript_compatibility
from exporters.runners import ONNX_PROVIDERS, onnxruntime_info

Device = Literal["cpu", "cuda"]


def why_not_here(fmt: Format, device: Device, *, cuda: bool) -> str | None:
    """Why this machine cannot make and gate ``fmt`` for ``device``; None when it can."""
    if device == "cuda" and not cuda:
        return "no working CUDA device on the exporting machine"
    if fmt == "aoti":
        return aoti.compiler_available()
    if fmt == "onnx":
        if importlib.util.find_spec("onnx") is None:
            return "the onnx package is not installed (pip install 'yolo-ota[export]')"
        version, providers = onnxruntime_info()
        if version is None:
            return "ONNX Runtime is not installed: the ONNX variant could not be gated"
        missing = [p for p in ONNX_PROVIDERS[device] if p not in providers]
        if missing:
            return f"ONNX Runtime here has no {', '.join(missing)} to gate a {device} variant"
    return None


def formats_available(*, cuda: bool) -> tuple[Format, ...]:
    """The formats this machine can make and check for the CPU (the CLI's default)."""
    return tuple(fmt for fmt in FORMATS if why_not_here(fmt, "cpu", cuda=cuda) is None)


def parse_formats(text: str | Sequence[str]) -> tuple[Format, ...]:
    """``torchscript,onnx`` -> the formats, in the project's order; ``ValueError`` for an unknown one."""
    names = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format {', '.join(unknown)}; formats are {', '.join(FORMATS)}")
    return tuple(fmt for fmt in FORMATS if fmt in names)


def _onnx_compatibility(path: Path, device: Device) -> Compatibility:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = max((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), default=None)
    version, _ = onnxruntime_info()
    return Compatibility(runtime="onnxruntime", opset=opset, onnxruntime=version, providers=ONNX_PROVIDERS[device])


def make_variant_file(
    detector: yolo.LoadedDetector,
    variant: FormatVariant,
    *,
    imgsz: tuple[int, int],
    destination: Path,
    fingerprint: Fingerprint,
) -> Compatibility:
    """Write ``variant``'s file to ``destination``; its compatibility record."""
    half = variant.dtype == "float16"
    if variant.format == "torchscript":
        yolo.export_torchscript(
            detector, device=variant.device, half=half, imgsz=imgsz, batch=variant.batch,
            destination=destination, fingerprint=fingerprint,
        )  # fmt: skip
        return torchscript_compatibility()
    if variant.format == "onnx":
        yolo.export_onnx(
            detector, device=variant.device, half=half, imgsz=imgsz, batch=variant.batch, destination=destination
        )
        return _onnx_compatibility(destination, variant.device)
    aoti.export_aoti(
        detector, device=variant.device, half=half, imgsz=imgsz, batch=variant.batch, destination=destination
    )
    return aoti.aoti_compatibility(fingerprint, variant.device)
