"""Loading any variant as one kind of callable: a (B, 3, H, W) tensor in, the raw output tensor out.

The gates (``exporters.gates``) and the edge agent's runtime call a model the same way whatever its format:

- TorchScript: ``torch.jit.load`` with ``map_location`` (``exporters.runtime``);
- AOTInductor: ``torch._inductor.aoti_load_package`` of the ``.pt2`` package, compiled for this device;
- ONNX: an ONNX Runtime session with the provider for the variant's device; tensors go through numpy.

Every loader raises ``ModelError`` when the file does not load here; run-time failures are ``RuntimeError`` (an
ONNX Runtime error is turned into one), which is what the agent's fallbacks catch.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from exporters.errors import ModelError, one_line
from exporters.formats import Format, FormatVariant
from exporters.runtime import load_torchscript

Runner = Callable[[torch.Tensor], Any]

ONNX_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}


class OnnxRunner:
    """An ONNX Runtime session called like a torch module: fixed input shape, first output returned."""

    def __init__(self, path: Path, device: str) -> None:
        import onnxruntime

        kind = "cuda" if device.startswith("cuda") else "cpu"
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
        # Its worker threads otherwise spin between runs, taking the cores from torch's letterbox and NMS (and
        # from the model serving beside a validation) on a small device.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=ONNX_PROVIDERS[kind])
        except Exception as exc:  # ONNX Runtime raises its own exception types, none of them exported
            raise ModelError(f"ONNX Runtime cannot load {path.name} on {kind}: {one_line(exc)}") from exc
        if kind == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ModelError(f"ONNX Runtime has no CUDA provider here: cannot run {path.name} on {device}")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.device = torch.device(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy()
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: array})
        except Exception as exc:  # e.g. a batch the file was not exported for
            raise RuntimeError(f"ONNX Runtime: {one_line(exc)}") from exc
        return torch.from_numpy(out).to(self.device)


class AotiRunner:
    """An AOTInductor package's compiled model; returns the first output tensor."""

    def __init__(self, path: Path, device: str) -> None:
        import torch._inductor

        index = (torch.device(device).index or 0) if device.startswith("cuda") else -1  # -1: the CPU
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = torch._inductor.aoti_load_package(str(path), device_index=index)
        except Exception as exc:  # a package for another torch, OS or GPU fails in many ways
            raise ModelError(f"cannot load AOTInductor package {path.name} on {device}: {one_line(exc)}") from exc

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out


def _torchscript(path: Path, device: str) -> Runner:
    return load_torchscript(path, device)


LOADERS: dict[Format, Callable[[Path, str], Runner]] = {
    "torchscript": _torchscript,
    "aoti": AotiRunner,
    "onnx": OnnxRunner,
}


def load_runner(path: Path, variant: FormatVariant) -> Runner:
    """Load ``variant``'s file at ``path`` onto its device (``cuda:0`` or ``cpu``)."""
    device = "cuda:0" if variant.device == "cuda" else "cpu"
    return LOADERS[variant.format](path, device)


def onnxruntime_info() -> tuple[str | None, tuple[str, ...]]:
    """This machine's ONNX Runtime version and providers; (None, ()) when it is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None, ()
    import onnxruntime

    return str(onnxruntime.__version__), tuple(onnxruntime.get_available_providers())
