"""Loading a bundle's TorchScript variant onto a device: the one place that calls ``torch.jit.load``.

Light module (torch only). TorchScript is marked deprecated in recent PyTorch in favour of ``torch.export``;
it remains the format Ultralytics exports and factory devices run, so that warning is silenced here, once.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from exporters.errors import ModelError, one_line


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence PyTorch's deprecation notice for ``torch.jit`` and the tracer's notes on shape-dependent Python
    branches (Ultralytics' export relies on them being frozen at the traced shape)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def load_torchscript(path: Path, device: str, *, extra_files: dict[str, Any] | None = None) -> torch.jit.ScriptModule:
    """Load a TorchScript file with ``map_location=device`` in eval mode; ``extra_files`` is filled in place."""
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra_files or {})
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelError(f"cannot load TorchScript {path.name} on {device}: {one_line(exc)}") from exc
    module.eval()
    return module
