"""AOTInductor variants: ``torch.export`` of the fused model, compiled ahead of time into a ``.pt2`` package.

Ultralytics has no AOTInductor exporter, so this is ours: the model as Ultralytics would export it
(``exporters.yolo.deployable_module``), exported at the variant's fixed shape and compiled by
``torch._inductor.aoti_compile_and_package``. Compiling needs a C++ compiler (and for CUDA, the CUDA toolkit's
headers that torch finds); loading the package on a device needs neither, but needs the same torch release, OS,
CPU architecture and, for CUDA, GPU architecture (recorded in ``formats.json``).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Literal

import torch

from exporters import yolo
from exporters.errors import ModelError, one_line
from exporters.fingerprint import Fingerprint
from exporters.formats import Compatibility

log = logging.getLogger(__name__)


def compiler_available() -> str | None:
    """Why AOTInductor variants cannot be compiled here, or None when they can."""
    if shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"):
        return None
    return "no C++ compiler (c++, g++ or clang++) on the exporting machine: AOTInductor compiles kernels with one"


def export_aoti(
    detector: yolo.LoadedDetector,
    *,
    device: Literal["cpu", "cuda"],
    half: bool,
    imgsz: tuple[int, int],
    batch: int,
    destination: Path,
) -> Path:
    """Compile the detector for ``device`` at the fixed input (batch, 3, *imgsz) into ``destination`` (.pt2)."""
    target = torch.device("cuda:0" if device == "cuda" else "cpu")
    dtype = torch.float16 if half else torch.float32
    module = yolo.deployable_module(detector).to(device=target, dtype=dtype)
    example = torch.zeros(batch, 3, *imgsz, device=target, dtype=dtype)
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example,), strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(destination))
    except Exception as exc:  # the exporter and the compiler raise many kinds; all mean the same here
        raise ModelError(f"AOTInductor compile on {device} failed: {one_line(exc)}") from exc
    return destination


def aoti_compatibility(fingerprint: Fingerprint, device: Literal["cpu", "cuda"]) -> Compatibility:
    """What a device needs to load a package compiled on this machine."""
    return Compatibility(
        runtime="torch",
        torch=fingerprint.torch,
        os=fingerprint.os,
        arch=fingerprint.arch,
        gpu_capability=fingerprint.gpu_capability if device == "cuda" else None,
    )
