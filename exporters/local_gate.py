"""Re-running a bundle's gates on this machine against its golden data.

``yolo-ota gate`` and the edge agent both call ``gate_bundle``: verify every file, pick the variants this
machine can run (in every format), load each (``exporters.runners``), and judge it with the thresholds stored in
the manifest. Light module: no Ultralytics.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Literal

import torch

from exporters.bundle import Manifest, load_verified, safe_join
from exporters.errors import DeviceError, ExportArgumentError
from exporters.fingerprint import Fingerprint, collect, cuda_usable
from exporters.formats import FORMAT_PREFERENCE, FormatVariant, all_variants, why_incompatible
from exporters.gates import GateThresholds, ProgressCallback, VariantGates, run_gates
from exporters.golden import Golden
from exporters.runners import load_runner, onnxruntime_info

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def runnable_variants(variants: dict[str, FormatVariant], device: Literal["cpu", "cuda"]) -> list[FormatVariant]:
    """The variants for ``device``, likely fastest first: fp16 before fp32, then AOTInductor, TorchScript, ONNX."""
    chosen = [v for v in variants.values() if v.device == device]
    return sorted(chosen, key=lambda v: (v.dtype != "float16", FORMAT_PREFERENCE[v.format], v.name))


def gate_variant(
    bundle_dir: Path,
    variant: FormatVariant,
    golden: Golden,
    *,
    thresholds: GateThresholds,
    fingerprint: Fingerprint,
    latency_budget_ms: float | None,
    sweep_memory: bool = True,
    progress: ProgressCallback | None = None,
) -> VariantGates:
    """Load one variant onto its device and run every gate against the golden data."""
    device = "cuda:0" if variant.device == "cuda" else "cpu"
    baseline_bytes = 0
    if variant.device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        baseline_bytes = torch.cuda.memory_allocated(device)
    module = load_runner(safe_join(bundle_dir, variant.path), variant)
    return run_gates(
        module,
        golden,
        variant=variant.name,
        device=device,
        dtype=TORCH_DTYPES[variant.dtype],
        batch=variant.batch,
        thresholds=thresholds,
        latency_budget_ms=latency_budget_ms,
        measured_on=fingerprint.summary(),
        memory_baseline_bytes=baseline_bytes,
        sweep_memory=sweep_memory,
        progress=progress,
    )


def gate_bundle(
    bundle_dir: Path,
    *,
    device: Literal["cpu", "cuda", "auto"],
    variants: list[str] | None = None,
    latency_budget_ms: float | None = None,
    public_key: Path | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[Manifest, list[VariantGates]]:
    """Verify ``bundle_dir`` and gate its variants for ``device`` on this machine (``auto``: the CUDA variants
    when CUDA works and the bundle has some, else the CPU ones).

    The budget defaults to the one recorded at export. With ``public_key``, the bundle must carry a valid
    signature (``SignatureError`` otherwise). Raises ``BundleError`` for a missing or altered file,
    ``DeviceError`` when CUDA is asked for and does not work, ``ExportArgumentError`` for an unknown variant.
    """
    manifest = load_verified(bundle_dir)
    if public_key is not None:
        from exporters.signing import load_public_key, verify_bundle_signature

        verify_bundle_signature(bundle_dir, load_public_key(public_key))
    every = all_variants(bundle_dir, manifest)
    if device == "auto":
        device = "cuda" if cuda_usable() and runnable_variants(every, "cuda") else "cpu"
    if device == "cuda" and not cuda_usable():
        raise DeviceError("--device cuda asked for, but no working CUDA device is visible on this machine")
    fingerprint = collect()
    if variants:
        unknown = [name for name in variants if name not in every]
        if unknown:
            raise ExportArgumentError(f"bundle has no variant {', '.join(unknown)}; it has {', '.join(sorted(every))}")
        chosen = [every[name] for name in variants]
    else:
        chosen = runnable_variants(every, device)
    if not chosen:
        raise DeviceError(f"bundle has no {device} variant (it has {', '.join(sorted(every))})")
    ort_version, ort_providers = onnxruntime_info()
    for variant in chosen:
        reason = why_incompatible(
            variant, manifest.fingerprint, fingerprint, onnxruntime_version=ort_version, onnx_providers=ort_providers
        )
        if reason:
            raise DeviceError(reason)
    golden = Golden.load(safe_join(bundle_dir, manifest.golden.path))
    budget = latency_budget_ms if latency_budget_ms is not None else manifest.latency_budget_ms
    results = [
        gate_variant(
            bundle_dir,
            v,
            golden,
            thresholds=manifest.thresholds,
            fingerprint=fingerprint,
            latency_budget_ms=budget,
            progress=progress,
        )
        for v in chosen
    ]
    return manifest, results
