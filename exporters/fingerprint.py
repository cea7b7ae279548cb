"""The environment fingerprint: what a model was exported and gated on, and what a device can run.

Light module: pydantic at import, torch only when a fingerprint is collected (so readers of manifests, such as
the rollout service, never load torch). Package versions are read from installed metadata, so asking for the
ultralytics version does not import ultralytics.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class Fingerprint(BaseModel):
    """Software and hardware that matter for loading and running a TorchScript detector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    torch: str
    torchvision: str | None
    ultralytics: str | None
    python: str
    os: str
    arch: str
    cuda_runtime: str | None
    cudnn: str | None
    gpu_name: str | None
    gpu_capability: str | None
    gpu_memory_bytes: int | None
    driver: str | None
    tf32_matmul: bool
    tf32_cudnn: bool
    cudnn_benchmark: bool
    deterministic: bool

    def summary(self) -> str:
        """One line for tables: torch, CUDA and GPU."""
        gpu = f"{self.gpu_name} (sm {self.gpu_capability})" if self.gpu_name else "no GPU"
        cuda = f"CUDA {self.cuda_runtime}" if self.cuda_runtime else "CPU build"
        return f"torch {self.torch}, {cuda}, {gpu}"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    """The NVIDIA driver version, from the kernel module or nvidia-smi; None when neither answers."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9.]+)", proc.read_text(errors="replace"))
        if match:
            return match.group(1)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _cudnn_text(version: int | None) -> str | None:
    """cuDNN's integer version as text: 92600 -> 9.26.0 (cuDNN 9 encoding), 8907 -> 8.9.7 (cuDNN 8)."""
    if version is None:
        return None
    if version >= 10000:
        return f"{version // 10000}.{version // 100 % 100}.{version % 100}"
    return f"{version // 1000}.{version // 100 % 10}.{version % 100}"


def cuda_usable() -> bool:
    """True when a CUDA device is present and a tiny kernel actually runs on it."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        (torch.ones(1, device="cuda") + 1).item()
    except RuntimeError:
        return False
    return True


def collect(device_index: int = 0) -> Fingerprint:
    """Read the fingerprint of this machine (GPU fields describe CUDA device ``device_index`` when usable)."""
    import torch  # here, not at the top: readers of manifests (the rollout service) never load torch

    gpu_name = gpu_capability = None
    gpu_memory: int | None = None
    driver = None
    if cuda_usable():
        props = torch.cuda.get_device_properties(device_index)
        gpu_name = props.name
        gpu_capability = f"{props.major}.{props.minor}"
        gpu_memory = int(props.total_memory)
        driver = _driver_version()
    cudnn_version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return Fingerprint(
        torch=torch.__version__,
        torchvision=_version("torchvision"),
        ultralytics=_version("ultralytics"),
        python=platform.python_version(),
        os=f"{platform.system()} {platform.release()}",
        arch=platform.machine(),
        cuda_runtime=torch.version.cuda,
        cudnn=_cudnn_text(cudnn_version),
        gpu_name=gpu_name,
        gpu_capability=gpu_capability,
        gpu_memory_bytes=gpu_memory,
        driver=driver,
        tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
        tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        deterministic=bool(torch.are_deterministic_algorithms_enabled()),
    )


def major_minor(version: str) -> tuple[int, int]:
    """``(2, 5)`` of ``'2.5.1+cu121'``; ``ValueError`` for text that does not start with major.minor."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_compatible(exported_on: Fingerprint, device: Fingerprint, variant: str) -> str | None:
    """Apply the compatibility rule; return None when the device may load ``variant``, else the reason why not.

    A device may load a bundle whose exporting torch major.minor is <= its own, and a ``cuda-*`` variant only
    with a working CUDA device (``device.gpu_name`` is only set when a kernel ran).
    """
    if major_minor(exported_on.torch) > major_minor(device.torch):
        return f"bundle exported with torch {exported_on.torch}, newer than this device's torch {device.torch}"
    if variant.startswith("cuda") and device.gpu_name is None:
        return f"variant {variant} needs a working CUDA device and this device has none"
    return None
